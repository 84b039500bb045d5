//! The exact JSON shapes vLLM 0.32 writes (field names, order, which fields are null or
//! absent) for completions, chat completions, their SSE chunks, responses and embeddings.
//! Written by hand into byte buffers: field order matters for fidelity and this is the
//! per-token hot path. The reference bytes are in `testdata/real-vllm-0.32/`.

use std::io::Write;

use bytes::Bytes;

/// The fake text of completion token `i`: `" tok0"`, `" tok1"`, ...
pub fn token_text(i: usize) -> String {
    format!(" tok{i}")
}

/// The fields every response and chunk of one request shares.
#[derive(Clone, Debug)]
pub(crate) struct Head {
    /// `cmpl-…` / `chatcmpl-…`
    pub id: String,
    pub created: u64,
    pub model: String,
    pub fingerprint: String,
}

/// Token usage of one choice or of the whole response.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Usage {
    pub prompt: usize,
    pub completion: usize,
}

impl Usage {
    fn total(self) -> usize {
        self.prompt + self.completion
    }
}

pub(crate) const DONE: &[u8] = b"data: [DONE]\n\n";
pub(crate) const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// A JSON string literal, escaped as JSON requires.
pub(crate) fn push_str(buf: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *buf, s).expect("writing to a Vec cannot fail");
}

fn push_head(buf: &mut Vec<u8>, head: &Head, object: &str) {
    buf.extend_from_slice(b"{\"id\":");
    push_str(buf, &head.id);
    buf.extend_from_slice(b",\"object\":\"");
    buf.extend_from_slice(object.as_bytes());
    let _ = write!(buf, "\",\"created\":{},\"model\":", head.created);
    push_str(buf, &head.model);
}

fn push_finish(buf: &mut Vec<u8>, finish: Option<&str>) {
    match finish {
        Some(f) => {
            buf.extend_from_slice(b"\"finish_reason\":\"");
            buf.extend_from_slice(f.as_bytes());
            buf.extend_from_slice(b"\"");
        }
        None => buf.extend_from_slice(b"\"finish_reason\":null"),
    }
}

/// `"usage":{"prompt_tokens":..,"total_tokens":..,"completion_tokens":..}` as on stream chunks.
fn push_short_usage(buf: &mut Vec<u8>, u: Usage) {
    let _ = write!(
        buf,
        "\"usage\":{{\"prompt_tokens\":{},\"total_tokens\":{},\"completion_tokens\":{}",
        u.prompt,
        u.total(),
        u.completion
    );
}

/// The usage object of non-streamed responses.
fn push_full_usage(buf: &mut Vec<u8>, u: Usage) {
    push_short_usage(buf, u);
    buf.extend_from_slice(b",\"prompt_tokens_details\":null,\"completion_tokens_details\":null}");
}

fn sse(mut json: Vec<u8>) -> Bytes {
    json.extend_from_slice(b"\n\n");
    Bytes::from(json)
}

fn sse_buf(capacity: usize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(capacity);
    buf.extend_from_slice(b"data: ");
    buf
}

/// One choice of a non-streamed completion.
pub(crate) struct ChoiceText<'a> {
    pub text: &'a str,
    pub finish: &'a str,
}

/// Non-streamed `/v1/completions` body. `kv_transfer_params` is raw JSON (or null).
pub(crate) fn completion(
    head: &Head,
    choices: &[ChoiceText<'_>],
    usage: Usage,
    kv_transfer_params: Option<&[u8]>,
) -> Vec<u8> {
    let mut buf = Vec::with_capacity(640 + choices.iter().map(|c| c.text.len()).sum::<usize>());
    push_head(&mut buf, head, "text_completion");
    buf.extend_from_slice(b",\"choices\":[");
    for (i, c) in choices.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        let _ = write!(buf, "{{\"index\":{i},\"text\":");
        push_str(&mut buf, c.text);
        buf.extend_from_slice(b",\"logprobs\":null,");
        push_finish(&mut buf, Some(c.finish));
        buf.extend_from_slice(
            b",\"stop_reason\":null,\"token_ids\":null,\"prompt_logprobs\":null,\
              \"prompt_token_ids\":null,\"routed_experts\":null}",
        );
    }
    buf.extend_from_slice(b"],\"service_tier\":null,\"system_fingerprint\":");
    push_str(&mut buf, &head.fingerprint);
    buf.extend_from_slice(b",");
    push_full_usage(&mut buf, usage);
    push_tail(&mut buf, kv_transfer_params);
    buf
}

fn push_tail(buf: &mut Vec<u8>, kv_transfer_params: Option<&[u8]>) {
    buf.extend_from_slice(b",\"kv_transfer_params\":");
    buf.extend_from_slice(kv_transfer_params.unwrap_or(b"null"));
    buf.extend_from_slice(b",\"ec_transfer_params\":null,\"metrics\":null}");
}

/// Non-streamed `/v1/chat/completions` body.
pub(crate) fn chat(
    head: &Head,
    text: &str,
    finish: &str,
    choices: usize,
    usage: Usage,
    kv_transfer_params: Option<&[u8]>,
) -> Vec<u8> {
    let mut buf = Vec::with_capacity(768 + (text.len() + 256) * choices);
    push_head(&mut buf, head, "chat.completion");
    buf.extend_from_slice(b",\"choices\":[");
    for index in 0..choices.max(1) {
        if index > 0 {
            buf.push(b',');
        }
        buf.extend_from_slice(
            format!("{{\"index\":{index},\"message\":{{\"role\":\"assistant\",\"content\":")
                .as_bytes(),
        );
        push_str(&mut buf, text);
        buf.extend_from_slice(
            b",\"refusal\":null,\"annotations\":null,\"audio\":null,\"function_call\":null,\
              \"reasoning\":null},\"logprobs\":null,",
        );
        push_finish(&mut buf, Some(finish));
        buf.extend_from_slice(b",\"stop_reason\":null,\"token_ids\":null,\"routed_experts\":null}");
    }
    buf.extend_from_slice(b"],\"service_tier\":null,\"system_fingerprint\":");
    push_str(&mut buf, &head.fingerprint);
    buf.extend_from_slice(b",");
    push_full_usage(&mut buf, usage);
    buf.extend_from_slice(
        b",\"prompt_logprobs\":null,\"prompt_token_ids\":null,\"prompt_text\":null",
    );
    push_tail(&mut buf, kv_transfer_params);
    buf
}

/// One streamed `/v1/completions` event. `usage` is set with `continuous_usage_stats`;
/// `fingerprint` on the last token chunk when no usage chunk follows.
pub(crate) fn completion_chunk(
    head: &Head,
    index: usize,
    text: &str,
    finish: Option<&str>,
    usage: Option<Usage>,
    fingerprint: bool,
) -> Bytes {
    let mut buf = sse_buf(320 + text.len());
    push_head(&mut buf, head, "text_completion");
    let _ = write!(buf, ",\"choices\":[{{\"index\":{index},\"text\":");
    push_str(&mut buf, text);
    buf.extend_from_slice(b",\"logprobs\":null,");
    push_finish(&mut buf, finish);
    buf.extend_from_slice(b",\"stop_reason\":null,\"prompt_token_ids\":null,\"token_ids\":null}]");
    if let Some(u) = usage {
        buf.push(b',');
        push_short_usage(&mut buf, u);
        buf.push(b'}');
    }
    if fingerprint {
        buf.extend_from_slice(b",\"system_fingerprint\":");
        push_str(&mut buf, &head.fingerprint);
    }
    buf.push(b'}');
    sse(buf)
}

/// The first streamed chat event: `"delta":{"role":"assistant","content":""}`.
pub(crate) fn chat_role_chunk(head: &Head, usage: Option<Usage>) -> Bytes {
    let mut buf = sse_buf(400);
    push_head(&mut buf, head, "chat.completion.chunk");
    buf.extend_from_slice(
        b",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\
          \"logprobs\":null,\"finish_reason\":null}]",
    );
    if let Some(u) = usage {
        buf.push(b',');
        push_short_usage(&mut buf, u);
        buf.extend_from_slice(b",\"completion_tokens_details\":null}");
    }
    buf.extend_from_slice(b",\"prompt_token_ids\":null,\"prompt_text\":null}");
    sse(buf)
}

/// One streamed chat content event.
pub(crate) fn chat_chunk(
    head: &Head,
    text: &str,
    finish: Option<&str>,
    usage: Option<Usage>,
    fingerprint: bool,
) -> Bytes {
    let mut buf = sse_buf(320 + text.len());
    push_head(&mut buf, head, "chat.completion.chunk");
    buf.extend_from_slice(b",\"choices\":[{\"index\":0,\"delta\":{\"content\":");
    push_str(&mut buf, text);
    buf.extend_from_slice(b"},\"logprobs\":null,");
    push_finish(&mut buf, finish);
    if finish.is_some() {
        buf.extend_from_slice(b",\"stop_reason\":null");
    }
    buf.extend_from_slice(b",\"token_ids\":null}]");
    if let Some(u) = usage {
        buf.push(b',');
        push_short_usage(&mut buf, u);
        buf.extend_from_slice(b",\"completion_tokens_details\":null}");
    }
    if fingerprint {
        buf.extend_from_slice(b",\"system_fingerprint\":");
        push_str(&mut buf, &head.fingerprint);
    }
    buf.push(b'}');
    sse(buf)
}

/// The final `"choices":[]` usage event sent with `stream_options.include_usage`.
pub(crate) fn usage_chunk(head: &Head, object: &str, usage: Usage) -> Bytes {
    let mut buf = sse_buf(300);
    push_head(&mut buf, head, object);
    buf.extend_from_slice(b",\"choices\":[],");
    push_short_usage(&mut buf, usage);
    buf.extend_from_slice(b"},\"system_fingerprint\":");
    push_str(&mut buf, &head.fingerprint);
    buf.push(b'}');
    sse(buf)
}

/// vLLM's in-band stream error (`json.dumps`, so with spaces), sent after a 200.
/// An SSE event (`data: {...}\n\n`) with `"key":value` added as its object's last field.
pub(crate) fn with_field(event: &Bytes, key: &str, value: u64) -> Bytes {
    let Some(close) = event.iter().rposition(|&c| c == b'}') else {
        return event.clone();
    };
    let mut buf = Vec::with_capacity(event.len() + key.len() + 24);
    buf.extend_from_slice(&event[..close]);
    buf.extend_from_slice(format!(",\"{key}\":{value}").as_bytes());
    buf.extend_from_slice(&event[close..]);
    Bytes::from(buf)
}

pub(crate) fn stream_error(message: &str, err_type: &str, code: u16) -> Bytes {
    let mut buf = sse_buf(160);
    buf.extend_from_slice(b"{\"error\": {\"message\": ");
    push_str(&mut buf, message);
    buf.extend_from_slice(b", \"type\": ");
    push_str(&mut buf, err_type);
    let _ = write!(buf, ", \"param\": null, \"code\": {code}}}}}");
    sse(buf)
}

/// Non-streamed `/v1/responses` body (the Responses API), minimal but in vLLM's shape.
pub(crate) fn responses(
    id: &str,
    msg_id: &str,
    created: u64,
    model: &str,
    text: &str,
    max_output_tokens: Option<usize>,
    usage: Usage,
) -> Vec<u8> {
    let incomplete = max_output_tokens.is_some_and(|m| usage.completion >= m);
    let mut buf = Vec::with_capacity(1300 + text.len());
    buf.extend_from_slice(b"{\"id\":");
    push_str(&mut buf, id);
    let _ = write!(buf, ",\"created_at\":{created},\"incomplete_details\":");
    if incomplete {
        buf.extend_from_slice(b"{\"reason\":\"max_output_tokens\"}");
    } else {
        buf.extend_from_slice(b"null");
    }
    buf.extend_from_slice(b",\"instructions\":null,\"metadata\":null,\"model\":");
    push_str(&mut buf, model);
    buf.extend_from_slice(b",\"object\":\"response\",\"output\":[{\"id\":");
    push_str(&mut buf, msg_id);
    buf.extend_from_slice(b",\"content\":[{\"annotations\":[],\"text\":");
    push_str(&mut buf, text);
    buf.extend_from_slice(
        b",\"type\":\"output_text\",\"logprobs\":null}],\"role\":\"assistant\",\
          \"status\":\"completed\",\"type\":\"message\",\"phase\":null}],\
          \"parallel_tool_calls\":true,\"temperature\":1.0,\"tool_choice\":\"none\",\
          \"tools\":[],\"top_p\":1.0,\"background\":false,\"max_output_tokens\":",
    );
    match max_output_tokens {
        Some(m) => {
            let _ = write!(buf, "{m}");
        }
        None => buf.extend_from_slice(b"null"),
    }
    buf.extend_from_slice(
        b",\"max_tool_calls\":null,\"previous_response_id\":null,\"prompt\":null,\
          \"reasoning\":null,\"service_tier\":\"auto\",\"status\":",
    );
    buf.extend_from_slice(if incomplete {
        b"\"incomplete\""
    } else {
        b"\"completed\""
    });
    let _ = write!(
        buf,
        ",\"text\":null,\"top_logprobs\":null,\"truncation\":\"disabled\",\"usage\":{{\
         \"input_tokens\":{},\"input_tokens_details\":{{\"cached_tokens\":0,\
         \"cache_write_tokens\":0,\"input_tokens_per_turn\":[],\"cached_tokens_per_turn\":[]}},\
         \"output_tokens\":{},\"output_tokens_details\":{{\"reasoning_tokens\":0,\
         \"tool_output_tokens\":0,\"output_tokens_per_turn\":[],\
         \"tool_output_tokens_per_turn\":[]}},\"total_tokens\":{}}}",
        usage.prompt,
        usage.completion,
        usage.total()
    );
    buf.extend_from_slice(
        b",\"user\":null,\"presence_penalty\":0.0,\"frequency_penalty\":0.0,\
          \"kv_transfer_params\":null,\"ec_transfer_params\":null,\"input_messages\":null,\
          \"output_messages\":null}",
    );
    buf
}

/// `/v1/embeddings` body: one deterministic unit vector per input.
pub(crate) fn embeddings(
    id: &str,
    created: u64,
    model: &str,
    inputs: &[String],
    dim: usize,
    prompt_tokens: usize,
) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256 + inputs.len() * dim * 24);
    buf.extend_from_slice(b"{\"id\":");
    push_str(&mut buf, id);
    let _ = write!(buf, ",\"object\":\"list\",\"created\":{created},\"model\":");
    push_str(&mut buf, model);
    buf.extend_from_slice(b",\"data\":[");
    for (i, input) in inputs.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        let _ = write!(
            buf,
            "{{\"index\":{i},\"object\":\"embedding\",\"embedding\":["
        );
        let mut seed = input.bytes().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        });
        let raw: Vec<f64> = (0..dim)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
            })
            .collect();
        let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        for (j, x) in raw.iter().enumerate() {
            if j > 0 {
                buf.push(b',');
            }
            let _ = write!(buf, "{:?}", x / norm);
        }
        buf.extend_from_slice(b"]}");
    }
    buf.extend_from_slice(b"],");
    push_full_usage(
        &mut buf,
        Usage {
            prompt: prompt_tokens,
            completion: 0,
        },
    );
    buf.push(b'}');
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head() -> Head {
        Head {
            id: "cmpl-1".into(),
            created: 7,
            model: "m".into(),
            fingerprint: "fp".into(),
        }
    }

    #[test]
    fn responses_are_valid_json() {
        let u = Usage {
            prompt: 3,
            completion: 2,
        };
        let c = [ChoiceText {
            text: "a\"b",
            finish: "length",
        }];
        for body in [
            completion(&head(), &c, u, None),
            completion(&head(), &c, u, Some(b"{\"x\":1}")),
            chat(&head(), "hi\n", "stop", 1, u, None),
            responses("resp_1", "msg_1", 7, "m", "x", Some(2), u),
            embeddings("embd-1", 7, "m", &["a".into(), "b".into()], 4, 2),
        ] {
            serde_json::from_slice::<serde_json::Value>(&body)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body)));
        }
        for chunk in [
            completion_chunk(&head(), 0, "x", None, None, false),
            completion_chunk(&head(), 1, "x", Some("length"), Some(u), true),
            chat_role_chunk(&head(), Some(u)),
            chat_chunk(&head(), "x", Some("stop"), Some(u), true),
            usage_chunk(&head(), "text_completion", u),
            stream_error("boom", "InternalServerError", 500),
        ] {
            let s = std::str::from_utf8(&chunk).unwrap();
            let json = s
                .strip_prefix("data: ")
                .unwrap()
                .strip_suffix("\n\n")
                .unwrap();
            serde_json::from_str::<serde_json::Value>(json)
                .unwrap_or_else(|e| panic!("{e}: {json}"));
        }
    }
}
