//! The Prometheus endpoint: known traffic through the real router, then `GET /metrics` on
//! its own port, read in vllm-router's names and labels.

mod common;

use std::time::Duration;

use common::*;

/// The value of one series (`name{labels}` exactly as exposed), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (s, v) = l.rsplit_once(' ')?;
        (s == series).then(|| v.parse().ok())?
    })
}

fn must(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or_else(|| panic!("{series} not in:\n{text}"))
}

/// Waits until the router has counted `n` requests (it counts a request as it ends, just
/// after the client read its last byte).
fn scrape_after(r: &Router, n: u64) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = r.scrape();
        let counted: f64 = text
            .lines()
            .filter(|l| l.starts_with("ringrouter_shard_requests_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        if counted as u64 >= n || std::time::Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn completion(model: &str, stream: bool) -> Vec<u8> {
    post_json(
        "/v1/completions",
        &format!(r#"{{"model":"{model}","prompt":"hello","max_tokens":3,"stream":{stream}}}"#),
    )
}

fn chat(stream: bool) -> Vec<u8> {
    post_json(
        "/v1/chat/completions",
        &format!(
            r#"{{"model":"mock-model","messages":[{{"role":"user","content":"hi"}}],"max_tokens":3,"stream":{stream}}}"#
        ),
    )
}

#[test]
fn requests_are_counted_by_route_worker_and_outcome() {
    let m = mocks(2, |_| {});
    let mut args = worker_args(&m);
    args.extend(["--policy", "round_robin", "--shards", "2"].map(String::from));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = Router::start(&a);

    for i in 0..6 {
        assert_eq!(
            exchange(r.addr, &completion("mock-model", i % 2 == 0)).status,
            200
        );
    }
    for _ in 0..4 {
        assert_eq!(exchange(r.addr, &chat(true)).status, 200);
    }
    // The router's own 400 (not JSON), and the worker's 404 (unknown model).
    assert_eq!(
        exchange(r.addr, &post_json("/v1/completions", "not json")).status,
        400
    );
    assert_eq!(
        exchange(r.addr, &completion("no-such-model", false)).status,
        404
    );
    // Health probes are not requests.
    assert_eq!(exchange(r.addr, &get("/health")).status, 200);

    let text = scrape_after(&r, 12);
    let c = "vllm_router_requests_total{route=\"/v1/completions\"}";
    assert_eq!(must(&text, c), 8.0);
    assert_eq!(
        must(
            &text,
            "vllm_router_requests_total{route=\"/v1/chat/completions\"}"
        ),
        4.0
    );
    assert_eq!(
        value(&text, "vllm_router_requests_total{route=\"other\"}"),
        None
    );
    assert_eq!(
        must(
            &text,
            "vllm_router_request_errors_total{route=\"/v1/completions\",error_type=\"bad_request\"}"
        ),
        1.0
    );
    assert_eq!(
        must(
            &text,
            "vllm_router_request_errors_total{route=\"/v1/completions\",error_type=\"non_retryable_error\"}"
        ),
        1.0
    );
    // Round robin over two workers: 11 responses from them (the 400 never reached one).
    let processed: Vec<f64> = m
        .iter()
        .map(|w| {
            must(
                &text,
                &format!(
                    "vllm_router_processed_requests_total{{worker=\"{}\"}}",
                    w.url()
                ),
            )
        })
        .collect();
    assert_eq!(processed.iter().sum::<f64>(), 11.0, "{processed:?}");
    for w in &m {
        let url = w.url();
        assert_eq!(
            must(
                &text,
                &format!("vllm_router_running_requests{{worker=\"{url}\"}}")
            ),
            0.0
        );
        assert_eq!(
            must(
                &text,
                &format!("vllm_router_worker_health{{worker=\"{url}\"}}")
            ),
            1.0
        );
        assert_eq!(
            must(&text, &format!("vllm_router_cb_state{{worker=\"{url}\"}}")),
            0.0
        );
        assert_eq!(
            must(
                &text,
                &format!("vllm_router_cb_outcomes_total{{worker=\"{url}\",outcome=\"failure\"}}")
            ),
            0.0
        );
    }
    assert_eq!(must(&text, "vllm_router_active_workers"), 2.0);
    // Histograms: every request observed once, buckets cumulative up to +Inf = count.
    let count = must(
        &text,
        "vllm_router_request_duration_seconds_count{route=\"/v1/completions\"}",
    );
    assert_eq!(count, 8.0);
    let buckets: Vec<f64> = text
        .lines()
        .filter(|l| {
            l.starts_with("vllm_router_request_duration_seconds_bucket{route=\"/v1/completions\"")
        })
        .map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap())
        .collect();
    assert_eq!(buckets.len(), 21, "vllm-router's 20 bounds and +Inf");
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    assert_eq!(*buckets.last().unwrap(), count);
    assert!(text.contains(
        "vllm_router_request_duration_seconds_bucket{route=\"/v1/completions\",le=\"+Inf\"} 8"
    ));
    assert_eq!(
        must(&text, "vllm_router_generate_duration_seconds_count"),
        12.0
    );
    // The router's own time: one observation per request a worker answered at once.
    assert_eq!(
        must(&text, "ringrouter_added_seconds_count{phase=\"to_worker\"}"),
        11.0
    );
    assert_eq!(
        must(&text, "ringrouter_added_seconds_count{phase=\"to_client\"}"),
        11.0
    );
    assert!(must(&text, "ringrouter_time_to_first_token_seconds_count") >= 10.0);
    // Per shard.
    let shards: f64 = (0..2)
        .map(|i| {
            must(
                &text,
                &format!("ringrouter_shard_requests_total{{shard=\"{i}\"}}"),
            )
        })
        .sum();
    assert_eq!(shards, 12.0);
    assert!(text.contains("ringrouter_shard_info{shard=\"0\",driver="));
    // The Prometheus text format's content type, as vllm-router serves it.
    let resp = exchange(
        r.metrics.unwrap(),
        b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(
        resp.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
}

#[test]
fn the_metrics_port_answers_only_metrics() {
    let m = mocks(1, |_| {});
    let args = worker_args(&m);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = Router::start(&a);
    let addr = r.metrics.unwrap();
    let resp = exchange(
        addr,
        b"GET /v1/models HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(resp.status, 404);
    assert_eq!(resp.json()["error"]["code"], 404);
    let resp = exchange(
        addr,
        b"POST /metrics HTTP/1.1\r\nHost: m\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(resp.status, 405);
    // The request port's /metrics is the worker's (vLLM's), as any other path.
    let resp = exchange(r.addr, &get("/metrics"));
    assert!(!resp.text().contains("vllm_router_"), "{}", resp.text());
}

#[test]
fn a_failing_worker_opens_its_breaker_and_retries_are_counted() {
    let good = mocks(1, |c| c.name = "good".into());
    let bad = mocks(1, |c| {
        c.name = "bad".into();
        c.fail_rate = 1.0;
    });
    let r = Router::start(&[
        "--worker-urls",
        &bad[0].url(),
        &good[0].url(),
        "--policy",
        "round_robin",
        "--shards",
        "1",
        "--cb-failure-threshold",
        "2",
        "--retry-initial-backoff-ms",
        "1",
    ]);
    for _ in 0..4 {
        let resp = exchange(r.addr, &completion("mock-model", false));
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    let text = scrape_after(&r, 4);
    let bad_url = bad[0].url();
    assert_eq!(
        must(
            &text,
            &format!("vllm_router_cb_state{{worker=\"{bad_url}\"}}")
        ),
        1.0,
        "open"
    );
    assert_eq!(
        must(
            &text,
            &format!(
                "vllm_router_cb_state_transitions_total{{worker=\"{bad_url}\",from=\"closed\",to=\"open\"}}"
            )
        ),
        1.0
    );
    assert_eq!(
        must(
            &text,
            &format!("vllm_router_cb_outcomes_total{{worker=\"{bad_url}\",outcome=\"failure\"}}")
        ),
        2.0
    );
    let retries = must(
        &text,
        "vllm_router_retries_total{route=\"/v1/completions\"}",
    );
    assert_eq!(
        retries, 2.0,
        "one retry per request the bad worker was tried for"
    );
    assert_eq!(
        must(
            &text,
            &format!(
                "vllm_router_processed_requests_total{{worker=\"{}\"}}",
                good[0].url()
            )
        ),
        4.0
    );
    assert_eq!(
        value(
            &text,
            "vllm_router_request_errors_total{route=\"/v1/completions\",error_type=\"worker_error\"}"
        ),
        None,
        "the client never saw the 500s"
    );
}

#[test]
fn a_stream_cut_mid_response_is_a_stream_error() {
    let m = mocks(1, |c| {
        c.drop_after = Some(2);
        c.tokens = 10;
    });
    let args = worker_args(&m);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = Router::start(&a);
    let resp = exchange(r.addr, &completion("mock-model", true));
    assert_eq!(resp.status, 200);
    assert!(resp.text().contains("BadGatewayError"), "{}", resp.text());
    let text = scrape_after(&r, 1);
    assert_eq!(
        must(
            &text,
            "vllm_router_request_errors_total{route=\"/v1/completions\",error_type=\"stream_error\"}"
        ),
        1.0
    );
}

#[test]
fn a_worker_failing_every_request_is_logged_once_a_second_and_counted_every_time() {
    let m = mocks(1, |c| {
        c.drop_after = Some(1);
        c.tokens = 10;
    });
    let mut args = worker_args(&m);
    args.extend(["--shards", "1", "--disable-circuit-breaker"].map(String::from));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = Router::start(&a);
    let t0 = std::time::Instant::now();
    for _ in 0..20 {
        let resp = exchange(r.addr, &completion("mock-model", true));
        assert!(resp.text().contains("BadGatewayError"), "{}", resp.text());
    }
    let secs = t0.elapsed().as_secs() as usize;
    let text = scrape_after(&r, 20);
    assert_eq!(
        must(
            &text,
            "vllm_router_request_errors_total{route=\"/v1/completions\",error_type=\"stream_error\"}"
        ),
        20.0
    );
    let lines = r
        .log()
        .lines()
        .filter(|l| l.contains("worker closed the connection mid-response"))
        .count();
    assert!(
        (1..=secs + 1).contains(&lines),
        "{lines} lines for 20 failures in {secs} s:\n{}",
        r.log()
    );
}

#[test]
fn a_slot_reused_by_a_new_worker_starts_from_zero() {
    let a = mocks(1, |c| c.name = "a".into());
    let b = mocks(1, |c| c.name = "b".into());
    let r = Router::start(&["--worker-urls", &a[0].url()]);
    for _ in 0..3 {
        assert_eq!(
            exchange(r.addr, &completion("mock-model", false)).status,
            200
        );
    }
    let admin = |path: String| {
        let raw = format!("POST {path} HTTP/1.1\r\nHost: r\r\nContent-Length: 0\r\n\r\n");
        let resp = exchange(r.addr, raw.as_bytes());
        assert_eq!(resp.status, 200, "{}", resp.text());
    };
    admin(format!("/remove_worker?url={}", a[0].url()));
    admin(format!("/add_worker?url={}", b[0].url()));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let resp = exchange(r.addr, &completion("mock-model", false));
        // b holds a's old slot: never over a's pooled connections.
        assert_ne!(resp.header("x-mock-worker"), Some("a"), "a was removed");
        if resp.header("x-mock-worker") == Some("b") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "b never served");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        exchange(r.addr, &completion("mock-model", false)).status,
        200
    );
    let text = scrape_after(&r, 5);
    assert_eq!(
        must(
            &text,
            &format!(
                "vllm_router_processed_requests_total{{worker=\"{}\"}}",
                b[0].url()
            )
        ),
        2.0,
        "b's count, not a's 3 before it: {text}"
    );
    assert_eq!(
        value(
            &text,
            &format!(
                "vllm_router_processed_requests_total{{worker=\"{}\"}}",
                a[0].url()
            )
        ),
        None,
        "a removed"
    );
}

#[test]
fn pd_requests_are_counted_per_leg() {
    let p = mocks(2, |c| c.name = "p".into());
    let d = mocks(1, |c| c.name = "d".into());
    let mut args: Vec<String> = vec!["--vllm-pd-disaggregation".into()];
    for w in &p {
        args.extend(["--prefill".into(), w.url()]);
    }
    args.extend(["--decode".into(), d[0].url()]);
    args.extend(["--policy", "round_robin", "--shards", "1"].map(String::from));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = Router::start(&a);
    for i in 0..4 {
        assert_eq!(
            exchange(r.addr, &completion("mock-model", i % 2 == 0)).status,
            200
        );
    }
    let text = scrape_after(&r, 4);
    assert_eq!(
        must(
            &text,
            "vllm_router_pd_requests_total{route=\"/v1/completions\"}"
        ),
        4.0
    );
    for w in &p {
        assert_eq!(
            must(
                &text,
                &format!(
                    "vllm_router_pd_prefill_requests_total{{worker=\"{}\"}}",
                    w.url()
                )
            ),
            2.0
        );
    }
    assert_eq!(
        must(
            &text,
            &format!(
                "vllm_router_pd_decode_requests_total{{worker=\"{}\"}}",
                d[0].url()
            )
        ),
        4.0
    );
    assert_eq!(
        must(
            &text,
            "ringrouter_added_seconds_count{phase=\"between_legs\"}"
        ),
        4.0
    );
    assert_eq!(
        must(&text, "ringrouter_added_seconds_count{phase=\"to_worker\"}"),
        4.0,
        "the prefill legs'"
    );
    assert!(text.contains("vllm_router_policy_decisions_total{policy=\"round_robin\",worker="));
    assert_eq!(
        must(
            &text,
            "vllm_router_pd_request_duration_seconds_count{route=\"/v1/completions\"}"
        ),
        4.0
    );
}

#[test]
fn an_explicit_metrics_port_that_is_taken_fails_the_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let err = Router::start_with(None, &["--prometheus-port", &port]).err();
    let log = err.expect("the router must not start");
    assert!(log.contains("--prometheus-port"), "{log}");
}

#[test]
fn the_access_log_has_a_line_per_request() {
    let m = mocks(1, |c| c.name = "w".into());
    let mut args = worker_args(&m);
    args.push("--access-log".into());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = Router::start(&a);
    let raw = String::from_utf8(completion("mock-model", true))
        .unwrap()
        .replacen(
            "Host: router\r\n",
            "Host: router\r\nX-Request-Id: acc-123\r\n",
            1,
        );
    assert_eq!(exchange(r.addr, raw.as_bytes()).status, 200);
    assert!(r.log_contains("acc-123"), "{}", r.log());
    let line = r
        .log()
        .lines()
        .find(|l| l.contains("acc-123"))
        .unwrap()
        .to_string();
    for part in [
        "route=/v1/completions",
        "status=200",
        &format!("worker={}", m[0].url()),
        "ttft_ms=",
        "total_ms=",
    ] {
        assert!(line.contains(part), "{part} not in {line}");
    }
    // Health probes are not logged.
    assert_eq!(exchange(r.addr, &get("/health")).status, 200);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(r.log().lines().filter(|l| l.contains("route=")).count(), 1);
}
