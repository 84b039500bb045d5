//! W3C trace context (`traceparent`, `tracestate`) and `baggage` from the client reach the
//! workers unchanged: byte for byte, repeated lines kept in order, on retried attempts, and
//! on both legs in P/D mode. Real router binary, raw upstreams and mock vLLM workers on
//! loopback.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::{Arc, Mutex};

use common::*;

/// Header lines as a client sends them: odd name case, a repeated `tracestate`, baggage
/// with spaces, percent-encoding and properties.
const TRACE_LINES: [&str; 4] = [
    "TraceParent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "tracestate: rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
    "tracestate: vendor2=opaque%20value",
    "baggage: userId=alice, serverNode=DF%2028;prop=1, isProduction=false",
];

fn request_with_trace(path: &str, body: &str) -> Vec<u8> {
    let mut r =
        format!("POST {path} HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n");
    for l in TRACE_LINES {
        r.push_str(l);
        r.push_str("\r\n");
    }
    r.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    r.into_bytes()
}

/// The trace lines of a request head, in order, as received.
fn trace_lines_of(head: &str) -> Vec<String> {
    head.split("\r\n")
        .filter(|l| {
            let name = l.split(':').next().unwrap_or("").to_ascii_lowercase();
            matches!(name.as_str(), "traceparent" | "tracestate" | "baggage")
        })
        .map(str::to_string)
        .collect()
}

/// A raw upstream that records each request head and answers `status` (200 with a small
/// JSON body, or an empty 503), keeping the connection.
fn recording_upstream(status: u16, heads: Arc<Mutex<Vec<String>>>) -> RawUpstream {
    RawUpstream::spawn(move |mut s: TcpStream| {
        while let Some((head, _body)) = read_request(&mut s) {
            heads.lock().unwrap().push(head);
            let answer = if status == 200 {
                let b = r#"{"id":"cmpl-1","object":"text_completion","choices":[]}"#;
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}",
                    b.len()
                )
            } else {
                "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n".to_string()
            };
            if s.write_all(answer.as_bytes()).is_err() {
                return;
            }
        }
    })
}

#[test]
fn trace_headers_reach_the_worker_byte_for_byte_on_every_attempt() {
    let failing_heads = Arc::new(Mutex::new(Vec::new()));
    let good_heads = Arc::new(Mutex::new(Vec::new()));
    let failing = recording_upstream(503, failing_heads.clone());
    let good = recording_upstream(200, good_heads.clone());
    // One shard, round robin: of two requests one starts on the failing worker and is
    // retried on the good one.
    let r = Router::start(&[
        "--shards",
        "1",
        "--policy",
        "round_robin",
        "--retry-initial-backoff-ms",
        "1",
        "--worker-urls",
        &failing.url,
        &good.url,
    ]);
    let body = r#"{"model":"m","prompt":"hello","max_tokens":1}"#;
    let mut s = r.connect();
    for _ in 0..2 {
        s.write_all(&request_with_trace("/v1/completions", body))
            .unwrap();
        let resp = read_response(&mut s);
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    let failing_heads = failing_heads.lock().unwrap().clone();
    let good_heads = good_heads.lock().unwrap().clone();
    assert_eq!(good_heads.len(), 2, "{good_heads:?}");
    assert!(
        !failing_heads.is_empty(),
        "no attempt reached the failing worker"
    );
    for head in failing_heads.iter().chain(&good_heads) {
        assert_eq!(trace_lines_of(head), TRACE_LINES, "{head}");
    }
}

#[test]
fn trace_headers_reach_both_legs_in_pd_mode() {
    let p = mocks(1, |c| c.name = "p0".into());
    let d = mocks(1, |c| c.name = "d0".into());
    let r = Router::start(&[
        "--vllm-pd-disaggregation",
        "--prefill",
        &p[0].url(),
        "--decode",
        &d[0].url(),
    ]);
    for stream in [false, true] {
        p[0].clear_received();
        d[0].clear_received();
        let body = format!(
            r#"{{"model":"mock-model","prompt":"trace me","max_tokens":3,"stream":{stream}}}"#
        );
        let resp = exchange(r.addr, &request_with_trace("/v1/completions", &body));
        assert_eq!(resp.status, 200, "{}", resp.text());
        for (leg, m) in [("prefill", &p[0]), ("decode", &d[0])] {
            let got: Vec<_> = m
                .received()
                .into_iter()
                .filter(|q| q.path == "/v1/completions")
                .collect();
            assert_eq!(got.len(), 1, "{leg} leg (stream {stream})");
            // The mock records header names lower-cased, values as received, in order.
            let trace: Vec<String> = got[0]
                .headers
                .iter()
                .filter(|(k, _)| matches!(k.as_str(), "traceparent" | "tracestate" | "baggage"))
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            let want: Vec<String> = TRACE_LINES
                .iter()
                .map(|l| {
                    let (k, v) = l.split_once(": ").unwrap();
                    format!("{}: {v}", k.to_ascii_lowercase())
                })
                .collect();
            assert_eq!(trace, want, "{leg} leg (stream {stream})");
        }
    }
}
