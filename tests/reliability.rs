//! Reliability as a client sees it: workers that fail health checks, answer 5xx, die, hang
//! mid-stream or are removed leave the client's requests whole; overload gets 429 and 408
//! with JSON errors; keys guard the API. Real router binary, mock vLLM workers on loopback.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

const COMPLETION: &str = r#"{"model":"mock-model","prompt":"x","max_tokens":4}"#;
const STREAM: &str = r#"{"model":"mock-model","prompt":"x","max_tokens":8,"stream":true}"#;

fn completion(r: &Router) -> Response {
    exchange(r.addr, &post_json("/v1/completions", COMPLETION))
}

/// Generation requests each mock has answered (health checks and scrapes not counted).
fn generations(m: &[MockServer]) -> Vec<usize> {
    m.iter()
        .map(|m| {
            m.received()
                .iter()
                .filter(|r| r.path == "/v1/completions")
                .count()
        })
        .collect()
}

/// Polls `f` every 20 ms for up to `secs`; returns whether it became true.
fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// Sends a request and reads only the response head (the body may never end).
fn open_stream(r: &Router, body: &str) -> (TcpStream, String) {
    let mut s = r.connect();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&post_json("/v1/completions", body)).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "closed before the head");
        head.push(b[0]);
    }
    (s, String::from_utf8(head).unwrap())
}

// ---- active health checks -------------------------------------------------------------

#[test]
fn a_worker_failing_its_health_checks_is_taken_out_and_comes_back() {
    let m = mocks(2, |_| {});
    let r = Router::start(&[
        "--worker-urls",
        &m[0].url(),
        &m[1].url(),
        "--policy",
        "round_robin",
        "--health-check-interval-secs",
        "1",
        "--health-failure-threshold",
        "1",
        "--health-success-threshold",
        "1",
    ]);
    assert_eq!(worker_health(&r, &m[0].url()), "healthy");
    m[0].set_healthy(false);
    assert!(
        eventually(5, || worker_health(&r, &m[0].url()) == "unhealthy"),
        "{}",
        r.log()
    );
    assert!(r.log_contains("unhealthy"), "{}", r.log());
    let before = generations(&m);
    for _ in 0..20 {
        assert_eq!(completion(&r).status, 200);
    }
    let after = generations(&m);
    assert_eq!(after[0], before[0], "an unhealthy worker got requests");
    assert_eq!(after[1], before[1] + 20);
    let listed = exchange(r.addr, &get("/list_workers")).json();
    assert_eq!(
        listed["urls"].as_array().unwrap().len(),
        2,
        "still registered"
    );

    m[0].set_healthy(true);
    assert!(eventually(5, || worker_health(&r, &m[0].url()) == "healthy"));
    let before = generations(&m);
    for _ in 0..20 {
        assert_eq!(completion(&r).status, 200);
    }
    let after = generations(&m);
    assert!(after[0] >= before[0] + 5, "{before:?} -> {after:?}");
}

#[test]
fn a_worker_down_at_start_is_unknown_and_unused_until_its_first_good_check() {
    let m = mocks(2, |_| {});
    m[1].set_healthy(false);
    let r = Router::start(&[
        "--worker-urls",
        &m[0].url(),
        &m[1].url(),
        "--health-check-interval-secs",
        "1",
    ]);
    assert_eq!(worker_health(&r, &m[0].url()), "healthy");
    assert_eq!(worker_health(&r, &m[1].url()), "unknown");
    for _ in 0..10 {
        assert_eq!(completion(&r).status, 200);
    }
    assert_eq!(generations(&m)[1], 0);
    m[1].set_healthy(true);
    assert!(eventually(5, || worker_health(&r, &m[1].url()) == "healthy"));
    for _ in 0..10 {
        assert_eq!(completion(&r).status, 200);
    }
    assert!(generations(&m)[1] > 0);
}

#[test]
fn with_a_zero_startup_timeout_workers_serve_before_any_check() {
    let m = mocks(1, |_| {});
    m[0].set_healthy(false);
    let r = Router::start(&[
        "--worker-urls",
        &m[0].url(),
        "--health-check-interval-secs",
        "30",
        "--worker-startup-timeout-secs",
        "0",
    ]);
    assert_eq!(completion(&r).status, 200);
}

// ---- retries ----------------------------------------------------------------------------

#[test]
fn retries_on_another_worker_hide_a_failing_worker_from_clients() {
    let m = mocks(2, |_| {});
    m[0].set_fail_rate(0.3);
    let r = Router::start(&[
        "--worker-urls",
        &m[0].url(),
        &m[1].url(),
        "--policy",
        "round_robin",
        "--retry-initial-backoff-ms",
        "1",
    ]);
    for i in 0..60 {
        let resp = completion(&r);
        assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
    }
    assert!(m[0].stats().injected_errors > 0, "the fault was never hit");
}

#[test]
fn streams_are_retried_too_while_nothing_reached_the_client() {
    let m = mocks(2, |_| {});
    m[0].set_fail_rate(1.0);
    let r = Router::start(&[
        "--worker-urls",
        &m[0].url(),
        &m[1].url(),
        "--policy",
        "round_robin",
        "--retry-initial-backoff-ms",
        "1",
    ]);
    for _ in 0..6 {
        let resp = exchange(r.addr, &post_json("/v1/completions", STREAM));
        assert_eq!(resp.status, 200);
        assert!(resp.text().ends_with("data: [DONE]\n\n"), "{}", resp.text());
    }
    assert!(m[0].stats().injected_errors > 0);
}

#[test]
fn with_retries_disabled_the_workers_error_reaches_the_client_unchanged() {
    let m = mocks(1, |c| c.fail_rate = 1.0);
    let r = Router::start(&["--worker-urls", &m[0].url(), "--disable-retries"]);
    let resp = completion(&r);
    assert_eq!(resp.status, 500);
    let direct = exchange(m[0].addr(), &post_json("/v1/completions", COMPLETION));
    assert_eq!(resp.body, direct.body);
    assert_eq!(
        m[0].stats().injected_errors,
        2,
        "one attempt through the router"
    );
}

#[test]
fn when_every_attempt_fails_the_last_answer_is_relayed() {
    let m = mocks(2, |c| c.fail_rate = 1.0);
    let r = Router::start(&[
        "--worker-urls",
        &m[0].url(),
        &m[1].url(),
        "--retry-max-retries",
        "3",
        "--retry-initial-backoff-ms",
        "1",
        "--disable-circuit-breaker",
    ]);
    let resp = completion(&r);
    assert_eq!(resp.status, 500);
    assert!(
        resp.json()["error"]["message"].is_string(),
        "{}",
        resp.text()
    );
    let tried: u64 = m.iter().map(|m| m.stats().injected_errors).sum();
    assert_eq!(tried, 3, "--retry-max-retries counts attempts");
}

// ---- circuit breaker ------------------------------------------------------------------

#[test]
fn the_breaker_opens_after_consecutive_failures_and_a_probe_closes_it() {
    let m = mocks(2, |_| {});
    m[0].set_fail_rate(1.0);
    let r = Router::start(&[
        "--worker-urls",
        &m[0].url(),
        &m[1].url(),
        "--policy",
        "round_robin",
        "--retry-initial-backoff-ms",
        "1",
        "--cb-failure-threshold",
        "3",
        "--cb-success-threshold",
        "1",
        "--cb-timeout-duration-secs",
        "3",
    ]);
    for _ in 0..12 {
        assert_eq!(completion(&r).status, 200);
    }
    assert!(r.log_contains("circuit breaker open"), "{}", r.log());
    let v = exchange(r.addr, &get("/workers")).json();
    assert_eq!(v["workers"][0]["circuit_breaker"], "open", "{v}");
    // Open: the failing worker is not tried at all.
    let tried = m[0].stats().injected_errors;
    assert_eq!(tried, 3, "exactly the threshold's failures before opening");
    for _ in 0..20 {
        assert_eq!(completion(&r).status, 200);
    }
    assert_eq!(m[0].stats().injected_errors, tried);

    // After the open period one probe goes through; it succeeds and closes the breaker.
    m[0].set_fail_rate(0.0);
    std::thread::sleep(Duration::from_millis(3100));
    let before = generations(&m)[0];
    for _ in 0..20 {
        assert_eq!(completion(&r).status, 200);
    }
    assert!(r.log_contains("circuit breaker closed"), "{}", r.log());
    assert!(generations(&m)[0] >= before + 5, "the worker came back");
}

#[test]
fn a_half_open_worker_gets_one_probe_not_a_flood() {
    let m = mocks(2, |c| c.ttft = Duration::from_millis(300));
    m[0].set_fail_rate(1.0);
    let r = Router::start(&[
        "--worker-urls",
        &m[0].url(),
        &m[1].url(),
        "--policy",
        "round_robin",
        "--retry-initial-backoff-ms",
        "1",
        "--cb-failure-threshold",
        "1",
        "--cb-timeout-duration-secs",
        "1",
    ]);
    for _ in 0..4 {
        assert_eq!(completion(&r).status, 200);
    }
    assert!(r.log_contains("circuit breaker open"), "{}", r.log());
    std::thread::sleep(Duration::from_millis(1100));
    // Still failing; 8 concurrent requests after the open period: one probe, the rest avoid it.
    let before = m[0].stats().injected_errors;
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let addr = r.addr;
            std::thread::spawn(move || {
                exchange(addr, &post_json("/v1/completions", COMPLETION)).status
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 200);
    }
    assert_eq!(m[0].stats().injected_errors, before + 1);
}

#[test]
fn with_every_breaker_open_requests_still_go_to_the_workers() {
    let m = mocks(2, |c| c.fail_rate = 1.0);
    let r = Router::start(&[
        "--worker-urls",
        &m[0].url(),
        &m[1].url(),
        "--retry-initial-backoff-ms",
        "1",
        "--cb-failure-threshold",
        "2",
        "--cb-timeout-duration-secs",
        "60",
    ]);
    for _ in 0..4 {
        assert_eq!(completion(&r).status, 500);
    }
    let v = exchange(r.addr, &get("/workers")).json();
    assert_eq!(v["workers"][0]["circuit_breaker"], "open", "{v}");
    assert_eq!(v["workers"][1]["circuit_breaker"], "open", "{v}");
    // The burst is over; the breakers would keep the fleet dark for a minute.
    m[0].set_fail_rate(0.0);
    m[1].set_fail_rate(0.0);
    assert_eq!(completion(&r).status, 200);
    assert!(r.log_contains("routing to them anyway"), "{}", r.log());
}

// ---- failures mid-run and mid-stream ----------------------------------------------------

#[test]
fn a_worker_killed_under_load_costs_no_client_a_request_that_had_not_started() {
    let mut m = mocks(2, |_| {});
    let r = Router::start(&[
        "--worker-urls",
        &m[0].url(),
        &m[1].url(),
        "--policy",
        "round_robin",
        "--retry-initial-backoff-ms",
        "1",
    ]);
    let addr = r.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                // Keep-alive connection, non-streamed requests back to back.
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut pending = Vec::new();
                let mut statuses = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    s.write_all(&post_json("/v1/completions", COMPLETION))
                        .unwrap();
                    let resp = read_response_from(&mut s, &mut pending, false).unwrap();
                    statuses.push(resp.status);
                }
                statuses
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    m.remove(0).shutdown();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        let statuses = c.join().unwrap();
        total += statuses.len();
        assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    }
    assert!(total > 20, "too little load to mean anything: {total}");
}

#[test]
fn an_upstream_silent_past_the_idle_timeout_is_cut_and_the_stream_ends_cleanly() {
    let m = mocks(1, |c| c.hang_after = Some(2));
    let r = Router::start(&[
        "--worker-urls",
        &m[0].url(),
        "--stream-idle-timeout-secs",
        "1",
    ]);
    let started = Instant::now();
    let resp = exchange(r.addr, &post_json("/v1/completions", STREAM));
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(resp.status, 200);
    let text = resp.text();
    assert_eq!(text.matches("\"text\"").count(), 2, "{text}");
    assert!(text.contains("data: {\"error\": {"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(r.log_contains("idle"), "{}", r.log());
    // The hung upstream connection was closed, not pooled.
    assert!(eventually(5, || m[0].stats().connections_open == 0));
}

#[test]
fn a_request_timeout_bounds_a_whole_request() {
    let m = mocks(1, |c| c.ttft = Duration::from_secs(30));
    let r = Router::start(&[
        "--worker-urls",
        &m[0].url(),
        "--request-timeout-secs",
        "1",
        "--disable-retries",
    ]);
    let resp = completion(&r);
    assert_eq!(resp.status, 504, "{}", resp.text());
    resp.error_message();
}

// ---- admission ------------------------------------------------------------------------

#[test]
fn beyond_the_in_flight_limit_requests_queue_then_get_429_or_408() {
    let m = mocks(1, |c| c.hang_after = Some(1));
    let r = Router::start(&[
        "--worker-urls",
        &m[0].url(),
        "--shards",
        "2",
        "--max-concurrent-requests",
        "2",
        "--queue-size",
        "1",
        "--queue-timeout-secs",
        "3",
    ]);
    let (a, head) = open_stream(&r, STREAM);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (_b, head) = open_stream(&r, STREAM);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Third waits in the queue (and times out); fourth finds the queue full.
    let addr = r.addr;
    let queued = std::thread::spawn(move || {
        let t = Instant::now();
        (
            exchange(addr, &post_json("/v1/completions", COMPLETION)),
            t.elapsed(),
        )
    });
    // (Generous: on a loaded machine the queued request takes a while to get in line.)
    std::thread::sleep(Duration::from_millis(1500));
    let resp = completion(&r);
    assert_eq!(resp.status, 429);
    assert!(resp.error_message().contains("--max-concurrent-requests"));
    let (resp, waited) = queued.join().unwrap();
    assert_eq!(resp.status, 408, "{}", resp.text());
    assert!(resp.error_message().contains("--queue-timeout-secs"));
    assert!(waited >= Duration::from_millis(2900), "{waited:?}");

    // A stream ending frees its slot: a queued request then gets it.
    let queued = std::thread::spawn(move || {
        exchange(addr, &post_json("/v1/completions", COMPLETION)).status
    });
    std::thread::sleep(Duration::from_millis(200));
    drop(a);
    assert_eq!(queued.join().unwrap(), 200);
}

// ---- live worker changes --------------------------------------------------------------

#[test]
fn a_removed_workers_streams_finish_and_new_requests_go_elsewhere() {
    let m = mocks(2, |c| {
        c.itl = Duration::from_millis(40);
        c.tokens = 25;
    });
    let r = Router::start(&["--worker-urls", &m[0].url()]);
    let addr = r.addr;
    let long = std::thread::spawn(move || {
        exchange(
            addr,
            &post_json(
                "/v1/completions",
                r#"{"model":"mock-model","prompt":"x","stream":true}"#,
            ),
        )
    });
    assert!(eventually(5, || m[0].stats().in_flight == 1));
    let add = exchange(r.addr, &post(&format!("/add_worker?url={}", m[1].url())));
    assert_eq!(add.status, 200, "{}", add.text());
    let rm = exchange(r.addr, &post(&format!("/remove_worker?url={}", m[0].url())));
    assert_eq!(rm.status, 200, "{}", rm.text());
    let listed = exchange(r.addr, &get("/list_workers")).json();
    assert_eq!(listed["urls"], serde_json::json!([m[1].url()]));
    let before = generations(&m);
    for _ in 0..10 {
        assert_eq!(completion(&r).status, 200);
    }
    let after = generations(&m);
    assert_eq!(after[0], before[0]);
    assert_eq!(after[1], before[1] + 10);
    // The stream in flight on the removed worker ran to its end.
    let resp = long.join().unwrap();
    assert_eq!(resp.text().matches("\"text\"").count(), 25);
    assert!(resp.text().ends_with("data: [DONE]\n\n"));
    assert_eq!(m[0].stats().streams_completed, 1);
    // And its connection was closed after it instead of going back to the pool.
    assert!(eventually(5, || m[0].stats().connections_open == 0));
}

fn post(path: &str) -> Vec<u8> {
    format!("POST {path} HTTP/1.1\r\nHost: router\r\nContent-Length: 0\r\n\r\n").into_bytes()
}

// ---- keys -----------------------------------------------------------------------------

#[test]
fn client_api_keys_guard_the_api_but_not_the_probes() {
    let m = mocks(1, |_| {});
    let r = Router::start(&[
        "--worker-urls",
        &m[0].url(),
        "--client-api-key",
        "k1",
        "--client-api-key",
        "k2",
    ]);
    let resp = completion(&r);
    assert_eq!(resp.status, 401);
    resp.error_message();
    let with = |key: &str| {
        let body = COMPLETION;
        exchange(
            r.addr,
            format!(
                "POST /v1/completions HTTP/1.1\r\nHost: r\r\nAuthorization: Bearer {key}\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .status
    };
    assert_eq!(with("k2"), 200);
    assert_eq!(with("k1"), 200);
    assert_eq!(with("k3"), 401);
    assert_eq!(exchange(r.addr, &get("/health")).status, 200);
    assert_eq!(exchange(r.addr, &get("/list_workers")).status, 401);
    assert_eq!(generations(&m)[0], 2);
}

#[test]
fn the_worker_api_key_replaces_the_clients_authorization_upstream() {
    let m = mocks(1, |_| {});
    let r = Router::start(&[
        "--worker-urls",
        &m[0].url(),
        "--client-api-key",
        "client-secret",
        "--api-key",
        "worker-secret",
    ]);
    let body = COMPLETION;
    let resp = exchange(
        r.addr,
        format!(
            "POST /v1/completions HTTP/1.1\r\nHost: r\r\nAuthorization: Bearer client-secret\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    assert_eq!(resp.status, 200);
    let got = m[0].received();
    let auth: Vec<_> = got[0]
        .headers
        .iter()
        .filter(|(k, _)| k == "authorization")
        .collect();
    assert_eq!(auth.len(), 1, "{auth:?}");
    assert_eq!(auth[0].1, "Bearer worker-secret");
}
