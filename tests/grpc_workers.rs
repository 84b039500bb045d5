//! gRPC workers (`grpc://`) as a client sees them: the real router binary in front of mock
//! vLLM gRPC engines (`mock_vllm::grpc`, in-process h2 servers on 127.0.0.1) serves
//! completions and chat, streamed or not, rendered from the engine's token ids by the tiny
//! Llama tokenizer; retries what the engine did not take; relays refusals as OpenAI errors;
//! ends failed streams with an error event; cancels and aborts when the client leaves; and
//! routes around an engine that says it is unhealthy. The engine's own record
//! (`GrpcMock::stats`) says what it saw.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use mock_vllm::grpc::{expected_text, Failure, GrpcConfig, GrpcMock};
use serde_json::Value;

const TINY_LLAMA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/frontend/testdata/tiny-llama");

fn engine(f: impl FnOnce(&mut GrpcConfig)) -> GrpcMock {
    let mut c = GrpcConfig {
        tokenizer_dir: Some(TINY_LLAMA.into()),
        ..GrpcConfig::default()
    };
    f(&mut c);
    GrpcMock::spawn(c).unwrap()
}

/// The router in front of `urls`, the tokenizer read from the tiny Llama directory.
fn router(urls: &[String], extra: &[&str]) -> Router {
    let mut args: Vec<&str> = vec!["--worker-urls"];
    args.extend(urls.iter().map(String::as_str));
    args.extend(["--model-path", TINY_LLAMA]);
    args.extend(extra);
    Router::start(&args)
}

fn post(r: &Router, path: &str, body: &str) -> Response {
    exchange(r.addr, &post_json(path, body))
}

/// The JSON events of an SSE body; asserts it ends with `[DONE]`.
fn events(r: &Response) -> Vec<Value> {
    let text = r.text();
    let datas: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap_or_else(|| panic!("{e:?}")))
        .collect();
    assert_eq!(datas.last(), Some(&"[DONE]"), "{text}");
    datas[..datas.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .collect()
}

/// Polls `f` every 10 ms for up to `within`.
fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

fn prompt_tokens(v: &Value) -> usize {
    v["usage"]["prompt_tokens"].as_u64().unwrap() as usize
}

// ---- generation -----------------------------------------------------------------------

#[test]
fn a_completion_is_the_engines_ids_decoded() {
    let e = engine(|_| {});
    let r = router(&[e.url()], &[]);
    let resp = post(
        &r,
        "/v1/completions",
        r#"{"model":"mock-model","prompt":"Hello world","max_tokens":5}"#,
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let v = resp.json();
    let p = prompt_tokens(&v);
    let seen = e.stats().requests;
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].input_ids.len(), p);
    assert!(!seen[0].stream);
    assert_eq!(seen[0].max_tokens, Some(5));
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "mock-model");
    // The router asked the engine for its block size at start (GetServerInfo).
    assert!(e.stats().server_info_calls >= 1, "{:?}", e.stats());
    assert_eq!(v["choices"][0]["text"], expected_text(p, 0, 5));
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["usage"]["total_tokens"], p as u64 + 5);

    // Without max_tokens the engine ends with EOS: finish "stop", EOS counted, not shown.
    let v = post(
        &r,
        "/v1/completions",
        r#"{"model":"mock-model","prompt":"Hello world"}"#,
    )
    .json();
    assert_eq!(v["choices"][0]["text"], expected_text(p, 0, 16));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["stop_reason"], Value::Null);
    assert_eq!(v["usage"]["completion_tokens"], 17);
}

#[test]
fn a_streamed_completion_is_one_event_per_token_then_done() {
    let e = engine(|c| c.inter_token_delay = Duration::from_millis(2));
    let r = router(&[e.url()], &[]);
    let resp = post(
        &r,
        "/v1/completions",
        r#"{"model":"mock-model","prompt":"Hello world","max_tokens":6,"stream":true,
            "stream_options":{"include_usage":true}}"#,
    );
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    let ev = events(&resp);
    let usage = ev.last().unwrap();
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0, "{usage}");
    let p = prompt_tokens(usage);
    assert_eq!(usage["usage"]["completion_tokens"], 6);
    let text: String = ev
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, expected_text(p, 0, 6));
    let finishes: Vec<&Value> = ev
        .iter()
        .map(|e| &e["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, vec!["length"]);
    assert!(e.stats().requests[0].stream);
    assert_eq!(e.stats().generate_ok, 1);
}

#[test]
fn chat_streamed_and_not() {
    let e = engine(|c| c.tokens = 3);
    let r = router(&[e.url()], &[]);
    let chat = r#"{"model":"mock-model","messages":[{"role":"user","content":"Hi there"}]"#;
    let v = post(&r, "/v1/chat/completions", &format!("{chat}}}")).json();
    let p = prompt_tokens(&v);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        expected_text(p, 0, 3)
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 4, "3 tokens and EOS");

    let resp = post(
        &r,
        "/v1/chat/completions",
        &format!(r#"{chat},"stream":true,"max_tokens":2}}"#),
    );
    let ev = events(&resp);
    assert_eq!(ev[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = ev
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, expected_text(p, 0, 2));
    assert_eq!(
        ev.last().unwrap()["choices"][0]["finish_reason"],
        "length",
        "{ev:?}"
    );
    // Every Generate of a chat carries the same prompt.
    let seen = e.stats().requests;
    assert_eq!(seen[0].input_ids, seen[1].input_ids);
    assert!(seen[0].request_id.starts_with("chatcmpl-"), "{seen:?}");
}

#[test]
fn a_prompt_list_is_one_generate_per_prompt_with_n_choices_each() {
    let e = engine(|_| {});
    let r = router(&[e.url()], &[]);
    let v = post(
        &r,
        "/v1/completions",
        r#"{"model":"mock-model","prompt":["one","one two three four five"],"max_tokens":3,
            "n":2,"temperature":1.0}"#,
    )
    .json();
    let seen = e.stats().requests;
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.iter().all(|s| s.n == 2));
    assert!(seen[0].request_id.ends_with("-0") && seen[1].request_id.ends_with("-1"));
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4, "{v}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let (prompt, choice) = (i / 2, i % 2);
        assert_eq!(
            c["text"],
            expected_text(seen[prompt].input_ids.len(), choice, 3),
            "{v}"
        );
    }
    let p: usize = seen.iter().map(|s| s.input_ids.len()).sum();
    assert_eq!(prompt_tokens(&v), p);
    assert_eq!(v["usage"]["completion_tokens"], 12);

    // Streamed, the four choices interleave and each ends once.
    let resp = post(
        &r,
        "/v1/completions",
        r#"{"model":"mock-model","prompt":["one","one two three four five"],"max_tokens":3,
            "n":2,"temperature":1.0,"stream":true}"#,
    );
    let ev = events(&resp);
    let seen = &e.stats().requests[2..];
    for i in 0..4 {
        let text: String = ev
            .iter()
            .flat_map(|e| e["choices"].as_array().unwrap())
            .filter(|c| c["index"] == i)
            .filter_map(|c| c["text"].as_str())
            .collect();
        assert_eq!(text, expected_text(seen[i / 2].input_ids.len(), i % 2, 3));
    }
}

/// vLLM streams a prompt list's choices as they are generated (its generators are merged),
/// so a later prompt's first tokens do not wait for an earlier prompt's last.
#[test]
fn a_streamed_prompt_list_interleaves_its_prompts() {
    let e = engine(|c| {
        c.tokens = 10;
        c.inter_token_delay = Duration::from_millis(20);
    });
    let r = router(&[e.url()], &[]);
    let resp = post(
        &r,
        "/v1/completions",
        r#"{"model":"mock-model","prompt":["Hello world","one two"],"stream":true}"#,
    );
    let order: Vec<u64> = events(&resp)
        .iter()
        .filter_map(|e| e["choices"][0]["index"].as_u64())
        .collect();
    let last_of_0 = order.iter().rposition(|&i| i == 0).unwrap();
    let first_of_1 = order.iter().position(|&i| i == 1).unwrap();
    assert!(first_of_1 < last_of_0, "choices in order {order:?}");
}

#[test]
fn without_a_model_path_the_tokenizer_comes_from_get_tokenizer() {
    let e = engine(|c| c.served_model_name = "tiny".into());
    let r = Router::start(&["--worker-urls", &e.url()]);
    assert_eq!(e.stats().tokenizer_calls, 1);
    assert!(e.stats().model_info_calls >= 1);
    let resp = post(
        &r,
        "/v1/completions",
        r#"{"model":"tiny","prompt":"Hello world","max_tokens":4}"#,
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let v = resp.json();
    assert_eq!(v["model"], "tiny");
    assert_eq!(
        v["choices"][0]["text"],
        expected_text(prompt_tokens(&v), 0, 4)
    );
    // The served name is GetModelInfo's: another is vLLM's 404.
    let resp = post(
        &r,
        "/v1/completions",
        r#"{"model":"mock-model","prompt":"x","max_tokens":1}"#,
    );
    assert_eq!(resp.status, 404, "{}", resp.text());
}

#[test]
fn v1_models_is_answered_with_the_served_model() {
    let e = engine(|c| {
        c.served_model_name = "tiny".into();
        c.max_context_length = 1000;
    });
    // In a mixed fleet too, whichever worker the request is routed to.
    let m = mocks(1, |c| c.model = "tiny".into());
    let r = router(&[e.url(), m[0].url()], &["--policy", "round_robin"]);
    for _ in 0..4 {
        let resp = exchange(r.addr, &get("/v1/models"));
        assert_eq!(resp.status, 200, "{}", resp.text());
        let v = resp.json();
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][0]["id"], "tiny", "{v}");
        assert_eq!(v["data"][0]["object"], "model");
        assert_eq!(v["data"][0]["owned_by"], "vllm");
    }
    let v = exchange(r.addr, &get("/v1/models")).json();
    let ours = if v["data"][0]["max_model_len"] == 1000 {
        v
    } else {
        exchange(r.addr, &get("/v1/models")).json()
    };
    assert_eq!(ours["data"][0]["max_model_len"], 1000, "{ours}");
    assert_eq!(
        ours["data"][0]["permission"][0]["object"],
        "model_permission"
    );
}

#[test]
fn a_grpc_fleet_answers_models_and_version_as_vllm_and_404s_what_engines_do_not_serve() {
    let e = engine(|c| {
        c.served_model_name = "tiny".into();
        c.version = "0.32.0-test".into();
    });
    let r = router(&[e.url()], &[]);
    let v = exchange(r.addr, &get("/v1/models")).json();
    assert_eq!(v["data"][0]["id"], "tiny", "{v}");
    let v = exchange(r.addr, &get("/version")).json();
    assert_eq!(v, serde_json::json!({"version": "0.32.0-test"}));
    let resp = post(&r, "/v1/embeddings", r#"{"model":"tiny","input":"hi"}"#);
    assert_eq!(resp.status, 404, "{}", resp.text());
    assert!(resp.error_message().contains("not served by gRPC workers"));
    assert_eq!(e.stats().generate_calls, 0);
}

// ---- failures -------------------------------------------------------------------------

const COMPLETION: &str = r#"{"model":"mock-model","prompt":"Hello world","max_tokens":3}"#;

#[test]
fn an_engine_refusing_connections_is_retried_on_another() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("grpc://{}", l.local_addr().unwrap())
    };
    let e = engine(|_| {});
    let r = router(&[dead, e.url()], &["--policy", "round_robin"]);
    for _ in 0..6 {
        let resp = post(&r, "/v1/completions", COMPLETION);
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    assert_eq!(e.stats().generate_ok, 6);
}

#[test]
fn unavailable_before_the_first_token_is_retried_on_another_engine() {
    let (a, b) = (engine(|_| {}), engine(|_| {}));
    a.state().set_failure(Some(Failure::Status {
        code: 14,
        message: "engine is draining".into(),
    }));
    let r = router(&[a.url(), b.url()], &["--policy", "round_robin"]);
    for stream in [false, true, false, true] {
        let body = format!(
            r#"{{"model":"mock-model","prompt":"Hello world","max_tokens":3,"stream":{stream}}}"#
        );
        let resp = post(&r, "/v1/completions", &body);
        assert_eq!(resp.status, 200, "{}", resp.text());
        if stream {
            events(&resp);
        }
    }
    assert!(a.stats().generate_calls >= 1, "a was never tried");
    assert_eq!(a.stats().generate_ok, 0);
    assert_eq!(b.stats().generate_ok, 4);
}

#[test]
fn when_every_engine_is_unavailable_the_client_gets_a_json_error_naming_it() {
    let (a, b) = (engine(|_| {}), engine(|_| {}));
    for e in [&a, &b] {
        e.state().set_failure(Some(Failure::Status {
            code: 14,
            message: "engine is draining".into(),
        }));
    }
    let r = router(&[a.url(), b.url()], &[]);
    let resp = post(&r, "/v1/completions", COMPLETION);
    // Every engine said UNAVAILABLE: the client gets its status, 503, once retries are spent
    // ("no worker could take the request (N attempts): <the engine's message>").
    assert_eq!(resp.status, 503, "{}", resp.text());
    let msg = resp.error_message();
    assert!(msg.contains("engine is draining"), "{msg}");
    let tried = a.stats().generate_calls + b.stats().generate_calls;
    assert!(tried >= 2, "{tried}");
    assert!(a.stats().generate_calls >= 1 && b.stats().generate_calls >= 1);
}

#[test]
fn invalid_argument_is_a_400_carrying_the_engines_message() {
    let e = engine(|_| {});
    let r = router(&[e.url()], &[]);
    // A prompt of token ids the engine's vocabulary does not have.
    let resp = post(
        &r,
        "/v1/completions",
        r#"{"model":"mock-model","prompt":[5,5000],"max_tokens":3}"#,
    );
    assert_eq!(resp.status, 400, "{}", resp.text());
    let msg = resp.error_message();
    assert!(msg.contains("Token id 5000 is out of vocabulary"), "{msg}");

    e.state().set_failure(Some(Failure::Status {
        code: 3,
        message: "temperature: bad value \u{e9}%".into(),
    }));
    for stream in [false, true] {
        let body = format!(
            r#"{{"model":"mock-model","prompt":"Hello world","max_tokens":3,"stream":{stream}}}"#
        );
        let resp = post(&r, "/v1/completions", &body);
        assert_eq!(resp.status, 400, "{}", resp.text());
        assert_eq!(resp.error_message(), "temperature: bad value \u{e9}%");
    }
    // Not retried elsewhere: the one engine saw each request once.
    assert_eq!(e.stats().generate_calls, 3);
}

/// A streamed completion whose stream the engine breaks after 2 tokens ends with an error
/// event and [DONE], promptly.
fn assert_stream_ends_with_error(failure: Failure) {
    let e = engine(|c| c.inter_token_delay = Duration::from_millis(5));
    e.state().set_failure(Some(failure));
    let r = router(&[e.url()], &[]);
    let start = Instant::now();
    let resp = post(
        &r,
        "/v1/completions",
        r#"{"model":"mock-model","prompt":"Hello world","max_tokens":10,"stream":true}"#,
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(resp.status, 200);
    let ev = events(&resp);
    let texts: Vec<&str> = ev
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .filter(|t| !t.is_empty())
        .collect();
    assert_eq!(texts.len(), 2, "{ev:?}");
    let last = ev.last().unwrap();
    assert!(last["error"]["message"].is_string(), "{last}");
    // The connection is still usable.
    assert_eq!(post(&r, "/v1/completions", COMPLETION).status, 200);
}

#[test]
fn a_status_mid_stream_ends_the_sse_stream_with_an_error_event() {
    assert_stream_ends_with_error(Failure::StatusAfter {
        after: 2,
        code: 13,
        message: "engine core died".into(),
    });
}

#[test]
fn a_reset_mid_stream_ends_the_sse_stream_with_an_error_event() {
    assert_stream_ends_with_error(Failure::ResetAfter { after: 2 });
}

#[test]
fn a_client_leaving_mid_stream_cancels_the_call_and_aborts_the_request() {
    let e = engine(|c| {
        c.tokens = 1000;
        c.inter_token_delay = Duration::from_millis(20);
    });
    let r = router(&[e.url()], &[]);
    let mut s = r.connect();
    s.write_all(&post_json(
        "/v1/completions",
        r#"{"model":"mock-model","prompt":"Hello world","stream":true}"#,
    ))
    .unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    while got.windows(6).filter(|w| w == b"data: ").count() < 3 {
        let n = s.read(&mut b).unwrap();
        assert!(n > 0, "closed early");
        got.extend_from_slice(&b[..n]);
    }
    assert_eq!(e.stats().running, 1);
    drop(s);
    let left = Instant::now();
    assert!(
        eventually(Duration::from_secs(1), || e.stats().cancelled == 1),
        "{:?}",
        e.stats()
    );
    let id = e.stats().requests[0].request_id.clone();
    assert!(
        eventually(Duration::from_secs(1), || e.stats().aborted.contains(&id)),
        "no Abort for {id}: {:?}",
        e.stats()
    );
    eprintln!(
        "cancel and abort seen {:?} after the client left",
        left.elapsed()
    );
    assert_eq!(e.stats().running, 0);
    assert_eq!(e.stats().generate_ok, 0);
}

#[test]
fn a_client_leaving_a_prompt_list_stream_cancels_and_aborts_every_prompt() {
    let e = engine(|c| {
        c.tokens = 1000;
        c.inter_token_delay = Duration::from_millis(20);
    });
    let r = router(&[e.url()], &[]);
    let mut s = r.connect();
    s.write_all(&post_json(
        "/v1/completions",
        r#"{"model":"mock-model","prompt":["Hello world","one two"],"stream":true}"#,
    ))
    .unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    while got.windows(6).filter(|w| w == b"data: ").count() < 3 {
        let n = s.read(&mut b).unwrap();
        assert!(n > 0, "closed early");
        got.extend_from_slice(&b[..n]);
    }
    assert_eq!(e.stats().running, 2);
    drop(s);
    let ids: Vec<String> = e
        .stats()
        .requests
        .iter()
        .map(|r| r.request_id.clone())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(
        eventually(Duration::from_secs(1), || {
            let st = e.stats();
            st.cancelled == 2 && ids.iter().all(|id| st.aborted.contains(id))
        }),
        "{:?}",
        e.stats()
    );
}

#[test]
fn a_client_leaving_before_a_non_streamed_answer_cancels_and_aborts_too() {
    let e = engine(|c| c.first_token_delay = Duration::from_secs(5));
    let r = router(&[e.url()], &[]);
    let mut s = r.connect();
    s.write_all(&post_json("/v1/completions", COMPLETION))
        .unwrap();
    assert!(eventually(Duration::from_secs(2), || e.stats().running == 1));
    drop(s);
    let id = e.stats().requests[0].request_id.clone();
    assert!(
        eventually(Duration::from_secs(1), || {
            let st = e.stats();
            st.cancelled == 1 && st.aborted.contains(&id)
        }),
        "{:?}",
        e.stats()
    );
}

#[test]
fn an_engine_silent_mid_stream_is_cut_by_the_idle_timeout() {
    let e = engine(|_| {});
    e.state().set_failure(Some(Failure::HangAfter { after: 2 }));
    let r = router(&[e.url()], &["--stream-idle-timeout-secs", "1"]);
    let start = Instant::now();
    let resp = post(
        &r,
        "/v1/completions",
        r#"{"model":"mock-model","prompt":"Hello world","max_tokens":10,"stream":true}"#,
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    let ev = events(&resp);
    assert!(ev.last().unwrap()["error"]["message"].is_string(), "{ev:?}");
    let id = e.stats().requests[0].request_id.clone();
    assert!(
        eventually(Duration::from_secs(1), || {
            let st = e.stats();
            st.cancelled == 1 && st.aborted.contains(&id)
        }),
        "{:?}",
        e.stats()
    );
}

#[test]
fn loads_and_health_are_polled_on_one_kept_connection() {
    let e = engine(|_| {});
    // power_of_two reads load and keeps no prefix index (so no KV-event subscription).
    let _r = router(
        &[e.url()],
        &[
            "--load-scrape-interval-ms",
            "100",
            "--health-check-interval-secs",
            "1",
            "--policy",
            "power_of_two",
        ],
    );
    assert!(
        eventually(Duration::from_secs(3), || e.stats().loads_calls >= 2),
        "{:?}",
        e.stats()
    );
    let (loads, checks, connections) = {
        let s = e.stats();
        (s.loads_calls, s.health_checks, s.connections)
    };
    assert!(eventually(Duration::from_secs(5), || {
        let s = e.stats();
        s.loads_calls >= loads + 10 && s.health_checks > checks
    }));
    assert_eq!(
        e.stats().connections,
        connections,
        "polls open no new connections"
    );
}

// ---- fleet ----------------------------------------------------------------------------

#[test]
fn an_engine_reporting_unhealthy_is_not_routed_to() {
    let (a, b) = (engine(|_| {}), engine(|_| {}));
    let r = router(
        &[a.url(), b.url()],
        &[
            "--policy",
            "round_robin",
            "--health-check-interval-secs",
            "1",
            "--health-failure-threshold",
            "1",
            "--health-success-threshold",
            "1",
        ],
    );
    assert!(eventually(Duration::from_secs(5), || worker_health(
        &r,
        &a.url()
    ) == "healthy"));
    a.state().set_healthy(false);
    assert!(
        eventually(Duration::from_secs(5), || worker_health(&r, &a.url())
            == "unhealthy"),
        "{}",
        r.log()
    );
    assert!(a.stats().health_checks >= 2);
    let before = a.stats().generate_calls;
    for _ in 0..10 {
        assert_eq!(post(&r, "/v1/completions", COMPLETION).status, 200);
    }
    assert_eq!(
        a.stats().generate_calls,
        before,
        "an unhealthy engine got requests"
    );

    a.state().set_healthy(true);
    assert!(eventually(Duration::from_secs(5), || worker_health(
        &r,
        &a.url()
    ) == "healthy"));
    for _ in 0..10 {
        assert_eq!(post(&r, "/v1/completions", COMPLETION).status, 200);
    }
    assert!(a.stats().generate_calls > before);
}

#[test]
fn a_mixed_fleet_of_http_and_grpc_workers_serves_both() {
    let e = engine(|_| {});
    let m = mocks(1, |c| c.record = true);
    let r = router(&[m[0].url(), e.url()], &["--policy", "round_robin"]);
    for i in 0..10 {
        let stream = i % 2 == 0;
        let body = format!(
            r#"{{"model":"mock-model","prompt":"Hello world","max_tokens":3,"stream":{stream}}}"#
        );
        let resp = post(&r, "/v1/completions", &body);
        assert_eq!(resp.status, 200, "{}", resp.text());
        if stream {
            events(&resp);
        }
    }
    let http = m[0]
        .received()
        .iter()
        .filter(|r| r.path == "/v1/completions")
        .count();
    let grpc = e.stats().generate_ok;
    assert_eq!(http + grpc, 10);
    assert!(http > 0 && grpc > 0, "http {http}, grpc {grpc}");
}

// ---- P/D over gRPC ----------------------------------------------------------------------

fn pd_router(prefill: &[String], decode: &[String], extra: &[&str]) -> Router {
    let mut args: Vec<&str> = vec!["--vllm-pd-disaggregation"];
    for p in prefill {
        args.extend(["--prefill", p.as_str()]);
    }
    for d in decode {
        args.extend(["--decode", d.as_str()]);
    }
    args.extend(["--model-path", TINY_LLAMA]);
    args.extend(extra);
    Router::start(&args)
}

#[test]
fn pd_is_a_one_token_prefill_then_a_decode_carrying_its_kv_params() {
    let p = engine(|c| c.name = "prefill".into());
    let d = engine(|c| c.name = "decode".into());
    let r = pd_router(&[p.url()], &[d.url()], &[]);
    for stream in [false, true] {
        let body = format!(
            r#"{{"model":"mock-model","messages":[{{"role":"user","content":"Hello"}}],"max_tokens":4,"stream":{stream}}}"#
        );
        let resp = post(&r, "/v1/chat/completions", &body);
        assert_eq!(resp.status, 200, "{}", resp.text());
        let text: String = if stream {
            events(&resp)
                .iter()
                .filter_map(|e| {
                    e["choices"][0]["delta"]["content"]
                        .as_str()
                        .map(String::from)
                })
                .collect()
        } else {
            resp.json()["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let pre = p.stats().requests.last().cloned().unwrap();
        let dec = d.stats().requests.last().cloned().unwrap();
        // The prefill leg: one token, not streamed, NIXL's request for a remote decode.
        assert_eq!(pre.max_tokens, Some(1));
        assert!(!pre.stream);
        let kv: Value =
            serde_json::from_str(pre.kv_transfer_params_json.as_deref().unwrap()).unwrap();
        assert_eq!(kv["do_remote_decode"], true);
        // The decode leg: the client's request, with the prefill's answer verbatim.
        assert_eq!(dec.request_id, pre.request_id);
        assert_eq!(dec.input_ids, pre.input_ids);
        assert_eq!(dec.max_tokens, Some(4));
        assert_eq!(dec.stream, stream);
        let handed: Value =
            serde_json::from_str(dec.kv_transfer_params_json.as_deref().unwrap()).unwrap();
        assert_eq!(handed["remote_engine_id"], "prefill-engine");
        assert_eq!(handed["do_remote_prefill"], true);
        assert_eq!(text, expected_text(dec.input_ids.len(), 0, 4));
    }
    assert_eq!(p.stats().requests.len(), 2);
    assert_eq!(d.stats().requests.len(), 2);
}

#[test]
fn pd_prefill_unavailable_moves_to_another_prefill_engine_and_refusals_reach_the_client() {
    let bad = engine(|c| c.name = "bad".into());
    bad.state().set_failure(Some(Failure::Status {
        code: 14,
        message: "draining".into(),
    }));
    let good = engine(|c| c.name = "good".into());
    let d = engine(|_| {});
    let r = pd_router(
        &[bad.url(), good.url()],
        &[d.url()],
        &["--prefill-policy", "round_robin"],
    );
    let body = r#"{"model":"mock-model","prompt":"Hello","max_tokens":2}"#;
    for _ in 0..2 {
        let resp = post(&r, "/v1/completions", body);
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    let handed = d.stats().requests;
    assert_eq!(handed.len(), 2);
    assert!(handed.iter().all(|q| q
        .kv_transfer_params_json
        .as_deref()
        .unwrap()
        .contains("good-engine")));

    // A prefill engine that refuses the request: the client gets its 400, no decode leg.
    good.state().set_failure(Some(Failure::Status {
        code: 3,
        message: "Token id 99999 is out of vocabulary".into(),
    }));
    bad.state().set_failure(Some(Failure::Status {
        code: 3,
        message: "Token id 99999 is out of vocabulary".into(),
    }));
    let resp = post(&r, "/v1/completions", body);
    assert_eq!(resp.status, 400, "{}", resp.text());
    assert!(resp.text().contains("out of vocabulary"), "{}", resp.text());
    assert_eq!(d.stats().requests.len(), 2);
}

#[test]
fn pd_prefill_without_kv_params_is_a_502_unless_decode_only_fallback() {
    // An engine without a KV connector answers the prefill leg without transfer params.
    let p = engine(|c| c.kv_connector = false);
    let d = engine(|_| {});
    let body = r#"{"model":"mock-model","prompt":"Hello","max_tokens":2}"#;
    let r = pd_router(&[p.url()], &[d.url()], &[]);
    let resp = post(&r, "/v1/completions", body);
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert!(resp.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("without kv_transfer_params"));
    assert!(d.stats().requests.is_empty());
    drop(r);
    let r = pd_router(&[p.url()], &[d.url()], &["--pd-fallback-decode-only"]);
    let resp = post(&r, "/v1/completions", body);
    assert_eq!(resp.status, 200, "{}", resp.text());
    let dec = d.stats().requests;
    assert_eq!(dec.len(), 1);
    assert_eq!(dec[0].kv_transfer_params_json, None);
}

// ---- KV-cache events (SubscribeKvEvents) --------------------------------------------

/// A 64-token prompt (four KV blocks of the mock's 16), distinct per `seed`.
fn token_prompt(seed: u32) -> Vec<u32> {
    (0..64).map(|i| 10 + seed * 100 + i).collect()
}

fn complete_ids(r: &Router, ids: &[u32]) -> Response {
    let body = serde_json::json!({"model": "mock-model", "prompt": ids, "max_tokens": 1});
    post(r, "/v1/completions", &body.to_string())
}

/// Which of `engines` received a Generate for `ids`.
fn served_by(engines: &[GrpcMock], ids: &[u32]) -> Vec<usize> {
    (0..engines.len())
        .filter(|&i| {
            engines[i]
                .stats()
                .requests
                .iter()
                .any(|s| s.input_ids == ids)
        })
        .collect()
}

/// The router's `ringrouter_kv_cache_blocks` for the worker at `url`, if reported.
fn kv_blocks(r: &Router, url: &str) -> Option<u64> {
    let needle = format!("ringrouter_kv_cache_blocks{{worker=\"{url}\"}} ");
    r.scrape()
        .lines()
        .find_map(|l| l.strip_prefix(needle.as_str()))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
}

fn kv_engines(n: usize) -> Vec<GrpcMock> {
    (0..n).map(|_| engine(|c| c.kv_events = true)).collect()
}

fn kv_router(engines: &[GrpcMock]) -> Router {
    let urls: Vec<String> = engines.iter().map(|e| e.url()).collect();
    let r = router(&urls, &["--policy", "cache_aware"]);
    assert!(
        eventually(Duration::from_secs(5), || engines
            .iter()
            .all(|e| e.stats().kv_subscriptions >= 1)),
        "the router subscribes to every engine's KV events"
    );
    r
}

#[test]
fn cache_aware_sends_a_prompt_to_the_engine_that_reports_holding_it() {
    let engines = kv_engines(2);
    let r = kv_router(&engines);
    // Nothing was routed yet: only the engines' events can say where each prompt is.
    for seed in 0..8 {
        engines[seed as usize % 2]
            .state()
            .kv_store(&token_prompt(seed));
    }
    for (i, e) in engines.iter().enumerate() {
        assert!(
            eventually(Duration::from_secs(5), || kv_blocks(&r, &e.url())
                == Some(16)),
            "engine {i}: {:?}",
            kv_blocks(&r, &e.url())
        );
    }
    for seed in 0..8 {
        let resp = complete_ids(&r, &token_prompt(seed));
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(
            served_by(&engines, &token_prompt(seed)),
            [seed as usize % 2],
            "prompt {seed}"
        );
    }
}

#[test]
fn an_evicted_prompt_stops_attracting_and_follows_the_engine_that_now_holds_it() {
    let engines = kv_engines(2);
    let r = kv_router(&engines);
    // Each prompt is stored on engine 0, evicted there and stored on engine 1. Without
    // the removals, both would hold it and the pick would be a coin toss per prompt.
    for seed in 0..6 {
        let p = token_prompt(seed);
        engines[0].state().kv_store(&p);
        engines[0].state().kv_evict(&p);
        engines[1].state().kv_store(&p);
    }
    assert!(eventually(Duration::from_secs(5), || {
        kv_blocks(&r, &engines[0].url()) == Some(0) && kv_blocks(&r, &engines[1].url()) == Some(24)
    }));
    for seed in 0..6 {
        assert_eq!(complete_ids(&r, &token_prompt(seed)).status, 200);
        assert_eq!(
            served_by(&engines, &token_prompt(seed)),
            [1],
            "prompt {seed}"
        );
    }
}

#[test]
fn a_gap_in_the_events_clears_the_engine_and_resubscribes() {
    let engines = kv_engines(1);
    let r = kv_router(&engines);
    let url = engines[0].url();
    engines[0].state().kv_store(&token_prompt(1));
    assert!(eventually(Duration::from_secs(5), || kv_blocks(&r, &url) == Some(4)));
    // A batch is lost: the router can no longer tell what the engine holds.
    engines[0].state().kv_skip_sequence();
    engines[0].state().kv_store(&token_prompt(2));
    assert!(
        eventually(Duration::from_secs(5), || engines[0]
            .stats()
            .kv_subscriptions
            >= 2),
        "resubscribed"
    );
    // From the new subscription on it is fed again, from nothing.
    engines[0].state().kv_store(&token_prompt(3));
    assert!(eventually(Duration::from_secs(5), || kv_blocks(&r, &url) == Some(4)));
    assert!(
        r.log_contains("KV-cache events: stream lost"),
        "{}",
        r.log()
    );
}

#[test]
fn an_engine_without_kv_events_is_routed_by_guess_and_says_so_once() {
    let e = engine(|_| {});
    let r = router(&[e.url()], &["--policy", "cache_aware"]);
    assert_eq!(complete_ids(&r, &token_prompt(1)).status, 200);
    assert!(eventually(Duration::from_secs(5), || r
        .log_contains("the engine streams no KV-cache events")));
    assert_eq!(kv_blocks(&r, &e.url()), None);
    assert_eq!(e.stats().kv_subscriptions, 0);
}

// ---- data parallelism ---------------------------------------------------------------

fn ranks_seen(e: &GrpcMock) -> Vec<Option<i32>> {
    e.stats()
        .requests
        .iter()
        .map(|s| s.data_parallel_rank)
        .collect()
}

#[test]
fn an_engines_data_parallel_ranks_are_targets_pinned_by_data_parallel_rank() {
    // The flag says 4, the engine says 2 (GetServerInfo): the engine is believed.
    let e = engine(|c| c.data_parallel_size = 2);
    let r = router(
        &[e.url()],
        &[
            "--intra-node-data-parallel-size",
            "4",
            "--policy",
            "round_robin",
        ],
    );
    for _ in 0..4 {
        assert_eq!(complete_ids(&r, &token_prompt(1)).status, 200);
    }
    let mut ranks = ranks_seen(&e);
    ranks.sort();
    assert_eq!(ranks, [Some(0), Some(0), Some(1), Some(1)]);
    let workers = call(&r, "GET", "/workers", "").json();
    let urls: Vec<&str> = workers["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["url"].as_str().unwrap())
        .collect();
    assert_eq!(urls, [format!("{}@0", e.url()), format!("{}@1", e.url())]);
}

#[test]
fn an_explicit_rank_is_kept_and_a_rankless_grpc_worker_lets_the_engine_balance() {
    let ranked = engine(|c| c.data_parallel_size = 8);
    let plain = engine(|_| {});
    let r = router(
        &[format!("{}@5", ranked.url()), plain.url()],
        &["--policy", "round_robin"],
    );
    for _ in 0..4 {
        assert_eq!(complete_ids(&r, &token_prompt(2)).status, 200);
    }
    assert_eq!(ranks_seen(&ranked), [Some(5), Some(5)]);
    assert_eq!(ranks_seen(&plain), [None, None]);
}

// ---- workers added at run time --------------------------------------------------------

#[test]
fn a_grpc_worker_added_at_run_time_needs_a_router_that_loaded_a_model() {
    let e = engine(|_| {});
    // Started with HTTP workers only: no tokenizer was loaded, so a gRPC worker is refused
    // at the door with the reason, not accepted and then skipped.
    let http = mocks(1, |_| {});
    let args = worker_args(&http);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = Router::start(&args);
    let resp = call(&r, "POST", &format!("/add_worker?url={}", e.url()), "");
    assert_eq!(resp.status, 400, "{}", resp.text());
    assert!(
        resp.error_message().contains("needs the model's tokenizer"),
        "{}",
        resp.text()
    );
    // Started with a gRPC worker: another one joins and serves.
    let other = engine(|_| {});
    let r = router(&[e.url()], &["--policy", "round_robin"]);
    let resp = call(&r, "POST", &format!("/add_worker?url={}", other.url()), "");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(eventually(Duration::from_secs(5), || {
        complete_ids(&r, &token_prompt(4)).status == 200 && other.stats().generate_ok > 0
    }));
}
