//! The P/D body splice against a parse → edit → serialise reference, over a corpus of
//! bodies: unicode, escapes, nested objects with the edited names, keys present, absent,
//! null or repeated, whitespace variants, the empty object, a half-megabyte prompt, and a
//! few thousand generated bodies. Both outputs are read with serde_json, whose maps keep
//! the last of duplicate keys, as vLLM's Python json does.

use serde_json::{json, Map, Value};
use shards::pd::splice::{decode_leg, prefill_leg, KvTransferParams, ObjectIndex};

/// What the prefill leg means: the client's body parsed, edited, serialised.
fn reference_prefill(client: &Value, kv: &Value) -> Value {
    let mut o: Map<String, Value> = client.as_object().unwrap().clone();
    o.insert("max_tokens".into(), json!(1));
    if o.contains_key("max_completion_tokens") {
        o.insert("max_completion_tokens".into(), json!(1));
    }
    if o.get("min_tokens")
        .and_then(Value::as_f64)
        .is_some_and(|n| n > 1.0)
    {
        o.insert("min_tokens".into(), json!(1));
    }
    o.insert("stream".into(), json!(false));
    o.remove("stream_options");
    o.insert("kv_transfer_params".into(), kv.clone());
    Value::Object(o)
}

fn reference_decode(client: &Value, kv: &Value) -> Value {
    let mut o = client.as_object().unwrap().clone();
    o.insert("kv_transfer_params".into(), kv.clone());
    Value::Object(o)
}

const PREFILL_ANSWER: &[u8] = br#"{"id":"cmpl-9","choices":[{"text":"x"}],"kv_transfer_params": {"do_remote_prefill":true,"do_remote_decode":false,"remote_block_ids":[3,  4],"remote_engine_id":"e\u00e9","remote_host":"10.1.2.3","remote_port":5601,"remote_request_id":"r","tp_size":2} }"#;

fn check(body: &[u8]) {
    let shown = || {
        let s = String::from_utf8_lossy(body);
        if s.len() > 300 {
            format!(
                "{}... ({} bytes)",
                &s[..s.floor_char_boundary(300)],
                s.len()
            )
        } else {
            s.into_owned()
        }
    };
    let client: Value = serde_json::from_slice(body).expect("corpus bodies are JSON");
    let nixl: Value = serde_json::from_slice(KvTransferParams::NIXL_PREFILL.as_bytes()).unwrap();

    let prefill = prefill_leg(body, KvTransferParams::NIXL_PREFILL)
        .unwrap_or_else(|e| panic!("{e}: {}", shown()));
    let got: Value = serde_json::from_slice(&prefill).unwrap_or_else(|e| {
        panic!(
            "prefill leg is not JSON ({e}): {}\nfrom {}",
            String::from_utf8_lossy(&prefill),
            shown()
        )
    });
    assert_eq!(
        got,
        reference_prefill(&client, &nixl),
        "prefill of {}",
        shown()
    );

    let kv = KvTransferParams::from_prefill_response(PREFILL_ANSWER)
        .unwrap()
        .unwrap();
    let kv_value: Value = serde_json::from_slice(kv.as_bytes()).unwrap();
    let decode = decode_leg(body, kv).unwrap();
    let got: Value = serde_json::from_slice(&decode).unwrap_or_else(|e| {
        panic!(
            "decode leg is not JSON ({e}): {}\nfrom {}",
            String::from_utf8_lossy(&decode),
            shown()
        )
    });
    assert_eq!(
        got,
        reference_decode(&client, &kv_value),
        "decode of {}",
        shown()
    );
    // The prefill's bytes go to decode as they came.
    assert!(contains(&decode, kv.as_bytes()));

    // As the router splices a body it has routed: indexed without validating again (the
    // routing read validated it), the index kept across the prefill leg for the decode leg.
    if shards::body::parse_fields(body).is_ok() {
        // SAFETY: parse_fields accepted the body.
        let accepted = unsafe { ObjectIndex::parse_accepted(body) }
            .unwrap_or_else(|e| panic!("{e}: {}", shown()));
        let mut legs = Vec::new();
        accepted.prefill_leg(KvTransferParams::NIXL_PREFILL, &mut legs);
        assert_eq!(legs, prefill, "prefill of an accepted {}", shown());
        let spans = accepted.into_spans();
        assert_eq!(
            spans,
            ObjectIndex::parse(body).unwrap().into_spans(),
            "{}",
            shown()
        );
        legs.clear();
        spans.over(body).unwrap().decode_leg(kv, &mut legs);
        assert_eq!(legs, decode, "decode of an accepted {}", shown());
    }

    // Rewritten keys appear once: nothing is left for a first-wins reader to misread.
    let once = |out: &[u8], key: &str| {
        sonic_rs::to_object_iter(out)
            .filter(|e| e.as_ref().unwrap().0 == key)
            .count()
    };
    for key in ["max_tokens", "stream", "kv_transfer_params"] {
        assert_eq!(
            once(&prefill, key),
            1,
            "{key} in the prefill leg of {}",
            shown()
        );
    }
    assert_eq!(once(&prefill, "stream_options"), 0, "{}", shown());
    assert_eq!(once(&decode, "kv_transfer_params"), 1, "{}", shown());

    // Untouched members are copied byte for byte.
    let edited = [
        "max_tokens",
        "max_completion_tokens",
        "min_tokens",
        "stream",
        "stream_options",
        "kv_transfer_params",
    ];
    for entry in sonic_rs::to_object_iter(body) {
        let (key, value) = entry.unwrap();
        if !edited.contains(&key.as_ref()) {
            let raw = value.as_raw_str().as_bytes();
            assert!(contains(&prefill, raw), "{key} changed in {}", shown());
            assert!(contains(&decode, raw), "{key} changed in {}", shown());
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn handwritten_corpus() {
    let corpus: &[&str] = &[
        "{}",
        " { } ",
        "\r\n{\r\n}\r\n",
        r#"{"model":"m","prompt":"Hello","max_tokens":16,"stream":true}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"Hi"}],"stream":true,"stream_options":{"include_usage":true,"continuous_usage_stats":true}}"#,
        // unicode, raw and escaped, surrogate pairs
        "{\"prompt\":\"h\u{e9}llo \u{4e16}\u{754c} \u{1f600} \\u00e9 \\ud83d\\ude00\",\"model\":\"m\u{e9}\"}",
        // every escape
        r#"{"prompt":"a\"b\\c\/d\b\f\n\r\t\u0000\u001f","stream":true,"max_tokens":2}"#,
        // the edited names inside values
        r#"{"messages":[{"role":"user","content":"x","stream":true,"max_tokens":9,"kv_transfer_params":{}}],"response_format":{"type":"json_schema","json_schema":{"schema":{"properties":{"stream":{"type":"boolean"},"stream_options":{},"min_tokens":{"type":"integer"}}}}},"stream":true}"#,
        r#"{"prompt":"\"stream\":true,\"max_tokens\":5","user":"stream_options"}"#,
        // present as null
        r#"{"max_tokens":null,"max_completion_tokens":null,"min_tokens":null,"stream":null,"stream_options":null,"kv_transfer_params":null}"#,
        // values of the wrong type are the worker's to refuse, but still edited as vLLM's proxy would
        r#"{"max_tokens":"16","stream":"yes","stream_options":[],"kv_transfer_params":[1,2],"min_tokens":"9"}"#,
        // min_tokens around the clamp
        r#"{"min_tokens":2}"#,
        r#"{"min_tokens":1}"#,
        r#"{"min_tokens":0}"#,
        r#"{"min_tokens":1.0000001}"#,
        r#"{"min_tokens":1e1}"#,
        r#"{"min_tokens":-5}"#,
        r#"{"min_tokens":true}"#,
        r#"{"min_tokens":18446744073709551616}"#,
        // max_completion_tokens only when present
        r#"{"max_completion_tokens":512,"messages":[]}"#,
        // duplicates, edited and untouched
        r#"{"stream":true,"stream":false,"stream":true}"#,
        r#"{"max_tokens":1,"model":"a","max_tokens":99,"model":"b"}"#,
        r#"{"stream_options":{"include_usage":true},"prompt":"p","stream_options":{}}"#,
        r#"{"min_tokens":9,"min_tokens":0}"#,
        r#"{"min_tokens":0,"min_tokens":9}"#,
        r#"{"kv_transfer_params":{"do_remote_decode":false},"kv_transfer_params":null}"#,
        r#"{"max_completion_tokens":null,"max_completion_tokens":7}"#,
        // escaped key names mean the key they spell
        r#"{"str\u0065am":true,"max\u005ftokens":64,"stream_option\u0073":{},"kv_transfer_params":1}"#,
        r#"{"stream":true,"str\u0065am":true}"#,
        // near-miss names are other keys
        r#"{"streams":true,"Stream":true,"max_tokens_":3,"stream\u0000":1," stream":2,"min_token":9}"#,
        // whitespace variants
        "{\n  \"model\": \"m\",\n  \"stream\": true,\n  \"max_tokens\": 32\n}\n",
        "\t{\t\"stream\"\t:\ttrue\t,\t\"prompt\"\t:\t\"x\"\t}\t",
        "{ \"stream_options\" : { \"include_usage\" : true } }",
        "{\"stream_options\":{}\r\n,\r\n\"prompt\":\"a\"}",
        "{\"prompt\":\"a\" ,\"stream_options\":{} }",
        "{\"stream_options\":1,\"stream_options\":2 , \"stream_options\":3}",
        // numbers as written
        r#"{"temperature":1.50E+0,"top_p":-0.0,"seed":12345678901234567890,"logit_bias":{"50256":-100}}"#,
    ];
    for body in corpus {
        check(body.as_bytes());
    }
}

#[test]
fn a_half_megabyte_prompt() {
    let filler =
        "The quick brown fox \\u00e9 \\n jumps \\\"over\\\" 😀 the lazy dog. ".repeat(8_000);
    let completions = format!(
        r#"{{"model":"m","prompt":"{filler}","max_tokens":128,"stream":true,"stream_options":{{"include_usage":true}},"min_tokens":4}}"#
    );
    assert!(completions.len() > 500_000);
    check(completions.as_bytes());
    let chat = format!(
        r#"{{"stream":true,"messages":[{{"role":"system","content":"Be brief."}},{{"role":"user","content":"{filler}"}}],"max_completion_tokens":64,"model":"m"}}"#
    );
    check(chat.as_bytes());
}

/// Bodies built from members drawn at random (fixed seed) with random whitespace.
#[test]
fn generated_corpus() {
    const KEYS: &[&str] = &[
        "max_tokens",
        "max_completion_tokens",
        "min_tokens",
        "stream",
        "stream_options",
        "kv_transfer_params",
        "model",
        "prompt",
        "messages",
        "temperature",
        "str\\u0065am",
        "max_tok\\u0065ns",
        "kv_transfer_param\\u0073",
        "min_tokens ",
    ];
    const VALUES: &[&str] = &[
        "1",
        "16",
        "0",
        "-1",
        "2.5",
        "1e3",
        "null",
        "true",
        "false",
        "\"s\"",
        "\"h\\u00e9\\n\\\"q\\\" \u{e9}\u{1f600}\"",
        "[]",
        "{}",
        "[1,{\"stream\":true,\"max_tokens\":2}]",
        "{\"max_tokens\":5,\"stream_options\":{\"include_usage\":true}}",
        "{\"include_usage\":true}",
        "{ \"do_remote_decode\" : true , \"remote_port\" : null }",
        "18446744073709551616",
    ];
    const SPACE: &[&str] = &["", "", " ", "\n", "\t", "\r\n  "];
    let mut rng = fastrand::Rng::with_seed(0x5eed_0f59_11ce);
    for _ in 0..5_000 {
        let ws = |rng: &mut fastrand::Rng| SPACE[rng.usize(..SPACE.len())];
        let mut body = String::new();
        body += ws(&mut rng);
        body.push('{');
        let n = rng.usize(0..10);
        for i in 0..n {
            if i > 0 {
                body += ws(&mut rng);
                body.push(',');
            }
            body += ws(&mut rng);
            body.push('"');
            body += KEYS[rng.usize(..KEYS.len())];
            body.push('"');
            body += ws(&mut rng);
            body.push(':');
            body += ws(&mut rng);
            body += VALUES[rng.usize(..VALUES.len())];
        }
        body += ws(&mut rng);
        body.push('}');
        body += ws(&mut rng);
        check(body.as_bytes());
    }
}
