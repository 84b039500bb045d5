//! Reading an OpenAI request body: the few fields the mock acts on (model, stream, token
//! limits, `n`, the sampling parameters vLLM validates, stream options, NIXL
//! `kv_transfer_params`) and a prompt-token estimate (whitespace
//! words plus template overhead: the mock has no tokenizer), and the routing text the prefix
//! cache hashes. Everything else is ignored, as vLLM ignores unknown fields.

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Default, Deserialize)]
pub(crate) struct GenerationRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub prompt: Option<Value>,
    #[serde(default)]
    pub messages: Option<Value>,
    #[serde(default)]
    pub input: Option<Value>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
    #[serde(default)]
    pub n: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Completions: sample logprobs (an int); chat: whether to return them (a bool).
    #[serde(default)]
    pub logprobs: Option<Value>,
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub kv_transfer_params: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
    #[serde(default)]
    pub continuous_usage_stats: Option<bool>,
}

/// The NIXL role a request asks for through `kv_transfer_params`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PdRole {
    None,
    /// `do_remote_decode: true`: a prefill leg; answer with kv_transfer_params.
    Prefill,
    /// `do_remote_prefill: true`: a decode leg; answer normally.
    Decode,
}

impl GenerationRequest {
    pub fn pd_role(&self) -> PdRole {
        let Some(Value::Object(kv)) = &self.kv_transfer_params else {
            return PdRole::None;
        };
        let flag = |k: &str| kv.get(k).and_then(Value::as_bool).unwrap_or(false);
        if flag("do_remote_decode") {
            PdRole::Prefill
        } else if flag("do_remote_prefill") {
            PdRole::Decode
        } else {
            PdRole::None
        }
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    pub fn continuous_usage(&self) -> bool {
        self.include_usage()
            && self
                .stream_options
                .as_ref()
                .and_then(|o| o.continuous_usage_stats)
                .unwrap_or(false)
    }
}

fn words(s: &str) -> usize {
    s.split_whitespace().count()
}

/// Prompt tokens of each prompt of a `/v1/completions` request (one per choice); `None` when
/// there is no usable prompt.
pub(crate) fn completion_prompts(prompt: Option<&Value>) -> Option<Vec<usize>> {
    let counts = match prompt? {
        Value::String(s) => vec![1 + words(s)],
        Value::Array(items) if items.is_empty() => return None,
        Value::Array(items) => match &items[0] {
            // A list of token ids is one prompt.
            Value::Number(_) => vec![items.len()],
            _ => items
                .iter()
                .map(|p| match p {
                    Value::String(s) => 1 + words(s),
                    Value::Array(ids) => ids.len(),
                    _ => 1,
                })
                .collect(),
        },
        _ => return None,
    };
    Some(counts)
}

/// The text of one chat message's `content` (a string or a list of parts).
fn content_text(content: Option<&Value>) -> Vec<&str> {
    match content {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => Vec::new(),
    }
}

/// Prompt tokens of a chat request, as a ChatML-like template would give: BOS, 4 per
/// message plus its words, 3 for the generation prompt.
pub(crate) fn chat_prompt_tokens(messages: &[Value]) -> usize {
    1 + messages
        .iter()
        .map(|m| {
            4 + content_text(m.get("content"))
                .iter()
                .map(|t| words(t))
                .sum::<usize>()
        })
        .sum::<usize>()
        + 3
}

/// The routing text of a `/v1/completions` prompt, fed to `sink` piece by piece (what the
/// prefix cache hashes): a string; a list of strings, one after the other; token ids as
/// 4 little-endian bytes each (so 4 bytes are one token), in one list or a list of lists.
pub(crate) fn completion_routing_text(prompt: Option<&Value>, sink: &mut impl FnMut(&[u8])) {
    match prompt {
        Some(Value::String(s)) => sink(s.as_bytes()),
        Some(Value::Array(items)) => {
            for item in items {
                match item {
                    Value::String(s) => sink(s.as_bytes()),
                    Value::Number(n) => sink(&token_bytes(n)),
                    Value::Array(ids) => {
                        for id in ids {
                            if let Value::Number(n) = id {
                                sink(&token_bytes(n));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

fn token_bytes(n: &serde_json::Number) -> [u8; 4] {
    (n.as_u64().unwrap_or(0) as u32).to_le_bytes()
}

/// The routing text of a chat request: every message's `content` string or text parts, one
/// after the other (roles and the template are left out).
pub(crate) fn chat_routing_text(messages: &[Value], sink: &mut impl FnMut(&[u8])) {
    for m in messages {
        match m.get("content") {
            Some(Value::String(s)) => sink(s.as_bytes()),
            Some(Value::Array(parts)) => {
                for text in parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                {
                    sink(text.as_bytes());
                }
            }
            _ => {}
        }
    }
}

/// Prompt tokens of a `/v1/responses` request: a string input is one user message.
pub(crate) fn responses_prompt_tokens(input: Option<&Value>) -> usize {
    match input {
        Some(Value::String(s)) => 1 + 4 + words(s) + 3,
        Some(Value::Array(items)) => chat_prompt_tokens(items),
        _ => 1,
    }
}

/// Embedding inputs as strings (token-id lists are rendered as their numbers).
pub(crate) fn embedding_inputs(input: Option<&Value>) -> Vec<String> {
    match input {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.first().is_some_and(Value::is_number) => {
            vec![Value::Array(items.clone()).to_string()]
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The prompt as text, for `/generate`.
pub(crate) fn prompt_text(prompt: Option<&Value>) -> String {
    match prompt {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prompt_counts() {
        assert_eq!(completion_prompts(Some(&json!("a b c"))), Some(vec![4]));
        assert_eq!(completion_prompts(Some(&json!([1, 2, 3]))), Some(vec![3]));
        assert_eq!(
            completion_prompts(Some(&json!(["a", "b c"]))),
            Some(vec![2, 3])
        );
        assert_eq!(completion_prompts(Some(&json!([]))), None);
        assert_eq!(completion_prompts(None), None);
        let msgs = json!([{"role": "user", "content": "hello world"}]);
        assert_eq!(chat_prompt_tokens(msgs.as_array().unwrap()), 10);
    }

    fn routing_text(f: impl FnOnce(&mut dyn FnMut(&[u8]))) -> Vec<u8> {
        let mut out = Vec::new();
        f(&mut |b: &[u8]| out.extend_from_slice(b));
        out
    }

    #[test]
    fn routing_texts() {
        let text = |v: serde_json::Value| {
            routing_text(|sink| completion_routing_text(Some(&v), &mut |b| sink(b)))
        };
        assert_eq!(text(json!("abc")), b"abc");
        assert_eq!(text(json!(["ab", "cd"])), b"abcd");
        assert_eq!(text(json!([1, 258])), [1, 0, 0, 0, 2, 1, 0, 0]);
        assert_eq!(text(json!([[1], [2]])), [1, 0, 0, 0, 2, 0, 0, 0]);
        let msgs = json!([
            {"role": "system", "content": "sys "},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null}
        ]);
        let chat =
            routing_text(|sink| chat_routing_text(msgs.as_array().unwrap(), &mut |b| sink(b)));
        assert_eq!(chat, b"sys ab");
    }

    #[test]
    fn pd_roles() {
        let r: GenerationRequest =
            serde_json::from_value(json!({"kv_transfer_params": {"do_remote_decode": true}}))
                .unwrap();
        assert_eq!(r.pd_role(), PdRole::Prefill);
        let r: GenerationRequest =
            serde_json::from_value(json!({"kv_transfer_params": {"do_remote_prefill": true}}))
                .unwrap();
        assert_eq!(r.pd_role(), PdRole::Decode);
        let r: GenerationRequest = serde_json::from_value(json!({})).unwrap();
        assert_eq!(r.pd_role(), PdRole::None);
    }
}
