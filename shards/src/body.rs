//! The fields of an OpenAI request body the router reads, in one validating pass with
//! sonic-rs: the body must be a JSON object (400 otherwise, before any worker sees it).
//! Values the router does not read are skipped with full validation, never materialised.
//! Duplicate keys are allowed and the last one wins, as in vLLM (pydantic).
//!
//! sonic-rs's validation of the values it skips has two gaps, so every sonic-rs pass over a
//! client's or a worker's JSON must be preceded by two checks:
//! - it recurses without a depth limit, so a body of a few hundred kilobytes of `[` would
//!   overflow a shard's stack and abort the whole process: [`check_nesting`] bounds the
//!   depth first ([`crate::nesting`]);
//! - it takes `\u` and any four bytes as an escape (`"\u00,"` passes, the quote eaten as a
//!   hex digit), so invalid JSON would be forwarded as if valid: [`invalid_unicode_escape`].

use std::fmt;

use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use sonic_rs::LazyValue;

/// What the data plane needs from a request body. Borrowed from the body bytes; values
/// are raw JSON (validated, not materialised).
#[derive(Default)]
pub struct RequestFields<'a> {
    /// The raw JSON of `model` (a string literal, quotes included), if present.
    pub model: Option<LazyValue<'a>>,
    pub stream: bool,
    /// Session keys for consistent hashing, in the order they are consulted.
    pub user: Option<LazyValue<'a>>,
    pub session_id: Option<LazyValue<'a>>,
    pub user_id: Option<LazyValue<'a>>,
    pub session_params: Option<LazyValue<'a>>,
    /// The text the model reads: completions `prompt`, chat `messages`, responses
    /// `input`, generate `text`.
    pub prompt: Option<LazyValue<'a>>,
    pub messages: Option<LazyValue<'a>>,
    pub input: Option<LazyValue<'a>>,
    pub text: Option<LazyValue<'a>>,
}

impl RequestFields<'_> {
    /// `model` as a string, when it is one.
    pub fn model_name(&self) -> Option<String> {
        self.model
            .as_ref()
            .and_then(|m| sonic_rs::from_str::<String>(m.as_raw_str()).ok())
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct BodyError(pub String);

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Validates `body` as a JSON object and extracts the routing fields.
pub fn parse_fields(body: &[u8]) -> Result<RequestFields<'_>, BodyError> {
    if body.is_empty() {
        return Err(BodyError(
            "request body is empty; expected a JSON object".into(),
        ));
    }
    // JSON text is UTF-8 (RFC 8259); checked up front because sonic-rs's lazy values
    // assume it.
    if simdutf8::basic::from_utf8(body).is_err() {
        let at = std::str::from_utf8(body)
            .err()
            .map_or(0, |e| e.valid_up_to());
        return Err(BodyError(format!(
            "request body is not valid UTF-8 (at byte {at})"
        )));
    }
    check_nesting(body)?;
    if let Some(at) = invalid_unicode_escape(body) {
        return Err(BodyError(format!(
            "request body is not valid JSON: invalid \\u escape at byte {at}"
        )));
    }
    sonic_rs::from_slice::<FieldsSeed>(body)
        .map(|f| f.0)
        .map_err(|e| {
            // sonic-rs appends a multi-line excerpt of the input; the first line says it all.
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("").trim_end();
            BodyError(format!("request body is not valid JSON: {first}"))
        })
}

/// Deepest nesting of arrays and objects accepted (the top-level object counts as 1);
/// serde_json's limit, well below Python's recursion limit, far above any real request.
pub const MAX_NESTING: usize = 128;

/// Refuses JSON text whose arrays and objects nest deeper than [`MAX_NESTING`] (brackets
/// inside strings do not count). Other errors are left to the parser.
pub fn check_nesting(json: &[u8]) -> Result<(), BodyError> {
    if crate::nesting::exceeds(json, MAX_NESTING) {
        return Err(BodyError(format!(
            "JSON nests arrays and objects deeper than {MAX_NESTING} levels"
        )));
    }
    Ok(())
}

/// Where the first `\u` escape not followed by four hex digits begins, if any. A `\u`
/// after an odd run of backslashes is an escaped backslash and a `u`, not an escape.
/// Backslashes outside strings make the text invalid anyway, so the check needs no notion
/// of strings: on valid JSON it finds nothing, and what it finds is invalid JSON.
pub fn invalid_unicode_escape(json: &[u8]) -> Option<usize> {
    for at in memchr::memmem::find_iter(json, br"\u") {
        let run = json[..at].iter().rev().take_while(|&&c| c == b'\\').count();
        if run % 2 == 1 {
            continue;
        }
        match json.get(at + 2..at + 6) {
            Some(hex) if hex.iter().all(u8::is_ascii_hexdigit) => {}
            _ => return Some(at),
        }
    }
    None
}

struct FieldsSeed<'a>(RequestFields<'a>);

impl<'de> serde::Deserialize<'de> for FieldsSeed<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(FieldsVisitor)
    }
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = FieldsSeed<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = RequestFields::default();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "model" => fields.model = Some(map.next_value::<LazyValue<'de>>()?),
                "user" => fields.user = Some(map.next_value::<LazyValue<'de>>()?),
                "session_id" => fields.session_id = Some(map.next_value::<LazyValue<'de>>()?),
                "user_id" => fields.user_id = Some(map.next_value::<LazyValue<'de>>()?),
                "session_params" => {
                    fields.session_params = Some(map.next_value::<LazyValue<'de>>()?)
                }
                "prompt" => fields.prompt = Some(map.next_value::<LazyValue<'de>>()?),
                "messages" => fields.messages = Some(map.next_value::<LazyValue<'de>>()?),
                "input" => fields.input = Some(map.next_value::<LazyValue<'de>>()?),
                "text" => fields.text = Some(map.next_value::<LazyValue<'de>>()?),
                "stream" => {
                    // The last duplicate wins, as in vLLM. A value vLLM cannot read as a
                    // bool is not the router's to refuse: the worker answers its own 400
                    // (pydantic's bool_parsing), which reaches the client unchanged.
                    let raw = map.next_value::<LazyValue<'de>>()?;
                    fields.stream = lax_bool(raw.as_raw_str()).unwrap_or(false);
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(FieldsSeed(fields))
    }
}

/// A JSON value as vLLM's request models (pydantic, lax mode) read an optional bool:
/// `null`, booleans, the numbers 0 and 1, and the strings pydantic knows, in any case.
fn lax_bool(raw: &str) -> Option<bool> {
    match raw {
        "true" => return Some(true),
        "false" | "null" => return Some(false),
        _ => {}
    }
    if raw.starts_with('"') {
        let s: String = if raw.contains('\\') {
            sonic_rs::from_str(raw).ok()?
        } else {
            raw[1..raw.len() - 1].to_string()
        };
        let s = s.to_ascii_lowercase();
        return match s.as_str() {
            "1" | "on" | "t" | "true" | "y" | "yes" => Some(true),
            "0" | "off" | "f" | "false" | "n" | "no" => Some(false),
            _ => None,
        };
    }
    match raw.parse::<f64>() {
        Ok(1.0) => Some(true),
        Ok(0.0) => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_model_and_stream() {
        let b = br#"{"model":"m\u00e9","prompt":"hi","stream":true,"max_tokens":4}"#;
        let f = parse_fields(b).unwrap();
        assert!(f.stream);
        assert_eq!(f.model_name().as_deref(), Some("mé"));
    }

    #[test]
    fn last_duplicate_wins() {
        let f = parse_fields(br#"{"stream":true,"stream":false}"#).unwrap();
        assert!(!f.stream);
        // Found by fuzz/body_fields: an earlier `stream` that is not a boolean was refused,
        // though vLLM reads only the last one.
        let f = parse_fields(br#"{"stream":"m","prompt":"p","stream":true}"#).unwrap();
        assert!(f.stream);
        // A last value vLLM cannot read is the worker's to refuse.
        assert!(
            !parse_fields(br#"{"stream":true,"stream":2}"#)
                .unwrap()
                .stream
        );
        let f = parse_fields(br#"{"stream":true,"stream":null}"#).unwrap();
        assert!(!f.stream);
    }

    #[test]
    fn stream_is_read_as_vllms_pydantic_models_read_a_bool() {
        for (raw, want) in [
            ("1", true),
            ("0", false),
            ("1.0", true),
            ("\"yes\"", true),
            ("\"TRUE\"", true),
            ("\"on\"", true),
            ("\"f\"", false),
            ("\"No\"", false),
            ("\"\\u0079es\"", true),
        ] {
            let body = format!(r#"{{"prompt":"p","stream":{raw}}}"#);
            assert_eq!(parse_fields(body.as_bytes()).unwrap().stream, want, "{raw}");
        }
    }

    #[test]
    fn null_stream_is_false() {
        assert!(!parse_fields(br#"{"stream":null}"#).unwrap().stream);
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        // sonic-rs validates skipped values by unbounded recursion: before this check a
        // 200 KB prompt of `[` aborted the whole router with a stack overflow.
        for key in ["prompt", "messages", "other"] {
            for depth in [MAX_NESTING, 100_000] {
                let body = format!("{{\"{key}\":{}{}}}", "[".repeat(depth), "]".repeat(depth));
                let err = parse_fields(body.as_bytes()).err().unwrap();
                assert_eq!(
                    err.0,
                    "JSON nests arrays and objects deeper than 128 levels"
                );
            }
            let body = format!(
                "{{\"{key}\":{}{}}}",
                "[".repeat(MAX_NESTING - 1),
                "]".repeat(MAX_NESTING - 1)
            );
            assert!(parse_fields(body.as_bytes()).is_ok());
        }
    }

    #[test]
    fn many_shallow_brackets_and_brackets_in_strings_are_fine() {
        let wide = format!("[{}1]", "{},[],".repeat(1000));
        let deep_text = format!("\"{}\"", "[{".repeat(300));
        let body = format!(r#"{{"messages":{wide},"prompt":{deep_text}}}"#);
        assert!(parse_fields(body.as_bytes()).is_ok());
    }

    #[test]
    fn a_unicode_escape_needs_four_hex_digits_even_in_skipped_values() {
        // Found by fuzz/pd_splice: sonic-rs's skip took `\u` and any four bytes as an
        // escape, a quote among them, so a string could run on past its end; the first
        // three were accepted.
        for bad in [
            &br#"{"other":{"k\u00,"b":1}}"#[..],
            br#"{"other":["\u0",""]}"#,
            br#"{"messages":[{"content":"\uzzzz"}]}"#,
            br#"{"other":"\\\u12"}"#,
            br#"{"other":"\u"}"#,
        ] {
            let err = parse_fields(bad)
                .err()
                .unwrap_or_else(|| panic!("accepted {}", String::from_utf8_lossy(bad)));
            assert!(err.0.contains("invalid \\u escape"), "{}", err.0);
        }
        for good in [
            &br#"{"other":"\u00e9\uD83D\uDE00 \\u00,"}"#[..],
            br#"{"other":"\\\\uzz \\\u0041"}"#,
            br#"{"other":"\\","u":"\u0000"}"#,
        ] {
            assert!(
                parse_fields(good).is_ok(),
                "{}",
                String::from_utf8_lossy(good)
            );
        }
        assert_eq!(invalid_unicode_escape(br#""a\\\u12G4""#), Some(4));
        assert_eq!(invalid_unicode_escape(br#""\\u12G4\u12""#), Some(8));
        assert_eq!(invalid_unicode_escape(b""), None);
    }

    #[test]
    fn invalid_json_is_refused_even_in_skipped_values() {
        for bad in [
            &b"{"[..],
            b"{\"prompt\": [1, 2,]}",
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}}",
            b"[1,2]",
            b"\"str\"",
            b"{} trailing",
            b"",
            b"{\"prompt\": \"\xff\"}",
        ] {
            assert!(
                parse_fields(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
