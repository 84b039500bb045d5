//! The model's tokenizer, loaded the way vLLM loads it from a model directory: `tokenizer.json`
//! for the vocabulary and pipeline, `tokenizer_config.json` for the named special tokens and
//! the chat template, `generation_config.json` (if present) for the ids that end generation.
//! Nothing is fetched: the caller hands a local directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::FrontendError;

/// A special token by its text and id, e.g. `<s>` = 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub text: String,
    pub id: u32,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    dir: PathBuf,
    config: Value,
    bos: Option<SpecialToken>,
    eos: Option<SpecialToken>,
    unk: Option<SpecialToken>,
    pad: Option<SpecialToken>,
    eos_token_ids: Vec<u32>,
    added_tokens: HashMap<u32, String>,
    /// A Metaspace pre-tokenizer's replacement character (`▁`), whose leading instances a
    /// one-token decode strips.
    leading_space_marker: Option<char>,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and `dir/tokenizer_config.json`. Either missing or malformed is
    /// an error naming the file, so a router fails at start saying which tokenizer it could not use.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, FrontendError> {
        let dir = dir.as_ref().to_path_buf();
        let json_path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&json_path).map_err(|e| {
            FrontendError::TokenizerLoad {
                path: json_path.clone(),
                reason: e.to_string(),
            }
        })?;
        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let generation_config = match dir.join("generation_config.json") {
            p if p.exists() => Some(read_json(&p)?),
            _ => None,
        };

        // A special token is named in tokenizer_config.json; failing that, generation_config.json
        // may give the bos / eos by id.
        let named = |key: &str| {
            let text = special_token_text(config.get(key)?)?;
            let id = inner.token_to_id(&text)?;
            Some(SpecialToken { text, id })
        };
        let by_generation_config = |key: &str| {
            let v = generation_config.as_ref()?.get(key)?;
            let id = v.as_u64().or_else(|| v.as_array()?.first()?.as_u64())? as u32;
            let text = inner.id_to_token(id)?;
            Some(SpecialToken { text, id })
        };
        let (bos, eos, unk, pad) = (
            named("bos_token").or_else(|| by_generation_config("bos_token_id")),
            named("eos_token").or_else(|| by_generation_config("eos_token_id")),
            named("unk_token"),
            named("pad_token"),
        );

        // vLLM stops on the tokenizer's eos and on every id generation_config.json lists.
        let mut eos_token_ids: Vec<u32> = eos.iter().map(|t| t.id).collect();
        if let Some(ids) = generation_config
            .as_ref()
            .and_then(|g| g.get("eos_token_id"))
        {
            let listed: Vec<u32> = match ids {
                Value::Array(a) => a
                    .iter()
                    .filter_map(|v| v.as_u64())
                    .map(|v| v as u32)
                    .collect(),
                v => v.as_u64().map(|v| v as u32).into_iter().collect(),
            };
            for id in listed {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }

        let added_tokens = inner
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| (id, t.content))
            .collect();
        let leading_space_marker = leading_space_marker(inner.get_pre_tokenizer());
        Ok(Self {
            inner,
            leading_space_marker,
            dir,
            config,
            bos,
            eos,
            unk,
            pad,
            eos_token_ids,
            added_tokens,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Token ids for `text`. `add_special_tokens` applies the tokenizer's post-processor (for
    /// Llama-like models: a leading BOS). vLLM passes `true` for completions and `false` for chat,
    /// whose template already writes the BOS as text.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, FrontendError> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| FrontendError::Tokenize(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids` in one piece (not incremental: see [`crate::DecodeStream`]).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, FrontendError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| FrontendError::Tokenize(e.to_string()))
    }

    /// One id's text as vLLM's logprobs show it (`convert_ids_list_to_tokens`): decoded alone
    /// with special tokens kept, the leading spaces a Metaspace decode strips put back. An id
    /// the vocabulary lacks decodes to "".
    pub fn decode_one(&self, id: u32) -> String {
        let text = self.inner.decode(&[id], false).unwrap_or_default();
        let Some(marker) = self.leading_space_marker else {
            return text;
        };
        let Some(raw) = self.inner.id_to_token(id) else {
            return text;
        };
        let markers = raw.chars().take_while(|&c| c == marker).count();
        let existing = text.len() - text.trim_start_matches(' ').len();
        if markers > existing {
            let mut s = " ".repeat(markers - existing);
            s.push_str(&text);
            s
        } else {
            text
        }
    }

    pub fn bos(&self) -> Option<&SpecialToken> {
        self.bos.as_ref()
    }

    pub fn eos(&self) -> Option<&SpecialToken> {
        self.eos.as_ref()
    }

    pub fn unk(&self) -> Option<&SpecialToken> {
        self.unk.as_ref()
    }

    pub fn pad(&self) -> Option<&SpecialToken> {
        self.pad.as_ref()
    }

    /// Every id that ends generation: the tokenizer's eos and generation_config.json's list.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// The text of an added token (special or not) by id, as the tokenizer's added vocabulary has it.
    pub fn added_token(&self, id: u32) -> Option<&str> {
        self.added_tokens.get(&id).map(String::as_str)
    }

    pub fn has_added_tokens(&self) -> bool {
        !self.added_tokens.is_empty()
    }

    /// The vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub(crate) fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The chat template the model ships, as transformers finds it: `chat_template.jinja` in the
    /// directory, else `chat_template` in tokenizer_config.json (a string, or a list of named
    /// templates of which `default` is the one used).
    pub fn chat_template_source(&self) -> Result<Option<String>, FrontendError> {
        let file = self.dir.join("chat_template.jinja");
        if file.exists() {
            return std::fs::read_to_string(&file)
                .map(Some)
                .map_err(|e| FrontendError::NoChatTemplate(format!("{}: {e}", file.display())));
        }
        Ok(match self.config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        })
    }
}

fn read_json(path: &Path) -> Result<Value, FrontendError> {
    let load_error = |reason: String| FrontendError::TokenizerLoad {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| load_error(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| load_error(e.to_string()))
}

/// A special token in tokenizer_config.json is a string or an AddedToken object with `content`.
fn special_token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// vLLM's `get_leading_space_marker`: a Metaspace pre-tokenizer's replacement, alone or in a
/// sequence.
fn leading_space_marker(pre: Option<&tokenizers::PreTokenizerWrapper>) -> Option<char> {
    use tokenizers::PreTokenizerWrapper as P;
    match pre? {
        P::Metaspace(m) => Some(m.get_replacement()),
        P::Sequence(seq) => seq.as_ref().iter().find_map(|p| match p {
            P::Metaspace(m) => Some(m.get_replacement()),
            _ => None,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_llama() -> Tokenizer {
        Tokenizer::from_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/tiny-llama")).unwrap()
    }

    #[test]
    fn special_tokens_come_from_tokenizer_config() {
        let t = tiny_llama();
        assert_eq!(
            t.bos().unwrap(),
            &SpecialToken {
                text: "<s>".into(),
                id: 1
            }
        );
        assert_eq!(
            t.eos().unwrap(),
            &SpecialToken {
                text: "</s>".into(),
                id: 2
            }
        );
        assert_eq!(t.eos_token_ids(), &[2]);
        assert_eq!(t.added_token(4), Some("<|im_start|>"));
    }

    #[test]
    fn completions_add_bos_and_chat_does_not() {
        let t = tiny_llama();
        let with = t.encode("hello", true).unwrap();
        let without = t.encode("hello", false).unwrap();
        assert_eq!(with[0], 1);
        assert_eq!(&with[1..], &without[..]);
    }

    #[test]
    fn bos_and_eos_fall_back_to_generation_config_ids() {
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/tiny-llama");
        let dir = std::env::temp_dir().join(format!("frontend-gen-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(format!("{src}/tokenizer.json"), dir.join("tokenizer.json")).unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"unk_token": "<unk>"}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("generation_config.json"),
            r#"{"bos_token_id": 1, "eos_token_id": [2, 5]}"#,
        )
        .unwrap();
        let t = Tokenizer::from_dir(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(t.bos().unwrap().text, "<s>");
        assert_eq!(t.eos().unwrap().id, 2);
        assert_eq!(t.eos_token_ids(), &[2, 5]);
    }

    #[test]
    fn a_missing_tokenizer_names_the_path() {
        let err = Tokenizer::from_dir("/nonexistent/model")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nonexistent/model/tokenizer.json"), "{err}");
    }

    #[test]
    fn a_missing_tokenizer_config_names_the_path() {
        let dir = std::env::temp_dir().join(format!("frontend-no-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/tiny-llama/tokenizer.json"
        );
        std::fs::copy(src, dir.join("tokenizer.json")).unwrap();
        let err = Tokenizer::from_dir(&dir).err().unwrap().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.contains("tokenizer_config.json"), "{err}");
    }
}
