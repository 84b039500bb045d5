//! Streams through the router over real sockets: the bytes the worker sent are the bytes
//! the client gets; many streams at once all finish; upstream connections are pooled and
//! reused; a client that leaves mid-stream makes the router close the upstream at once.

mod common;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// An SSE body as vLLM frames it, each event in its own chunk, with a comment and a
/// multi-byte character split across two chunks.
const SSE_CHUNKS: &[&str] = &[
    "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"choices\":[{\"index\":0,\"text\":\" h\u{e9}llo\"}]}\n\n",
    ": keep-alive\n\n",
    "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"choices\":[{\"index\":0,\"text\":\" \u{1F600}",
    "\"}]}\n\n",
    "data: [DONE]\n\n",
];

fn sse_worker() -> RawUpstream {
    RawUpstream::spawn(|mut s| {
        while let Some((_head, _body)) = read_request(&mut s) {
            let mut wire = Vec::new();
            wire.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\nx-worker: raw\r\n\r\n");
            s.write_all(&wire).unwrap();
            for c in SSE_CHUNKS {
                let chunk = format!("{:x}\r\n{c}\r\n", c.len());
                s.write_all(chunk.as_bytes()).unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
            s.write_all(b"0\r\n\r\n").unwrap();
        }
    })
}

#[test]
fn sse_body_reaches_the_client_byte_for_byte() {
    let up = sse_worker();
    let r = Router::start(&["--worker-urls", &up.url]);
    let resp = exchange(
        r.addr,
        &post_json(
            "/v1/completions",
            r#"{"model":"m","prompt":"x","stream":true}"#,
        ),
    );
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    assert_eq!(resp.header("x-worker"), Some("raw"));
    let mut expected_wire = String::new();
    for c in SSE_CHUNKS {
        expected_wire.push_str(&format!("{:x}\r\n{c}\r\n", c.len()));
    }
    expected_wire.push_str("0\r\n\r\n");
    // Not re-chunked: the chunk framing itself is the worker's.
    assert_eq!(
        String::from_utf8(resp.raw_body.clone()).unwrap(),
        expected_wire
    );
    assert_eq!(String::from_utf8(resp.body).unwrap(), SSE_CHUNKS.concat());
}

/// The events of an SSE body with the per-request `id` and `created` removed.
fn events_without_ids(body: &[u8]) -> Vec<String> {
    String::from_utf8(body.to_vec())
        .unwrap()
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let data = e
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE event: {e:?}"));
            if data == "[DONE]" {
                return data.to_string();
            }
            let mut v: serde_json::Value = serde_json::from_str(data).unwrap();
            v.as_object_mut().unwrap().remove("id");
            v.as_object_mut().unwrap().remove("created");
            v.to_string()
        })
        .collect()
}

#[test]
fn streamed_completion_and_chat_equal_what_the_worker_sends() {
    let m = mocks(1, |c| c.itl = Duration::from_millis(1));
    let r = Router::start(&["--worker-urls", &m[0].url()]);
    let bodies = [
        (
            "/v1/completions",
            r#"{"model":"mock-model","prompt":"Hello","max_tokens":8,"stream":true}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"mock-model","messages":[{"role":"user","content":"Hi"}],"max_tokens":8,"stream":true,"stream_options":{"include_usage":true}}"#,
        ),
    ];
    for (path, body) in bodies {
        let direct = exchange(m[0].addr(), &post_json(path, body));
        let routed = exchange(r.addr, &post_json(path, body));
        assert_eq!(routed.status, 200);
        assert_eq!(routed.header("content-type"), direct.header("content-type"));
        let (d, rt) = (
            events_without_ids(&direct.body),
            events_without_ids(&routed.body),
        );
        assert_eq!(rt, d, "{path}");
        assert_eq!(rt.last().map(String::as_str), Some("[DONE]"));
        assert!(rt.len() >= 9, "{path}: {} events", rt.len());
    }
}

#[test]
fn a_thousand_concurrent_streams_all_complete() {
    let m = mocks(4, |c| {
        c.itl = Duration::from_millis(2);
        c.record = false;
        c.threads = 1;
    });
    let mut args = worker_args(&m);
    args.extend(["--shards".into(), "2".into()]);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let r = Router::start(&a);
    let addr = r.addr;
    let results = concurrently(1000, move |i| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let body = r#"{"model":"mock-model","prompt":"Hello","max_tokens":16,"stream":true}"#;
        let req = post_json("/v1/completions", body);
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("{i}: connect {e}"))?;
        s.write_all(&req).await.map_err(|e| e.to_string())?;
        let mut all = Vec::new();
        let mut buf = vec![0u8; 16384];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(60), s.read(&mut buf))
                .await
                .map_err(|_| format!("{i}: stalled"))?
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(format!("{i}: closed early"));
            }
            all.extend_from_slice(&buf[..n]);
            if all.ends_with(b"0\r\n\r\n") {
                if let Some(p) = all.windows(4).position(|w| w == b"\r\n\r\n") {
                    if let Some((_, body)) = dechunk(&all[p + 4..]) {
                        let text = String::from_utf8_lossy(&body);
                        if !text.ends_with("data: [DONE]\n\n") {
                            return Err(format!("{i}: no [DONE]"));
                        }
                        return Ok(text.matches("data: ").count());
                    }
                }
            }
        }
    });
    assert_all_ok(&results);
    // 16 tokens + [DONE] in every stream.
    assert!(results.iter().all(|r| *r.as_ref().unwrap() == 17));
    let served: u64 = m.iter().map(|m| m.stats().streams_completed).sum();
    assert_eq!(served, 1000);
}

#[test]
fn upstream_connections_are_pooled_and_reused() {
    let m = mocks(2, |_| {});
    let mut args = worker_args(&m);
    args.extend(["--shards".into(), "1".into()]);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let r = Router::start(&a);
    // 40 sequential requests, half of them streamed, on fresh client connections.
    for i in 0..40 {
        let body = format!(
            r#"{{"model":"mock-model","prompt":"x","max_tokens":2,"stream":{}}}"#,
            i % 2 == 0
        );
        assert_eq!(
            exchange(r.addr, &post_json("/v1/completions", &body)).status,
            200
        );
    }
    let accepted: u64 = m.iter().map(|m| m.stats().connections_accepted).sum();
    let requests: u64 = m.iter().map(|m| m.stats().requests).sum();
    assert_eq!(requests, 40);
    assert_eq!(accepted, 2, "one connection per worker, reused 40 times");
}

#[test]
fn request_id_is_kept_or_generated_and_reaches_the_worker() {
    let m = mocks(1, |_| {});
    let r = Router::start(&["--worker-urls", &m[0].url()]);
    let with_id = String::from_utf8(post_json(
        "/v1/completions",
        r#"{"model":"mock-model","prompt":"x"}"#,
    ))
    .unwrap()
    .replacen(
        "Host: router\r\n",
        "Host: router\r\nX-Request-Id: my-id-1\r\n",
        1,
    );
    let resp = exchange(r.addr, with_id.as_bytes());
    assert_eq!(resp.header("x-request-id"), Some("my-id-1"));
    let resp = exchange(
        r.addr,
        &post_json("/v1/completions", r#"{"model":"mock-model","prompt":"x"}"#),
    );
    let generated = resp
        .header("x-request-id")
        .expect("generated id")
        .to_string();
    assert!(generated.len() >= 16);
    let ids: Vec<String> = m[0]
        .received()
        .iter()
        .map(|r| {
            r.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("x-request-id"))
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(ids, vec!["my-id-1".to_string(), generated]);
    // The worker sees its own authority as Host, not the router's.
    let host = m[0].received()[0]
        .headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("host"))
        .map(|(_, v)| v.clone());
    assert_eq!(host, Some(m[0].addr().to_string()));
}

#[test]
fn client_leaving_mid_stream_closes_the_upstream_at_once_and_it_is_not_reused() {
    // A worker that sends the head and one event, then waits to see the router close.
    let closed_at: Closes = Arc::default();
    let conns = Arc::new(AtomicUsize::new(0));
    let (c2, n2) = (closed_at.clone(), conns.clone());
    let up = RawUpstream::spawn(move |mut s| {
        n2.fetch_add(1, Ordering::SeqCst);
        while read_request(&mut s).is_some() {
            let first = "data: {\"text\":\"a\"}\n\n";
            let wire = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{first}\r\n",
                first.len()
            );
            s.write_all(wire.as_bytes()).unwrap();
            let mut b = [0u8; 64];
            // Blocks until the router closes this connection.
            let n = s.read(&mut b).unwrap_or(0);
            if n == 0 {
                c2.lock().unwrap().push(Instant::now());
                return;
            }
        }
    });
    let r = Router::start(&["--worker-urls", &up.url]);
    let mut worst = Duration::ZERO;
    for round in 0..3 {
        let mut s = r.connect();
        s.write_all(&post_json(
            "/v1/completions",
            r#"{"model":"m","prompt":"x","stream":true}"#,
        ))
        .unwrap();
        let mut buf = [0u8; 4096];
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains("data: {") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        let left = Instant::now();
        drop(s);
        let at = nth_close(&closed_at, round).expect("the router closed the upstream");
        worst = worst.max(at.saturating_duration_since(left));
    }
    // Each round needed a new upstream connection: an aborted one is never reused.
    assert_eq!(conns.load(Ordering::SeqCst), 3);
    eprintln!("upstream closed {worst:?} after the client left (worst of 3)");
    assert!(worst < Duration::from_secs(1), "{worst:?}");
}

#[test]
fn worker_dropping_mid_stream_ends_the_stream_with_an_error_event() {
    let m = mocks(1, |c| c.drop_after = Some(2));
    let r = Router::start(&["--worker-urls", &m[0].url()]);
    let mut s = r.connect();
    s.write_all(&post_json(
        "/v1/completions",
        r#"{"model":"mock-model","prompt":"x","max_tokens":8,"stream":true}"#,
    ))
    .unwrap();
    let resp = read_response(&mut s);
    assert_eq!(resp.status, 200);
    let text = resp.text();
    // Two tokens, then vLLM's in-band error shape and [DONE]: clients see an error, not a
    // silently short answer, and the chunked body ends properly.
    assert_eq!(text.matches("\"text\"").count(), 2, "{text}");
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    let n = events.len();
    assert!(n >= 4, "{text}");
    assert!(events[n - 2].starts_with("data: {\"error\": {"), "{text}");
    assert!(events[n - 2].contains("\"code\": 502"), "{text}");
    assert_eq!(events[n - 1], "data: [DONE]");
    // And the router still serves.
    let ok = exchange(
        r.addr,
        &post_json("/v1/completions", r#"{"model":"mock-model","prompt":"x"}"#),
    );
    assert_eq!(ok.status, 200);
}

#[test]
fn connect_failure_falls_through_to_the_next_worker() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let m = mocks(1, |_| {});
    let r = Router::start(&["--worker-urls", &dead_url, &m[0].url(), "--shards", "1"]);
    for _ in 0..4 {
        let resp = exchange(
            r.addr,
            &post_json("/v1/completions", r#"{"model":"mock-model","prompt":"x"}"#),
        );
        assert_eq!(resp.status, 200);
    }
    // With every worker down: 502 with a JSON error.
    let r2 = Router::start(&["--worker-urls", &dead_url]);
    let resp = exchange(
        r2.addr,
        &post_json("/v1/completions", r#"{"model":"mock-model","prompt":"x"}"#),
    );
    assert_eq!(resp.status, 502);
    assert!(resp.error_message().contains("connect"));
}

#[test]
fn a_worker_that_refuses_connections_is_routed_around() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let m = mocks(2, |_| {});
    let r = Router::start(&[
        "--worker-urls",
        &dead_url,
        &m[0].url(),
        &m[1].url(),
        "--shards",
        "1",
        "--policy",
        "round_robin",
    ]);
    let started = std::time::Instant::now();
    for _ in 0..30 {
        let resp = exchange(
            r.addr,
            &post_json("/v1/completions", r#"{"model":"mock-model","prompt":"x"}"#),
        );
        assert_eq!(resp.status, 200);
    }
    // Refused once, then left alone for its 5 s down period: one warning per period, not
    // one per request (30 requests take well under 5 s unless the machine is crawling).
    let periods = 1 + started.elapsed().as_secs() as usize / 5;
    assert!(r.log_contains("worker refused a connection"), "{}", r.log());
    std::thread::sleep(Duration::from_millis(100));
    let log = r.log();
    let warnings = log.matches("worker refused a connection").count();
    assert!(
        (1..=periods).contains(&warnings),
        "{periods} periods: {log}"
    );
    // Both live workers share the load.
    let served: Vec<u64> = m.iter().map(|m| m.stats().requests).collect();
    assert!(served.iter().all(|&n| n >= 10), "{served:?}");
}

#[test]
fn sigterm_while_starting_is_a_drain_not_a_kill() {
    // A worker that accepts (the kernel's backlog) and never answers: the router's first
    // health round waits out its 2 s timeout before the router says it listens.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ringrouter"))
        .args(["--port", "0", "--no-pin-cores", "--prometheus-port", "0"])
        .args(["--worker-urls", &url, "--load-scrape-interval-ms", "0"])
        .args([
            "--health-check-interval-secs",
            "1",
            "--health-check-timeout-secs",
            "2",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    let status = child.wait().unwrap();
    // Not killed by the signal's default action: it started, drained (nothing in flight)
    // and exited 0.
    assert!(status.success(), "{status:?}\n{log}");
    assert!(log.contains("draining"), "{log}");
}

#[test]
fn sigterm_drains_streams_in_flight_then_exits_zero() {
    let m = mocks(1, |c| c.itl = Duration::from_millis(50));
    let mut r = Router::start(&["--worker-urls", &m[0].url(), "--shutdown-grace-secs", "20"]);
    let mut s = r.connect();
    s.write_all(&post_json(
        "/v1/completions",
        r#"{"model":"mock-model","prompt":"x","max_tokens":20,"stream":true}"#,
    ))
    .unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    assert!(n > 0);
    let pid = r.child.id() as i32;
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    // The stream in flight finishes whole...
    let mut rest = buf[..n].to_vec();
    s.read_to_end(&mut rest).unwrap();
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("data: [DONE]\n\n"), "{text}");
    assert!(text.ends_with("0\r\n\r\n"));
    // ... then the router exits 0 and accepts nothing more.
    let status = r.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(std::net::TcpStream::connect(r.addr).is_err());
    assert!(r.log().contains("draining"));
}
