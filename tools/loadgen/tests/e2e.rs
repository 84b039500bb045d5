//! End-to-end: runs the `loadgen` binary with `--json` against a tiny in-test vLLM-like server
//! (real socket on 127.0.0.1:0) that answers chunked SSE streams and Content-Length JSON.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MODEL: &str = "test-model";

/// How the fake server behaves.
#[derive(Clone, Default)]
struct Behaviour {
    /// Wait before the first event (or before the JSON body).
    first_delay: Duration,
    /// Wait between events.
    gap: Duration,
    /// Answer 503 to every Nth completion request (1-based).
    fail_every: Option<usize>,
    /// Leave out `data: [DONE]` on every Nth completion request.
    drop_done_every: Option<usize>,
    /// Send `Connection: close` and close after each response.
    close_each: bool,
    /// Close after each response without saying so (like an idle timeout firing).
    silent_close_each: bool,
}

#[derive(Default)]
struct Seen {
    completions: AtomicUsize,
    with_test_header: AtomicUsize,
    connections: AtomicUsize,
}

/// Starts the server on its own thread and runtime; returns its address and what it saw.
fn start(b: Behaviour) -> (SocketAddr, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let seen2 = seen.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            loop {
                let (s, _) = l.accept().await.unwrap();
                s.set_nodelay(true).unwrap();
                seen2.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(s, b.clone(), seen2.clone()));
            }
        });
    });
    (rx.recv().unwrap(), seen)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn serve(mut s: TcpStream, b: Behaviour, seen: Arc<Seen>) {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    loop {
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
        let request_line = head.lines().next().unwrap_or("").to_string();
        let content_length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0);
        if head.contains("\r\nx-loadgen-test: 1\r\n") {
            seen.with_test_header.fetch_add(1, Ordering::SeqCst);
        }
        while buf.len() < head_end + content_length {
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        }
        let body: Vec<u8> = buf[head_end..head_end + content_length].to_vec();
        buf.drain(..head_end + content_length);

        let conn_hdr = if b.close_each {
            "Connection: close\r\n"
        } else {
            ""
        };
        if request_line.starts_with("get /v1/models") {
            let json = format!("{{\"object\":\"list\",\"data\":[{{\"id\":\"{MODEL}\"}}]}}");
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{json}",
                json.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            continue;
        }
        let n = seen.completions.fetch_add(1, Ordering::SeqCst) + 1;
        let worker = format!("w{}", n % 2);
        let req: Value = serde_json::from_slice(&body).unwrap();
        if req["model"] != MODEL {
            let json = r#"{"error":{"message":"model not found","type":"NotFoundError","param":null,"code":404}}"#;
            let resp = format!(
                "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\n{conn_hdr}\r\n{json}",
                json.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        } else if b.fail_every.is_some_and(|k| n.is_multiple_of(k)) {
            let json = r#"{"error":{"message":"busy"}}"#;
            let resp = format!(
                "HTTP/1.1 503 Service Unavailable\r\nx-mock-worker: {worker}\r\nContent-Length: {}\r\n{conn_hdr}\r\n{json}",
                json.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        } else {
            let chat = request_line.contains("/chat/");
            let tokens = req["max_tokens"].as_u64().unwrap();
            if req["stream"] == true {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nx-mock-worker: {worker}\r\n{conn_hdr}\r\n"
                );
                let _ = s.write_all(head.as_bytes()).await;
                tokio::time::sleep(b.first_delay).await;
                let mut events = Vec::new();
                if chat {
                    events.push(r#"{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#.to_string());
                }
                for i in 0..tokens {
                    events.push(if chat {
                        format!(r#"{{"object":"chat.completion.chunk","choices":[{{"index":0,"delta":{{"content":"t{i}"}}}}]}}"#)
                    } else {
                        format!(r#"{{"object":"text_completion","choices":[{{"index":0,"text":"t{i}"}}]}}"#)
                    });
                }
                if req["stream_options"]["include_usage"] == true {
                    events.push(format!(
                        r#"{{"choices":[],"usage":{{"prompt_tokens":9,"completion_tokens":{tokens}}}}}"#
                    ));
                }
                if b.drop_done_every.is_none_or(|k| !n.is_multiple_of(k)) {
                    events.push("[DONE]".to_string());
                }
                for (i, ev) in events.iter().enumerate() {
                    if i > 0 {
                        tokio::time::sleep(b.gap).await;
                    }
                    let sse = format!("data: {ev}\n\n");
                    let chunk = format!("{:x}\r\n{sse}\r\n", sse.len());
                    // Two writes per event so the client sees events split across reads.
                    let (a, c) = chunk.as_bytes().split_at(chunk.len() / 2);
                    let _ = s.write_all(a).await;
                    let _ = s.flush().await;
                    tokio::task::yield_now().await;
                    let _ = s.write_all(c).await;
                }
                let _ = s.write_all(b"0\r\n\r\n").await;
            } else {
                tokio::time::sleep(b.first_delay).await;
                let json = format!(
                    r#"{{"object":"text_completion","choices":[{{"index":0,"text":"{}"}}]}}"#,
                    "t".repeat(tokens as usize)
                );
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nx-mock-worker: {worker}\r\nContent-Length: {}\r\n{conn_hdr}\r\n{json}",
                    json.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            }
        }
        if b.close_each || b.silent_close_each {
            return;
        }
    }
}

/// Runs loadgen against `addr` with `args` plus `--json --quiet`; returns (exit code, report).
fn loadgen(addr: SocketAddr, args: &[&str]) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .arg("--url")
        .arg(format!("http://{addr}"))
        .args(["--json", "--quiet"])
        .args(args)
        .output()
        .expect("run loadgen");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "loadgen printed no JSON ({e}); stdout: {stdout}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

fn u(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("expected an integer, got {v}"))
}

#[test]
fn closed_loop_stream_counts_events_and_ttft() {
    let (addr, seen) = start(Behaviour {
        first_delay: Duration::from_millis(30),
        gap: Duration::from_millis(2),
        ..Default::default()
    });
    // No --model: loadgen discovers it from /v1/models (the server 404s any other name).
    let (code, r) = loadgen(
        addr,
        &[
            "--requests",
            "20",
            "--concurrency",
            "2",
            "--max-tokens",
            "5",
            "--expect-events",
            "5",
            "--header",
            "X-Loadgen-Test: 1",
            "--fail-on-error",
        ],
    );
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["mode"], "closed");
    assert_eq!(r["model"], MODEL);
    assert_eq!(u(&r["requests"]["total"]), 20);
    assert_eq!(u(&r["requests"]["ok"]), 20);
    assert_eq!(u(&r["errors"]["total"]), 0);
    let st = &r["streams"];
    assert_eq!(u(&st["checked"]), 20);
    assert_eq!(u(&st["events_total"]), 100);
    assert_eq!(u(&st["events_min"]), 5);
    assert_eq!(u(&st["events_max"]), 5);
    assert_eq!(u(&st["missing_done"]), 0);
    assert_eq!(u(&st["wrong_event_count"]), 0);
    let l = &r["latency_us"];
    assert_eq!(u(&l["ttft"]["count"]), 20);
    assert!(
        u(&l["ttft"]["min"]) >= 30_000,
        "ttft below injected delay: {l}"
    );
    assert!(u(&l["first_byte"]["min"]) >= 30_000, "{l}");
    assert!(
        u(&l["head"]["p50"]) < 30_000,
        "head is sent before the delay: {l}"
    );
    assert_eq!(u(&l["gap"]["count"]), 20 * 4);
    // Two events can share a read when the reader is late (gap 0), but the gaps of a
    // stream add up to at least the 4 × 2 ms the server waited between events.
    assert!(l["gap"]["mean"].as_f64().unwrap() >= 1_900.0, "{l}");
    assert!(u(&l["total"]["min"]) >= 30_000 + 4 * 2_000, "{l}");
    assert_eq!(u(&l["send_delay"]["count"]), 0);
    assert_eq!(u(&r["workers"]["w0"]) + u(&r["workers"]["w1"]), 20);
    assert_eq!(u(&r["workers"]["w0"]), 10);
    // Keep-alive: one connection per lane (plus the discovery GET).
    assert_eq!(u(&r["connections_opened"]), 2);
    assert_eq!(seen.connections.load(Ordering::SeqCst), 3);
    assert_eq!(seen.with_test_header.load(Ordering::SeqCst), 20);
    assert!(r["requests_per_sec"].as_f64().unwrap() > 0.0);
}

#[test]
fn non_stream_content_length_json() {
    let (addr, _) = start(Behaviour {
        first_delay: Duration::from_millis(20),
        ..Default::default()
    });
    let (code, r) = loadgen(
        addr,
        &[
            "--model",
            MODEL,
            "--no-stream",
            "--requests",
            "10",
            "--fail-on-error",
        ],
    );
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["stream"], false);
    assert_eq!(u(&r["requests"]["ok"]), 10);
    let l = &r["latency_us"];
    assert_eq!(u(&l["ttft"]["count"]), 0);
    assert_eq!(u(&l["first_byte"]["count"]), 10);
    assert!(u(&l["first_byte"]["min"]) >= 20_000, "{l}");
    assert_eq!(u(&r["streams"]["checked"]), 0);
    assert_eq!(u(&r["connections_opened"]), 1);
}

#[test]
fn open_loop_chat_with_usage() {
    let (addr, _) = start(Behaviour {
        first_delay: Duration::from_millis(5),
        ..Default::default()
    });
    let (code, r) = loadgen(
        addr,
        &[
            "--model",
            MODEL,
            "--endpoint",
            "chat",
            "--rate",
            "100",
            "--requests",
            "30",
            "--max-tokens",
            "3",
            "--include-usage",
            "--expect-events",
            "3",
            "--prefix-groups",
            "4",
            "--fail-on-error",
        ],
    );
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["mode"], "open");
    assert_eq!(u(&r["requests"]["ok"]), 30);
    // Role-only and usage-only chunks are not content events.
    assert_eq!(u(&r["streams"]["events_total"]), 90);
    assert_eq!(u(&r["streams"]["wrong_event_count"]), 0);
    assert_eq!(u(&r["latency_us"]["send_delay"]["count"]), 30);
    assert!(u(&r["latency_us"]["ttft"]["min"]) >= 5_000);
    // 30 requests at 100/s take about 0.3 s.
    let d = r["duration_s"].as_f64().unwrap();
    assert!((0.25..2.0).contains(&d), "duration {d}");
}

#[test]
fn errors_and_integrity_failures_are_counted() {
    let (addr, _) = start(Behaviour {
        fail_every: Some(4),
        drop_done_every: Some(5),
        ..Default::default()
    });
    let (code, r) = loadgen(
        addr,
        &[
            "--model",
            MODEL,
            "--requests",
            "20",
            "--max-tokens",
            "2",
            "--fail-on-error",
        ],
    );
    assert_eq!(code, 1, "--fail-on-error exits 1: {r}");
    // Requests 4, 8, 12, 16, 20 fail; 5, 10, 15 lack [DONE] (20 already failed).
    assert_eq!(u(&r["errors"]["by_kind"]["status_503"]), 5);
    assert_eq!(u(&r["requests"]["ok"]), 15);
    assert_eq!(u(&r["streams"]["missing_done"]), 3);
    assert_eq!(u(&r["workers"]["w0"]) + u(&r["workers"]["w1"]), 20);

    let (code, r) = loadgen(addr, &["--model", "other", "--requests", "3"]);
    assert_eq!(
        code, 0,
        "without --fail-on-error errors do not fail the run"
    );
    assert_eq!(u(&r["errors"]["by_kind"]["status_404"]), 3);
}

#[test]
fn connection_close_forces_reconnects() {
    let (addr, seen) = start(Behaviour {
        close_each: true,
        ..Default::default()
    });
    let (code, r) = loadgen(
        addr,
        &["--model", MODEL, "--requests", "6", "--fail-on-error"],
    );
    assert_eq!(code, 0, "{r}");
    assert_eq!(u(&r["requests"]["ok"]), 6);
    assert_eq!(u(&r["connections_opened"]), 6);
    assert_eq!(seen.connections.load(Ordering::SeqCst), 6);
}

#[test]
fn connect_errors_when_nobody_listens() {
    // Port 1 (tcpmux): nobody listens there. A port bound and released here could be
    // taken at once by another test's server running in parallel.
    let addr: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    let (code, r) = loadgen(
        addr,
        &["--model", MODEL, "--requests", "3", "--fail-on-error"],
    );
    assert_eq!(code, 1);
    assert_eq!(u(&r["errors"]["by_kind"]["connect"]), 3);
}

#[test]
fn duration_with_warmup() {
    let (addr, seen) = start(Behaviour {
        first_delay: Duration::from_millis(10),
        ..Default::default()
    });
    let (code, r) = loadgen(
        addr,
        &["--model", MODEL, "--duration", "0.5", "--warmup", "0.3"],
    );
    assert_eq!(code, 0, "{r}");
    let measured = u(&r["requests"]["total"]);
    let served = seen.completions.load(Ordering::SeqCst) as u64;
    // Warmup requests (about 30 on an idle machine) are served but not reported. Counts
    // only, no rates: a loaded CI machine serves far fewer than an idle one.
    assert!(served > measured, "served {served}, measured {measured}");
    assert!(measured >= 1, "measured {measured}");
    let d = r["duration_s"].as_f64().unwrap();
    assert!(d >= 0.5, "duration {d}");
}

#[test]
fn stale_keep_alive_connection_is_retried() {
    let (addr, seen) = start(Behaviour {
        silent_close_each: true,
        ..Default::default()
    });
    let (code, r) = loadgen(
        addr,
        &[
            "--model",
            MODEL,
            "--requests",
            "5",
            "--fail-on-error",
            "--threads",
            "2",
        ],
    );
    assert_eq!(code, 0, "{r}");
    assert_eq!(u(&r["requests"]["ok"]), 5);
    assert_eq!(u(&r["stale_connection_retries"]), 4);
    assert_eq!(seen.completions.load(Ordering::SeqCst), 5);
}

#[test]
fn slow_responses_time_out() {
    let (addr, _) = start(Behaviour {
        first_delay: Duration::from_secs(3),
        ..Default::default()
    });
    let (code, r) = loadgen(
        addr,
        &[
            "--model",
            MODEL,
            "--requests",
            "2",
            "--timeout",
            "0.2",
            "--fail-on-error",
        ],
    );
    assert_eq!(code, 1);
    assert_eq!(u(&r["errors"]["by_kind"]["timeout"]), 2);
    assert_eq!(u(&r["requests"]["ok"]), 0);
}
