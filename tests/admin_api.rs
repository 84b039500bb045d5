//! The worker admin API over HTTP, through the real router: the shard hands the call to
//! the control plane on another thread and relays its answer.

mod common;

use common::*;

#[test]
fn workers_are_listed_added_and_removed_over_http() {
    let m = mocks(2, |_| {});
    let r = Router::start(&["--worker-urls", &m[0].url(), "--shards", "1"]);
    let urls = |r: &Router| {
        let resp = exchange(r.addr, &get("/list_workers"));
        assert_eq!(resp.status, 200, "{}", resp.text());
        resp.json()["urls"].clone()
    };
    assert_eq!(urls(&r), serde_json::json!([m[0].url()]));

    let add = format!(
        "POST /add_worker?url={} HTTP/1.1\r\nHost: router\r\nContent-Length: 0\r\n\r\n",
        m[1].url()
    );
    let resp = exchange(r.addr, add.as_bytes());
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(urls(&r), serde_json::json!([m[0].url(), m[1].url()]));

    let remove = format!(
        "POST /remove_worker?url={} HTTP/1.1\r\nHost: router\r\nContent-Length: 0\r\n\r\n",
        m[0].url()
    );
    let resp = exchange(r.addr, remove.as_bytes());
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(urls(&r), serde_json::json!([m[1].url()]));
    let body = r#"{"model":"mock-model","prompt":"p","max_tokens":2}"#;
    for _ in 0..4 {
        let resp = exchange(r.addr, &post_json("/v1/completions", body));
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.header("x-mock-worker"), Some("mock-1"));
    }
}
