//! Request body field extraction on arbitrary bytes, against serde_json: never panics (nor
//! overflows the stack); what serde_json reads as an object is accepted (a `stream` vLLM's
//! pydantic models do not read as a bool reads as false: the worker refuses it), and the
//! fields found are the ones serde_json sees, the last of duplicate keys winning; what serde_json refuses is refused too, but for depth 128,
//! numbers beyond f64 and lone surrogates. Routing text and session keys are taken from every accepted
//! body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use shards::body::parse_fields;
use shards::route::key::{body_session_key, routing_text};

/// What sonic-rs may accept and serde_json refuse: depth 128 (serde_json stops at 127),
/// numbers beyond f64, lone surrogates (Python's json, hence vLLM, takes all three).
/// Anything else is invalid JSON the router must not pass on.
fn serde_json_is_stricter(e: &serde_json::Error) -> bool {
    let m = e.to_string();
    [
        "recursion limit exceeded",
        "number out of range",
        "surrogate",
        // serde_json's words for a leading surrogate followed by anything but `\u`.
        "unexpected end of hex escape",
    ]
    .iter()
    .any(|s| m.contains(s))
}

/// pydantic's lax bool, as vLLM reads `stream`.
fn lax_bool(v: Option<&Value>) -> Option<bool> {
    match v {
        None | Some(Value::Null) => Some(false),
        Some(Value::Bool(b)) => Some(*b),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(x) if x == 1.0 => Some(true),
            Some(x) if x == 0.0 => Some(false),
            _ => None,
        },
        Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
            "1" | "on" | "t" | "true" | "y" | "yes" => Some(true),
            "0" | "off" | "f" | "false" | "n" | "no" => Some(false),
            _ => None,
        },
        Some(_) => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let fields = parse_fields(data);
    let parsed = serde_json::from_slice::<Value>(data);
    if let (Ok(_), Err(e)) = (&fields, &parsed) {
        assert!(
            serde_json_is_stricter(e),
            "parse_fields accepted what serde_json refuses: {e}"
        );
    }
    let reference = parsed.ok().filter(Value::is_object);
    match (fields, reference) {
        (Ok(f), Some(v)) => {
            let o = v.as_object().unwrap();
            assert_eq!(f.stream, lax_bool(o.get("stream")).unwrap_or(false));
            for (name, raw) in [
                ("model", &f.model),
                ("user", &f.user),
                ("session_id", &f.session_id),
                ("user_id", &f.user_id),
                ("session_params", &f.session_params),
                ("prompt", &f.prompt),
                ("messages", &f.messages),
                ("input", &f.input),
                ("text", &f.text),
            ] {
                match (raw, o.get(name)) {
                    (Some(raw), Some(want)) => {
                        let got: Value = serde_json::from_str(raw.as_raw_str())
                            .unwrap_or_else(|e| panic!("{name}: {e}: {}", raw.as_raw_str()));
                        assert_eq!(&got, want, "{name}");
                    }
                    (None, None) => {}
                    (got, want) => panic!(
                        "{name}: {:?} vs {want:?}",
                        got.as_ref().map(|r| r.as_raw_str())
                    ),
                }
            }
            if let Some(Value::String(m)) = o.get("model") {
                assert_eq!(f.model_name().as_deref(), Some(m.as_str()));
            }
            let mut segs = Vec::new();
            routing_text(&f, &mut segs);
            let _ = body_session_key(&f);
        }
        (Ok(f), None) => {
            // serde_json is stricter here (checked above).
            let mut segs = Vec::new();
            routing_text(&f, &mut segs);
            let _ = body_session_key(&f);
        }
        (Err(e), Some(_)) => panic!(
            "serde_json reads an object, parse_fields refused it: {}",
            e.0
        ),
        (Err(_), None) => {}
    }
});
