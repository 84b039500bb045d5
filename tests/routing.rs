//! Routing policies through the real router: which mock worker served each request is in
//! its `x-mock-worker` header.

mod common;

use std::collections::HashMap;

use common::*;

fn router(policy: &str, workers: usize, extra: &[&str]) -> (Router, Vec<MockServer>) {
    let m = mocks(workers, |_| {});
    let mut args = worker_args(&m);
    args.extend(["--policy".into(), policy.into()]);
    if !extra.contains(&"--shards") {
        args.extend(["--shards".into(), "2".into()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    (Router::start(&a), m)
}

fn served_by(r: &Router, raw: &[u8]) -> String {
    let resp = exchange(r.addr, raw);
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.header("x-mock-worker")
        .expect("x-mock-worker")
        .to_string()
}

fn completion(prompt: &str) -> Vec<u8> {
    post_json(
        "/v1/completions",
        &format!(r#"{{"model":"mock-model","prompt":"{prompt}","max_tokens":2}}"#),
    )
}

fn with_header(raw: Vec<u8>, name: &str, value: &str) -> Vec<u8> {
    String::from_utf8(raw)
        .unwrap()
        .replacen(
            "Host: router\r\n",
            &format!("Host: router\r\n{name}: {value}\r\n"),
            1,
        )
        .into_bytes()
}

#[test]
fn round_robin_spreads_evenly() {
    let (r, _m) = router("round_robin", 4, &["--shards", "1"]);
    let mut count: HashMap<String, usize> = HashMap::new();
    for i in 0..40 {
        *count
            .entry(served_by(&r, &completion(&format!("p{i}"))))
            .or_default() += 1;
    }
    assert_eq!(count.len(), 4);
    assert!(count.values().all(|&c| c == 10), "{count:?}");
}

#[test]
fn consistent_hash_keeps_a_session_on_one_worker() {
    let (r, _m) = router("consistent_hash", 4, &[]);
    let mut owners = HashMap::new();
    for round in 0..5 {
        for s in 0..12 {
            let raw = with_header(
                completion(&format!("turn {round}")),
                "X-Session-Id",
                &format!("s{s}"),
            );
            let w = served_by(&r, &raw);
            assert_eq!(
                owners.entry(s).or_insert_with(|| w.clone()),
                &w,
                "session {s}"
            );
        }
    }
    let distinct: std::collections::HashSet<_> = owners.values().collect();
    assert!(distinct.len() >= 2, "12 sessions all on one worker");
    // The body's `user` field keys the same way when no header is given.
    let a = served_by(
        &r,
        &post_json(
            "/v1/completions",
            r#"{"model":"mock-model","prompt":"x","user":"alice"}"#,
        ),
    );
    let b = served_by(
        &r,
        &post_json(
            "/v1/completions",
            r#"{"model":"mock-model","prompt":"y","user":"alice"}"#,
        ),
    );
    assert_eq!(a, b);
}

#[test]
fn cache_aware_keeps_prefix_groups_together_across_shards() {
    let (r, _m) = router("cache_aware", 4, &[]);
    let mut owners: HashMap<usize, String> = HashMap::new();
    for i in 0..48 {
        let g = i % 6;
        // 80% shared within the group, 20% unique.
        let prompt = format!(
            "{}{}",
            format!("group {g} shared context. ").repeat(60),
            format!("question {i}. ").repeat(25)
        );
        let w = served_by(&r, &completion(&prompt));
        assert_eq!(
            owners.entry(g).or_insert_with(|| w.clone()),
            &w,
            "group {g} request {i}"
        );
    }
}

#[test]
fn power_of_two_and_random_and_load_aware_serve() {
    for policy in ["power_of_two", "random", "load_aware"] {
        let (r, _m) = router(policy, 3, &[]);
        let mut seen = std::collections::HashSet::new();
        for i in 0..60 {
            seen.insert(served_by(&r, &completion(&format!("{i:04} cold prompt"))));
        }
        assert_eq!(seen.len(), 3, "{policy} used {seen:?}");
    }
}

#[test]
fn load_using_policies_read_vllms_load_header_and_keep_it_from_the_client() {
    let (r, m) = router("power_of_two", 2, &[]);
    let resp = exchange(r.addr, &completion("x"));
    assert_eq!(resp.status, 200);
    assert!(resp.header("endpoint-load-metrics").is_none());
    let asked = m
        .iter()
        .flat_map(|m| m.received())
        .any(|q| q.header("endpoint-load-metrics-format") == Some("TEXT"));
    assert!(asked, "the router asks workers for their load");
    // A client that asks itself gets the report.
    let resp = exchange(
        r.addr,
        &with_header(completion("y"), "endpoint-load-metrics-format", "TEXT"),
    );
    assert!(resp.header("endpoint-load-metrics").is_some());
}

#[test]
fn invalid_utf8_in_a_prompt_is_400_and_the_router_lives() {
    let (r, _m) = router("cache_aware", 2, &[]);
    let body = b"{\"prompt\":\"ab\xff\xfecd\"}";
    let mut raw = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    let resp = exchange(r.addr, &raw);
    assert_eq!(resp.status, 400);
    assert!(resp.error_message().contains("UTF-8"));
    assert!(!served_by(&r, &completion("still here")).is_empty());
}

/// A worker whose `/metrics` says `waiting` requests queue on it, and that answers every
/// other request with its name.
fn gauged_worker(
    name: &'static str,
    waiting: u32,
) -> (RawUpstream, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    slow_gauged_worker(name, waiting, std::time::Duration::ZERO)
}

/// The same, answering `/metrics` only after `delay` (as a vLLM busy generating does).
fn slow_gauged_worker(
    name: &'static str,
    waiting: u32,
    delay: std::time::Duration,
) -> (RawUpstream, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::Write;
    let scrapes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = scrapes.clone();
    let up = RawUpstream::spawn(move |mut s| {
        while let Some((head, _)) = read_request(&mut s) {
            let body = if head.starts_with("GET /metrics") {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(delay);
                format!(
                    "vllm:num_requests_waiting{{engine=\"0\",model_name=\"m\"}} {waiting}.0\nvllm:num_requests_running{{engine=\"0\",model_name=\"m\"}} 1.0\nvllm:kv_cache_usage_perc{{engine=\"0\",model_name=\"m\"}} 0.25\n"
                )
            } else {
                "{}".to_string()
            };
            let resp = format!(
                "HTTP/1.1 200 OK\r\nx-mock-worker: {name}\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if s.write_all(resp.as_bytes()).is_err() {
                return;
            }
        }
    });
    (up, scrapes)
}

#[test]
fn scraped_queue_depth_breaks_power_of_two_ties() {
    let (busy, busy_scrapes) = gauged_worker("busy", 50);
    let (idle, _) = gauged_worker("idle", 0);
    let r = Router::start(&[
        "--worker-urls",
        &busy.url,
        &idle.url,
        "--policy",
        "power_of_two",
        "--load-scrape-interval-ms",
        "50",
    ]);
    // Two scrapes of the busy worker: the first one's answer is on the board by then.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while busy_scrapes.load(std::sync::atomic::Ordering::SeqCst) < 2
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // One keep-alive connection: each request is routed after the previous one left the
    // in-flight count (which ranks before the scraped queue). A scrape can time out on a
    // loaded machine; wait for the first answer to count.
    let mut s = r.connect();
    let mut pending = Vec::new();
    let mut served_on_conn = |body: &[u8]| {
        use std::io::Write;
        s.write_all(body).unwrap();
        let resp = read_response_from(&mut s, &mut pending, false).unwrap();
        assert_eq!(resp.status, 200, "{}", resp.text());
        resp.header("x-mock-worker").unwrap().to_string()
    };
    while served_on_conn(&completion("first")) != "idle" {
        assert!(
            std::time::Instant::now() < deadline,
            "the scraped depth never counted"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for i in 0..20 {
        assert_eq!(served_on_conn(&completion(&format!("{i}"))), "idle");
    }
}

/// vLLM busy generating answers `/metrics` late (seconds on a loaded host): the scrape waits
/// for the answer rather than giving up after one interval, and `/get_loads` shows what
/// each worker reported next to the router's own in-flight count.
#[test]
fn a_slow_metrics_answer_still_counts_and_get_loads_shows_it() {
    let (slow, slow_scrapes) = slow_gauged_worker("slow", 7, std::time::Duration::from_millis(400));
    let r = Router::start(&[
        "--worker-urls",
        &slow.url,
        "--policy",
        "power_of_two",
        "--load-scrape-interval-ms",
        "50",
    ]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let reported = loop {
        let loads = exchange(r.addr, &get("/get_loads")).json();
        let w = &loads["workers"][0];
        assert_eq!(w["worker"], slow.url.as_str());
        assert_eq!(w["load"], 0);
        if !w["reported"]["num_requests_waiting"].is_null() {
            break w["reported"].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no scrape of a worker answering /metrics in 400 ms was recorded"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(
        reported,
        serde_json::json!({"num_requests_running": 1, "num_requests_waiting": 7,
                           "kv_cache_usage_perc": 0.25})
    );
    // One scrape at a time per worker, not one per interval piling up.
    let n = slow_scrapes.load(std::sync::atomic::Ordering::SeqCst);
    assert!(n <= 2, "{n} scrapes started within about one slow answer");
}
