//! The io driver: each shard reports the driver it got; under a seccomp filter that refuses
//! io_uring (Docker's default profile), `auto` falls back to epoll and serves, and `uring`
//! refuses to start with a clear message.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

/// Builds the nouring wrapper (../shared/tools/nouring.c, copied in tools/) once per test
/// process, into a temporary name renamed into place (tests run in parallel).
fn nouring() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/nouring/nouring.c");
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
            let out = dir.join("nouring");
            let tmp = dir.join(format!("nouring.{}", std::process::id()));
            let st = Command::new("cc")
                .args(["-O2", "-o"])
                .arg(&tmp)
                .arg(&src)
                .status()
                .expect("cc");
            assert!(st.success(), "building nouring");
            std::fs::rename(&tmp, &out).unwrap();
            out
        })
        .clone()
}

#[test]
fn auto_falls_back_to_epoll_without_io_uring_and_serves() {
    let m = mocks(1, |_| {});
    let r = Router::start_with(
        Some(nouring().to_str().unwrap()),
        &[
            "--worker-urls",
            &m[0].url(),
            "--shards",
            "2",
            "--io-driver",
            "auto",
        ],
    )
    .expect("starts under nouring");
    assert!(r.log_contains("driver=\"epoll\""), "{}", r.log());
    let resp = exchange(
        r.addr,
        &post_json(
            "/v1/completions",
            r#"{"model":"mock-model","prompt":"x","max_tokens":4,"stream":true}"#,
        ),
    );
    assert_eq!(resp.status, 200);
    assert!(resp.text().ends_with("data: [DONE]\n\n"));
}

#[test]
fn uring_refuses_to_start_without_io_uring() {
    let err = Router::start_with(Some(nouring().to_str().unwrap()), &["--io-driver", "uring"])
        .err()
        .expect("must not start");
    assert!(
        err.contains("--io-driver uring") && err.contains("io_uring"),
        "{err}"
    );
}

#[test]
fn epoll_can_be_chosen() {
    let m = mocks(1, |_| {});
    let r = Router::start(&["--worker-urls", &m[0].url(), "--io-driver", "epoll"]);
    assert!(r.log_contains("driver=\"epoll\""), "{}", r.log());
    let resp = exchange(
        r.addr,
        &post_json(
            "/v1/chat/completions",
            r#"{"model":"mock-model","messages":[{"role":"user","content":"x"}],"stream":true}"#,
        ),
    );
    assert_eq!(resp.status, 200);
    assert!(resp.text().ends_with("data: [DONE]\n\n"));
}
