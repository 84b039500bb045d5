//! Waiting for a worker's response head without a buffer. With more requests waiting for
//! heads on a shard than `--head-wait-poll-above`, each waits for readiness and takes the
//! head with a `recv()` at its size, instead of posting a read that owns a buffer for the
//! whole wait. `0` puts every request on that path: here, on both io drivers, a head that
//! comes in pieces after an interim `100 Continue`, a large body behind a small head, a
//! stream, a worker that closes before answering, a pooled connection the worker closed,
//! and a client that leaves while it waits all go as they do on the ring's reads. Then a
//! burst of streams that crosses the default threshold all complete.

mod common;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn router(driver: &str, workers: &[&str]) -> Router {
    let mut args = vec![
        "--io-driver",
        driver,
        "--head-wait-poll-above",
        "0",
        "--shards",
        "1",
        "--worker-urls",
    ];
    args.extend_from_slice(workers);
    Router::start(&args)
}

fn completion(stream: bool) -> Vec<u8> {
    post_json(
        "/v1/completions",
        &format!(r#"{{"model":"mock-model","prompt":"x","max_tokens":4,"stream":{stream}}}"#),
    )
}

const DRIVERS: [&str; 2] = ["auto", "epoll"];

#[test]
fn a_head_in_pieces_after_an_interim_response_and_a_large_body_arrive_whole() {
    let body: String = (0..200_000)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let expected = format!(r#"{{"text":"{body}"}}"#);
    let wire = expected.clone();
    let up = RawUpstream::spawn(move |mut s| {
        while read_request(&mut s).is_some() {
            s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
            std::thread::sleep(Duration::from_millis(20));
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-ty").unwrap();
            std::thread::sleep(Duration::from_millis(20));
            let rest = format!(
                "pe: application/json\r\nx-worker: raw\r\ncontent-length: {}\r\n\r\n",
                wire.len()
            );
            s.write_all(rest.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            s.write_all(wire.as_bytes()).unwrap();
        }
    });
    for driver in DRIVERS {
        let r = router(driver, &[&up.url]);
        let mut s = r.connect();
        for _ in 0..2 {
            s.write_all(&completion(false)).unwrap();
            let resp = read_response(&mut s);
            assert_eq!(resp.status, 200, "{driver}");
            assert_eq!(resp.header("x-worker"), Some("raw"), "{driver}");
            assert!(resp.text() == expected, "{driver}: the body differs");
        }
    }
}

#[test]
fn a_stream_is_relayed_event_by_event() {
    let m = mocks(1, |_| {});
    for driver in DRIVERS {
        let r = router(driver, &[&m[0].url()]);
        let resp = exchange(
            r.addr,
            &post_json(
                "/v1/chat/completions",
                r#"{"model":"mock-model","messages":[{"role":"user","content":"x"}],"max_tokens":8,"stream":true}"#,
            ),
        );
        assert_eq!(resp.status, 200, "{driver}");
        let text = resp.text();
        assert_eq!(text.matches("data: ").count(), 10, "{driver}: {text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{driver}");
        let unbuffered = scrape_counter(&r, "ringrouter_shard_unbuffered_head_waits_total");
        assert_eq!(unbuffered, 1.0, "{driver}");
    }
}

#[test]
fn a_worker_that_closes_before_answering_is_retried_on_another() {
    let closer = RawUpstream::spawn(|mut s| {
        let _ = read_request(&mut s);
    });
    let m = mocks(1, |_| {});
    for driver in DRIVERS {
        // Round robin: each worker gets a turn, and the closer's turn is retried.
        let r = router(driver, &[&closer.url, &m[0].url()]);
        for _ in 0..4 {
            let resp = exchange(r.addr, &completion(false));
            assert_eq!(resp.status, 200, "{driver}: {}", resp.text());
        }
    }
}

#[test]
fn a_pooled_connection_the_worker_closed_is_replaced_on_the_same_worker() {
    // Answers one request per connection, then closes it without saying so.
    let conns = Arc::new(AtomicUsize::new(0));
    let n = conns.clone();
    let up = RawUpstream::spawn(move |mut s| {
        n.fetch_add(1, Ordering::SeqCst);
        if read_request(&mut s).is_some() {
            let body = r#"{"text":"ok"}"#;
            let wire = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(wire.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(30));
        }
    });
    for driver in DRIVERS {
        let before = conns.load(Ordering::SeqCst);
        let r = router(driver, &[&up.url]);
        for _ in 0..3 {
            let resp = exchange(r.addr, &completion(false));
            assert_eq!(resp.status, 200, "{driver}: {}", resp.text());
            assert_eq!(resp.text(), r#"{"text":"ok"}"#);
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(conns.load(Ordering::SeqCst) - before, 3, "{driver}");
    }
}

#[test]
fn a_client_leaving_while_its_head_is_awaited_closes_the_upstream() {
    let closed_at: Closes = Arc::default();
    let c = closed_at.clone();
    // Never answers; records when the router closes the connection.
    let up = RawUpstream::spawn(move |mut s| {
        if read_request(&mut s).is_some() {
            let mut b = [0u8; 64];
            if s.read(&mut b).unwrap_or(0) == 0 {
                c.lock().unwrap().push(Instant::now());
            }
        }
    });
    for (round, driver) in DRIVERS.iter().enumerate() {
        let r = router(driver, &[&up.url]);
        let mut s = r.connect();
        s.write_all(&completion(true)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let left = Instant::now();
        drop(s);
        let at = nth_close(&closed_at, round)
            .unwrap_or_else(|| panic!("{driver}: the router kept the upstream open"));
        assert!(at.duration_since(left) < Duration::from_secs(1), "{driver}");
    }
}

/// More requests waiting for their heads at once than the default threshold (512) on one
/// shard (non-streamed: the head comes with the answer, after the mock's 2 s, long enough
/// for all of them to be sent on a loaded machine): the first wait on the ring's reads, the
/// rest without a buffer; all are answered whole.
#[test]
fn a_burst_that_crowds_the_shard_is_answered_whole() {
    let m = mocks(2, |c| {
        c.ttft = Duration::from_secs(2);
        c.record = false;
    });
    let mut args = worker_args(&m);
    args.extend(["--shards".into(), "1".into()]);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let r = Router::start(&a);
    let addr = r.addr;
    const N: usize = 700;
    let results = concurrently(N, move |i| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let body = r#"{"model":"mock-model","prompt":"Hello","max_tokens":4}"#;
        let req = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("{i}: connect {e}"))?;
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut all))
            .await
            .map_err(|_| format!("{i}: stalled"))?
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&all);
        let (head, body) = text.split_once("\r\n\r\n").ok_or("no head")?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(format!("{i}: {head}"));
        }
        let v: serde_json::Value =
            serde_json::from_str(body).map_err(|e| format!("{i}: {e}: {body}"))?;
        match v["choices"][0]["finish_reason"].as_str() {
            Some("length") => Ok(()),
            _ => Err(format!("{i}: {body}")),
        }
    });
    assert_all_ok(&results);
    let unbuffered = scrape_counter(&r, "ringrouter_shard_unbuffered_head_waits_total");
    assert!(
        unbuffered > 0.0 && unbuffered < N as f64,
        "{unbuffered} of {N} waited without a buffer"
    );
}

fn scrape_counter(r: &Router, name: &str) -> f64 {
    r.scrape()
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
