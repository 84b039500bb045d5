//! Data parallelism: with `--intra-node-data-parallel-size N`, each worker URL is N routing
//! targets (`URL@0` .. `URL@N-1`), each request carries its target's rank in
//! `X-data-parallel-rank`, explicit ranks are kept, and a server is health-checked once
//! for all its ranks. Workers added at run time (the admin API) are expanded the same way,
//! and removing a rank-less URL removes all its ranks. Real router binary, mock vLLM
//! workers on loopback.

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

fn list_workers(r: &Router) -> Value {
    let resp = call(r, "GET", "/list_workers", "");
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.json()["urls"].clone()
}

fn completions(r: &Router, n: usize) -> Vec<u16> {
    (0..n)
        .map(|_| exchange(r.addr, &post_json("/v1/completions", COMPLETION)).status)
        .collect()
}

fn encoded(url: &str) -> String {
    url.replace(':', "%3A")
        .replace('/', "%2F")
        .replace('@', "%40")
}

#[test]
fn a_worker_added_at_run_time_is_its_ranks_and_leaves_with_them() {
    let m = mocks(1, |_| {});
    let u = m[0].url();
    let r = Router::start(&[
        "--intra-node-data-parallel-size",
        "4",
        "--policy",
        "round_robin",
        "--shards",
        "1",
    ]);
    let resp = call(&r, "POST", &format!("/add_worker?url={u}"), "");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), format!("Successfully added worker: {u}"));
    let ranks_of = |u: &str| -> Vec<String> { (0..4).map(|i| format!("{u}@{i}")).collect() };
    assert_eq!(list_workers(&r), serde_json::json!(ranks_of(&u)));
    // Every rank is a target: round robin over four sends each one request.
    assert_eq!(completions(&r, 4), [200; 4]);
    let mut got = ranks(&m[0]);
    got.sort();
    assert_eq!(got, ["0", "1", "2", "3"]);

    // The server, or any rank of it, is there already.
    let resp = call(&r, "POST", &format!("/add_worker?url={u}"), "");
    assert_eq!(resp.status, 400);
    assert!(resp.error_message().contains("already exists"));
    let resp = call(&r, "POST", &format!("/add_worker?url={u}@2"), "");
    assert_eq!(resp.status, 400);
    assert!(resp.error_message().contains("already exists"));

    // One rank out: the others still serve.
    let resp = call(&r, "POST", &format!("/remove_worker?url={u}@2"), "");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), format!("Successfully removed worker: {u}@2"));
    let mut rest = ranks_of(&u);
    rest.remove(2);
    assert_eq!(list_workers(&r), serde_json::json!(rest));
    assert_eq!(completions(&r, 3), [200; 3]);
    let mut got = ranks(&m[0])[4..].to_vec();
    got.sort();
    assert_eq!(got, ["0", "1", "3"]);

    // The rank-less URL takes all its ranks with it.
    let resp = call(&r, "POST", &format!("/remove_worker?url={u}"), "");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), format!("Successfully removed worker: {u}"));
    assert_eq!(list_workers(&r), serde_json::json!([]));
    assert_eq!(completions(&r, 2), [503; 2]);
    assert_eq!(ranks(&m[0]).len(), 7, "nothing reached the removed worker");
    let resp = call(&r, "POST", &format!("/remove_worker?url={u}"), "");
    assert_eq!(resp.status, 404);
    assert!(resp.error_message().contains("not found"));

    // An explicit rank is added and removed as given.
    let resp = call(&r, "POST", &format!("/add_worker?url={u}@5"), "");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), format!("Successfully added worker: {u}@5"));
    assert_eq!(list_workers(&r), serde_json::json!([format!("{u}@5")]));
    assert_eq!(completions(&r, 2), [200; 2]);
    assert_eq!(ranks(&m[0])[7..], ["5", "5"]);
    let resp = call(&r, "POST", &format!("/remove_worker?url={u}@5"), "");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(list_workers(&r), serde_json::json!([]));
}

#[test]
fn requests_go_elsewhere_once_an_added_server_is_removed() {
    let m = mocks(2, |_| {});
    let (u0, u1) = (m[0].url(), m[1].url());
    let r = Router::start(&[
        "--worker-urls",
        &u0,
        "--intra-node-data-parallel-size",
        "2",
        "--policy",
        "round_robin",
        "--shards",
        "1",
    ]);
    let resp = call(&r, "POST", "/workers", &format!(r#"{{"url":"{u1}"}}"#));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["success"], true);
    let mut expected = [
        format!("{u0}@0"),
        format!("{u0}@1"),
        format!("{u1}@0"),
        format!("{u1}@1"),
    ];
    expected.sort();
    assert_eq!(worker_urls(&r), expected);
    assert_eq!(completions(&r, 4), [200; 4]);
    let mut got = ranks(&m[1]);
    got.sort();
    assert_eq!(got, ["0", "1"]);

    let resp = call(&r, "DELETE", &format!("/workers/{}", encoded(&u1)), "");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["success"], true);
    assert_eq!(worker_urls(&r), [format!("{u0}@0"), format!("{u0}@1")]);
    assert_eq!(completions(&r, 4), [200; 4]);
    assert_eq!(
        ranks(&m[1]).len(),
        2,
        "nothing more reached the removed server"
    );
    assert_eq!(ranks(&m[0]).len(), 6);
}

#[test]
fn an_added_server_is_health_checked_once_for_all_its_ranks() {
    let m = mocks(1, |_| {});
    let u = m[0].url();
    let r = Router::start(&[
        "--intra-node-data-parallel-size",
        "4",
        "--health-check-interval-secs",
        "3600",
    ]);
    let resp = call(&r, "POST", &format!("/add_worker?url={u}"), "");
    assert_eq!(resp.status, 200, "{}", resp.text());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let v = call(&r, "GET", "/workers", "").json();
        let workers = v["workers"].as_array().unwrap().clone();
        assert_eq!(workers.len(), 4, "{v}");
        if workers.iter().all(|w| w["is_healthy"] == Value::Bool(true)) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{v}\n{}", r.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let checks = m[0]
        .received()
        .iter()
        .filter(|r| r.path == "/health")
        .count();
    assert_eq!(checks, 1);
    assert_eq!(completions(&r, 1), [200]);
}

#[test]
fn added_pd_workers_keep_their_role_on_every_rank() {
    let p = mocks(1, |_| {});
    let d = mocks(1, |_| {});
    let (pu, du) = (p[0].url(), d[0].url());
    let r = Router::start(&[
        "--vllm-pd-disaggregation",
        "--intra-node-data-parallel-size",
        "2",
        "--policy",
        "round_robin",
        "--shards",
        "1",
    ]);
    let body = format!(r#"{{"url":"{pu}","worker_type":"prefill","bootstrap_port":8998}}"#);
    let resp = call(&r, "POST", "/workers", &body);
    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = format!(r#"{{"url":"{du}","worker_type":"decode"}}"#);
    let resp = call(&r, "POST", "/workers", &body);
    assert_eq!(resp.status, 200, "{}", resp.text());

    let v = call(&r, "GET", "/workers", "").json();
    assert_eq!(v["total"], 4, "{v}");
    assert_eq!(v["stats"]["prefill_count"], 2, "{v}");
    assert_eq!(v["stats"]["decode_count"], 2, "{v}");
    for rank in 0..2 {
        let one = call(
            &r,
            "GET",
            &format!("/workers/{}", encoded(&format!("{pu}@{rank}"))),
            "",
        );
        assert_eq!(one.status, 200, "{}", one.text());
        let one = one.json();
        assert_eq!(one["worker_type"], "prefill");
        assert_eq!(one["bootstrap_port"], 8998);
        let one = call(
            &r,
            "GET",
            &format!("/workers/{}", encoded(&format!("{du}@{rank}"))),
            "",
        );
        assert_eq!(one.json()["worker_type"], "decode");
    }
    assert_eq!(completions(&r, 2), [200; 2]);
    let mut got = ranks(&p[0]);
    got.sort();
    assert_eq!(got, ["0", "1"]);
    let mut got = ranks(&d[0]);
    got.sort();
    assert_eq!(got, ["0", "1"]);

    // No prefill worker left: P/D requests cannot be served.
    let resp = call(&r, "DELETE", &format!("/workers/{}", encoded(&pu)), "");
    assert_eq!(resp.status, 200, "{}", resp.text());
    let v = call(&r, "GET", "/workers", "").json();
    assert_eq!(v["stats"]["prefill_count"], 0, "{v}");
    assert_eq!(v["stats"]["decode_count"], 2, "{v}");
    assert_eq!(completions(&r, 1), [503]);
}
