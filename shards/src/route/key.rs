//! What a request is routed by: its session key (consistent hashing) and its routing text
//! (prefix matching). Both are read from the original bytes: strings stay in their JSON
//! form (escapes included), which is stable for equal inputs and needs no copy.

use sonic_rs::{JsonValueTrait, LazyValue};

use crate::body::RequestFields;

/// Headers that carry a session key, in the order they are consulted.
pub const SESSION_HEADERS: [&[u8]; 6] = [
    b"x-session-id",
    b"x-user-id",
    b"x-tenant-id",
    b"x-correlation-id",
    b"x-request-id",
    b"x-trace-id",
];

/// The body's session key: `user`, `session_id`, `user_id`, `session_params.session_id`,
/// the first that is a non-empty string or a number.
pub fn body_session_key<'a>(f: &'a RequestFields<'a>) -> Option<&'a [u8]> {
    for v in [&f.user, &f.session_id, &f.user_id].into_iter().flatten() {
        if let Some(k) = scalar_bytes(v) {
            return Some(k);
        }
    }
    let sp = f.session_params.as_ref()?;
    let raw = sp.as_raw_str();
    let id = sonic_rs::get_from_str(raw, ["session_id"]).ok()?;
    // `id` borrows `raw`, which borrows the body: find its span in the body.
    let bytes = scalar_bytes(&id)?;
    let start = bytes.as_ptr() as usize - raw.as_ptr() as usize;
    let raw_bytes = sp.as_raw_str().as_bytes();
    Some(&raw_bytes[start..start + bytes.len()])
}

/// A string's JSON inner bytes (no quotes), or a number's digits.
fn scalar_bytes<'a>(v: &'a LazyValue<'_>) -> Option<&'a [u8]> {
    let raw = v.as_raw_str().as_bytes();
    if v.is_str() {
        let inner = &raw[1..raw.len() - 1];
        (!inner.is_empty()).then_some(inner)
    } else if v.is_number() {
        Some(raw)
    } else {
        None
    }
}

/// The routing text as segments of the body: completions prompt (string, list of strings,
/// token ids), chat message contents (strings and text parts), responses `input`,
/// generate `text`. `out` is cleared first. Segments are inner JSON bytes.
pub fn routing_text<'a>(f: &'a RequestFields<'a>, out: &mut Vec<&'a [u8]>) {
    out.clear();
    if let Some(m) = &f.messages {
        messages_text(m, out);
    } else if let Some(p) = f.prompt.as_ref().or(f.input.as_ref()).or(f.text.as_ref()) {
        prompt_text(p, out);
    }
}

fn prompt_text<'a>(p: &'a LazyValue<'a>, out: &mut Vec<&'a [u8]>) {
    let raw = p.as_raw_str().as_bytes();
    if p.is_str() {
        out.push(&raw[1..raw.len() - 1]);
    } else if p.is_array() {
        // A list of strings, token ids, or lists of token ids: each element's JSON, in order
        // (strings without their quotes). Equal prompts give equal segments.
        for item in sonic_rs::to_array_iter(p.as_raw_str()).flatten() {
            let span = span_in(raw, item.as_raw_str().as_bytes());
            if item.is_str() {
                out.push(&span[1..span.len() - 1]);
            } else if item.is_object() {
                // responses `input` items: their content.
                content_text(raw, &item, out);
            } else {
                out.push(span);
            }
        }
    }
}

fn messages_text<'a>(m: &'a LazyValue<'a>, out: &mut Vec<&'a [u8]>) {
    let raw = m.as_raw_str().as_bytes();
    for msg in sonic_rs::to_array_iter(m.as_raw_str()).flatten() {
        content_text(raw, &msg, out);
    }
}

/// A message's `content`: a string, or the `text` of each part.
fn content_text<'a>(whole: &'a [u8], msg: &LazyValue<'_>, out: &mut Vec<&'a [u8]>) {
    let Ok(content) = sonic_rs::get_from_str(msg.as_raw_str(), ["content"]) else {
        return;
    };
    let span = span_in(whole, content.as_raw_str().as_bytes());
    if content.is_str() {
        out.push(&span[1..span.len() - 1]);
    } else if content.is_array() {
        for part in sonic_rs::to_array_iter(content.as_raw_str()).flatten() {
            if let Ok(t) = sonic_rs::get_from_str(part.as_raw_str(), ["text"]) {
                if t.is_str() {
                    let ts = span_in(whole, t.as_raw_str().as_bytes());
                    out.push(&ts[1..ts.len() - 1]);
                }
            }
        }
    }
}

/// `part` as a sub-slice of `whole` with `whole`'s lifetime. Lazy values without escapes
/// borrow the input, so `part` lies inside `whole`; an escaped string is a copy, found by
/// position (it is the same bytes).
fn span_in<'a>(whole: &'a [u8], part: &[u8]) -> &'a [u8] {
    let w = whole.as_ptr() as usize;
    let p = part.as_ptr() as usize;
    if p >= w && p + part.len() <= w + whole.len() {
        let start = p - w;
        &whole[start..start + part.len()]
    } else {
        match memfind(whole, part) {
            Some(start) => &whole[start..start + part.len()],
            None => &[],
        }
    }
}

fn memfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Total length of the segments.
pub fn text_len(segments: &[&[u8]]) -> usize {
    segments.iter().map(|s| s.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::parse_fields;

    fn text_of(body: &str) -> Vec<String> {
        let f = parse_fields(body.as_bytes()).unwrap();
        let mut out = Vec::new();
        routing_text(&f, &mut out);
        out.iter()
            .map(|s| String::from_utf8(s.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn completions_prompt_string_list_and_token_ids() {
        assert_eq!(
            text_of(r#"{"prompt":"Hello \"world\""}"#),
            vec![r#"Hello \"world\""#]
        );
        assert_eq!(text_of(r#"{"prompt":["a","b c"]}"#), vec!["a", "b c"]);
        assert_eq!(text_of(r#"{"prompt":[1, 2,3]}"#), vec!["1", "2", "3"]);
        assert_eq!(text_of(r#"{"prompt":[[1,2],[3]]}"#), vec!["[1,2]", "[3]"]);
    }

    #[test]
    fn chat_string_content_and_parts() {
        let body = r#"{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"Hi"},{"type":"image_url","image_url":{"url":"x"}},{"type":"text","text":"there\n"}]}]}"#;
        assert_eq!(text_of(body), vec!["Be brief.", "Hi", "there\\n"]);
    }

    #[test]
    fn responses_input_and_generate_text() {
        assert_eq!(text_of(r#"{"input":"Tell me"}"#), vec!["Tell me"]);
        assert_eq!(
            text_of(r#"{"input":[{"role":"user","content":"q1"}]}"#),
            vec!["q1"]
        );
        assert_eq!(text_of(r#"{"text":"gen"}"#), vec!["gen"]);
    }

    #[test]
    fn session_key_from_the_body_in_order() {
        let key = |b: &str| {
            let f = parse_fields(b.as_bytes()).unwrap();
            body_session_key(&f).map(|k| String::from_utf8(k.to_vec()).unwrap())
        };
        assert_eq!(
            key(r#"{"user":"u1","session_id":"s1"}"#).as_deref(),
            Some("u1")
        );
        assert_eq!(
            key(r#"{"session_id":"s1","user_id":"x"}"#).as_deref(),
            Some("s1")
        );
        assert_eq!(key(r#"{"user_id":42}"#).as_deref(), Some("42"));
        assert_eq!(
            key(r#"{"session_params":{"other":1,"session_id":"deep"}}"#).as_deref(),
            Some("deep")
        );
        assert_eq!(key(r#"{"user":""}"#), None);
        assert_eq!(key(r#"{"prompt":"user"}"#), None);
    }
}
