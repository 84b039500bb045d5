//! The mock against the real thing: each test sends the request that produced a capture in
//! `testdata/real-vllm-0.32/` and compares status, the headers that matter and the JSON
//! "skeleton" (keys in order, value kinds; text, ids, numbers abstracted) event by event.

mod common;

use common::*;
use mock_vllm::{MockConfig, MockServer};

fn tiny() -> MockServer {
    MockServer::spawn(MockConfig {
        model: "tiny".into(),
        max_model_len: 1024,
        request_id_headers: false,
        ..MockConfig::default()
    })
    .unwrap()
}

/// JSON with every string value replaced by `S` and every number by `N`; keys and their
/// order, nulls, booleans and nesting kept.
fn skeleton(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                let start = i;
                i += 1;
                while b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
                let mut j = i;
                while j < b.len() && b[j] == b' ' {
                    j += 1;
                }
                if j < b.len() && b[j] == b':' {
                    out.push_str(&s[start..i]);
                } else {
                    out.push('S');
                }
            }
            b'-' | b'0'..=b'9' => {
                while i < b.len() && matches!(b[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    i += 1;
                }
                out.push('N');
            }
            c => {
                out.push(c as char);
                i += 1;
            }
        }
    }
    out
}

fn same_shape(capture_name: &str, mock: &Resp) {
    let real = capture(capture_name);
    assert_eq!(mock.status, real.status, "{capture_name}: status");
    for h in [
        "content-type",
        "transfer-encoding",
        "allow",
        "endpoint-load-metrics",
    ] {
        assert_eq!(mock.header(h), real.header(h), "{capture_name}: header {h}");
    }
    assert_eq!(
        mock.header("content-length").is_some(),
        real.header("content-length").is_some()
    );
    let (m, r) = (mock.events(), real.events());
    if real.header("content-type") == Some("text/event-stream; charset=utf-8") {
        assert_eq!(
            m.len(),
            r.len(),
            "{capture_name}: events\nmock: {m:#?}\nreal: {r:#?}"
        );
        for (me, re) in m.iter().zip(&r) {
            assert_eq!(skeleton(me), skeleton(re), "{capture_name}: event");
        }
        // Each event its own chunk, as uvicorn sends them.
        assert_eq!(
            mock.chunks.len(),
            real.chunks.len(),
            "{capture_name}: chunks"
        );
    } else {
        assert_eq!(
            skeleton(&mock.text()),
            skeleton(&real.text()),
            "{capture_name}: body"
        );
    }
}

const J: &str = "endpoint-load-metrics-format";

/// (capture name, path, request body, extra headers)
type Case = (
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

#[test]
fn completions_match_real_vllm() {
    let m = tiny();
    let a = m.addr();
    let cases: &[Case] = &[
        (
            "completion",
            "/v1/completions",
            r#"{"model":"tiny","prompt":"hello world the quick","max_tokens":3}"#,
            &[],
        ),
        (
            "completion-stream",
            "/v1/completions",
            r#"{"model":"tiny","prompt":"hello world the quick","max_tokens":3,"stream":true}"#,
            &[],
        ),
        (
            "completion-stream-usage",
            "/v1/completions",
            r#"{"model":"tiny","prompt":"hello world the quick","max_tokens":3,"stream":true,"stream_options":{"include_usage":true}}"#,
            &[],
        ),
        (
            "completion-stream-continuous-usage",
            "/v1/completions",
            r#"{"prompt":"hello world","max_tokens":2,"stream":true,"stream_options":{"include_usage":true,"continuous_usage_stats":true}}"#,
            &[],
        ),
        (
            "completion-prompt-list",
            "/v1/completions",
            r#"{"prompt":["hello world","foo"],"max_tokens":1}"#,
            &[],
        ),
        (
            "completion-no-model-x-request-id",
            "/v1/completions",
            r#"{"prompt":"hi","max_tokens":2}"#,
            &[("x-request-id", "abc123")],
        ),
        (
            "completion-load-metrics-text",
            "/v1/completions",
            r#"{"prompt":"hi","max_tokens":2}"#,
            &[(J, "TEXT")],
        ),
        (
            "completion-load-metrics-json",
            "/v1/completions",
            r#"{"prompt":"hi","max_tokens":2}"#,
            &[(J, "JSON")],
        ),
        (
            "completion-kv-transfer-no-connector",
            "/v1/completions",
            r#"{"prompt":"hi","max_tokens":1,"stream":false}"#,
            &[],
        ),
        (
            "chat",
            "/v1/chat/completions",
            r#"{"model":"tiny","messages":[{"role":"user","content":"hello world"}],"max_tokens":3}"#,
            &[],
        ),
        (
            "chat-stream",
            "/v1/chat/completions",
            r#"{"model":"tiny","messages":[{"role":"user","content":"hello world"}],"max_tokens":3,"stream":true}"#,
            &[],
        ),
        (
            "chat-stream-usage",
            "/v1/chat/completions",
            r#"{"model":"tiny","messages":[{"role":"user","content":"hello world"}],"max_completion_tokens":3,"stream":true,"stream_options":{"include_usage":true}}"#,
            &[],
        ),
        (
            "chat-stream-continuous-usage",
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"hello world"}],"max_tokens":2,"stream":true,"stream_options":{"include_usage":true,"continuous_usage_stats":true}}"#,
            &[],
        ),
        (
            "chat-stream-load-metrics-text",
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":1,"stream":true}"#,
            &[(J, "TEXT")],
        ),
        (
            "responses",
            "/v1/responses",
            r#"{"model":"tiny","input":"hello world","max_output_tokens":3}"#,
            &[],
        ),
    ];
    for (name, path, body, headers) in cases {
        let r = post(a, path, body, headers);
        same_shape(name, &r);
        let real = capture(name);
        // Token accounting follows the real server for these prompts.
        if let (Some(mu), Some(ru)) = (
            r.data_json().last().map(|e| e["usage"].clone()),
            real.data_json().last().map(|e| e["usage"].clone()),
        ) {
            assert_eq!(mu, ru, "{name}: usage");
        }
    }
    let j = post(
        a,
        "/v1/completions",
        r#"{"prompt":"hi","max_tokens":2}"#,
        &[("x-request-id", "abc123")],
    )
    .json();
    assert_eq!(
        j["id"],
        capture("completion-no-model-x-request-id").json()["id"]
    );
}

#[test]
fn errors_match_real_vllm() {
    let m = tiny();
    let a = m.addr();
    let exact: &[(&str, &str, &str)] = &[
        (
            "error-unknown-model",
            "/v1/completions",
            r#"{"model":"nope","prompt":"hi","max_tokens":3}"#,
        ),
        (
            "error-unknown-model-chat-stream",
            "/v1/chat/completions",
            r#"{"model":"nope","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
        ),
        (
            "error-missing-prompt",
            "/v1/completions",
            r#"{"model":"tiny"}"#,
        ),
        (
            "error-missing-messages",
            "/v1/chat/completions",
            r#"{"model":"tiny"}"#,
        ),
    ];
    for (name, path, body) in exact {
        let r = post(a, path, body, &[]);
        same_shape(name, &r);
        assert_eq!(r.text(), capture(name).text(), "{name}");
    }
    let r = post(a, "/v1/completions", r#"{"model":"tiny","#, &[]);
    same_shape("error-invalid-json", &r);
    assert_eq!(r.json()["error"]["param"], "body.16");

    let r = Conn::open(a).request(
        "POST",
        "/v1/completions",
        &[("content-type", "text/plain")],
        r#"{"model":"tiny","prompt":"hi"}"#,
    );
    same_shape("error-wrong-content-type", &r);
    assert_eq!(r.text(), capture("error-wrong-content-type").text());

    for (name, r) in [
        ("not-found-path", get(a, "/get_server_info")),
        ("get-completions-405", get(a, "/v1/completions")),
        ("version", get(a, "/version")),
        ("load", get(a, "/load")),
        ("health", get(a, "/health")),
    ] {
        same_shape(name, &r);
        assert_eq!(r.text(), capture(name).text(), "{name}");
    }
    same_shape("models", &get(a, "/v1/models"));
}

#[test]
fn metrics_use_real_names_and_labels() {
    let m = tiny();
    let mock = get(m.addr(), "/metrics");
    let real = capture("metrics-full");
    assert_eq!(mock.header("content-type"), real.header("content-type"));
    let real_text = real.text();
    for line in mock.text().lines() {
        if line.starts_with('#') {
            assert!(
                real_text.lines().any(|l| l == line),
                "not in real /metrics: {line}"
            );
        } else {
            let series = line.rsplit_once(' ').unwrap().0;
            assert!(
                real_text
                    .lines()
                    .any(|l| l.rsplit_once(' ').is_some_and(|(s, _)| s == series)),
                "series not in real /metrics: {series}"
            );
        }
    }
}

#[test]
fn skeleton_keeps_keys_and_order_and_abstracts_values() {
    assert_eq!(
        skeleton(r#"{"a":"x\"y","b":-1.5e3,"c":[null,true],"d":{}}"#),
        r#"{"a":S,"b":N,"c":[null,true],"d":{}}"#
    );
    assert_ne!(skeleton(r#"{"a":1,"b":2}"#), skeleton(r#"{"b":1,"a":2}"#));
    assert_ne!(
        skeleton(&capture("completion").text()),
        skeleton(&capture("chat").text())
    );
}
