//! deploy/: every YAML document parses; every ringrouter container's flags are flags the
//! binary accepts (the binary itself checks them, values included, with `--check-config`);
//! router pods are Guaranteed QoS with whole CPUs, use the io_uring seccomp profile and
//! probe /readiness and /liveness; the P/D example's selectors match its vLLM pods. The
//! seccomp profile parses, allows io_uring, and is enough for the router: the router runs
//! under it (a BPF filter built from the JSON, installed before exec as a container runtime
//! does) with router.yaml's own flags, finds a worker pod on the stub API server, routes
//! to it on io_uring, and drains on SIGTERM.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde::Deserialize;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ringrouter");

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Every document of every deploy/*.yaml, as JSON values, with the file each came from.
fn documents() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "deploy/*.yaml: {files:?}");
    let mut docs = Vec::new();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&f).unwrap();
        for d in serde_norway::Deserializer::from_str(&text) {
            let v = Value::deserialize(d).unwrap_or_else(|e| panic!("{name}: {e}"));
            if v.is_null() {
                continue; // an empty document (a leading `---`)
            }
            docs.push((name.clone(), v));
        }
    }
    docs
}

/// Pod templates: (file, kind/name, pod spec, pod labels).
fn pod_specs(docs: &[(String, Value)]) -> Vec<(String, String, Value, Value)> {
    docs.iter()
        .filter_map(|(f, d)| {
            let kind = d["kind"].as_str()?;
            let (spec, labels) = match kind {
                "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => (
                    d["spec"]["template"]["spec"].clone(),
                    d["spec"]["template"]["metadata"]["labels"].clone(),
                ),
                "Pod" => (d["spec"].clone(), d["metadata"]["labels"].clone()),
                _ => return None,
            };
            Some((
                f.clone(),
                format!("{kind}/{}", d["metadata"]["name"].as_str().unwrap_or("?")),
                spec,
                labels,
            ))
        })
        .collect()
}

fn is_ringrouter(c: &Value) -> bool {
    let image = c["image"].as_str().unwrap_or("");
    let command0 = c["command"][0].as_str().unwrap_or("");
    image
        .split('/')
        .next_back()
        .unwrap_or("")
        .starts_with("ringrouter")
        || command0.ends_with("ringrouter")
}

/// The container's args with `$(VAR)` expanded as the kubelet does, for variables of its
/// `env` (a value from the downward API becomes a stand-in).
fn expanded_args(c: &Value) -> Vec<String> {
    let mut vars = BTreeMap::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap().to_string();
        let value = match (&e["value"], &e["valueFrom"]["fieldRef"]["fieldPath"]) {
            (Value::String(v), _) => v.clone(),
            (_, Value::String(p)) if p == "metadata.namespace" => "serving".into(),
            (_, Value::String(p)) if p == "status.podIP" => "10.0.0.1".into(),
            _ => "stand-in".into(),
        };
        vars.insert(name, value);
    }
    c["args"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|a| {
            let mut s = a.as_str().expect("args are strings").to_string();
            for (k, v) in &vars {
                s = s.replace(&format!("$({k})"), v);
            }
            s
        })
        .collect()
}

/// The long flags `ringrouter --help` lists.
fn help_flags() -> BTreeSet<String> {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_string)
        .collect()
}

/// The values that follow `flag` in `args`, up to the next flag.
fn values_of<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
    let Some(i) = args.iter().position(|a| a == flag) else {
        return Vec::new();
    };
    args[i + 1..]
        .iter()
        .take_while(|a| !a.starts_with("--"))
        .map(String::as_str)
        .collect()
}

/// `args` without the flags in `drop` and their values.
fn without(args: &[String], drop: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut skipping = false;
    for a in args {
        if a.starts_with("--") {
            skipping = drop.contains(&a.as_str());
        }
        if !skipping {
            out.push(a.clone());
        }
    }
    out
}

/// The router containers of deploy/: (file, workload, pod spec, container, expanded args).
fn routers() -> Vec<(String, String, Value, Value, Vec<String>)> {
    let docs = documents();
    let mut out = Vec::new();
    for (f, name, spec, _) in pod_specs(&docs) {
        for c in spec["containers"].as_array().unwrap() {
            if is_ringrouter(c) {
                out.push((
                    f.clone(),
                    name.clone(),
                    spec.clone(),
                    c.clone(),
                    expanded_args(c),
                ));
            }
        }
    }
    out
}

#[test]
fn every_document_parses_and_names_itself() {
    let docs = documents();
    let kinds: BTreeSet<&str> = docs
        .iter()
        .filter_map(|(_, d)| d["kind"].as_str())
        .collect();
    for k in [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
    ] {
        assert!(kinds.contains(k), "no {k} in deploy/: {kinds:?}");
    }
    for (f, d) in &docs {
        assert!(d["apiVersion"].is_string(), "{f}: {d}");
        assert!(d["kind"].is_string(), "{f}: {d}");
        assert!(d["metadata"]["name"].is_string(), "{f}: {d}");
    }
    let files: BTreeSet<&str> = docs.iter().map(|(f, _)| f.as_str()).collect();
    assert!(
        files.contains("router.yaml") && files.contains("pd-8p8d.yaml"),
        "{files:?}"
    );
}

#[test]
fn every_ringrouter_flag_in_deploy_is_one_the_binary_accepts() {
    let known = help_flags();
    assert!(
        known.contains("--worker-urls") && known.contains("--log-json"),
        "{known:?}"
    );
    let routers = routers();
    let files: BTreeSet<&str> = routers.iter().map(|r| r.0.as_str()).collect();
    assert!(
        files.contains("router.yaml") && files.contains("pd-8p8d.yaml"),
        "{files:?}"
    );
    for (f, name, _, _, args) in &routers {
        for a in args.iter().filter(|a| a.starts_with("--")) {
            let flag = a.split('=').next().unwrap();
            assert!(
                known.contains(flag),
                "{f} {name}: {flag} is not a ringrouter flag"
            );
        }
        // The binary parses and checks them all, values included.
        let out = Command::new(BIN)
            .args(args)
            .arg("--check-config")
            .env_remove("RUST_LOG")
            .env_remove("KUBECONFIG")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{f} {name}: ringrouter {args:?} refused: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "ringrouter: flags ok\n"
        );
    }
}

#[test]
fn check_config_refuses_what_a_start_would() {
    for bad in [
        &["--policy", "fastest"][..],
        &["--service-discovery"][..],
        &[
            "--vllm-pd-disaggregation",
            "--service-discovery",
            "--selector",
            "app=vllm",
        ][..],
        &["--service-discovery-namespace", "$(POD_NAMESPACE)"][..],
    ] {
        let out = Command::new(BIN)
            .args(bad)
            .arg("--check-config")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad:?} accepted");
        assert!(out.stdout.is_empty(), "{bad:?}");
    }
}

/// A Kubernetes CPU quantity as a whole number of CPUs, if it is one.
fn whole_cpus(q: &Value) -> Option<u64> {
    match q {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse::<u64>().ok(),
        _ => None,
    }
}

#[test]
fn router_pods_are_guaranteed_pinned_probed_and_under_the_io_uring_profile() {
    let docs = documents();
    for (f, name, spec, c, args) in routers() {
        // Guaranteed QoS: every container of the pod has requests == limits for cpu and
        // memory; whole CPUs for the static CPU manager to give exclusive cores.
        for any in spec["containers"].as_array().unwrap() {
            let r = &any["resources"];
            for res in ["cpu", "memory"] {
                assert!(
                    r["requests"][res].is_string() || r["requests"][res].is_number(),
                    "{f} {name}: no {res} request"
                );
                assert_eq!(r["requests"][res], r["limits"][res], "{f} {name}: {res}");
            }
            let cpus = whole_cpus(&r["limits"]["cpu"]);
            assert!(
                cpus.is_some_and(|n| n >= 1),
                "{f} {name}: cpu {}",
                r["limits"]["cpu"]
            );
        }
        // The seccomp profile that allows io_uring, at pod or container level.
        let profile = if c["securityContext"]["seccompProfile"].is_object() {
            &c["securityContext"]["seccompProfile"]
        } else {
            &spec["securityContext"]["seccompProfile"]
        };
        assert_eq!(profile["type"], "Localhost", "{f} {name}");
        assert!(
            profile["localhostProfile"]
                .as_str()
                .is_some_and(|p| p.ends_with("seccomp-io-uring.json")),
            "{f} {name}: {profile}"
        );
        // Ports: the flags' and the container's agree; probes on the request port.
        let port_of = |n: &str| {
            c["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == n)
                .unwrap_or_else(|| panic!("{f} {name}: no port named {n}"))["containerPort"]
                .as_u64()
                .unwrap()
        };
        assert_eq!(
            values_of(&args, "--port"),
            [port_of("http").to_string()],
            "{f}"
        );
        assert_eq!(values_of(&args, "--host"), ["0.0.0.0"], "{f}");
        assert_eq!(
            values_of(&args, "--prometheus-port"),
            [port_of("metrics").to_string()],
            "{f}"
        );
        for (probe, path) in [
            ("readinessProbe", "/readiness"),
            ("livenessProbe", "/liveness"),
        ] {
            let g = &c[probe]["httpGet"];
            assert_eq!(g["path"], path, "{f} {name} {probe}");
            assert!(
                g["port"] == "http" || g["port"] == port_of("http"),
                "{f} {probe}"
            );
        }
        // RBAC: the pod's service account may get, list and watch pods, and the router
        // watches only the namespace its Role covers.
        assert!(args.contains(&"--service-discovery".to_string()), "{f}");
        assert!(
            !values_of(&args, "--service-discovery-namespace").is_empty(),
            "{f}"
        );
        let sa = spec["serviceAccountName"]
            .as_str()
            .expect("serviceAccountName");
        let of_file = |kind: &str| of_kind(&docs, &f, kind).into_iter();
        assert!(
            of_file("ServiceAccount").any(|d| d["metadata"]["name"] == sa),
            "{f}: {sa}"
        );
        let binding = of_file("RoleBinding")
            .find(|b| {
                b["subjects"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["kind"] == "ServiceAccount" && s["name"] == sa)
            })
            .unwrap_or_else(|| panic!("{f}: no RoleBinding for {sa}"));
        let role = of_file("Role")
            .find(|r| r["metadata"]["name"] == binding["roleRef"]["name"])
            .unwrap_or_else(|| panic!("{f}: no Role {}", binding["roleRef"]["name"]));
        let verbs: BTreeSet<&str> = role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| {
                r["resources"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x == "pods")
            })
            .flat_map(|r| {
                r["verbs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap())
            })
            .collect();
        for v in ["get", "list", "watch"] {
            assert!(verbs.contains(v), "{f}: Role lacks {v} on pods: {verbs:?}");
        }
        // A Service with the request and the metrics port.
        let labels = &docs
            .iter()
            .find(|(df, d)| {
                *df == f
                    && d["kind"] == "Deployment"
                    && format!("Deployment/{}", d["metadata"]["name"].as_str().unwrap()) == name
            })
            .unwrap()
            .1["spec"]["template"]["metadata"]["labels"];
        let svc = of_file("Service")
            .find(|s| {
                s["spec"]["selector"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .all(|(k, v)| &labels[k] == v)
            })
            .unwrap_or_else(|| panic!("{f}: no Service selects {name}"));
        let ports: BTreeSet<u64> = svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["port"].as_u64().unwrap())
            .collect();
        assert_eq!(ports, BTreeSet::from([30000, 29000]), "{f}");
    }
}

/// The documents of `file` of `kind`.
fn of_kind<'a>(docs: &'a [(String, Value)], file: &str, kind: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|(f, d)| f == file && d["kind"] == kind)
        .map(|(_, d)| d)
        .collect()
}

/// Whether pod `labels` satisfy every `key=value` of `selector`.
fn matches(labels: &Value, selector: &[&str]) -> bool {
    !selector.is_empty()
        && selector.iter().all(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            labels[k] == v
        })
}

#[test]
fn the_pd_example_is_8_prefill_and_8_decode_nixl_pods_its_router_selects() {
    let docs: Vec<(String, Value)> = documents()
        .into_iter()
        .filter(|(f, _)| f == "pd-8p8d.yaml")
        .collect();
    let routers: Vec<_> = routers()
        .into_iter()
        .filter(|r| r.0 == "pd-8p8d.yaml")
        .collect();
    assert_eq!(routers.len(), 1);
    let args = &routers[0].4;
    assert!(args.contains(&"--vllm-pd-disaggregation".to_string()));
    assert!(args.contains(&"--service-discovery".to_string()));
    let prefill_sel = values_of(args, "--prefill-selector");
    let decode_sel = values_of(args, "--decode-selector");
    let worker_port = values_of(args, "--service-discovery-port");
    let mut prefill = 0;
    let mut decode = 0;
    for (_, d) in docs
        .iter()
        .filter(|(_, d)| d["kind"] == "Deployment" || d["kind"] == "StatefulSet")
    {
        let spec = &d["spec"]["template"]["spec"];
        let c = &spec["containers"][0];
        if is_ringrouter(c) {
            continue;
        }
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        let replicas = d["spec"]["replicas"].as_u64().unwrap();
        let (p, dd) = (matches(labels, &prefill_sel), matches(labels, &decode_sel));
        // A pod matching both would be taken as a prefill worker: none may.
        assert!(
            p != dd,
            "{}: prefill {p}, decode {dd}",
            d["metadata"]["name"]
        );
        if p {
            prefill += replicas;
        } else {
            decode += replicas;
        }
        // vLLM with the NIXL connector, serving where the router looks.
        let vargs = expanded_args(c);
        let kv: Value = serde_json::from_str(values_of(&vargs, "--kv-transfer-config")[0]).unwrap();
        assert_eq!(kv["kv_connector"], "NixlConnector");
        assert_eq!(kv["kv_role"], "kv_both");
        assert_eq!(values_of(&vargs, "--port"), worker_port);
        assert_eq!(
            c["ports"][0]["containerPort"].as_u64().unwrap().to_string(),
            worker_port[0]
        );
    }
    assert_eq!((prefill, decode), (8, 8));
}

// ---- the seccomp profile ----

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Profile {
    default_action: String,
    default_errno_ret: Option<u32>,
    syscalls: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rule {
    names: Vec<String>,
    action: String,
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Vec<Arg>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Arg {
    index: u32,
    value: u64,
    value_two: u64,
    op: String,
}

fn profile() -> Profile {
    let text = std::fs::read_to_string(deploy_dir().join("seccomp-io-uring.json")).unwrap();
    serde_json::from_str(&text).expect("the seccomp profile parses")
}

const IO_URING: [&str; 3] = ["io_uring_setup", "io_uring_enter", "io_uring_register"];

#[test]
fn the_seccomp_profile_refuses_by_default_and_allows_io_uring() {
    let p = profile();
    assert_eq!(p.default_action, "SCMP_ACT_ERRNO");
    for name in IO_URING {
        let rules: Vec<&Rule> = p
            .syscalls
            .iter()
            .filter(|r| r.names.iter().any(|n| n == name))
            .collect();
        assert_eq!(rules.len(), 1, "{name}");
        assert_eq!(rules[0].action, "SCMP_ACT_ALLOW", "{name}");
        assert!(
            rules[0].args.is_empty(),
            "{name} allowed only conditionally"
        );
    }
    // Nothing that leaves the container's confinement.
    for name in [
        "unshare",
        "setns",
        "mount",
        "ptrace",
        "bpf",
        "kexec_load",
        "init_module",
        "reboot",
    ] {
        assert!(
            !p.syscalls
                .iter()
                .any(|r| r.action == "SCMP_ACT_ALLOW" && r.names.iter().any(|n| n == name)),
            "{name} allowed"
        );
    }
}

/// x86-64 syscall numbers by name, from the kernel headers (None where they are missing).
fn syscall_numbers() -> Option<BTreeMap<String, u32>> {
    let text = [
        "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
        "/usr/include/asm/unistd_64.h",
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())?;
    Some(
        text.lines()
            .filter_map(|l| {
                let mut w = l.strip_prefix("#define __NR_")?.split_whitespace();
                Some((w.next()?.to_string(), w.next()?.parse().ok()?))
            })
            .collect(),
    )
}

/// A classic-BPF seccomp filter with the profile's meaning on x86-64 (other ABIs get the
/// default action), without the syscalls in `leave_out`.
#[cfg(target_arch = "x86_64")]
fn bpf(p: &Profile, numbers: &BTreeMap<String, u32>, leave_out: &[&str]) -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const AND_K: u16 = 0x54; // BPF_ALU | BPF_AND | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const ALLOW: u32 = 0x7fff_0000;
    const ERRNO: u32 = 0x0005_0000;
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    let stmt = |code, k| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code, k, jt, jf| libc::sock_filter { code, jt, jf, k };
    let action = |a: &str, errno: Option<u32>| match a {
        "SCMP_ACT_ALLOW" => ALLOW,
        "SCMP_ACT_ERRNO" => ERRNO | (errno.unwrap_or(1) & 0xffff),
        other => panic!("action {other} not handled by this test"),
    };
    let default = action(&p.default_action, p.default_errno_ret);
    let mut f = vec![
        stmt(LD_W_ABS, 4), // arch
        jump(JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(RET_K, default),
        stmt(LD_W_ABS, 0), // nr
    ];
    for rule in &p.syscalls {
        let act = action(&rule.action, rule.errno_ret);
        let mut body = Vec::new();
        for a in &rule.args {
            assert_eq!(
                a.op, "SCMP_CMP_MASKED_EQ",
                "only masked-eq conditions are handled"
            );
            // (arg & value) == valueTwo, high word then low word; a mismatch: the default.
            let off = 16 + 8 * a.index;
            for (half, shift) in [(off + 4, 32), (off, 0)] {
                body.push(stmt(LD_W_ABS, half));
                body.push(stmt(AND_K, (a.value >> shift) as u32));
                body.push(jump(JEQ_K, (a.value_two >> shift) as u32, 0, 0)); // jf patched
            }
        }
        body.push(stmt(RET_K, act));
        let n = body.len();
        for (i, ins) in body.iter_mut().enumerate() {
            if ins.code == JEQ_K {
                ins.jf = (n - 1 - i) as u8; // to the RET default after the body
            }
        }
        if !rule.args.is_empty() {
            body.push(stmt(RET_K, default));
        }
        for name in &rule.names {
            if leave_out.contains(&name.as_str()) {
                continue;
            }
            let nr = *numbers
                .get(name)
                .unwrap_or_else(|| panic!("{name}: not a syscall of this kernel's headers"));
            f.push(jump(JEQ_K, nr, 0, body.len() as u8));
            f.extend(body.iter().copied());
        }
    }
    f.push(stmt(RET_K, default));
    f
}

/// Spawns the router under `filter` (installed right before exec, with no_new_privs, as
/// runc does) with `args`; waits for its listening line.
#[cfg(target_arch = "x86_64")]
fn router_under(filter: Vec<libc::sock_filter>, env: &[(&str, &str)], args: &[String]) -> Router {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only prctl, async-signal-safe, between fork and exec; the filter was built
    // before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    2, /* SECCOMP_MODE_FILTER */
                    &prog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn the router under the profile");
    Router::attach(child, Duration::from_secs(30))
        .unwrap_or_else(|log| panic!("the router did not start under the profile: {log}"))
}

/// Whether this kernel lets this process set up an io_uring at all.
#[cfg(target_arch = "x86_64")]
fn io_uring_available() -> bool {
    // struct io_uring_params
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup(1, &params) writes only into params; the fd is closed.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1, params.as_mut_ptr()) };
    if fd >= 0 {
        unsafe { libc::close(fd as i32) };
    }
    fd >= 0
}

/// The io drivers the router's shards logged ("shard started" JSON lines).
fn drivers(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "shard started")
        .map(|v| v["driver"].as_str().unwrap_or("").to_string())
        .collect()
}

#[cfg(target_arch = "x86_64")]
#[test]
fn the_router_runs_under_the_seccomp_profile_with_router_yamls_flags() {
    use stub_apiserver::{pod, Cluster};
    let Some(numbers) = syscall_numbers() else {
        eprintln!("skipped: no kernel headers (asm/unistd_64.h) to number the syscalls");
        return;
    };
    let p = profile();
    // One vLLM pod: a mock worker at "its IP" 127.0.0.2, on the port discovery is told.
    let worker = MockServer::spawn_on(SocketAddr::from(([127, 0, 0, 2], 0)), {
        let mut c = MockConfig::named("pod-a");
        c.model = "mock-model".into();
        c
    })
    .unwrap();
    let cluster = Cluster::new();
    cluster.put(pod("a", "127.0.0.2").namespace("serving").json());
    let api = cluster.serve_in_thread().unwrap();
    let kubeconfig = std::env::temp_dir().join(format!(
        "ringrouter-seccomp-kubeconfig-{}",
        std::process::id()
    ));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: stub
  cluster:
    server: {}
users:
- name: nobody
  user: {{}}
contexts:
- name: stub
  context: {{cluster: stub, user: nobody}}
current-context: stub
",
            api.url()
        ),
    )
    .unwrap();
    let log_dir =
        std::env::temp_dir().join(format!("ringrouter-seccomp-logs-{}", std::process::id()));

    // router.yaml's router, on loopback, with the stand-in namespace "serving".
    let (_, _, _, _, yaml_args) = routers()
        .into_iter()
        .find(|r| r.0 == "router.yaml")
        .unwrap();
    let mut args = without(
        &yaml_args,
        &[
            "--host",
            "--port",
            "--service-discovery-port",
            "--prometheus-host",
            "--prometheus-port",
        ],
    );
    args.extend(
        [
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-pin-cores",
            "--shards",
            "2",
            "--service-discovery-port",
            &worker.addr().port().to_string(),
            "--health-check-interval-secs",
            "0",
            "--log-dir",
            log_dir.to_str().unwrap(),
        ]
        .map(String::from),
    );
    args.extend(["--prometheus-host", "127.0.0.1", "--prometheus-port", "0"].map(String::from));
    assert!(
        args.contains(&"--log-json".to_string()),
        "router.yaml logs JSON: {args:?}"
    );
    let env = [("KUBECONFIG", kubeconfig.to_str().unwrap())];

    let mut r = router_under(bpf(&p, &numbers, &[]), &env, &args);
    if io_uring_available() {
        assert_eq!(drivers(&r.log()), ["io_uring", "io_uring"], "{}", r.log());
    }
    // Discovery (the Kubernetes client on the control plane) finds the pod; requests
    // reach it, plain and streamed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let resp = exchange(r.addr, &get("/list_workers"));
        if resp.json()["urls"].as_array().is_some_and(|u| u.len() == 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no worker discovered: {}",
            r.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for stream in [false, true] {
        let body =
            format!(r#"{{"model":"mock-model","prompt":"hi","max_tokens":4,"stream":{stream}}}"#);
        let resp = exchange(r.addr, &post_json("/v1/completions", &body));
        assert_eq!(resp.status, 200, "{}\n{}", resp.text(), r.log());
        assert_eq!(resp.header("x-mock-worker"), Some("pod-a"));
    }
    assert_eq!(exchange(r.addr, &get("/readiness")).status, 200);
    // The metrics endpoint works under the profile too.
    let text = r.scrape();
    assert!(text.contains("vllm_router_requests_total"), "{text}");
    assert_eq!(exchange(r.addr, &get("/liveness")).status, 200);
    // SIGTERM: drains and exits 0.
    unsafe { libc::kill(r.child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = r.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no exit after SIGTERM: {}",
            r.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}: {}", r.log());
    let mut file = String::new();
    std::fs::File::open(log_dir.join("ringrouter.log"))
        .unwrap()
        .read_to_string(&mut file)
        .unwrap();
    assert!(file.contains("drained; exiting"), "{file}");
    drop(r);

    // The same profile without the io_uring syscalls is Docker's default as far as the
    // router can tell: it runs on epoll. (So the filter above was in force.)
    if io_uring_available() {
        let r = router_under(bpf(&p, &numbers, &IO_URING), &env, &args);
        assert_eq!(drivers(&r.log()), ["epoll", "epoll"], "{}", r.log());
        let resp = exchange(
            r.addr,
            &post_json(
                "/v1/completions",
                r#"{"model":"mock-model","prompt":"x","max_tokens":2}"#,
            ),
        );
        assert!(resp.status == 200 || resp.status == 503, "{}", resp.status);
    }
    let _ = std::fs::remove_file(&kubeconfig);
    let _ = std::fs::remove_dir_all(&log_dir);
}
