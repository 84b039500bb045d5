//! The Dockerfile, without a Docker engine: tools/docker-build-check.sh runs the build the
//! Dockerfile's builder stage runs (test.sh runs it in full, a release build of minutes;
//! here only its `--print` mode), its flags turn on the CPU features sonic-rs needs, the
//! build context holds every workspace member, and the final image runs ringrouter as a
//! non-root user.

use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn dockerfile() -> String {
    std::fs::read_to_string(root().join("Dockerfile")).unwrap()
}

/// `(RUSTFLAGS, command)` as tools/docker-build-check.sh reads them from the Dockerfile.
fn script_print() -> (String, String) {
    let out = Command::new(root().join("tools/docker-build-check.sh"))
        .arg("--print")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |k: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {stdout}"))
            .to_string()
    };
    (field("RUSTFLAGS="), field("command="))
}

#[test]
fn the_script_runs_the_dockerfiles_cargo_build() {
    let (rustflags, command) = script_print();
    assert_eq!(command, "cargo build --release --locked --bin ringrouter");
    let d = dockerfile();
    assert!(
        d.contains(&format!("ARG RUSTFLAGS=\"{rustflags}\"")),
        "{rustflags}"
    );
    assert!(
        d.contains("ENV RUSTFLAGS=${RUSTFLAGS}"),
        "the ARG must reach cargo"
    );
    let builds = d
        .lines()
        .filter(|l| l.trim_start().starts_with("cargo build"))
        .count();
    assert_eq!(builds, 1, "one build command, the one the script runs");
}

#[cfg(target_arch = "x86_64")]
#[test]
fn the_build_flags_turn_on_what_sonic_rs_needs_for_simd() {
    let (rustflags, _) = script_print();
    let out = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .args(rustflags.split_whitespace())
        .args(["--print", "cfg"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = String::from_utf8(out.stdout).unwrap();
    for f in ["avx2", "pclmulqdq", "sse4.2"] {
        assert!(
            cfg.contains(&format!("target_feature=\"{f}\"")),
            "{f} off with {rustflags}"
        );
    }
    // Not tied to the build machine.
    assert!(!rustflags.contains("native"), "{rustflags}");
}

#[test]
fn the_build_context_holds_every_workspace_member() {
    let d = dockerfile();
    let copied: Vec<&str> = d
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .flat_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w[..w.len() - 1].to_vec()
        })
        .collect();
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let members_line = manifest.lines().find(|l| l.starts_with("members")).unwrap();
    let members: Vec<&str> = members_line.split('"').skip(1).step_by(2).collect();
    assert!(members.contains(&"shards"), "{members:?}");
    // The root package's own files, and what its manifest names (benches).
    let needed =
        members
            .iter()
            .copied()
            .chain(["Cargo.toml", "Cargo.lock", "src", "benches", ".cargo"]);
    let ignored = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    let ignored: Vec<&str> = ignored
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for n in needed {
        assert!(
            copied
                .iter()
                .any(|c| n == *c || n.starts_with(&format!("{c}/"))),
            "{n} is not copied into the builder: {copied:?}"
        );
        assert!(
            !ignored
                .iter()
                .any(|i| n == *i || n.starts_with(&format!("{i}/"))),
            "{n} is excluded by .dockerignore"
        );
    }
    assert!(ignored.contains(&"**/target"), "{ignored:?}");
}

#[test]
fn the_image_runs_ringrouter_as_a_non_root_user() {
    let d = dockerfile();
    let froms: Vec<&str> = d.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(
        froms[0].contains("rust:")
            && froms[0].contains("-bookworm")
            && froms[0].ends_with("AS builder"),
        "{}",
        froms[0]
    );
    assert!(
        froms[1].contains("distroless/cc-debian12") || froms[1].contains("debian:bookworm-slim"),
        "{}",
        froms[1]
    );
    let final_stage = &d[d.find(froms[1]).unwrap()..];
    let user = final_stage
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER in the final stage");
    let uid = user.split(':').next().unwrap();
    assert!(uid != "0" && uid != "root", "{user}");
    assert!(final_stage.contains("ENTRYPOINT [\"ringrouter\"]"));
    let expose = final_stage
        .lines()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .expect("EXPOSE");
    let ports: Vec<&str> = expose.split_whitespace().collect();
    assert!(
        ports.contains(&"30000") && ports.contains(&"29000"),
        "{expose}"
    );
}
