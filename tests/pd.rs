//! Prefill/decode disaggregation as the workers see it: each client request is one prefill
//! leg (the client's body with one token, not streamed, and the NIXL request for a remote
//! decode) on a prefill worker, then one decode leg (the client's body with the prefill's
//! `kv_transfer_params`) on a decode worker, whose answer the client gets. Failures of the
//! prefill leg are retried elsewhere or answered clearly. Real router binary, mock vLLM
//! workers (which know the NIXL legs) on loopback.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// The router in P/D mode over `prefill` and `decode` workers, with `extra` flags.
fn pd_router(prefill: &[String], decode: &[String], extra: &[&str]) -> Router {
    let mut args: Vec<String> = vec!["--vllm-pd-disaggregation".into()];
    for p in prefill {
        args.extend(["--prefill".into(), p.clone()]);
    }
    for d in decode {
        args.extend(["--decode".into(), d.clone()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Router::start(&args)
}

fn urls(m: &[MockServer]) -> Vec<String> {
    m.iter().map(|m| m.url()).collect()
}

/// Generation requests (completions and chat) a mock received, as JSON bodies with their
/// request ids.
fn legs(m: &MockServer) -> Vec<(Value, String)> {
    m.received()
        .iter()
        .filter(|r| r.path == "/v1/completions" || r.path == "/v1/chat/completions")
        .map(|r| {
            (
                r.json().expect("a JSON leg"),
                r.header("x-request-id").unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn all_legs(m: &[MockServer]) -> Vec<(Value, String)> {
    m.iter().flat_map(legs).collect()
}

/// What the prefill leg must be: the client's body with the P/D edits.
fn expected_prefill(client: &Value) -> Value {
    let mut v = client.clone();
    let o = v.as_object_mut().unwrap();
    o.insert("max_tokens".into(), json!(1));
    if o.contains_key("max_completion_tokens") {
        o.insert("max_completion_tokens".into(), json!(1));
    }
    if o.get("min_tokens")
        .and_then(Value::as_u64)
        .is_some_and(|n| n > 1)
    {
        o.insert("min_tokens".into(), json!(1));
    }
    o.insert("stream".into(), json!(false));
    o.remove("stream_options");
    o.insert(
        "kv_transfer_params".into(),
        json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
               "remote_block_ids": null, "remote_host": null, "remote_port": null}),
    );
    v
}

/// One request through a fresh 1 prefill + 1 decode fleet: checks both legs and returns
/// the client's response.
fn one_request(path: &str, client: Value) -> Response {
    let p = mocks(1, |c| c.name = "p0".into());
    let d = mocks(1, |c| c.name = "d0".into());
    let r = pd_router(&urls(&p), &urls(&d), &[]);
    let resp = exchange(r.addr, &post_json(path, &client.to_string()));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-mock-worker"), Some("d0"));

    let pl = legs(&p[0]);
    let dl = legs(&d[0]);
    assert_eq!((pl.len(), dl.len()), (1, 1), "one leg each");
    assert_eq!(p[0].stats().prefill_legs, 1);
    assert_eq!(d[0].stats().decode_legs, 1);
    let (prefill, prefill_id) = &pl[0];
    let (decode, decode_id) = &dl[0];
    assert_eq!(prefill, &expected_prefill(&client));
    // The decode leg: the client's body, plus what the prefill worker answered.
    let mut without_kv = decode.clone();
    let kv = without_kv
        .as_object_mut()
        .unwrap()
        .remove("kv_transfer_params")
        .expect("the decode leg carries kv_transfer_params");
    assert_eq!(without_kv, client);
    assert_eq!(kv["do_remote_prefill"], json!(true));
    assert_eq!(kv["remote_engine_id"], json!("p0-engine"));
    assert_eq!(kv["remote_port"], json!(p[0].addr().port()));
    assert!(kv["remote_request_id"]
        .as_str()
        .unwrap()
        .contains(prefill_id.as_str()));
    // Same request id on both legs, and the client sees it.
    assert!(!prefill_id.is_empty());
    assert_eq!(prefill_id, decode_id);
    assert_eq!(resp.header("x-request-id"), Some(prefill_id.as_str()));
    resp
}

#[test]
fn completion_is_a_prefill_leg_then_a_decode_leg() {
    let resp = one_request(
        "/v1/completions",
        json!({"model": "mock-model", "prompt": "the quick brown fox", "max_tokens": 5,
               "min_tokens": 3, "temperature": 0.5}),
    );
    let v = resp.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 5);
}

#[test]
fn chat_is_a_prefill_leg_then_a_decode_leg() {
    let resp = one_request(
        "/v1/chat/completions",
        json!({"model": "mock-model", "messages": [{"role": "user", "content": "héllo \"there\""}],
               "max_completion_tokens": 4}),
    );
    let v = resp.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["completion_tokens"], 4);
}

#[test]
fn streamed_completion_streams_the_decode_leg() {
    let resp = one_request(
        "/v1/completions",
        json!({"model": "mock-model", "prompt": "stream me", "max_tokens": 6, "stream": true,
               "stream_options": {"include_usage": true}}),
    );
    assert!(resp
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let text = resp.text();
    assert_eq!(text.matches("data: ").count(), 6 + 1 + 1, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
}

#[test]
fn streamed_chat_streams_the_decode_leg() {
    let resp = one_request(
        "/v1/chat/completions",
        json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}],
               "max_tokens": 3, "stream": true}),
    );
    let text = resp.text();
    assert!(text.contains("\"role\":\"assistant\""), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
}

#[test]
fn every_request_gets_exactly_one_leg_of_each_over_a_fleet() {
    let p = mocks(2, |_| {});
    let d = mocks(2, |_| {});
    let r = pd_router(&urls(&p), &urls(&d), &["--policy", "round_robin"]);
    let mut s = r.connect();
    let mut pending = Vec::new();
    for i in 0..8 {
        let body = json!({"model": "mock-model", "prompt": format!("prompt {i}"), "max_tokens": 2,
                          "stream": i % 2 == 0});
        s.write_all(&post_json("/v1/completions", &body.to_string()))
            .unwrap();
        let resp = read_response_from(&mut s, &mut pending, false).unwrap();
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    let pl = all_legs(&p);
    let dl = all_legs(&d);
    assert_eq!((pl.len(), dl.len()), (8, 8));
    // Round robin spreads both legs.
    assert!(p.iter().all(|m| m.stats().prefill_legs == 4));
    assert!(d.iter().all(|m| m.stats().decode_legs == 4));
    // Each decode leg carries its own prefill's parameters.
    for (decode, id) in &dl {
        let kv = &decode["kv_transfer_params"];
        assert!(kv["remote_request_id"]
            .as_str()
            .unwrap()
            .contains(id.as_str()));
    }
}

#[test]
fn prefill_5xx_and_refused_connections_move_the_prefill_to_another_worker() {
    let p = mocks(2, |c| c.name = "p".into());
    p[0].set_fail_rate(1.0);
    // A prefill worker that is not there at all.
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let d = mocks(1, |_| {});
    let prefill = vec![p[0].url(), gone, p[1].url()];
    let r = pd_router(
        &prefill,
        &urls(&d),
        &["--policy", "round_robin", "--retry-initial-backoff-ms", "1"],
    );
    for _ in 0..3 {
        let body = r#"{"model":"mock-model","prompt":"x","max_tokens":2}"#;
        let resp = exchange(r.addr, &post_json("/v1/completions", body));
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    // Every answer came from a prefill on the healthy worker.
    assert_eq!(p[1].stats().prefill_legs, 3);
    assert_eq!(d[0].stats().decode_legs, 3);
}

#[test]
fn prefill_failures_once_retries_are_spent_reach_the_client() {
    let p = mocks(1, |c| c.fail_rate = 1.0);
    let d = mocks(1, |_| {});
    let r = pd_router(&urls(&p), &urls(&d), &["--retry-max-retries", "2"]);
    let body = r#"{"model":"mock-model","prompt":"x","max_tokens":2}"#;
    let resp = exchange(r.addr, &post_json("/v1/completions", body));
    assert_eq!(resp.status, 500, "{}", resp.text());
    assert_eq!(legs(&p[0]).len(), 2);
    assert!(
        legs(&d[0]).is_empty(),
        "no decode leg after a failed prefill"
    );
}

#[test]
fn a_4xx_from_prefill_goes_to_the_client_as_is() {
    let p = mocks(1, |_| {});
    let d = mocks(1, |_| {});
    let r = pd_router(&urls(&p), &urls(&d), &[]);
    // vLLM refuses a completion without a prompt.
    let body = r#"{"model":"mock-model","max_tokens":2}"#;
    let resp = exchange(r.addr, &post_json("/v1/completions", body));
    assert_eq!(resp.status, 400, "{}", resp.text());
    assert!(resp.error_message().contains("prompt"));
    assert_eq!(legs(&p[0]).len(), 1, "a 4xx is not retried");
    assert!(legs(&d[0]).is_empty());
}

/// A prefill worker without the NIXL connector: a normal answer, no kv_transfer_params.
fn prefill_without_kv() -> RawUpstream {
    RawUpstream::spawn(|mut s| {
        while read_request(&mut s).is_some() {
            let body = r#"{"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":"a"}],"kv_transfer_params":null}"#;
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if s.write_all(resp.as_bytes()).is_err() {
                return;
            }
        }
    })
}

#[test]
fn a_prefill_answer_without_kv_transfer_params_is_a_502() {
    let p = prefill_without_kv();
    let d = mocks(1, |_| {});
    let r = pd_router(std::slice::from_ref(&p.url), &urls(&d), &[]);
    let body = r#"{"model":"mock-model","prompt":"x","max_tokens":2}"#;
    let resp = exchange(r.addr, &post_json("/v1/completions", body));
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert!(resp.error_message().contains("kv_transfer_params"));
    assert!(legs(&d[0]).is_empty(), "never a silent decode-only run");
}

#[test]
fn fallback_decode_only_runs_the_decode_leg_on_the_clients_body() {
    let p = prefill_without_kv();
    let d = mocks(1, |_| {});
    let r = pd_router(
        std::slice::from_ref(&p.url),
        &urls(&d),
        &["--pd-fallback-decode-only"],
    );
    let body = r#"{"model":"mock-model","prompt":"x","max_tokens":2,"stream":true}"#;
    let resp = exchange(r.addr, &post_json("/v1/completions", body));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(resp.text().ends_with("data: [DONE]\n\n"));
    let dl = legs(&d[0]);
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].0, serde_json::from_str::<Value>(body).unwrap());
}

#[test]
fn short_prompts_skip_the_prefill_leg() {
    let p = mocks(1, |_| {});
    let d = mocks(1, |_| {});
    let r = pd_router(&urls(&p), &urls(&d), &["--pd-min-prompt-chars", "20"]);
    let short = r#"{"model":"mock-model","prompt":"short","max_tokens":2}"#;
    let long = r#"{"model":"mock-model","prompt":"a prompt of more than twenty characters","max_tokens":2}"#;
    for body in [short, long] {
        let resp = exchange(r.addr, &post_json("/v1/completions", body));
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    assert_eq!(legs(&p[0]).len(), 1, "only the long prompt is prefilled");
    let dl = legs(&d[0]);
    assert_eq!(dl.len(), 2);
    assert_eq!(dl[0].0, serde_json::from_str::<Value>(short).unwrap());
    assert!(dl[1].0["kv_transfer_params"].is_object());
}

#[test]
fn a_client_leaving_during_prefill_closes_the_prefill_connection() {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let p = RawUpstream::spawn(move |mut s| {
        if read_request(&mut s).is_none() {
            return;
        }
        // Never answers; reports when the router closes the connection.
        let mut b = [0u8; 64];
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let closed = matches!(s.read(&mut b), Ok(0) | Err(_));
        let _ = tx.lock().unwrap().send(closed);
    });
    let d = mocks(1, |_| {});
    let r = pd_router(std::slice::from_ref(&p.url), &urls(&d), &[]);
    let mut s = TcpStream::connect(r.addr).unwrap();
    let body = r#"{"model":"mock-model","prompt":"x","max_tokens":2}"#;
    s.write_all(&post_json("/v1/completions", body)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(s);
    let closed = rx.recv_timeout(Duration::from_secs(5));
    assert_eq!(closed, Ok(true), "the prefill connection was closed");
    assert!(legs(&d[0]).is_empty());
}

#[test]
fn the_decode_workers_load_lasts_until_its_stream_ends() {
    let p = mocks(1, |_| {});
    let d = mocks(1, |c| c.itl = Duration::from_millis(100));
    let r = pd_router(&urls(&p), &urls(&d), &[]);
    let mut s = r.connect();
    let body = r#"{"model":"mock-model","prompt":"x","max_tokens":20,"stream":true}"#;
    s.write_all(&post_json("/v1/completions", body)).unwrap();
    let mut first = [0u8; 1];
    s.read_exact(&mut first).unwrap();
    // Mid-stream: the router counts the request on the decode worker, not the prefill one.
    let v = exchange(r.addr, &get("/workers")).json();
    let load = |url: &str| {
        v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["url"] == url)
            .unwrap_or_else(|| panic!("{url} in {v}"))["load"]
            .as_u64()
    };
    assert_eq!(load(&d[0].url()), Some(1), "{v}");
    assert_eq!(load(&p[0].url()), Some(0), "{v}");
}

#[test]
fn prefill_workers_keep_their_bootstrap_port() {
    let p = mocks(2, |_| {});
    let d = mocks(1, |_| {});
    let r = Router::start(&[
        "--vllm-pd-disaggregation",
        "--prefill",
        &p[0].url(),
        "8998",
        "--prefill",
        &p[1].url(),
        "none",
        "--decode",
        &d[0].url(),
    ]);
    let v = exchange(r.addr, &get("/workers")).json();
    let find = |url: &str| {
        v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["url"] == url)
            .cloned()
            .unwrap_or_else(|| panic!("{url} in {v}"))
    };
    let p0 = find(&p[0].url());
    assert_eq!(
        (&p0["worker_type"], &p0["bootstrap_port"]),
        (&json!("prefill"), &json!(8998))
    );
    let p1 = find(&p[1].url());
    assert_eq!(
        (&p1["worker_type"], &p1["bootstrap_port"]),
        (&json!("prefill"), &Value::Null)
    );
    assert_eq!(find(&d[0].url())["worker_type"], "decode");
}

#[test]
fn worker_urls_are_refused_in_pd_mode() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringrouter"))
        .args([
            "--port",
            "0",
            "--pd-disaggregation",
            "--worker-urls",
            "http://127.0.0.1:9",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--worker-urls") && err.contains("--prefill"),
        "{err}"
    );
}

#[test]
fn a_chunked_client_body_is_spliced_too() {
    let p = mocks(1, |_| {});
    let d = mocks(1, |_| {});
    let r = pd_router(&urls(&p), &urls(&d), &[]);
    let body = r#"{"model":"mock-model","prompt":"chunked prompt","max_tokens":3}"#;
    let (a, b) = body.split_at(20);
    let raw = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    let resp = exchange(r.addr, raw.as_bytes());
    assert_eq!(resp.status, 200, "{}", resp.text());
    let client: Value = serde_json::from_str(body).unwrap();
    assert_eq!(legs(&p[0])[0].0, expected_prefill(&client));
    let mut decode = legs(&d[0])[0].0.clone();
    assert!(decode
        .as_object_mut()
        .unwrap()
        .remove("kv_transfer_params")
        .is_some_and(|kv| kv.is_object()));
    assert_eq!(decode, client);
}

#[test]
fn a_client_leaving_during_decode_aborts_the_decode_stream() {
    let p = mocks(1, |_| {});
    let d = mocks(1, |c| c.itl = Duration::from_millis(50));
    let r = pd_router(&urls(&p), &urls(&d), &[]);
    let mut s = r.connect();
    let body = r#"{"model":"mock-model","prompt":"x","max_tokens":200,"stream":true}"#;
    s.write_all(&post_json("/v1/completions", body)).unwrap();
    let mut first = [0u8; 64];
    assert!(s.read(&mut first).unwrap() > 0);
    drop(s);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while d[0].stats().streams_aborted == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let stats = d[0].stats();
    assert_eq!((stats.streams_aborted, stats.streams_completed), (1, 0));
    assert_eq!(p[0].stats().prefill_legs, 1);
}

#[test]
fn a_prefill_answer_cut_mid_body_moves_the_prefill_to_another_worker() {
    let cut = RawUpstream::spawn(|mut s| {
        if read_request(&mut s).is_some() {
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"id\":",
            );
        }
    });
    let good = mocks(1, |_| {});
    let d = mocks(1, |_| {});
    let r = pd_router(
        &[cut.url.clone(), good[0].url()],
        &urls(&d),
        &["--policy", "round_robin"],
    );
    for _ in 0..2 {
        let body = r#"{"model":"mock-model","prompt":"x","max_tokens":2}"#;
        let resp = exchange(r.addr, &post_json("/v1/completions", body));
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    assert_eq!(good[0].stats().prefill_legs, 2);
    assert_eq!(d[0].stats().decode_legs, 2);
}

#[test]
fn a_prefill_that_never_answers_is_a_504() {
    let silent = RawUpstream::spawn(|mut s| {
        if read_request(&mut s).is_some() {
            std::thread::sleep(Duration::from_secs(5));
        }
    });
    let d = mocks(1, |_| {});
    let r = pd_router(
        std::slice::from_ref(&silent.url),
        &urls(&d),
        &["--request-timeout-secs", "1"],
    );
    let body = r#"{"model":"mock-model","prompt":"x","max_tokens":2}"#;
    let resp = exchange(r.addr, &post_json("/v1/completions", body));
    assert_eq!(resp.status, 504, "{}", resp.text());
    resp.error_message();
    assert!(legs(&d[0]).is_empty());
}

#[test]
fn each_leg_has_its_own_policy() {
    let p = mocks(2, |_| {});
    let d = mocks(2, |_| {});
    let r = pd_router(
        &urls(&p),
        &urls(&d),
        &[
            "--prefill-policy",
            "cache_aware",
            "--decode-policy",
            "round_robin",
            "--shards",
            "1",
        ],
    );
    let prompt = "a long shared system prompt that the prefill worker has cached ".repeat(8);
    for _ in 0..6 {
        let body = json!({"model": "mock-model", "prompt": prompt, "max_tokens": 2});
        let resp = exchange(r.addr, &post_json("/v1/completions", &body.to_string()));
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    let mut prefill: Vec<u64> = p.iter().map(|m| m.stats().prefill_legs).collect();
    prefill.sort();
    assert_eq!(
        prefill,
        [0, 6],
        "the same prompt is prefilled where it is cached"
    );
    let decode: Vec<u64> = d.iter().map(|m| m.stats().decode_legs).collect();
    assert_eq!(decode, [3, 3], "decode legs go round");
}

#[test]
fn workers_added_with_their_role_take_their_leg() {
    let p = mocks(1, |_| {});
    let d = mocks(1, |_| {});
    let r = pd_router(&[], &urls(&d), &[]);
    let body = r#"{"model":"mock-model","prompt":"x","max_tokens":2}"#;
    let resp = exchange(r.addr, &post_json("/v1/completions", body));
    assert_eq!(resp.status, 503, "no prefill worker yet: {}", resp.text());
    assert!(resp.error_message().contains("prefill"));
    let add = json!({"url": p[0].url(), "worker_type": "prefill"}).to_string();
    let resp = exchange(r.addr, &post_json("/workers", &add));
    assert!(resp.status < 300, "{}", resp.text());
    let resp = exchange(r.addr, &post_json("/v1/completions", body));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(p[0].stats().prefill_legs, 1);
    assert_eq!(d[0].stats().decode_legs, 1);
}
