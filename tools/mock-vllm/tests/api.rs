//! The mock's behaviour over real sockets: streaming framing, usage, limits, injected
//! failures, drop/hang, NIXL legs, load reporting, stats and shutdown.

mod common;

use std::time::{Duration, Instant};

use common::*;
use mock_vllm::{token_text, MockConfig, MockServer};
use serde_json::Value;

fn mock() -> MockServer {
    MockServer::spawn(MockConfig::named("w0")).unwrap()
}

const CHAT_STREAM: &str = r#"{"model":"mock-model","messages":[{"role":"user","content":"hello world"}],"max_tokens":3,"stream":true}"#;

#[test]
fn streamed_chat_starts_with_role_and_ends_with_done() {
    let m = mock();
    let r = post(m.addr(), "/v1/chat/completions", CHAT_STREAM, &[]);
    assert_eq!(r.status, 200);
    assert!(r.complete);
    assert_eq!(
        r.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.header("x-mock-worker"), Some("w0"));
    // Every event is its own chunk.
    assert!(r
        .chunks
        .iter()
        .all(|c| c.starts_with(b"data: ") && c.ends_with(b"\n\n")));
    assert_eq!(r.chunks.len(), 5, "role + 3 tokens + [DONE]");
    assert_eq!(r.chunks.last().unwrap(), b"data: [DONE]\n\n");
    let events = r.data_json();
    assert_eq!(
        events[0]["choices"][0]["delta"],
        serde_json::json!({"role":"assistant","content":""})
    );
    let text: String = events[1..]
        .iter()
        .map(|e| e["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, (0..3).map(token_text).collect::<String>());
    assert_eq!(events[3]["choices"][0]["finish_reason"], "length");
    assert!(events[3]["system_fingerprint"].is_string());
    assert!(
        events[1].get("usage").is_none(),
        "vLLM 0.32 omits usage without include_usage"
    );
    let id = events[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    assert!(events
        .iter()
        .all(|e| e["id"] == id && e["object"] == "chat.completion.chunk"));
    assert!(eventually(Duration::from_secs(1), || m
        .stats()
        .streams_completed
        == 1));
}

#[test]
fn include_usage_adds_a_final_usage_chunk() {
    let m = mock();
    let body = r#"{"prompt":"a b c","max_tokens":4,"stream":true,"stream_options":{"include_usage":true}}"#;
    let r = post(m.addr(), "/v1/completions", body, &[]);
    let events = r.data_json();
    assert_eq!(events.len(), 5, "4 tokens + usage");
    let usage = &events[4];
    assert_eq!(usage["choices"], serde_json::json!([]));
    assert_eq!(
        usage["usage"],
        serde_json::json!({"prompt_tokens":4,"total_tokens":8,"completion_tokens":4})
    );
    assert!(usage["system_fingerprint"].is_string());
    // The last token chunk leaves the fingerprint to the usage chunk; no `usage` elsewhere.
    assert!(events[3].get("system_fingerprint").is_none());
    assert!(events[..4].iter().all(|e| e.get("usage").is_none()));
    assert!(r.text().ends_with("data: [DONE]\n\n"));

    let body = r#"{"prompt":"a","max_tokens":2,"stream":true,"stream_options":{"include_usage":true,"continuous_usage_stats":true}}"#;
    let events = post(m.addr(), "/v1/completions", body, &[]).data_json();
    assert_eq!(events[0]["usage"]["completion_tokens"], 1);
    assert_eq!(events[1]["usage"]["completion_tokens"], 2);
}

#[test]
fn max_tokens_and_default_length() {
    let m = mock();
    let r = post(
        m.addr(),
        "/v1/completions",
        r#"{"prompt":"hi there","max_tokens":5}"#,
        &[],
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let j = r.json();
    assert_eq!(j["object"], "text_completion");
    assert_eq!(j["model"], "mock-model");
    assert_eq!(j["choices"][0]["finish_reason"], "length");
    assert_eq!(j["usage"]["completion_tokens"], 5);
    assert_eq!(j["usage"]["prompt_tokens"], 3);
    assert_eq!(j["usage"]["total_tokens"], 8);
    assert_eq!(
        j["choices"][0]["text"],
        (0..5).map(token_text).collect::<String>()
    );

    // No max_tokens: the config's 16, ended by "EOS".
    let j = post(
        m.addr(),
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"x"}]}"#,
        &[],
    )
    .json();
    assert_eq!(j["object"], "chat.completion");
    assert_eq!(j["usage"]["completion_tokens"], 16);
    assert_eq!(j["choices"][0]["finish_reason"], "stop");
    assert_eq!(j["choices"][0]["message"]["role"], "assistant");

    // max_completion_tokens wins for chat; x-mock-tokens shorter than the limit stops early.
    let body =
        r#"{"messages":[{"role":"user","content":"x"}],"max_completion_tokens":2,"max_tokens":9}"#;
    assert_eq!(
        post(m.addr(), "/v1/chat/completions", body, &[]).json()["usage"]["completion_tokens"],
        2
    );
    let j = post(
        m.addr(),
        "/v1/completions",
        r#"{"prompt":"x","max_tokens":9}"#,
        &[("x-mock-tokens", "3")],
    )
    .json();
    assert_eq!(j["usage"]["completion_tokens"], 3);
    assert_eq!(j["choices"][0]["finish_reason"], "stop");
}

#[test]
fn injected_failures() {
    let m = mock();
    let r = post(
        m.addr(),
        "/v1/completions",
        r#"{"prompt":"x"}"#,
        &[("x-mock-fail", "1")],
    );
    assert_eq!(r.status, 500);
    assert_eq!(r.header("x-mock-worker"), Some("w0"));
    let e = &r.json()["error"];
    assert_eq!(e["type"], "InternalServerError");
    assert_eq!(e["code"], 500);
    assert!(e["param"].is_null());

    let r = post(
        m.addr(),
        "/v1/chat/completions",
        CHAT_STREAM,
        &[("x-mock-status", "503")],
    );
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["type"], "ServiceUnavailableError");
    let r = post(
        m.addr(),
        "/v1/chat/completions",
        CHAT_STREAM,
        &[("x-mock-status", "429")],
    );
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["type"], "Too Many Requests");

    m.set_fail_rate(1.0);
    assert_eq!(
        post(m.addr(), "/v1/completions", r#"{"prompt":"x"}"#, &[]).status,
        500
    );
    m.set_fail_rate(0.0);
    assert_eq!(
        post(m.addr(), "/v1/completions", r#"{"prompt":"x"}"#, &[]).status,
        200
    );
    assert_eq!(m.stats().injected_errors, 4);

    // In-band error after a 200, as vLLM sends when generation fails mid-stream.
    let r = post(
        m.addr(),
        "/v1/chat/completions",
        CHAT_STREAM,
        &[("x-mock-error-after", "1")],
    );
    assert_eq!(r.status, 200);
    let events = r.events();
    assert_eq!(events.len(), 4, "{events:?}");
    assert!(
        events[2].starts_with("data: {\"error\": {"),
        "{}",
        events[2]
    );
    assert_eq!(events[3], "data: [DONE]");
}

#[test]
fn request_errors_look_like_vllm() {
    let m = mock();
    let r = post(
        m.addr(),
        "/v1/completions",
        r#"{"model":"other","prompt":"x"}"#,
        &[],
    );
    assert_eq!(r.status, 404);
    assert_eq!(
        r.text(),
        r#"{"error":{"message":"The model `other` does not exist. Valid aliases: mock-model.","type":"NotFoundError","param":"model","code":404}}"#
    );
    let r = post(m.addr(), "/v1/completions", r#"{"prompt":"#, &[]);
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "Bad Request");
    let r = post(
        m.addr(),
        "/v1/chat/completions",
        r#"{"model":"mock-model"}"#,
        &[],
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "body.messages");
    let r = Conn::open(m.addr()).request("POST", "/v1/completions", &[], r#"{"prompt":"x"}"#);
    assert_eq!(r.status, 400, "no content-type");
    let r = get(m.addr(), "/get_server_info");
    assert_eq!(
        (r.status, r.text().as_str()),
        (404, r#"{"detail":"Not Found"}"#)
    );
    let r = get(m.addr(), "/v1/completions");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
}

#[test]
fn drop_after_closes_the_connection_mid_stream() {
    let m = mock();
    let r = post(
        m.addr(),
        "/v1/chat/completions",
        CHAT_STREAM,
        &[("x-mock-drop-after", "2")],
    );
    assert_eq!(r.status, 200);
    assert!(!r.complete, "no terminating chunk");
    assert_eq!(r.chunks.len(), 3, "role + 2 tokens, then EOF");
    assert!(eventually(Duration::from_secs(1), || m
        .stats()
        .streams_dropped
        == 1));
    assert_eq!(m.stats().streams_aborted, 0);

    let cfg = MockConfig {
        drop_after: Some(1),
        ..MockConfig::default()
    };
    let m = MockServer::spawn(cfg).unwrap();
    let body = r#"{"prompt":"x","max_tokens":5,"stream":true}"#;
    let r = post(m.addr(), "/v1/completions", body, &[]);
    assert_eq!((r.chunks.len(), r.complete), (1, false));
}

#[test]
fn hang_after_keeps_the_connection_open_until_the_client_leaves() {
    let m = mock();
    let mut c = Conn::open(m.addr());
    c.send(
        "POST",
        "/v1/chat/completions",
        &[JSON, ("x-mock-hang-after", "1")],
        CHAT_STREAM,
    );
    let resp_head = read_head(&mut c);
    assert!(resp_head.contains("200 OK"));
    // role chunk + 1 token chunk arrive, then nothing.
    for _ in 0..2 {
        let size = c.read_line().unwrap();
        assert!(usize::from_str_radix(size.trim(), 16).unwrap() > 0);
        let _event = c.read_line().unwrap();
        let _blank = c.read_line().unwrap();
        let _crlf = c.read_line().unwrap();
    }
    assert!(
        !c.closed_within(Duration::from_millis(150)),
        "still open, silent"
    );
    assert_eq!(m.stats().in_flight, 1);
    drop(c);
    assert!(eventually(Duration::from_secs(1), || m
        .stats()
        .streams_aborted
        == 1));
    assert_eq!(m.stats().in_flight, 0);
}

fn read_head(c: &mut Conn) -> String {
    let mut head = String::new();
    loop {
        let line = c.read_line().unwrap();
        if line == "\r\n" {
            return head;
        }
        head.push_str(&line);
    }
}

#[test]
fn client_disconnect_mid_stream_is_noticed_promptly() {
    let m = mock();
    let mut c = Conn::open(m.addr());
    c.send(
        "POST",
        "/v1/completions",
        &[JSON, ("x-mock-itl-ms", "20")],
        r#"{"prompt":"x","max_tokens":1000,"stream":true}"#,
    );
    read_head(&mut c);
    let _first_chunk = c.read_line().unwrap();
    let left = Instant::now();
    drop(c);
    assert!(eventually(Duration::from_secs(1), || m
        .stats()
        .streams_aborted
        == 1));
    assert!(
        left.elapsed() < Duration::from_secs(2),
        "{:?}",
        left.elapsed()
    );
    assert!(eventually(Duration::from_secs(1), || m
        .stats()
        .connections_open
        == 0));
}

#[test]
fn nixl_prefill_and_decode_legs() {
    let cfg = MockConfig {
        name: "p0".into(),
        prefill_delay: Duration::from_millis(50),
        ..MockConfig::default()
    };
    let m = MockServer::spawn(cfg).unwrap();
    let prefill = r#"{"prompt":"one two three","max_tokens":1,"stream":false,"kv_transfer_params":{"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,"remote_block_ids":null,"remote_host":null,"remote_port":null}}"#;
    let t0 = Instant::now();
    let r = post(
        m.addr(),
        "/v1/completions",
        prefill,
        &[("x-request-id", "req-7")],
    );
    assert!(t0.elapsed() >= Duration::from_millis(50));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), Some("req-7"));
    let j = r.json();
    assert_eq!(j["id"], "cmpl-req-7");
    assert_eq!(j["usage"]["completion_tokens"], 1);
    let kv = &j["kv_transfer_params"];
    assert_eq!(kv["do_remote_prefill"], true);
    assert_eq!(kv["do_remote_decode"], false);
    assert_eq!(kv["remote_engine_id"], "p0-engine");
    assert_eq!(kv["remote_host"], "127.0.0.1");
    assert_eq!(kv["remote_port"], m.addr().port());
    assert_eq!(kv["tp_size"], 1);
    assert!(kv["remote_request_id"]
        .as_str()
        .unwrap()
        .starts_with("cmpl-req-7-0-"));
    assert!(kv["remote_block_ids"][0]
        .as_array()
        .is_some_and(|b| !b.is_empty()));

    // The decode leg carries the prefill's params back; it is answered normally (streamed).
    let decode = serde_json::json!({
        "prompt": "one two three", "max_tokens": 3, "stream": true, "kv_transfer_params": kv,
    })
    .to_string();
    let r = post(
        m.addr(),
        "/v1/completions",
        &decode,
        &[("x-request-id", "req-7")],
    );
    assert_eq!(r.data_json().len(), 3);
    let stats = m.stats();
    assert_eq!((stats.prefill_legs, stats.decode_legs), (1, 1));
    let received = m.received();
    let leg = received.last().unwrap().json().unwrap();
    assert_eq!(leg["kv_transfer_params"]["do_remote_prefill"], true);
    assert_eq!(
        received.last().unwrap().header("X-Request-Id"),
        Some("req-7")
    );
}

/// `--report-timing`: the prefill answer carries its own time in `kv_transfer_params`, and
/// the decode stream's first event the time to it plus what its request carried, so a
/// benchmark can take exactly the mocks' part out of a client's TTFT. Off by default.
#[test]
fn report_timing_rides_with_the_legs() {
    let cfg = MockConfig {
        prefill_delay: Duration::from_millis(30),
        ttft: Duration::from_millis(20),
        report_timing: true,
        ..MockConfig::default()
    };
    let m = MockServer::spawn(cfg).unwrap();
    let prefill =
        r#"{"prompt":"one two","max_tokens":1,"kv_transfer_params":{"do_remote_decode":true}}"#;
    let t0 = Instant::now();
    let r = post(m.addr(), "/v1/completions", prefill, &[]);
    let took = t0.elapsed().as_micros() as u64;
    let kv = r.json()["kv_transfer_params"].clone();
    let service = kv["mock_service_us"].as_u64().expect("mock_service_us");
    assert!((30_000..=took).contains(&service), "{service} µs of {took}");

    let decode = serde_json::json!({
        "prompt": "one two", "max_tokens": 2, "stream": true, "kv_transfer_params": kv,
    })
    .to_string();
    let t0 = Instant::now();
    let r = post(m.addr(), "/v1/completions", &decode, &[]);
    let took = t0.elapsed().as_micros() as u64;
    let events = r.data_json();
    let first = events[0]["mock_timing_us"]
        .as_u64()
        .expect("mock_timing_us");
    assert!(
        (service + 20_000..=service + took).contains(&first),
        "{first} µs: prefill {service} + decode at most {took}"
    );
    assert!(events[1].get("mock_timing_us").is_none(), "only the first");

    // Off: nothing added.
    let m = MockServer::spawn(MockConfig::default()).unwrap();
    let r = post(m.addr(), "/v1/completions", prefill, &[]);
    assert!(r.json()["kv_transfer_params"]
        .get("mock_service_us")
        .is_none());
}

#[test]
fn stats_and_received_track_connections() {
    let m = mock();
    let mut c = Conn::open(m.addr());
    for _ in 0..3 {
        assert_eq!(c.request("GET", "/health", &[], "").status, 200);
    }
    let _other = post(
        m.addr(),
        "/v1/completions",
        r#"{"prompt":"x","max_tokens":1}"#,
        &[],
    );
    let s = m.stats();
    assert_eq!(s.connections_accepted, 2);
    assert_eq!(s.requests, 4);
    let received = m.received();
    assert_eq!(received.len(), 4);
    assert!(received[..3]
        .iter()
        .all(|r| r.connection_id == received[0].connection_id));
    assert_ne!(received[3].connection_id, received[0].connection_id);
    assert_eq!(received[3].method, "POST");
    assert_eq!(received[3].path, "/v1/completions");
    assert_eq!(&received[3].body[..], br#"{"prompt":"x","max_tokens":1}"#);
    drop(c);
    assert!(eventually(Duration::from_secs(1), || m
        .stats()
        .connections_open
        == 0));

    m.set_healthy(false);
    assert_eq!(get(m.addr(), "/health").status, 503);
}

#[test]
fn load_is_reported_in_metrics_load_and_orca_header() {
    let m = mock();
    // One stream parked in flight.
    let mut c = Conn::open(m.addr());
    c.send(
        "POST",
        "/v1/chat/completions",
        &[JSON, ("x-mock-hang-after", "0")],
        CHAT_STREAM,
    );
    read_head(&mut c);
    assert!(eventually(Duration::from_secs(1), || m.stats().in_flight == 1));
    let metrics = get(m.addr(), "/metrics");
    assert_eq!(
        metrics.header("content-type"),
        Some("text/plain; version=1.0.0; charset=utf-8")
    );
    assert!(metrics
        .text()
        .contains("vllm:num_requests_running{engine=\"0\",model_name=\"mock-model\"} 1.0\n"));
    assert!(metrics
        .text()
        .contains("vllm:num_requests_waiting{engine=\"0\",model_name=\"mock-model\"} 0.0\n"));
    assert!(metrics
        .text()
        .contains("vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"mock-model\"} "));
    assert_eq!(get(m.addr(), "/load").text(), r#"{"server_load":1}"#);

    let body = r#"{"prompt":"x","max_tokens":1}"#;
    let r = post(
        m.addr(),
        "/v1/completions",
        body,
        &[("endpoint-load-metrics-format", "TEXT")],
    );
    assert_eq!(
        r.header("endpoint-load-metrics"),
        Some("TEXT named_metrics.num_requests_waiting=0.0, named_metrics.kv_cache_usage_perc=0.00390625")
    );
    let r = post(
        m.addr(),
        "/v1/completions",
        body,
        &[("endpoint-load-metrics-format", "JSON")],
    );
    assert_eq!(
        r.header("endpoint-load-metrics"),
        Some(
            r#"JSON {"named_metrics": {"num_requests_waiting": 0.0, "kv_cache_usage_perc": 0.00390625}}"#
        )
    );
    let r = post(
        m.addr(),
        "/v1/chat/completions",
        CHAT_STREAM,
        &[("endpoint-load-metrics-format", "TEXT")],
    );
    assert_eq!(
        r.header("endpoint-load-metrics"),
        None,
        "streams carry no ORCA header"
    );
}

#[test]
fn ttft_itl_and_queueing_delay() {
    let cfg = MockConfig {
        ttft: Duration::from_millis(60),
        itl: Duration::from_millis(10),
        ..MockConfig::default()
    };
    let m = MockServer::spawn(cfg).unwrap();
    let mut c = Conn::open(m.addr());
    let t0 = Instant::now();
    c.send(
        "POST",
        "/v1/completions",
        &[JSON],
        r#"{"prompt":"x","max_tokens":3,"stream":true}"#,
    );
    read_head(&mut c);
    let head_at = t0.elapsed();
    let _size = c.read_line().unwrap();
    let first = t0.elapsed();
    assert!(
        head_at < first,
        "headers go out before the first token: {head_at:?}"
    );
    assert!(first >= Duration::from_millis(60), "{first:?}");
    drop(c);

    // Per-request override, non-streamed: ttft + 2 * itl.
    let t0 = Instant::now();
    let r = post(
        m.addr(),
        "/v1/completions",
        r#"{"prompt":"x","max_tokens":3}"#,
        &[("x-mock-ttft-ms", "5"), ("x-mock-itl-ms", "20")],
    );
    let took = t0.elapsed();
    assert_eq!(r.status, 200);
    assert!(
        took >= Duration::from_millis(45) && took < Duration::from_secs(2),
        "{took:?}"
    );

    // TTFT grows with requests already in flight.
    let cfg = MockConfig {
        ttft_per_inflight: Duration::from_millis(40),
        ..MockConfig::default()
    };
    let m = MockServer::spawn(cfg).unwrap();
    let mut parked = Conn::open(m.addr());
    parked.send(
        "POST",
        "/v1/chat/completions",
        &[JSON, ("x-mock-hang-after", "0")],
        CHAT_STREAM,
    );
    read_head(&mut parked);
    let t0 = Instant::now();
    post(
        m.addr(),
        "/v1/completions",
        r#"{"prompt":"x","max_tokens":1}"#,
        &[],
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(40),
        "{:?}",
        t0.elapsed()
    );
}

#[test]
fn keep_alive_comments_while_idle() {
    let cfg = MockConfig {
        sse_keep_alive: Some(Duration::from_millis(20)),
        ..MockConfig::default()
    };
    let m = MockServer::spawn(cfg).unwrap();
    let r = post(
        m.addr(),
        "/v1/completions",
        r#"{"prompt":"x","max_tokens":1,"stream":true}"#,
        &[("x-mock-ttft-ms", "70")],
    );
    let events = r.events();
    let comments = events.iter().filter(|e| *e == ": keep-alive").count();
    assert!((2..=4).contains(&comments), "{events:?}");
    assert_eq!(events.last().unwrap(), "data: [DONE]");
}

#[test]
fn other_endpoints() {
    let m = mock();
    let r = get(m.addr(), "/v1/models");
    let j = r.json();
    assert_eq!(j["data"][0]["id"], "mock-model");
    assert_eq!(j["data"][0]["owned_by"], "vllm");
    assert_eq!(get(m.addr(), "/version").json()["version"], "0.32.0");
    let r = get(m.addr(), "/health");
    assert_eq!((r.status, r.body.len()), (200, 0));

    // A generative model (vLLM's and the mock's default) has no embeddings route.
    let r = post(m.addr(), "/v1/embeddings", r#"{"input":["a","b c"]}"#, &[]);
    assert_eq!(
        (r.status, r.text()),
        (404, r#"{"detail":"Not Found"}"#.to_string())
    );
    let e = MockServer::spawn(MockConfig {
        embeddings: true,
        ..MockConfig::named("emb")
    })
    .unwrap();
    let j = post(e.addr(), "/v1/embeddings", r#"{"input":["a","b c"]}"#, &[]).json();
    assert_eq!(j["data"].as_array().unwrap().len(), 2);
    assert_eq!(j["data"][1]["object"], "embedding");
    let j = post(
        m.addr(),
        "/v1/responses",
        r#"{"input":"hi","max_output_tokens":2}"#,
        &[],
    )
    .json();
    assert_eq!(j["object"], "response");
    assert_eq!(j["status"], "incomplete");
    assert_eq!(j["usage"]["output_tokens"], 2);
    let j = post(
        m.addr(),
        "/generate",
        r#"{"prompt":"hi","max_tokens":2}"#,
        &[],
    )
    .json();
    assert_eq!(j["text"][0], "hi tok0 tok1");
    let j = post(m.addr(), "/tokenize", r#"{"prompt":"a b"}"#, &[]).json();
    assert_eq!(j["count"], 3);

    // x-request-id: echoed, or a fresh one.
    let r = post(
        m.addr(),
        "/v1/completions",
        r#"{"prompt":"x","max_tokens":1}"#,
        &[("x-request-id", "abc")],
    );
    assert_eq!(r.header("x-request-id"), Some("abc"));
    assert_eq!(r.json()["id"], "cmpl-abc");
    assert!(get(m.addr(), "/health")
        .header("x-request-id")
        .is_some_and(|v| v.len() == 32));
}

#[test]
fn shutdown_closes_open_connections() {
    let m = mock();
    let mut idle = Conn::open(m.addr());
    assert_eq!(idle.request("GET", "/health", &[], "").status, 200);
    let mut streaming = Conn::open(m.addr());
    streaming.send(
        "POST",
        "/v1/chat/completions",
        &[JSON, ("x-mock-hang-after", "1")],
        CHAT_STREAM,
    );
    read_head(&mut streaming);
    let addr = m.addr();
    let state = m.state();
    m.shutdown();
    assert!(idle.closed_within(Duration::from_secs(1)));
    assert!(streaming.closed_within(Duration::from_secs(1)));
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "listener closed"
    );
    assert_eq!(state.stats().connections_open, 0);
    assert_eq!(state.stats().streams_aborted, 1);
}

#[test]
fn many_prompts_many_choices() {
    let m = mock();
    let j = post(
        m.addr(),
        "/v1/completions",
        r#"{"prompt":["a","b c"],"max_tokens":2}"#,
        &[],
    )
    .json();
    let choices = j["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[1]["index"], 1);
    assert_eq!(j["usage"]["completion_tokens"], 4);
    let r = post(
        m.addr(),
        "/v1/completions",
        r#"{"prompt":["a","b"],"max_tokens":2,"stream":true}"#,
        &[],
    );
    let idx: Vec<Value> = r
        .data_json()
        .iter()
        .map(|e| e["choices"][0]["index"].clone())
        .collect();
    assert_eq!(idx, vec![0, 1, 0, 1]);
}

/// vLLM's refusals, in its order and words (the real server's, checked live by
/// tests/real_vllm/test_real_mock.py).
#[test]
fn invalid_parameters_are_refused_as_vllm_refuses_them() {
    let m = MockServer::spawn(MockConfig {
        max_model_len: 1024,
        ..MockConfig::named("v")
    })
    .unwrap();
    let err = |path: &str, body: &str| {
        let r = post(m.addr(), path, body, &[]);
        let j = r.json();
        (
            r.status,
            j["error"]["message"].as_str().unwrap_or("").to_string(),
            j["error"]["type"].clone(),
            j["error"]["param"].clone(),
        )
    };
    let c = "/v1/completions";
    let (s, msg, t, p) = err(c, r#"{"prompt":"x","max_tokens":-1}"#);
    assert_eq!(
        (s, t, p),
        (400, "BadRequestError".into(), "max_tokens".into())
    );
    assert_eq!(
        msg,
        "max_tokens must be at least 1, got -1. (parameter=max_tokens, value=-1)"
    );
    let (_, msg, _, p) = err(c, r#"{"prompt":"x","max_tokens":5000}"#);
    assert!(
        msg.starts_with("max_tokens=5000 cannot be greater than max_model_len=1024."),
        "{msg}"
    );
    assert_eq!(p, "max_tokens");
    let (_, msg, _, p) = err(c, r#"{"prompt":"x","n":0,"top_p":0,"temperature":-1}"#);
    assert_eq!(
        (msg.as_str(), p),
        ("n must be at least 1, got 0.", serde_json::Value::Null)
    );
    let (_, msg, _, _) = err(c, r#"{"prompt":"x","top_p":0,"temperature":-1}"#);
    assert_eq!(
        msg,
        "temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)"
    );
    let (_, msg, _, _) = err(c, r#"{"prompt":"x","top_p":0}"#);
    assert_eq!(
        msg,
        "top_p must be in (0, 1], got 0.0. (parameter=top_p, value=0.0)"
    );
    let (_, msg, _, p) = err(c, r#"{"prompt":"x","logprobs":50}"#);
    assert!(msg.starts_with("Requested sample logprobs of 50"), "{msg}");
    assert_eq!(p, "logprobs");
    let (_, msg, _, p) = err(
        c,
        r#"{"prompt":"x","stream_options":{"include_usage":true},"max_tokens":"many"}"#,
    );
    assert!(
        msg.starts_with("Stream options can only be defined"),
        "{msg}"
    );
    assert_eq!(p, "stream_options");
    let long = format!(r#"{{"prompt":"{}"}}"#, "hello ".repeat(2000));
    let (_, msg, _, p) = err(c, &long);
    assert!(
        msg.contains("your prompt contains at least 1025 input tokens"),
        "{msg}"
    );
    assert_eq!(p, "input_tokens");
    // pydantic's type errors, all at once, the first one's location as param
    let (s, msg, t, p) = err(
        "/v1/chat/completions",
        r#"{"max_tokens":"many","stream":"maybe"}"#,
    );
    assert_eq!(
        (s, t, p),
        (400, "Bad Request".into(), "body.messages".into())
    );
    assert!(
        msg.starts_with("3 validation errors:\n  {'type': 'missing', 'loc': 'body.messages'"),
        "{msg}"
    );
    assert!(msg.contains("{'type': 'int_parsing', 'loc': 'body.max_tokens', 'msg': 'Input should be a valid integer, unable to parse string as an integer', 'input': 'many'}"), "{msg}");
    assert!(
        msg.contains("'type': 'bool_parsing', 'loc': 'body.stream'"),
        "{msg}"
    );
    // ... and its lax mode: these are fine
    let r = post(
        m.addr(),
        c,
        r#"{"prompt":"x","max_tokens":"2","stream":"yes","temperature":"0"}"#,
        &[],
    );
    assert_eq!(r.status, 200);
    assert!(r.text().ends_with("data: [DONE]\n\n"), "{}", r.text());
    let (_, msg, _, p) = err(c, r#"{"prompt":"x","n":2,"temperature":0}"#);
    assert_eq!(
        (msg.as_str(), p),
        (
            "n must be 1 when using greedy sampling, got 2.",
            serde_json::Value::Null
        )
    );
    // Python's json module's words and offsets for bad JSON
    let (_, msg, _, p) = err(c, r#"{"model":"tiny" "prompt":1}"#);
    assert!(
        msg.contains("'loc': 'body.16'") && msg.contains(r#""Expecting ',' delimiter""#),
        "{msg}"
    );
    assert_eq!(p, "body.16");
    let (_, msg, _, _) = err(c, r#"{"model":"ti"#);
    assert!(
        msg.contains("'loc': 'body.9'") && msg.contains("'Unterminated string starting at'"),
        "{msg}"
    );
    let (_, msg, _, p) = err(c, "");
    assert!(msg.contains("'type': 'missing', 'loc': 'body'"), "{msg}");
    assert_eq!(p, "body");
    // the prompt is checked before the model, the model before the limits
    assert_eq!(err(c, r#"{"model":"other"}"#).3, "prompt");
    assert_eq!(
        err(c, r#"{"model":"other","prompt":"x","max_tokens":-1}"#).0,
        404
    );
}

#[test]
fn n_choices_per_prompt() {
    let m = mock();
    let j = post(
        m.addr(),
        "/v1/completions",
        r#"{"prompt":["a","b c"],"max_tokens":2,"n":2}"#,
        &[],
    )
    .json();
    let idx: Vec<u64> = j["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, vec![0, 1, 2, 3]);
    assert_eq!(j["usage"]["prompt_tokens"], 5);
    assert_eq!(j["usage"]["completion_tokens"], 8);
    let j = post(
        m.addr(),
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":2,"n":3}"#,
        &[],
    )
    .json();
    assert_eq!(j["choices"].as_array().unwrap().len(), 3);
    assert_eq!(j["choices"][2]["index"], 2);
    assert_eq!(j["usage"]["completion_tokens"], 6);
}
