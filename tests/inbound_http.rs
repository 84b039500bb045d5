//! The router's server side of HTTP/1.1, over real sockets: persistence, pipelining,
//! body framings, `Expect: 100-continue`, HEAD, the limits and their answers, and the
//! router's own endpoints. Every bad input gets its status and an OpenAI-style JSON
//! error, and the router keeps serving afterwards.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;

fn router_with_mocks(extra: &[&str]) -> (Router, Vec<MockServer>) {
    let m = mocks(2, |_| {});
    let mut args: Vec<String> = worker_args(&m);
    if !extra.contains(&"--shards") {
        args.extend(["--shards", "2"].iter().map(|s| s.to_string()));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    (Router::start(&a), m)
}

/// Requests that reached the workers, other than the router's own `/metrics` scrapes.
fn routed_requests(m: &[MockServer]) -> usize {
    m.iter()
        .flat_map(|m| m.received())
        .filter(|r| r.path != "/metrics")
        .count()
}

fn completion(stream: bool) -> String {
    format!(r#"{{"model":"mock-model","prompt":"Say hi","max_tokens":3,"stream":{stream}}}"#)
}

fn assert_still_serving(r: &Router) {
    let resp = exchange(r.addr, &post_json("/v1/completions", &completion(false)));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["choices"][0]["finish_reason"], "length");
}

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    let (r, _m) = router_with_mocks(&[]);
    let mut s = r.connect();
    let mut pending = Vec::new();
    for i in 0..20 {
        s.write_all(&post_json("/v1/completions", &completion(i % 2 == 0)))
            .unwrap();
        let resp = read_response_from(&mut s, &mut pending, false).unwrap();
        assert_eq!(resp.status, 200);
        assert!(resp.header("connection").is_none());
    }
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let (r, _m) = router_with_mocks(&[]);
    let mut s = r.connect();
    let mut all = Vec::new();
    for i in 0..5 {
        let body = format!(
            r#"{{"model":"mock-model","prompt":"p","max_tokens":{}}}"#,
            i + 1
        );
        let mut req = post_json("/v1/completions", &body);
        // Tag each request so the answers can be matched to them.
        let tagged = String::from_utf8(req.clone()).unwrap().replacen(
            "Host: router\r\n",
            &format!("Host: router\r\nX-Request-Id: req-{i}\r\n"),
            1,
        );
        req = tagged.into_bytes();
        all.extend_from_slice(&req);
    }
    all.extend_from_slice(&get("/health"));
    s.write_all(&all).unwrap();
    let mut pending = Vec::new();
    for i in 0..5 {
        let resp = read_response_from(&mut s, &mut pending, false).unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(
            resp.header("x-request-id"),
            Some(format!("req-{i}").as_str())
        );
        assert_eq!(resp.json()["usage"]["completion_tokens"], i + 1);
    }
    let health = read_response_from(&mut s, &mut pending, false).unwrap();
    assert_eq!(health.status, 200);
}

#[test]
fn chunked_request_body_is_decoded_and_forwarded_with_a_length() {
    let (r, m) = router_with_mocks(&["--shards", "1"]);
    let body = completion(false);
    let (a, b) = body.split_at(10);
    let raw = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x};ext=1\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    let resp = exchange(r.addr, raw.as_bytes());
    assert_eq!(resp.status, 200, "{}", resp.text());
    let got: Vec<_> = m.iter().flat_map(|m| m.received()).collect();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, body.as_bytes());
    let te = got[0]
        .headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"));
    assert!(!te, "the worker gets a Content-Length body");
}

#[test]
fn expect_100_continue_gets_an_interim_response_first() {
    let (r, _m) = router_with_mocks(&[]);
    let mut s = r.connect();
    let body = completion(false);
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut buf = [0u8; 25];
    std::io::Read::read_exact(&mut s, &mut buf).unwrap();
    assert_eq!(&buf, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(body.as_bytes()).unwrap();
    let resp = read_response(&mut s);
    assert_eq!(resp.status, 200);
}

#[test]
fn expect_100_continue_with_an_oversized_body_gets_413_without_continue() {
    let (r, _m) = router_with_mocks(&["--max-payload-size", "100"]);
    let mut s = r.connect();
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1000\r\n\r\n")
        .unwrap();
    let resp = read_response(&mut s);
    assert_eq!(resp.status, 413);
    assert!(resp.error_message().contains("--max-payload-size"));
}

#[test]
fn connection_close_is_honoured() {
    let (r, _m) = router_with_mocks(&[]);
    let mut s = r.connect();
    let req = String::from_utf8(post_json("/v1/completions", &completion(true)))
        .unwrap()
        .replacen(
            "Host: router\r\n",
            "Host: router\r\nConnection: close\r\n",
            1,
        );
    s.write_all(req.as_bytes()).unwrap();
    let resp = read_response(&mut s);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(resp.text().ends_with("data: [DONE]\n\n"));
    assert!(closed_within(&mut s, Duration::from_secs(5)));
}

#[test]
fn http_1_0_client_gets_close_delimited_answers() {
    let (r, _m) = router_with_mocks(&[]);
    let mut s = r.connect();
    s.write_all(b"GET /health HTTP/1.0\r\n\r\n").unwrap();
    let resp = read_response(&mut s);
    assert_eq!(resp.status, 200);
    assert!(closed_within(&mut s, Duration::from_secs(5)));
}

#[test]
fn head_gets_headers_only() {
    let (r, _m) = router_with_mocks(&[]);
    let mut s = r.connect();
    s.write_all(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\nHEAD /v1/models HTTP/1.1\r\nHost: x\r\n\r\nGET /liveness HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut pending = Vec::new();
    let h = read_response_from(&mut s, &mut pending, true).unwrap();
    assert_eq!(h.status, 200);
    assert!(h.body.is_empty());
    let h = read_response_from(&mut s, &mut pending, true).unwrap();
    assert!(h.status == 200 || h.status == 405, "{}", h.status);
    assert!(h.body.is_empty());
    // The next response starts right where the bodiless ones ended.
    let l = read_response_from(&mut s, &mut pending, false).unwrap();
    assert_eq!(l.status, 200);
    assert_eq!(l.json()["status"], "ok");
}

#[test]
fn header_block_too_large_is_431() {
    let (r, _m) = router_with_mocks(&["--max-header-size", "4096"]);
    let raw = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(5000)
    );
    let resp = exchange(r.addr, raw.as_bytes());
    assert_eq!(resp.status, 431);
    resp.error_message();
    assert_still_serving(&r);
}

#[test]
fn body_over_max_payload_size_is_413() {
    let (r, _m) = router_with_mocks(&["--max-payload-size", "1000"]);
    let body = format!(
        r#"{{"model":"mock-model","prompt":"{}"}}"#,
        "x".repeat(2000)
    );
    let resp = exchange(r.addr, &post_json("/v1/completions", &body));
    assert_eq!(resp.status, 413);
    resp.error_message();
    // Also when the size only shows once chunks are decoded.
    let raw = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    let resp = exchange(r.addr, raw.as_bytes());
    assert_eq!(resp.status, 413);
    assert_still_serving(&r);
}

#[test]
fn malformed_requests_are_400() {
    let (r, _m) = router_with_mocks(&[]);
    for raw in [
        &b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n"[..],
        b"GARBAGE\r\n\r\n",
        b"GET http://elsewhere/ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ] {
        let resp = exchange(r.addr, raw);
        assert_eq!(resp.status, 400, "{:?}", String::from_utf8_lossy(raw));
        resp.error_message();
    }
    assert_still_serving(&r);
}

#[test]
fn smuggling_shapes_are_400() {
    let (r, m) = router_with_mocks(&[]);
    for raw in [
        &b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n{}{}",
    ] {
        let resp = exchange(r.addr, raw);
        assert_eq!(resp.status, 400, "{:?}", String::from_utf8_lossy(raw));
        resp.error_message();
    }
    assert_eq!(routed_requests(&m), 0, "nothing reached a worker");
    assert_still_serving(&r);
}

/// A `stream` value vLLM cannot read as a bool is vLLM's to refuse: the router passes the
/// request on and the worker's own 400 (pydantic's bool_parsing) reaches the client.
#[test]
fn a_stream_value_vllm_refuses_gets_vllms_own_400() {
    let (r, m) = router_with_mocks(&[]);
    let resp = exchange(
        r.addr,
        &post_json(
            "/v1/completions",
            r#"{"model":"mock-model","prompt":"hi","stream":"maybe"}"#,
        ),
    );
    assert_eq!(resp.status, 400);
    assert!(
        resp.error_message().contains("bool_parsing"),
        "{}",
        resp.text()
    );
    assert_eq!(routed_requests(&m), 1);
}

#[test]
fn invalid_json_on_a_json_route_is_400_without_a_worker_round_trip() {
    let (r, m) = router_with_mocks(&[]);
    for path in [
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/generate",
    ] {
        for body in ["{\"model\": ", "[1,2]", ""] {
            let resp = exchange(r.addr, &post_json(path, body));
            assert_eq!(resp.status, 400, "{path} {body:?}");
            assert!(resp.error_message().contains("JSON"));
        }
    }
    assert_eq!(routed_requests(&m), 0);
    assert_still_serving(&r);
}

#[test]
fn slow_or_idle_clients_are_closed_after_the_timeout() {
    let (r, _m) = router_with_mocks(&[
        "--client-header-timeout-secs",
        "1",
        "--client-keepalive-timeout-secs",
        "1",
    ]);
    // Slow head: half a request line, then nothing.
    let mut slow = r.connect();
    slow.write_all(b"GET /health HT").unwrap();
    // Idle keep-alive connection.
    let mut idle = r.connect();
    assert!(closed_within(&mut slow, Duration::from_secs(5)));
    assert!(closed_within(&mut idle, Duration::from_secs(5)));
    assert_still_serving(&r);
}

#[test]
fn local_endpoints() {
    let (r, _m) = router_with_mocks(&[]);
    for path in ["/health", "/liveness", "/readiness"] {
        let resp = exchange(r.addr, &get(path));
        assert_eq!(resp.status, 200, "{path}");
    }
    // vLLM's version, from a worker (as vllm-router answers it), not the router's own.
    let v = exchange(r.addr, &get("/version")).json();
    assert_eq!(v["version"], "0.32.0");
    let models = exchange(r.addr, &get("/v1/models"));
    assert_eq!(models.status, 200);
    assert_eq!(models.json()["data"][0]["id"], "mock-model");
}

#[test]
fn without_workers_routed_requests_get_503_and_health_says_so() {
    let r = Router::start(&[]);
    let resp = exchange(r.addr, &post_json("/v1/completions", &completion(true)));
    assert_eq!(resp.status, 503);
    resp.error_message();
    assert_eq!(exchange(r.addr, &get("/health")).status, 503);
    assert_eq!(exchange(r.addr, &get("/liveness")).status, 200);
}

#[test]
fn unknown_paths_are_proxied_as_is() {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let up = RawUpstream::spawn(move |mut s| {
        while let Some((head, _)) = read_request(&mut s) {
            seen2
                .lock()
                .unwrap()
                .push(head.lines().next().unwrap().to_string());
            s.write_all(b"HTTP/1.1 418 I'm a teapot\r\ncontent-length: 2\r\n\r\nhi")
                .unwrap();
        }
    });
    let r = Router::start(&["--worker-urls", &up.url]);
    let resp = exchange(
        r.addr,
        b"DELETE /custom/path?x=1&y=%20 HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(resp.status, 418);
    assert_eq!(resp.text(), "hi");
    assert_eq!(
        seen.lock().unwrap().clone(),
        vec!["DELETE /custom/path?x=1&y=%20 HTTP/1.1".to_string()]
    );
    let (r2, _m) = router_with_mocks(&[]);
    let metrics = exchange(r2.addr, &get("/metrics"));
    assert!(metrics.text().contains("vllm:num_requests_running"));
}

#[test]
fn http_1_0_client_gets_a_streamed_body_without_chunk_framing() {
    let (r, _m) = router_with_mocks(&[]);
    let body = r#"{"model":"mock-model","prompt":"x","max_tokens":3,"stream":true}"#;
    let raw = format!(
        "POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let resp = exchange(r.addr, raw.as_bytes());
    assert_eq!(resp.status, 200);
    assert!(resp.header("transfer-encoding").is_none());
    assert_eq!(resp.header("connection"), Some("close"));
    let text = resp.text();
    assert!(text.starts_with("data: {"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(text.matches("data: ").count(), 4);
}
