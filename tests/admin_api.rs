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

fn encoded(url: &str) -> String {
    url.replace(':', "%3A").replace('/', "%2F")
}

#[test]
fn the_admin_api_answers_in_vllm_routers_shapes() {
    let m = mocks(2, |_| {});
    let r = Router::start(&["--worker-urls", &m[0].url()]);
    let u0 = m[0].url();
    let u1 = m[1].url();

    // The classic form: plain-text success, JSON errors.
    let resp = call(&r, "POST", &format!("/add_worker?url={u1}"), "");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), format!("Successfully added worker: {u1}"));
    let resp = call(&r, "POST", &format!("/add_worker?url={u1}"), "");
    assert_eq!(resp.status, 400);
    assert!(resp.error_message().contains("already exists"));
    let resp = call(&r, "POST", "/add_worker", "");
    assert_eq!(resp.status, 400);
    assert!(resp.error_message().contains("url"));
    let resp = call(&r, "POST", "/add_worker?url=ftp://nope", "");
    assert_eq!(resp.status, 400);
    resp.error_message();
    let resp = call(&r, "POST", "/remove_worker?url=http://127.0.0.1:1", "");
    assert_eq!(resp.status, 404);
    assert!(resp.error_message().contains("not found"));

    let loads = call(&r, "GET", "/get_loads", "").json();
    let workers = loads["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2, "{loads}");
    assert_eq!(workers[0]["worker"], u0.as_str());
    assert!(workers[0]["load"].is_u64(), "{loads}");

    // The REST form.
    let all = call(&r, "GET", "/workers", "").json();
    assert_eq!(all["total"], 2, "{all}");
    assert_eq!(all["stats"]["regular_count"], 2);
    let one = call(&r, "GET", &format!("/workers/{}", encoded(&u1)), "");
    assert_eq!(one.status, 200);
    let one = one.json();
    assert_eq!(one["url"], u1.as_str());
    assert_eq!(one["worker_type"], "regular");
    assert_eq!(one["is_healthy"], true);
    assert_eq!(one["circuit_breaker"], "closed");
    let resp = call(&r, "DELETE", &format!("/workers/{}", encoded(&u1)), "");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["success"], true);
    let resp = call(&r, "GET", &format!("/workers/{}", encoded(&u1)), "");
    assert_eq!(resp.status, 404);
    resp.error_message();
    let resp = call(&r, "POST", "/workers", &format!(r#"{{"url":"{u1}"}}"#));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["success"], true);
    let resp = call(&r, "POST", "/workers", "{not json");
    assert_eq!(resp.status, 400);
    resp.error_message();
    let resp = call(
        &r,
        "POST",
        "/workers",
        &format!(r#"{{"url":"{u0}x","worker_type":"gpu"}}"#),
    );
    assert_eq!(resp.status, 400);
    assert!(resp.error_message().contains("worker_type"));
    let resp = call(&r, "PUT", "/list_workers", "");
    assert_eq!(resp.status, 405);
    resp.error_message();
    let listed = call(&r, "GET", "/list_workers", "").json();
    assert_eq!(listed["urls"], serde_json::json!([u0, u1]));
}
