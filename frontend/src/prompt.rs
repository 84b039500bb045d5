//! The `prompt` of a `/v1/completions` request. OpenAI allows four shapes; each prompt in it
//! becomes one engine request (one set of `n` choices), in order:
//!
//! | JSON                 | prompts | tokenized                      |
//! |----------------------|---------|--------------------------------|
//! | `"text"`             | 1       | with special tokens (BOS)      |
//! | `["a", "b"]`         | 2       | each with special tokens       |
//! | `[1, 2, 3]`          | 1       | used as given                  |
//! | `[[1, 2], [3]]`      | 2       | each used as given             |
//!
//! Chat completions do not come through here: their prompt is the rendered chat template,
//! tokenized without special tokens (see [`crate::chat`]).

use serde_json::Value;

use crate::{FrontendError, Tokenizer};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    TokenIds(Vec<u32>),
    TokenIdLists(Vec<Vec<u32>>),
}

/// One prompt ready for the engine: the ids, and the text when the client sent text (vLLM
/// echoes it and the gRPC request carries it as `original_text`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    pub text: Option<String>,
    pub token_ids: Vec<u32>,
}

impl Prompt {
    /// Reads the `prompt` field of a completions request body.
    pub fn from_json(value: &Value) -> Result<Self, FrontendError> {
        let invalid = |why: &str| FrontendError::InvalidPrompt(why.to_string());
        match value {
            Value::String(s) => Ok(Prompt::Text(s.clone())),
            Value::Array(items) if items.is_empty() => Err(invalid("prompt must not be empty")),
            Value::Array(items) => match &items[0] {
                Value::String(_) => items
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .map(Prompt::Texts)
                    .ok_or_else(|| invalid("a list of prompts mixes strings with other values")),
                Value::Number(_) => token_ids(items)
                    .map(Prompt::TokenIds)
                    .ok_or_else(|| invalid("a token-id prompt holds something other than ids")),
                Value::Array(_) => items
                    .iter()
                    .map(|v| match v {
                        Value::Array(ids) if !ids.is_empty() => token_ids(ids),
                        _ => None,
                    })
                    .collect::<Option<_>>()
                    .map(Prompt::TokenIdLists)
                    .ok_or_else(|| {
                        invalid("a list of token-id prompts holds a non-list or an empty list")
                    }),
                _ => Err(invalid(
                    "prompt must be a string, a list of strings, or token ids",
                )),
            },
            _ => Err(invalid(
                "prompt must be a string, a list of strings, or token ids",
            )),
        }
    }

    /// The prompts to send to the engine, in order. Text is tokenized with special tokens, as
    /// vLLM's completions endpoint does (`add_special_tokens` defaults to true there).
    pub fn tokenize(
        &self,
        tokenizer: &Tokenizer,
        add_special_tokens: bool,
    ) -> Result<Vec<TokenizedPrompt>, FrontendError> {
        let text = |s: &String| {
            Ok(TokenizedPrompt {
                token_ids: tokenizer.encode(s, add_special_tokens)?,
                text: Some(s.clone()),
            })
        };
        let ids = |ids: &Vec<u32>| TokenizedPrompt {
            text: None,
            token_ids: ids.clone(),
        };
        match self {
            Prompt::Text(s) => Ok(vec![text(s)?]),
            Prompt::Texts(texts) => texts.iter().map(text).collect(),
            Prompt::TokenIds(token_ids) => Ok(vec![ids(token_ids)]),
            Prompt::TokenIdLists(lists) => Ok(lists.iter().map(ids).collect()),
        }
    }
}

fn token_ids(items: &[Value]) -> Option<Vec<u32>> {
    items
        .iter()
        .map(|v| v.as_u64().and_then(|id| u32::try_from(id).ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tiny_llama() -> Tokenizer {
        Tokenizer::from_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/tiny-llama")).unwrap()
    }

    #[test]
    fn the_four_shapes_of_a_prompt() {
        assert_eq!(
            Prompt::from_json(&json!("hi")).unwrap(),
            Prompt::Text("hi".into())
        );
        assert_eq!(
            Prompt::from_json(&json!(["a", "b"])).unwrap(),
            Prompt::Texts(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            Prompt::from_json(&json!([1, 2])).unwrap(),
            Prompt::TokenIds(vec![1, 2])
        );
        assert_eq!(
            Prompt::from_json(&json!([[1], [2, 3]])).unwrap(),
            Prompt::TokenIdLists(vec![vec![1], vec![2, 3]])
        );
    }

    #[test]
    fn malformed_prompts_are_rejected() {
        for bad in [
            json!([]),
            json!(["a", 1]),
            json!([1, -1]),
            json!([[]]),
            json!(7),
            json!([1.5]),
        ] {
            assert!(Prompt::from_json(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn text_prompts_get_a_bos_and_token_prompts_are_kept_as_given() {
        let t = tiny_llama();
        let texts = Prompt::from_json(&json!(["hello", "world"])).unwrap();
        let out = texts.tokenize(&t, true).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].token_ids, t.encode("hello", true).unwrap());
        assert_eq!(out[0].token_ids[0], 1);
        assert_eq!(out[1].text.as_deref(), Some("world"));

        let ids = Prompt::from_json(&json!([[7, 8], [9]])).unwrap();
        let out = ids.tokenize(&t, true).unwrap();
        assert_eq!(out[0].token_ids, vec![7, 8]);
        assert_eq!(
            out[1],
            TokenizedPrompt {
                text: None,
                token_ids: vec![9]
            }
        );
    }
}
