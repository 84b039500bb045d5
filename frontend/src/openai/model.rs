//! What rendering needs to know about the served model: its tokenizer and chat template, the
//! name clients call it by, its context length, and the sampling defaults vLLM takes from the
//! model's `generation_config.json` when a request leaves a field out.

use std::path::Path;

use serde_json::Value;

use super::OpenAiError;
use crate::{ChatTemplate, FrontendError, Tokenizer};

/// The sampling defaults of the model (vLLM's `get_diff_sampling_param`): each applies when a
/// request does not set the field. `max_tokens` is `generation_config.json`'s `max_new_tokens`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DefaultSampling {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub max_tokens: Option<u32>,
}

impl DefaultSampling {
    /// From JSON as the gRPC `GetModelInfoResponse.default_sampling_params_json` carries it
    /// (vLLM's names; `max_new_tokens` is read as `max_tokens` too), or a
    /// `generation_config.json`. Unknown keys are ignored; an empty string means none.
    pub fn from_json(json: &str) -> Result<Self, FrontendError> {
        if json.trim().is_empty() {
            return Ok(Self::default());
        }
        let v: Value = serde_json::from_str(json)
            .map_err(|e| FrontendError::InvalidPrompt(format!("default sampling params: {e}")))?;
        let f = |k: &str| v.get(k).and_then(Value::as_f64);
        Ok(Self {
            temperature: f("temperature"),
            top_p: f("top_p"),
            top_k: v.get("top_k").and_then(Value::as_i64),
            min_p: f("min_p"),
            repetition_penalty: f("repetition_penalty"),
            max_tokens: v
                .get("max_tokens")
                .or_else(|| v.get("max_new_tokens"))
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok()),
        })
    }
}

pub struct ModelContext {
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub served_model_name: String,
    pub max_model_len: u32,
    pub defaults: DefaultSampling,
    /// vLLM's `system_fingerprint` (`vllm-<version>-<config hash>` by default; it cannot be
    /// derived here). `None` writes `null` where vLLM writes it, as `--fingerprint-mode none`.
    pub system_fingerprint: Option<String>,
    /// The most logprobs a request may ask for (vLLM's `--max-logprobs`, 20 by default; -1:
    /// the vocabulary).
    pub max_logprobs: i32,
}

impl ModelContext {
    /// `default_sampling_params_json` as the engine reports it (may be empty).
    pub fn new(
        tokenizer: Tokenizer,
        chat_template: Option<ChatTemplate>,
        served_model_name: impl Into<String>,
        max_model_len: u32,
        default_sampling_params_json: &str,
    ) -> Result<Self, FrontendError> {
        Ok(Self {
            tokenizer,
            chat_template,
            served_model_name: served_model_name.into(),
            max_model_len,
            defaults: DefaultSampling::from_json(default_sampling_params_json)?,
            system_fingerprint: None,
            max_logprobs: 20,
        })
    }

    /// Tokenizer, chat template (if the model ships one) and `generation_config.json` (if
    /// present) from a model directory.
    pub fn from_model_dir(
        dir: impl AsRef<Path>,
        served_model_name: impl Into<String>,
        max_model_len: u32,
    ) -> Result<Self, FrontendError> {
        let dir = dir.as_ref();
        let tokenizer = Tokenizer::from_dir(dir)?;
        let chat_template = match tokenizer.chat_template_source()? {
            Some(source) => Some(ChatTemplate::new(source, &tokenizer)?),
            None => None,
        };
        let generation_config =
            std::fs::read_to_string(dir.join("generation_config.json")).unwrap_or_default();
        Self::new(
            tokenizer,
            chat_template,
            served_model_name,
            max_model_len,
            &generation_config,
        )
    }

    pub fn with_system_fingerprint(mut self, fingerprint: Option<String>) -> Self {
        self.system_fingerprint = fingerprint;
        self
    }

    pub(crate) fn chat_template(&self) -> Result<&ChatTemplate, OpenAiError> {
        self.chat_template.as_ref().ok_or_else(|| {
            OpenAiError::bad_request(
                "As of transformers v4.44, default chat template is no longer allowed, so you \
                 must provide a chat template if the tokenizer does not define one.",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_read_vllm_and_generation_config_names() {
        let d = DefaultSampling::from_json(
            r#"{"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_new_tokens": 100, "bos_token_id": 1}"#,
        )
        .unwrap();
        assert_eq!(d.temperature, Some(0.6));
        assert_eq!(d.top_k, Some(20));
        assert_eq!(d.max_tokens, Some(100));
        assert_eq!(
            DefaultSampling::from_json("").unwrap(),
            DefaultSampling::default()
        );
    }
}
