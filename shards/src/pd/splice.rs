//! The request bodies of the two P/D legs, spliced into the client's bytes.
//!
//! A prompt can be half a megabyte; re-serialising it for each leg would cost more than the
//! rest of the request's handling. So the client's body is indexed once by its top-level
//! members (one sonic-rs pass; values are skipped, never materialised; the routing read has
//! validated the body already), and each leg is written as the untouched spans of the
//! original bytes, with only the edited members rewritten, dropped or appended.
//! Whitespace, escapes and key order of everything else stay exactly as the client sent
//! them.
//!
//! Meaning is that of vLLM, which parses with Python's `json` (then pydantic): the last of
//! duplicate keys wins. A spliced body therefore means exactly what parse → edit →
//! serialise would: every occurrence of an edited key is dropped but one (the last, which
//! carries the new value), and keys the router does not edit keep all their occurrences
//! (the last one still wins). Only top-level members are edited; nested objects with the
//! same key names are part of untouched values.
//!
//! The legs (vLLM's NIXL connector; `tests/v1/kv_connector/nixl_integration/toy_proxy_server.py`
//! in vLLM and `prepare_prefill_request` in vllm-router do the same):
//! - prefill: `max_tokens: 1` (set or inserted), `max_completion_tokens: 1` only if present,
//!   `min_tokens` clamped to at most 1 if present, `stream: false`, `stream_options`
//!   removed, and `kv_transfer_params` set to the NIXL request for a remote decode
//!   ([`KvTransferParams::NIXL_PREFILL`]);
//! - decode: the client's body with `kv_transfer_params` set to the prefill response's, byte
//!   for byte ([`KvTransferParams::from_prefill_response`]).

use std::fmt;

/// Why a body cannot be spliced. For the client's body the caller answers 400 with this
/// message; for a prefill response, 502.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpliceError {
    Empty,
    /// Not JSON at all (the first line of the parser's message), invalid UTF-8 included.
    NotJson(String),
    /// Valid JSON perhaps, but not an object.
    NotAnObject,
    /// Arrays and objects nested deeper than [`crate::body::MAX_NESTING`].
    TooDeep,
    /// A `kv_transfer_params` that is neither an object nor null.
    KvTransferParamsNotAnObject,
}

impl fmt::Display for SpliceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpliceError::Empty => f.write_str("body is empty; expected a JSON object"),
            SpliceError::NotJson(m) => write!(f, "body is not valid JSON: {m}"),
            SpliceError::NotAnObject => f.write_str("body is not a JSON object"),
            SpliceError::TooDeep => write!(
                f,
                "body nests arrays and objects deeper than {} levels",
                crate::body::MAX_NESTING
            ),
            SpliceError::KvTransferParamsNotAnObject => {
                f.write_str("'kv_transfer_params' is neither a JSON object nor null")
            }
        }
    }
}

impl std::error::Error for SpliceError {}

/// The raw bytes of a `kv_transfer_params` JSON object, checked to be one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvTransferParams<'a>(&'a [u8]);

impl KvTransferParams<'static> {
    /// What a prefill leg asks of vLLM's NIXL connector: compute the prompt's KV cache and
    /// keep it for a remote decode to pull. The same object as vLLM's own P/D proxy
    /// (`toy_proxy_server.py`) and vllm-router (`vllm_pd_router.rs`) send.
    pub const NIXL_PREFILL: KvTransferParams<'static> = KvTransferParams(
        br#"{"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,"remote_block_ids":null,"remote_host":null,"remote_port":null}"#,
    );
}

impl<'a> KvTransferParams<'a> {
    /// Checks that `raw` is a JSON object.
    pub fn new(raw: &'a [u8]) -> Result<Self, SpliceError> {
        ObjectIndex::parse(raw)?;
        Ok(KvTransferParams(raw))
    }

    /// The top-level `kv_transfer_params` of a prefill response (the last one, if repeated),
    /// as the exact bytes the worker sent. `None` when absent or null: the prefill did not
    /// keep the KV cache for a remote decode, and the caller must not pretend it did.
    pub fn from_prefill_response(body: &'a [u8]) -> Result<Option<Self>, SpliceError> {
        let index = ObjectIndex::parse(body)?;
        let Some(i) = index.last_of(Key::KvTransferParams) else {
            return Ok(None);
        };
        let value = index.value(i);
        match value.first() {
            Some(b'{') => Ok(Some(KvTransferParams(value))),
            Some(b'n') => Ok(None),
            _ => Err(SpliceError::KvTransferParamsNotAnObject),
        }
    }

    pub fn as_bytes(&self) -> &'a [u8] {
        self.0
    }
}

/// The prefill leg's body for `client_body`. See [`ObjectIndex::prefill_leg`].
pub fn prefill_leg(client_body: &[u8], kv: KvTransferParams<'_>) -> Result<Vec<u8>, SpliceError> {
    let mut out = Vec::new();
    ObjectIndex::parse(client_body)?.prefill_leg(kv, &mut out);
    Ok(out)
}

/// The decode leg's body for `client_body`. See [`ObjectIndex::decode_leg`].
pub fn decode_leg(client_body: &[u8], kv: KvTransferParams<'_>) -> Result<Vec<u8>, SpliceError> {
    let mut out = Vec::new();
    ObjectIndex::parse(client_body)?.decode_leg(kv, &mut out);
    Ok(out)
}

/// The top-level members the legs edit. Everything else is `Other` and never rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    MaxTokens,
    MaxCompletionTokens,
    MinTokens,
    Stream,
    StreamOptions,
    KvTransferParams,
    Other,
}

const EDITED_KEYS: usize = 6;

impl Key {
    fn of(name: &str) -> Key {
        match name {
            "max_tokens" => Key::MaxTokens,
            "max_completion_tokens" => Key::MaxCompletionTokens,
            "min_tokens" => Key::MinTokens,
            "stream" => Key::Stream,
            "stream_options" => Key::StreamOptions,
            "kv_transfer_params" => Key::KvTransferParams,
            _ => Key::Other,
        }
    }

    /// The key as written when a member is inserted.
    fn json(self) -> &'static [u8] {
        match self {
            Key::MaxTokens => br#""max_tokens":"#,
            Key::MaxCompletionTokens => br#""max_completion_tokens":"#,
            Key::MinTokens => br#""min_tokens":"#,
            Key::Stream => br#""stream":"#,
            Key::StreamOptions => br#""stream_options":"#,
            Key::KvTransferParams => br#""kv_transfer_params":"#,
            Key::Other => unreachable!("only edited keys are written"),
        }
    }
}

/// One top-level member, as spans of the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Member {
    /// Where the member's bytes begin: just after the previous member's value (or after the
    /// opening brace), so for all but the first member this includes the separating comma.
    start: usize,
    value_start: usize,
    value_end: usize,
    key: Key,
}

/// What a leg does to one edited key.
#[derive(Clone, Copy)]
enum Edit<'v> {
    /// Drop every occurrence.
    Remove(Key),
    /// One member with this value: the last occurrence gets it, the others are dropped;
    /// appended when the key is absent.
    Set(Key, &'v [u8]),
}

impl Edit<'_> {
    fn key(&self) -> Key {
        match *self {
            Edit::Remove(k) | Edit::Set(k, _) => k,
        }
    }
}

/// A JSON object body indexed by its top-level members, ready to be spliced into either
/// leg. Built in one pass; holds spans, not values.
#[derive(Debug)]
pub struct ObjectIndex<'a> {
    body: &'a [u8],
    spans: Spans,
}

/// An index without its body: what the prefill leg keeps for the decode leg, so the
/// client's body is indexed once per request, not once per leg.
#[derive(Debug, PartialEq, Eq)]
pub struct Spans {
    /// The indexed body's length (a different body is indexed anew).
    len: usize,
    /// Position of the opening brace.
    open: usize,
    members: Vec<Member>,
    /// For each edited key, the index in `members` of its last occurrence.
    last: [Option<usize>; EDITED_KEYS],
}

impl Spans {
    /// The index of `body`, the body these spans were taken from.
    pub fn over(self, body: &[u8]) -> Option<ObjectIndex<'_>> {
        (body.len() == self.len).then_some(ObjectIndex { body, spans: self })
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl<'a> ObjectIndex<'a> {
    /// Validates `body` as a JSON object (UTF-8, full JSON grammar, nothing after the
    /// object but whitespace) and indexes its top-level members.
    pub fn parse(body: &'a [u8]) -> Result<Self, SpliceError> {
        let open = checked_open(body)?;
        Self::index(body, open, sonic_rs::to_object_iter(body))
    }

    /// Indexes a client's body that [`crate::body::parse_fields`] accepted, without
    /// validating it again: sonic-rs's unchecked iterator skips a nested value by matching
    /// its brackets, where the validating one parses it (a quarter of a P/D request's
    /// instructions went to indexing a 2 KB body twice over).
    ///
    /// # Safety
    ///
    /// `body` must be valid JSON, as `parse_fields` checks (UTF-8, grammar, escapes,
    /// nesting): sonic-rs's result on anything else is undefined.
    pub unsafe fn parse_accepted(body: &'a [u8]) -> Result<Self, SpliceError> {
        let open = Self::open_brace(body)?;
        // SAFETY: the caller's.
        Self::index(body, open, unsafe {
            sonic_rs::to_object_iter_unchecked(body)
        })
    }

    fn open_brace(body: &[u8]) -> Result<usize, SpliceError> {
        let open = body
            .iter()
            .position(|&b| !is_ws(b))
            .ok_or(SpliceError::Empty)?;
        if body[open] != b'{' {
            return Err(SpliceError::NotAnObject);
        }
        Ok(open)
    }

    fn index(
        body: &'a [u8],
        open: usize,
        members_of: sonic_rs::ObjectJsonIter<'a>,
    ) -> Result<Self, SpliceError> {
        let base = body.as_ptr() as usize;
        let mut members = Vec::with_capacity(16);
        let mut last = [None; EDITED_KEYS];
        let mut end = open + 1;
        for entry in members_of {
            let (name, value) = entry.map_err(not_json)?;
            let raw = value.as_raw_str().as_bytes();
            // The unchecked iterator ends a number at the next `,`, `]` or `}`, whitespace
            // before it included; a span ends at the value's last byte.
            let raw = match raw.iter().rposition(|&b| !is_ws(b)) {
                Some(last) => &raw[..=last],
                None => raw,
            };
            // The lazy value borrows the body (sonic-rs never copies a borrowed input).
            let value_start = (raw.as_ptr() as usize).wrapping_sub(base);
            let value_end = value_start.wrapping_add(raw.len());
            if value_start < end || value_end > body.len() {
                return Err(SpliceError::NotJson(
                    "value outside the body (sonic-rs copied the input?)".into(),
                ));
            }
            let key = Key::of(&name);
            if key != Key::Other {
                last[key as usize] = Some(members.len());
            }
            members.push(Member {
                start: end,
                value_start,
                value_end,
                key,
            });
            end = value_end;
        }
        // The iterator stops at the closing brace (whitespace before it); it does not look
        // beyond.
        let close = end
            + body[end..]
                .iter()
                .position(|&b| b == b'}')
                .ok_or_else(|| SpliceError::NotJson("unterminated object".into()))?;
        if !body[close + 1..].iter().all(|&b| is_ws(b)) {
            return Err(SpliceError::NotJson(
                "trailing characters after the JSON object".into(),
            ));
        }
        Ok(ObjectIndex {
            body,
            spans: Spans {
                len: body.len(),
                open,
                members,
                last,
            },
        })
    }

    pub fn body(&self) -> &'a [u8] {
        self.body
    }

    /// The index without the body, to be put back over it later ([`Spans::over`]).
    pub fn into_spans(self) -> Spans {
        self.spans
    }

    fn last_of(&self, key: Key) -> Option<usize> {
        self.spans.last[key as usize]
    }

    fn value(&self, i: usize) -> &'a [u8] {
        let m = &self.spans.members[i];
        &self.body[m.value_start..m.value_end]
    }

    /// Appends the prefill leg's body to `out`: the client's body with `max_tokens: 1`,
    /// `max_completion_tokens: 1` when present, `min_tokens` at most 1 when present,
    /// `stream: false`, no `stream_options`, and `kv_transfer_params` set to `kv` (for NIXL,
    /// [`KvTransferParams::NIXL_PREFILL`]).
    pub fn prefill_leg(&self, kv: KvTransferParams<'_>, out: &mut Vec<u8>) {
        let mut edits = [Edit::Remove(Key::Other); EDITED_KEYS];
        let mut n = 0;
        let mut push = |e| {
            edits[n] = e;
            n += 1;
        };
        push(Edit::Set(Key::MaxTokens, b"1"));
        if self.last_of(Key::MaxCompletionTokens).is_some() {
            push(Edit::Set(Key::MaxCompletionTokens, b"1"));
        }
        if let Some(i) = self.last_of(Key::MinTokens) {
            if number_above_one(self.value(i)) {
                push(Edit::Set(Key::MinTokens, b"1"));
            }
        }
        push(Edit::Set(Key::Stream, b"false"));
        push(Edit::Remove(Key::StreamOptions));
        push(Edit::Set(Key::KvTransferParams, kv.0));
        self.write(&edits[..n], out);
    }

    /// Appends the decode leg's body to `out`: the client's body with `kv_transfer_params`
    /// set to `kv`, the prefill response's bytes.
    pub fn decode_leg(&self, kv: KvTransferParams<'_>, out: &mut Vec<u8>) {
        self.write(&[Edit::Set(Key::KvTransferParams, kv.0)], out);
    }

    fn write(&self, edits: &[Edit<'_>], out: &mut Vec<u8>) {
        let b = self.body;
        let added: usize = edits
            .iter()
            .map(|e| match e {
                Edit::Set(k, v) => k.json().len() + v.len() + 1,
                Edit::Remove(_) => 0,
            })
            .sum();
        out.reserve(b.len() + added);
        out.extend_from_slice(&b[..=self.spans.open]);
        let mut any = false;
        for (i, m) in self.spans.members.iter().enumerate() {
            let edit = match m.key {
                Key::Other => None,
                k => edits.iter().find(|e| e.key() == k),
            };
            let value = match edit {
                None => &b[m.value_start..m.value_end],
                Some(Edit::Remove(_)) => continue,
                Some(Edit::Set(k, v)) => {
                    if self.last_of(*k) != Some(i) {
                        continue;
                    }
                    v
                }
            };
            // Key and separators as the client wrote them; the comma goes when this is
            // the first member written.
            let lead = &b[m.start..m.value_start];
            match lead.iter().position(|&c| !is_ws(c)) {
                Some(c) if !any && lead[c] == b',' => {
                    out.extend_from_slice(&lead[..c]);
                    out.extend_from_slice(&lead[c + 1..]);
                }
                _ => out.extend_from_slice(lead),
            }
            out.extend_from_slice(value);
            any = true;
        }
        for e in edits {
            if let Edit::Set(k, v) = *e {
                if self.last_of(k).is_none() {
                    if any {
                        out.push(b',');
                    }
                    out.extend_from_slice(k.json());
                    out.extend_from_slice(v);
                    any = true;
                }
            }
        }
        let tail = self
            .spans
            .members
            .last()
            .map_or(self.spans.open + 1, |m| m.value_end);
        out.extend_from_slice(&b[tail..]);
    }
}

/// Where the object opens, once `body` passed the checks sonic-rs's validating iterator
/// leaves to its caller.
fn checked_open(body: &[u8]) -> Result<usize, SpliceError> {
    let open = ObjectIndex::open_brace(body)?;
    // Before sonic-rs recurses into values.
    crate::body::check_nesting(body).map_err(|_| SpliceError::TooDeep)?;
    if let Some(at) = crate::body::invalid_unicode_escape(body) {
        return Err(SpliceError::NotJson(format!(
            "invalid \\u escape at byte {at}"
        )));
    }
    Ok(open)
}

/// Whether a raw JSON value is a number greater than 1 (what `min_tokens` is clamped from).
/// Strings, booleans and null are left for vLLM to judge.
fn number_above_one(raw: &[u8]) -> bool {
    match raw.first() {
        Some(b'-' | b'0'..=b'9') => std::str::from_utf8(raw)
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .is_some_and(|n| n > 1.0),
        _ => false,
    }
}

fn not_json(e: sonic_rs::Error) -> SpliceError {
    // sonic-rs appends a multi-line excerpt of the input; the first line says it all.
    let msg = e.to_string();
    SpliceError::NotJson(msg.lines().next().unwrap_or("").trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefill(body: &str) -> String {
        String::from_utf8(prefill_leg(body.as_bytes(), KvTransferParams::NIXL_PREFILL).unwrap())
            .unwrap()
    }

    const NIXL: &str = r#"{"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,"remote_block_ids":null,"remote_host":null,"remote_port":null}"#;

    #[test]
    fn prefill_leg_of_a_streamed_chat_request() {
        let client = r#"{"model":"m","messages":[{"role":"user","content":"Hi"}],"max_tokens":64,"stream":true,"stream_options":{"include_usage":true}}"#;
        assert_eq!(
            prefill(client),
            format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"Hi"}}],"max_tokens":1,"stream":false,"kv_transfer_params":{NIXL}}}"#
            )
        );
    }

    #[test]
    fn prefill_leg_inserts_what_the_client_left_out() {
        assert_eq!(
            prefill(r#"{"model":"m","prompt":"Hi"}"#),
            format!(
                r#"{{"model":"m","prompt":"Hi","max_tokens":1,"stream":false,"kv_transfer_params":{NIXL}}}"#
            )
        );
        assert_eq!(
            prefill("{}"),
            format!(r#"{{"max_tokens":1,"stream":false,"kv_transfer_params":{NIXL}}}"#)
        );
    }

    #[test]
    fn max_completion_tokens_is_capped_only_when_present() {
        assert_eq!(
            prefill(r#"{"max_completion_tokens":100,"stream":false}"#),
            format!(
                r#"{{"max_completion_tokens":1,"stream":false,"max_tokens":1,"kv_transfer_params":{NIXL}}}"#
            )
        );
        // Present as null is present (Python's `in`, vllm-router's `get().is_some()`).
        assert!(
            prefill(r#"{"max_completion_tokens":null}"#).contains(r#""max_completion_tokens":1"#)
        );
        assert!(!prefill(r#"{"prompt":"x"}"#).contains("max_completion_tokens"));
    }

    #[test]
    fn min_tokens_is_clamped_to_one() {
        assert!(prefill(r#"{"min_tokens":16}"#).starts_with(r#"{"min_tokens":1,"#));
        assert!(prefill(r#"{"min_tokens":1.5e1}"#).starts_with(r#"{"min_tokens":1,"#));
        for kept in ["0", "1", "null", "-3", "\"7\""] {
            let body = format!(r#"{{"min_tokens":{kept}}}"#);
            assert!(
                prefill(&body).starts_with(&format!(r#"{{"min_tokens":{kept},"#)),
                "{kept}"
            );
        }
    }

    #[test]
    fn nested_members_with_the_same_names_are_untouched() {
        let client = r#"{"messages":[{"role":"user","content":"x","stream":true,"max_tokens":9}],"response_format":{"stream_options":{},"kv_transfer_params":null}}"#;
        let out = prefill(client);
        assert!(out.starts_with(&client[..client.len() - 1]), "{out}");
    }

    #[test]
    fn the_last_duplicate_is_the_one_that_counts() {
        // Edited keys appear once, where their last occurrence was.
        assert_eq!(
            prefill(
                r#"{"stream":true,"max_tokens":5,"model":"a","stream":true,"max_tokens":7,"model":"b","stream_options":{},"stream_options":{}}"#
            ),
            format!(
                r#"{{"model":"a","stream":false,"max_tokens":1,"model":"b","kv_transfer_params":{NIXL}}}"#
            )
        );
        // min_tokens: the last value decides; when it needs no clamp, nothing is rewritten.
        assert!(prefill(r#"{"min_tokens":9,"min_tokens":0}"#)
            .starts_with(r#"{"min_tokens":9,"min_tokens":0,"#));
        assert!(prefill(r#"{"min_tokens":0,"min_tokens":9}"#).starts_with(r#"{"min_tokens":1,"#));
    }

    #[test]
    fn escaped_keys_are_the_keys_they_spell() {
        // Python's json reads "str\u0065am" as "stream".
        assert_eq!(
            prefill(r#"{"str\u0065am":true,"max\u005ftokens":3}"#),
            format!(r#"{{"str\u0065am":false,"max\u005ftokens":1,"kv_transfer_params":{NIXL}}}"#)
        );
    }

    #[test]
    fn untouched_bytes_stay_exactly_as_sent() {
        let client = "\r\n {\n  \"prompt\" : \"caf\u{e9} \\u00e9 \\n \\/ \\\"q\\\" \u{1f600}\",\n\t\"max_tokens\":\t16 ,\n  \"temperature\": 1.50E+0\n} \n";
        let out = prefill(client);
        assert_eq!(
            out,
            format!("\r\n {{\n  \"prompt\" : \"caf\u{e9} \\u00e9 \\n \\/ \\\"q\\\" \u{1f600}\",\n\t\"max_tokens\":\t1 ,\n  \"temperature\": 1.50E+0,\"stream\":false,\"kv_transfer_params\":{NIXL}\n}} \n")
        );
    }

    #[test]
    fn dropping_the_first_member_drops_the_comma_after_it() {
        assert_eq!(
            prefill(r#"{ "stream_options" : {"include_usage":true} , "model" : "m" }"#),
            format!(
                r#"{{  "model" : "m","max_tokens":1,"stream":false,"kv_transfer_params":{NIXL} }}"#
            )
        );
        assert_eq!(
            prefill(r#"{"stream_options":null}"#),
            format!(r#"{{"max_tokens":1,"stream":false,"kv_transfer_params":{NIXL}}}"#)
        );
    }

    /// What a vLLM 0.32 prefill worker answers with the NIXL connector (shape from vLLM's
    /// `NixlConnector.request_finished`).
    const PREFILL_RESPONSE: &str = r#"{"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":" the","logprobs":null,"finish_reason":"length","stop_reason":null,"prompt_logprobs":null}],"usage":{"prompt_tokens":5,"total_tokens":6,"completion_tokens":1,"prompt_tokens_details":null},"kv_transfer_params":{"do_remote_prefill": true, "do_remote_decode": false, "remote_block_ids": [1, 2], "remote_engine_id": "e-\u00e9", "remote_request_id": "cmpl-x-0", "remote_host": "10.0.0.7", "remote_port": 5600, "tp_size": 1}}"#;

    #[test]
    fn decode_leg_carries_the_prefill_answer_verbatim() {
        let kv = KvTransferParams::from_prefill_response(PREFILL_RESPONSE.as_bytes())
            .unwrap()
            .unwrap();
        let raw = r#"{"do_remote_prefill": true, "do_remote_decode": false, "remote_block_ids": [1, 2], "remote_engine_id": "e-\u00e9", "remote_request_id": "cmpl-x-0", "remote_host": "10.0.0.7", "remote_port": 5600, "tp_size": 1}"#;
        assert_eq!(kv.as_bytes(), raw.as_bytes());
        let client = r#"{"model":"m","prompt":"Hi","max_tokens":64,"stream":true,"stream_options":{"include_usage":true}}"#;
        let decode = decode_leg(client.as_bytes(), kv).unwrap();
        assert_eq!(
            String::from_utf8(decode).unwrap(),
            format!(
                "{},\"kv_transfer_params\":{raw}}}",
                &client[..client.len() - 1]
            )
        );
        // A client's own kv_transfer_params is replaced, in place.
        let decode = decode_leg(br#"{"kv_transfer_params":{"x":1},"prompt":"p"}"#, kv).unwrap();
        assert_eq!(
            String::from_utf8(decode).unwrap(),
            format!(r#"{{"kv_transfer_params":{raw},"prompt":"p"}}"#)
        );
    }

    #[test]
    fn a_prefill_answer_without_kv_transfer_params() {
        for body in [
            &br#"{"id":"x","choices":[]}"#[..],
            br#"{"kv_transfer_params":null}"#,
            br#"{"kv_transfer_params":{"a":1},"kv_transfer_params":null}"#,
            br#"{"choices":[{"kv_transfer_params":{"do_remote_prefill":true}}]}"#,
        ] {
            assert_eq!(KvTransferParams::from_prefill_response(body), Ok(None));
        }
        assert_eq!(
            KvTransferParams::from_prefill_response(br#"{"kv_transfer_params":[1]}"#),
            Err(SpliceError::KvTransferParamsNotAnObject)
        );
        assert!(matches!(
            KvTransferParams::from_prefill_response(b"Internal Server Error"),
            Err(SpliceError::NotAnObject)
        ));
        assert!(matches!(
            KvTransferParams::from_prefill_response(br#"{"kv_transfer_params":{"a":1}"#),
            Err(SpliceError::NotJson(_))
        ));
    }

    #[test]
    fn the_decode_leg_reuses_the_prefill_legs_index_of_the_same_body_only() {
        let body = br#"{"prompt":"Hi","stream":true,"kv_transfer_params":{"old":1}}"#;
        let spans = ObjectIndex::parse(body).unwrap().into_spans();
        let kv = KvTransferParams::new(br#"{"remote_block_ids":[1]}"#).unwrap();
        let mut out = Vec::new();
        spans.over(body).unwrap().decode_leg(kv, &mut out);
        assert_eq!(out, decode_leg(body, kv).unwrap());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"prompt":"Hi","stream":true,"kv_transfer_params":{"remote_block_ids":[1]}}"#
        );
        let spans = ObjectIndex::parse(body).unwrap().into_spans();
        assert!(spans.over(&body[..body.len() - 1]).is_none());
    }

    #[test]
    fn nixl_prefill_params_are_the_object_vllm_expects() {
        assert_eq!(KvTransferParams::NIXL_PREFILL.as_bytes(), NIXL.as_bytes());
        assert!(KvTransferParams::new(NIXL.as_bytes()).is_ok());
    }

    #[test]
    fn bodies_that_are_not_json_objects_are_refused_clearly() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "body is empty; expected a JSON object"),
            (b" \n", "body is empty; expected a JSON object"),
            (b"[1,2]", "body is not a JSON object"),
            (b"\"str\"", "body is not a JSON object"),
            (b"null", "body is not a JSON object"),
            (
                b"{} trailing",
                "body is not valid JSON: trailing characters after the JSON object",
            ),
            (
                b"{}{}",
                "body is not valid JSON: trailing characters after the JSON object",
            ),
        ];
        for (body, msg) in cases {
            let err = prefill_leg(body, KvTransferParams::NIXL_PREFILL).unwrap_err();
            assert_eq!(err.to_string(), *msg, "{:?}", String::from_utf8_lossy(body));
        }
        for bad in [
            &b"{"[..],
            b"{\"prompt\": [1, 2,]}",
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}}",
            b"{\"prompt\": \"\xff\"}",
            b"{\"a\" 1}",
            b"{\"a\":1,}",
            b"{,\"a\":1}",
            b"{\"a\":tru}",
            b"{\"a\":\"\x01\"}",
            b"{\"a\":01}",
            b"{\"a\":NaN}",
            b"{'a':1}",
        ] {
            let err = prefill_leg(bad, KvTransferParams::NIXL_PREFILL).unwrap_err();
            assert!(
                matches!(err, SpliceError::NotJson(_)),
                "{:?}: {err}",
                String::from_utf8_lossy(bad)
            );
            assert!(decode_leg(bad, KvTransferParams::NIXL_PREFILL).is_err());
        }
        assert!(KvTransferParams::new(b"[]").is_err());
    }

    #[test]
    fn a_unicode_escape_needs_four_hex_digits() {
        // Found by fuzz/pd_splice: sonic-rs's skip took `\u00,"` as an escape (its quote
        // eaten as a hex digit), so this prefill answer was accepted and its invalid
        // kv_transfer_params would have been copied into the decode leg.
        let answer = b"{\"i\":[{\"text\":\"x\"}]\n,\"kv_transfer_params\":{\"do_remote_pref\":null,\"str\\u00,\"remote_port\":5600}}";
        assert_eq!(
            KvTransferParams::from_prefill_response(answer),
            Err(SpliceError::NotJson("invalid \\u escape at byte 69".into()))
        );
        for bad in [
            &br#"{"prompt":["\u0",""],"max_tokens":1}"#[..],
            br#"{"prompt":"\u12"}"#,
            br#"{"messages":[{"content":"\uGGGG"}]}"#,
        ] {
            assert!(
                matches!(
                    prefill_leg(bad, KvTransferParams::NIXL_PREFILL),
                    Err(SpliceError::NotJson(_))
                ),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let escaped_backslash = br#"{"prompt":"\\u00,","stream":true}"#;
        assert!(prefill_leg(escaped_backslash, KvTransferParams::NIXL_PREFILL).is_ok());
    }

    #[test]
    fn deep_nesting_is_refused_before_it_can_overflow_the_stack() {
        let body = format!(
            "{{\"prompt\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(
            prefill_leg(body.as_bytes(), KvTransferParams::NIXL_PREFILL),
            Err(SpliceError::TooDeep)
        );
        let response = format!(
            "{{\"kv_transfer_params\":{{\"a\":{}1{}}}}}",
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(
            KvTransferParams::from_prefill_response(response.as_bytes()),
            Err(SpliceError::TooDeep)
        );
    }
}
