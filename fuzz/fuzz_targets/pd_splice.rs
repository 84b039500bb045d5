//! The P/D body splice on arbitrary bytes: never panics; it refuses what serde_json refuses
//! (but for depth 128, numbers beyond f64 and lone surrogates); whatever it accepts, it
//! turns into legs that are JSON objects; whatever serde_json reads as an object, it
//! accepts, and its legs mean what parse → edit → serialise means (serde_json, last
//! duplicate wins), with each rewritten key written once. The same bytes read as a prefill
//! answer give the `kv_transfer_params` serde_json sees there.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};
use shards::pd::splice::{KvTransferParams, ObjectIndex, SpliceError};

const ANSWER: &[u8] = br#"{"choices":[],"kv_transfer_params":{"do_remote_prefill":true,"remote_block_ids":[1, 2],"remote_engine_id":"e","remote_host":"h","remote_port":1,"tp_size":1}}"#;

fn reference_prefill(client: &Map<String, Value>, kv: &Value) -> Value {
    let mut o = client.clone();
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

fn count(out: &[u8], key: &str) -> usize {
    sonic_rs::to_object_iter(out)
        .filter(|e| e.as_ref().expect("a leg is valid JSON").0 == key)
        .count()
}

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

fuzz_target!(|data: &[u8]| {
    let parsed = serde_json::from_slice::<Value>(data);
    if let (Ok(_), Err(e)) = (ObjectIndex::parse(data), &parsed) {
        assert!(
            serde_json_is_stricter(e),
            "the splice accepted what serde_json refuses: {e}"
        );
    }
    let reference = parsed.ok().and_then(|v| match v {
        Value::Object(o) => Some(o),
        _ => None,
    });

    // As a prefill answer.
    let answer = KvTransferParams::from_prefill_response(data);
    if let Some(o) = &reference {
        match (o.get("kv_transfer_params"), &answer) {
            (None | Some(Value::Null), Ok(None)) => {}
            (Some(want @ Value::Object(_)), Ok(Some(kv))) => {
                let got: Value = serde_json::from_slice(kv.as_bytes()).unwrap();
                assert_eq!(&got, want);
            }
            (Some(_), Err(SpliceError::KvTransferParamsNotAnObject)) => {}
            (want, got) => panic!("kv_transfer_params {want:?} read as {got:?}"),
        }
    }
    // What a worker's JSON encoder writes (serde_json reads it) gives params that stand as an
    // object of their own. Outside that, the span is still passed on verbatim: sonic-rs checks
    // a nested value's grammar but decodes only top-level keys, so a lone surrogate escape
    // (`\ude00`) in a nested key passes inside the answer and fails on its own; vLLM refuses
    // such a body either way.
    if let (Ok(Some(kv)), Some(_)) = (answer, &reference) {
        assert!(KvTransferParams::new(kv.as_bytes()).is_ok());
    }

    // As a client's body.
    let index = match (ObjectIndex::parse(data), &reference) {
        (Ok(index), _) => index,
        (Err(e), Some(_)) => panic!("serde_json reads an object, the splice refused it: {e}"),
        (Err(_), None) => return,
    };
    let nixl = KvTransferParams::NIXL_PREFILL;
    let kv = KvTransferParams::from_prefill_response(ANSWER)
        .unwrap()
        .unwrap();
    let mut prefill = Vec::new();
    index.prefill_leg(nixl, &mut prefill);
    let mut decode = Vec::new();
    index.decode_leg(kv, &mut decode);
    for leg in [&prefill, &decode] {
        if let Err(e) = ObjectIndex::parse(leg) {
            panic!(
                "a leg is not a JSON object ({e}): {}",
                String::from_utf8_lossy(leg)
            );
        }
    }
    // A body the router has routed is indexed without validating it again: the same index.
    if shards::body::parse_fields(data).is_ok() {
        // SAFETY: parse_fields accepted it.
        let accepted = unsafe { ObjectIndex::parse_accepted(data) }.expect("an accepted body");
        assert_eq!(
            accepted.into_spans(),
            ObjectIndex::parse(data).unwrap().into_spans()
        );
    }
    for key in ["max_tokens", "stream", "kv_transfer_params"] {
        assert_eq!(count(&prefill, key), 1, "{key}");
    }
    assert_eq!(count(&prefill, "stream_options"), 0);
    assert_eq!(count(&decode, "kv_transfer_params"), 1);

    if let Some(client) = &reference {
        let nixl_value: Value = serde_json::from_slice(nixl.as_bytes()).unwrap();
        let got: Value = serde_json::from_slice(&prefill).expect("prefill leg");
        assert_eq!(got, reference_prefill(client, &nixl_value));
        let kv_value: Value = serde_json::from_slice(kv.as_bytes()).unwrap();
        let mut want = client.clone();
        want.insert("kv_transfer_params".into(), kv_value);
        let got: Value = serde_json::from_slice(&decode).expect("decode leg");
        assert_eq!(got, Value::Object(want));
    }
});
