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

/// With io_uring, each shard reports how its ring runs completions: the cheapest mode the
/// kernel grants (deferred to the shard's park on kernels from 6.1), in the log and in
/// `ringrouter_shard_info`.
#[test]
fn each_io_uring_shard_reports_its_rings_completion_mode() {
    let m = mocks(1, |_| {});
    let r = Router::start(&[
        "--worker-urls",
        &m[0].url(),
        "--shards",
        "2",
        "--io-driver",
        "auto",
    ]);
    // The log comes on stderr, the listening line on stdout: wait for both shards' lines.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut log = r.log();
    while log.matches("shard started").count() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        log = r.log();
    }
    let started: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("shard started"))
        .collect();
    assert_eq!(started.len(), 2, "{log}");
    for line in started {
        let mode = line
            .split("uring_setup=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_else(|| panic!("no uring_setup in {line}"));
        if line.contains("driver=\"io_uring\"") {
            assert!(
                ["defer_taskrun", "coop_taskrun", "plain"].contains(&mode),
                "{line}"
            );
        } else {
            assert_eq!(mode, "none", "{line}");
        }
    }
    let metrics = exchange(
        r.metrics.unwrap(),
        b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
    )
    .text();
    assert!(
        metrics.contains("ringrouter_shard_info{shard=\"0\",driver=")
            && metrics.contains(",uring_setup=\""),
        "{metrics}"
    );
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
    assert!(r.log_contains("uring_setup=\"none\""), "{}", r.log());
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

/// A connection's first request is read without a buffer posted in advance
/// (shards/src/recv.rs: readiness, then a `recv()`), the next ones through the driver's
/// reads: on each driver, a first head that arrives in two pieces, a request after an idle
/// pause, and two requests in one write are all answered, in order.
fn a_kept_alive_connection_is_served_request_after_request(driver: &str) {
    use std::io::Write;
    let m = mocks(1, |_| {});
    let r = Router::start(&["--worker-urls", &m[0].url(), "--io-driver", driver]);
    let mut s = r.connect();
    let request = |n: u32| {
        post_json(
            "/v1/completions",
            &format!(r#"{{"model":"mock-model","prompt":"request {n}","max_tokens":2}}"#),
        )
    };
    // Bytes read past one response (the next one, when two come in one read) are kept.
    let mut pending = Vec::new();
    let mut answered = |s: &mut std::net::TcpStream| {
        let resp = read_response_from(s, &mut pending, false).expect("a response");
        assert_eq!(resp.status, 200, "{}", resp.text());
        resp.json()["choices"][0]["text"].as_str().is_some()
    };
    // The first head in two pieces: the first recv takes a part, the driver's reads the rest.
    let first = request(1);
    s.write_all(&first[..10]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    s.write_all(&first[10..]).unwrap();
    assert!(answered(&mut s));
    // Idle between requests.
    std::thread::sleep(std::time::Duration::from_millis(150));
    s.write_all(&request(2)).unwrap();
    assert!(answered(&mut s));
    let third = request(3);
    s.write_all(&third[..10]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    s.write_all(&third[10..]).unwrap();
    assert!(answered(&mut s));
    // Two requests in one write: the second waits in the buffer, not on the socket.
    let mut both = request(4);
    both.extend_from_slice(&request(5));
    s.write_all(&both).unwrap();
    assert!(answered(&mut s));
    assert!(answered(&mut s));
}

#[test]
fn epoll_serves_a_kept_alive_connection_request_after_request() {
    a_kept_alive_connection_is_served_request_after_request("epoll");
}

#[test]
fn the_default_driver_serves_a_kept_alive_connection_request_after_request() {
    a_kept_alive_connection_is_served_request_after_request("auto");
}
