//! Data parallelism: with `--intra-node-data-parallel-size N`, each worker URL is N routing
//! targets (`URL@0` .. `URL@N-1`), each request carries its target's rank in
//! `X-data-parallel-rank`, explicit ranks are kept, and a server is health-checked once
//! for all its ranks. Real router binary, mock vLLM workers on loopback.

mod common;

use std::io::Write;

use common::*;
use serde_json::Value;

const COMPLETION: &str = r#"{"model":"mock-model","prompt":"x","max_tokens":2}"#;

fn worker_urls(r: &Router) -> Vec<String> {
    let v = exchange(r.addr, &get("/workers")).json();
    let mut urls: Vec<String> = v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["url"].as_str().unwrap().to_string())
        .collect();
    urls.sort();
    urls
}

/// The ranks the mock's generation requests carried, in arrival order.
fn ranks(m: &MockServer) -> Vec<String> {
    m.received()
        .iter()
        .filter(|r| r.path.starts_with("/v1/"))
        .map(|r| {
            r.header("x-data-parallel-rank")
                .unwrap_or("none")
                .to_string()
        })
        .collect()
}

#[test]
fn each_rank_is_a_target_and_gets_its_header() {
    let m = mocks(1, |_| {});
    let r = Router::start(&[
        "--worker-urls",
        &m[0].url(),
        "--intra-node-data-parallel-size",
        "2",
        "--policy",
        "round_robin",
    ]);
    let url = m[0].url();
    assert_eq!(
        worker_urls(&r),
        vec![format!("{url}@0"), format!("{url}@1")]
    );
    assert!(r.log_contains("fallback"), "{}", r.log());
    for _ in 0..4 {
        let resp = exchange(r.addr, &post_json("/v1/completions", COMPLETION));
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    let mut got = ranks(&m[0]);
    got.sort();
    assert_eq!(got, ["0", "0", "1", "1"]);
}

#[test]
fn explicit_global_ranks_are_kept() {
    let m = mocks(1, |_| {});
    let url = m[0].url();
    let r = Router::start(&[
        "--worker-urls",
        &format!("{url}@4"),
        &format!("{url}@5"),
        "--intra-node-data-parallel-size",
        "8",
        "--policy",
        "round_robin",
    ]);
    assert_eq!(
        worker_urls(&r),
        vec![format!("{url}@4"), format!("{url}@5")]
    );
    for _ in 0..2 {
        let resp = exchange(r.addr, &post_json("/v1/completions", COMPLETION));
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    let mut got = ranks(&m[0]);
    got.sort();
    assert_eq!(got, ["4", "5"]);
}

#[test]
fn the_servers_dp_size_wins_when_it_reports_one() {
    let up = RawUpstream::spawn(|mut s| {
        while let Some((head, _)) = read_request(&mut s) {
            let body = if head.starts_with("GET /get_server_info") {
                r#"{"dp_size":3}"#
            } else {
                r#"{"ok":true}"#
            };
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if s.write_all(resp.as_bytes()).is_err() {
                return;
            }
        }
    });
    let r = Router::start(&[
        "--worker-urls",
        &up.url,
        "--intra-node-data-parallel-size",
        "2",
    ]);
    let u = &up.url;
    assert_eq!(
        worker_urls(&r),
        vec![format!("{u}@0"), format!("{u}@1"), format!("{u}@2")]
    );
}

#[test]
fn a_server_is_health_checked_once_for_all_its_ranks() {
    let m = mocks(1, |_| {});
    let r = Router::start(&[
        "--worker-urls",
        &m[0].url(),
        "--intra-node-data-parallel-size",
        "4",
        "--health-check-interval-secs",
        "3600",
    ]);
    let v = exchange(r.addr, &get("/workers")).json();
    let workers = v["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 4);
    assert!(
        workers.iter().all(|w| w["is_healthy"] == Value::Bool(true)),
        "{v}"
    );
    let checks = m[0]
        .received()
        .iter()
        .filter(|r| r.path == "/health")
        .count();
    assert_eq!(checks, 1);
    let resp = exchange(r.addr, &post_json("/v1/completions", COMPLETION));
    assert_eq!(resp.status, 200, "{}", resp.text());
}

#[test]
fn pd_legs_carry_their_ranks() {
    let p = mocks(1, |_| {});
    let d = mocks(1, |_| {});
    let r = Router::start(&[
        "--vllm-pd-disaggregation",
        "--prefill",
        &format!("{}@1", p[0].url()),
        "--decode",
        &d[0].url(),
        "--intra-node-data-parallel-size",
        "2",
        "--policy",
        "round_robin",
    ]);
    for _ in 0..2 {
        let resp = exchange(r.addr, &post_json("/v1/completions", COMPLETION));
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    assert_eq!(ranks(&p[0]), ["1", "1"]);
    let mut got = ranks(&d[0]);
    got.sort();
    assert_eq!(got, ["0", "1"]);
}
