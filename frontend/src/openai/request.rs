//! The request side: a `/v1/completions` or `/v1/chat/completions` body, validated and
//! tokenized as vLLM's OpenAI server does it, and the engine requests (`GenerateRequest`) it
//! becomes: one per prompt, each asking for `n` choices.

use std::collections::HashMap;

use grpc_proto::engine::{
    generate_request::Input, sampling_params::Constraint, ChoiceConstraint, GenerateRequest,
    SamplingParams, TokenizedInput,
};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::error::py_float;
use super::{ModelContext, OpenAiError};
use crate::{Prompt, StopParams, TokenizedPrompt};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    ChatCompletions,
}

/// A parsed, tokenized request, ready to become engine requests and to shape the answer.
#[derive(Debug, Clone)]
pub struct Generation {
    pub endpoint: Endpoint,
    /// One per engine request, in order.
    pub prompts: Vec<TokenizedPrompt>,
    /// The sampling params of each prompt (`max_tokens` depends on the prompt's length).
    pub sampling: Vec<SamplingParams>,
    pub n: u32,
    pub stream: bool,
    pub include_usage: bool,
    pub continuous_usage_stats: bool,
    /// What shapes the text of each choice.
    pub stop: StopParams,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// `return_tokens_as_token_ids`: logprobs name tokens `token_id:{id}`.
    pub return_tokens_as_token_ids: bool,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
    continuous_usage_stats: Option<bool>,
}

#[derive(Deserialize)]
struct Body<'a> {
    model: Option<String>,
    prompt: Option<Value>,
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    tools: Option<&'a RawValue>,
    #[serde(borrow)]
    chat_template_kwargs: Option<&'a RawValue>,
    add_generation_prompt: Option<bool>,
    continue_final_message: Option<bool>,
    add_special_tokens: Option<bool>,

    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    min_p: Option<f64>,
    frequency_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    repetition_penalty: Option<f64>,
    min_tokens: Option<i64>,
    stop: Option<Value>,
    stop_token_ids: Option<Vec<i64>>,
    seed: Option<i64>,
    n: Option<i64>,
    ignore_eos: Option<bool>,
    logprobs: Option<Value>,
    top_logprobs: Option<i64>,
    prompt_logprobs: Option<i64>,
    return_tokens_as_token_ids: Option<bool>,
    skip_special_tokens: Option<bool>,
    spaces_between_special_tokens: Option<bool>,
    include_stop_str_in_output: Option<bool>,
    logit_bias: Option<HashMap<String, f64>>,
    response_format: Option<Value>,
    structured_outputs: Option<Value>,
    guided_json: Option<Value>,
    guided_regex: Option<String>,
    guided_choice: Option<Vec<String>>,
    guided_grammar: Option<String>,

    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
}

const SAMPLING_EPS: f64 = 1e-5;

impl Generation {
    pub fn parse(endpoint: Endpoint, body: &[u8], ctx: &ModelContext) -> Result<Self, OpenAiError> {
        let b: Body = parse_body(body)?;
        check_logprobs_fields(&b, endpoint)?;
        if let Some(model) = &b.model {
            if *model != ctx.served_model_name {
                return Err(OpenAiError {
                    status: 404,
                    message: format!(
                        "The model `{model}` does not exist. Valid aliases: {}.",
                        ctx.served_model_name
                    ),
                    kind: "NotFoundError",
                    param: Some("model".into()),
                });
            }
        }

        let prompts = match endpoint {
            Endpoint::Completions => {
                let prompt = b
                    .prompt
                    .as_ref()
                    .ok_or_else(|| OpenAiError::schema("prompt", "Field required"))?;
                Prompt::from_json(prompt)
                    .and_then(|p| p.tokenize(&ctx.tokenizer, b.add_special_tokens.unwrap_or(true)))
                    .map_err(|e| OpenAiError::bad_request(e.to_string()).with_param("prompt"))?
            }
            Endpoint::ChatCompletions => vec![chat_prompt(&b, ctx)?],
        };
        for p in &prompts {
            check_length(p.token_ids.len(), p.text.is_some(), ctx.max_model_len)?;
        }

        let sampling = prompts
            .iter()
            .map(|p| sampling_params(&b, endpoint, ctx, p.token_ids.len() as u32))
            .collect::<Result<Vec<_>, _>>()?;
        let first = &sampling[0];
        let stream_options = b.stream_options.as_ref();
        let include_usage = stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        Ok(Self {
            endpoint,
            n: first.n,
            stream: b.stream.unwrap_or(false),
            include_usage,
            continuous_usage_stats: include_usage
                && stream_options
                    .and_then(|o| o.continuous_usage_stats)
                    .unwrap_or(false),
            stop: StopParams {
                stop: first.stop.clone(),
                include_stop_str_in_output: first.include_stop_str_in_output,
                min_tokens: first.min_tokens as usize,
                skip_special_tokens: first.skip_special_tokens,
                spaces_between_special_tokens: first.spaces_between_special_tokens,
            },
            stop_token_ids: first.stop_token_ids.clone(),
            ignore_eos: first.ignore_eos,
            return_tokens_as_token_ids: b.return_tokens_as_token_ids.unwrap_or(false),
            prompts,
            sampling,
        })
    }

    /// The engine requests, one per prompt. Completions: `cmpl-{request_id}-{i}`; chat:
    /// `chatcmpl-{request_id}` (vLLM's own ids for them).
    pub fn requests(&self, request_id: &str) -> Vec<GenerateRequest> {
        self.prompts
            .iter()
            .zip(&self.sampling)
            .enumerate()
            .map(|(i, (p, s))| GenerateRequest {
                request_id: match self.endpoint {
                    Endpoint::Completions => format!("cmpl-{request_id}-{i}"),
                    Endpoint::ChatCompletions => format!("chatcmpl-{request_id}"),
                },
                input: Some(Input::Tokenized(TokenizedInput {
                    original_text: p.text.clone().unwrap_or_default(),
                    input_ids: p.token_ids.clone(),
                })),
                sampling_params: Some(s.clone()),
                stream: self.stream,
                ..Default::default()
            })
            .collect()
    }

    /// Choices in all: `n` per prompt.
    pub fn num_choices(&self) -> usize {
        self.prompts.len() * self.n as usize
    }
}

/// The request models' `mode="before"` validators of vLLM's logprobs fields.
fn check_logprobs_fields(b: &Body, endpoint: Endpoint) -> Result<(), OpenAiError> {
    if let Some(p) = b.prompt_logprobs {
        if b.stream == Some(true) && (p > 0 || p == -1) {
            return Err(OpenAiError::validation_param(
                "`prompt_logprobs` are not available when `stream=True`.",
                "prompt_logprobs",
            ));
        }
        if p < -1 {
            return Err(OpenAiError::validation(
                "`prompt_logprobs` must be a positive value or -1.",
                "prompt_logprobs",
                p,
            ));
        }
    }
    match endpoint {
        Endpoint::Completions => {
            if let Some(l) = b.logprobs.as_ref().and_then(Value::as_i64) {
                if l < -1 {
                    return Err(OpenAiError::validation(
                        "`logprobs` must be a positive value or -1.",
                        "logprobs",
                        l,
                    ));
                }
            }
        }
        Endpoint::ChatCompletions => {
            if let Some(t) = b.top_logprobs {
                if t < -1 {
                    return Err(OpenAiError::validation(
                        "`top_logprobs` must be a positive value or -1.",
                        "top_logprobs",
                        t,
                    ));
                }
                let asked = matches!(b.logprobs, Some(Value::Bool(true)));
                if (t == -1 || t > 0) && !asked {
                    return Err(OpenAiError::validation_param(
                        "when using `top_logprobs`, `logprobs` must be set to true.",
                        "top_logprobs",
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A prompt longer than the context is refused. vLLM tokenizes text with truncation at one
/// token past the context, so for text it can only say "at least" that many.
fn check_length(len: usize, from_text: bool, max_model_len: u32) -> Result<(), OpenAiError> {
    let max = max_model_len as usize;
    if len > max {
        let len = if from_text { len.min(max + 1) } else { len };
        let qualifier = if len == max + 1 { "at least " } else { "" };
        return Err(OpenAiError::validation(
            format!(
                "This model's maximum context length is {max} tokens. However, your prompt \
                 contains {qualifier}{len} input tokens, which exceeds this limit even without \
                 any output tokens. Please reduce the length of the input prompt."
            ),
            "input_tokens",
            len,
        ));
    }
    Ok(())
}

/// The body as vLLM's schema reads it; a refusal names the field (or the JSON offset).
fn parse_body(body: &[u8]) -> Result<Body<'_>, OpenAiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let inner = e.inner();
        if inner.is_syntax() || inner.is_eof() {
            // Python's offset of the character it stopped at.
            let offset = offset_of(body, inner.line(), inner.column(), inner.is_eof());
            OpenAiError::schema(&offset.to_string(), format!("JSON decode error: {inner}"))
        } else {
            OpenAiError::schema(&e.path().to_string(), inner)
        }
    })
}

/// The 0-based offset of serde's 1-based (line, column); at the end for an early EOF.
fn offset_of(body: &[u8], line: usize, column: usize, eof: bool) -> usize {
    if eof {
        return String::from_utf8_lossy(body).chars().count();
    }
    let text = String::from_utf8_lossy(body);
    let mut offset = 0;
    for (i, l) in text.split('\n').enumerate() {
        if i + 1 == line {
            return offset + column.saturating_sub(1);
        }
        offset += l.chars().count() + 1;
    }
    offset
}

fn chat_prompt(b: &Body, ctx: &ModelContext) -> Result<TokenizedPrompt, OpenAiError> {
    let messages = b
        .messages
        .ok_or_else(|| OpenAiError::schema("messages", "Field required"))?;
    if !messages.get().trim_start().starts_with('[') {
        return Err(OpenAiError::schema(
            "messages",
            "Input should be a valid list",
        ));
    }
    let template = ctx.chat_template()?;
    let continue_final = b.continue_final_message.unwrap_or(false);
    let add_generation_prompt = b.add_generation_prompt.unwrap_or(true);
    if continue_final && add_generation_prompt {
        return Err(OpenAiError::bad_request(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
        ));
    }
    let bad = |e: crate::FrontendError| OpenAiError::bad_request(e.to_string());
    let mut text = template
        .render(
            messages.get(),
            add_generation_prompt,
            b.tools.map(RawValue::get),
            b.chat_template_kwargs.map(RawValue::get),
        )
        .map_err(bad)?;
    if continue_final {
        text = continue_final_message(text, messages.get())?;
    }
    let token_ids = ctx
        .tokenizer
        .encode(&text, b.add_special_tokens.unwrap_or(false))
        .map_err(bad)?;
    Ok(TokenizedPrompt {
        text: Some(text),
        token_ids,
    })
}

/// transformers' `continue_final_message`: the rendered chat ends where the final message's
/// text ends, so the model continues it.
fn continue_final_message(rendered: String, messages_json: &str) -> Result<String, OpenAiError> {
    let messages: Vec<Value> =
        serde_json::from_str(messages_json).map_err(|e| OpenAiError::bad_request(e.to_string()))?;
    let content = messages.last().and_then(|m| m.get("content"));
    let final_message = match content {
        Some(Value::String(s)) => s.as_str(),
        Some(Value::Array(parts)) => parts
            .iter()
            .rev()
            .find_map(|p| p.get("text").and_then(Value::as_str))
            .ok_or_else(|| {
                OpenAiError::bad_request(
                    "continue_final_message is set but we could not find any text to continue in the final message!",
                )
            })?,
        _ => "",
    };
    let stripped = final_message.trim();
    let Some(loc) = rendered.rfind(stripped) else {
        return Err(OpenAiError::bad_request(
            "continue_final_message is set but the final message does not appear in the chat after applying the chat template! This can happen if the chat template deletes portions of the final message. Please verify the chat template and final message in your chat to ensure they are compatible.",
        ));
    };
    let lstripped = final_message.trim_start();
    let end =
        if rendered[loc..].starts_with(final_message) && lstripped.len() == final_message.len() {
            loc + lstripped.len()
        } else {
            loc + stripped.len()
        };
    let mut rendered = rendered;
    rendered.truncate(end);
    Ok(rendered)
}

fn sampling_params(
    b: &Body,
    endpoint: Endpoint,
    ctx: &ModelContext,
    prompt_len: u32,
) -> Result<SamplingParams, OpenAiError> {
    let d = &ctx.defaults;
    let temperature = b.temperature.or(d.temperature).unwrap_or(1.0);
    let top_p = b.top_p.or(d.top_p).unwrap_or(1.0);
    let top_k = b.top_k.or(d.top_k).unwrap_or(0);
    let min_p = b.min_p.or(d.min_p).unwrap_or(0.0);
    let repetition_penalty = b.repetition_penalty.or(d.repetition_penalty).unwrap_or(1.0);
    let frequency_penalty = b.frequency_penalty.unwrap_or(0.0);
    let presence_penalty = b.presence_penalty.unwrap_or(0.0);
    let n = b.n.unwrap_or(1);

    // vLLM's SamplingParams._verify_args, in its order.
    if n < 1 {
        return Err(OpenAiError::bad_request(format!(
            "n must be at least 1, got {n}."
        )));
    }
    if !(-2.0..=2.0).contains(&presence_penalty) {
        return Err(OpenAiError::bad_request(format!(
            "presence_penalty must be in [-2, 2], got {}.",
            py_float(presence_penalty)
        )));
    }
    if !(-2.0..=2.0).contains(&frequency_penalty) {
        return Err(OpenAiError::bad_request(format!(
            "frequency_penalty must be in [-2, 2], got {}.",
            py_float(frequency_penalty)
        )));
    }
    if repetition_penalty <= 0.0 {
        return Err(OpenAiError::bad_request(format!(
            "repetition_penalty must be greater than zero, got {}.",
            py_float(repetition_penalty)
        )));
    }
    if temperature < 0.0 {
        let t = py_float(temperature);
        return Err(OpenAiError::validation(
            format!("temperature must be non-negative, got {t}."),
            "temperature",
            t,
        ));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        let p = py_float(top_p);
        return Err(OpenAiError::validation(
            format!("top_p must be in (0, 1], got {p}."),
            "top_p",
            p,
        ));
    }
    if top_k < -1 {
        return Err(OpenAiError::bad_request(format!(
            "top_k must be 0 (disable), or at least 1, got {top_k}."
        )));
    }
    if !(0.0..=1.0).contains(&min_p) {
        return Err(OpenAiError::bad_request(format!(
            "min_p must be in [0, 1], got {}.",
            py_float(min_p)
        )));
    }

    // vLLM's get_max_tokens: the request's (or the model's default), never past the context.
    let room = ctx.max_model_len - prompt_len;
    let asked = match endpoint {
        Endpoint::Completions => b.max_tokens,
        Endpoint::ChatCompletions => b.max_completion_tokens.or(b.max_tokens),
    };
    let max_tokens = match asked {
        Some(m) if m < 1 => {
            return Err(OpenAiError::validation(
                format!("max_tokens must be at least 1, got {m}."),
                "max_tokens",
                m,
            ))
        }
        Some(m) if m > i64::from(ctx.max_model_len) => {
            return Err(OpenAiError::validation(
                format!(
                    "max_tokens={m} cannot be greater than max_model_len={}. Please request \
                     fewer output tokens.",
                    ctx.max_model_len
                ),
                "max_tokens",
                m,
            ))
        }
        Some(m) => room.min(u32::try_from(m).unwrap_or(u32::MAX)),
        None => d.max_tokens.map_or(room, |m| room.min(m)),
    };
    if max_tokens < 1 {
        return Err(OpenAiError::validation(
            format!("max_tokens must be at least 1, got {max_tokens}."),
            "max_tokens",
            max_tokens,
        ));
    }
    let min_tokens = b.min_tokens.unwrap_or(0);
    if min_tokens < 0 {
        return Err(OpenAiError::bad_request(format!(
            "min_tokens must be greater than or equal to 0, got {min_tokens}."
        )));
    }
    if min_tokens > max_tokens as i64 {
        return Err(OpenAiError::bad_request(format!(
            "min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}."
        )));
    }

    let logprobs = match endpoint {
        Endpoint::Completions => match &b.logprobs {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_i64().ok_or_else(|| {
                OpenAiError::bad_request("logprobs must be an integer").with_param("logprobs")
            })?),
        },
        Endpoint::ChatCompletions => match &b.logprobs {
            Some(Value::Bool(true)) => Some(b.top_logprobs.unwrap_or(0)),
            None | Some(Value::Null) | Some(Value::Bool(false)) => None,
            Some(_) => {
                return Err(
                    OpenAiError::bad_request("logprobs must be a boolean").with_param("logprobs")
                )
            }
        },
    };
    if let Some(l) = logprobs {
        if l < -1 {
            return Err(OpenAiError::validation(
                format!("logprobs must be non-negative or -1, got {l}."),
                "logprobs",
                l,
            ));
        }
    }
    // SamplingParams._validate_logprobs (vLLM checks it once the request reaches the engine
    // client).
    let vocab = ctx.tokenizer.vocab_size() as i64;
    let max_logprobs = match ctx.max_logprobs {
        -1 => vocab,
        m => m as i64,
    };
    if let Some(l) = logprobs.filter(|&l| l != 0) {
        let l = if l == -1 { vocab } else { l };
        if l > max_logprobs {
            return Err(OpenAiError::validation(
                format!(
                    "Requested sample logprobs of {l}, which is greater than max allowed: {max_logprobs}"
                ),
                "logprobs",
                l,
            ));
        }
    }
    if let Some(l) = b.prompt_logprobs.filter(|&l| l != 0) {
        let l = if l == -1 { vocab } else { l };
        if l > max_logprobs {
            return Err(OpenAiError::validation(
                format!(
                    "Requested prompt logprobs of {l}, which is greater than max allowed: {max_logprobs}"
                ),
                "prompt_logprobs",
                l,
            ));
        }
    }

    let stop = match &b.stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                OpenAiError::schema("stop", "Input should be a valid string or list of strings")
            })?,
        Some(_) => {
            return Err(OpenAiError::schema(
                "stop",
                "Input should be a valid string or list of strings",
            ))
        }
    };
    if stop.iter().any(String::is_empty) {
        return Err(OpenAiError::bad_request(
            "stop cannot contain an empty string.",
        ));
    }
    let stop_token_ids = b
        .stop_token_ids
        .iter()
        .flatten()
        .map(|&id| u32::try_from(id).ok())
        .collect::<Option<Vec<u32>>>()
        .ok_or_else(|| OpenAiError::bad_request("stop_token_ids must contain only token ids"))?;

    let mut logit_bias = HashMap::new();
    for (k, v) in b.logit_bias.iter().flatten() {
        let id: i32 = k.parse().map_err(|_| {
            OpenAiError::validation(
                format!("logit_bias contains key(s) that cannot be converted to integer token IDs: ['{k}']"),
                "logit_bias",
                k,
            )
        })?;
        logit_bias.insert(id, v.clamp(-100.0, 100.0) as f32);
    }

    if temperature < SAMPLING_EPS && n > 1 {
        return Err(OpenAiError::bad_request(format!(
            "n must be 1 when using greedy sampling, got {n}."
        )));
    }

    Ok(SamplingParams {
        temperature: Some(temperature as f32),
        top_p: top_p as f32,
        top_k: top_k.max(0) as u32,
        min_p: min_p as f32,
        frequency_penalty: frequency_penalty as f32,
        presence_penalty: presence_penalty as f32,
        repetition_penalty: repetition_penalty as f32,
        max_tokens: Some(max_tokens),
        min_tokens: min_tokens as u32,
        stop,
        stop_token_ids,
        // The engine reads these as given (proto default false); vLLM's defaults are true.
        skip_special_tokens: b.skip_special_tokens.unwrap_or(true),
        spaces_between_special_tokens: b.spaces_between_special_tokens.unwrap_or(true),
        ignore_eos: b.ignore_eos.unwrap_or(false),
        n: n as u32,
        logprobs: logprobs.map(|l| l as i32),
        prompt_logprobs: b.prompt_logprobs.map(|l| l as i32),
        seed: b.seed.map(|s| s as i32),
        include_stop_str_in_output: b.include_stop_str_in_output.unwrap_or(false),
        logit_bias,
        constraint: constraint(b)?,
        ..Default::default()
    })
}

/// Structured outputs: `response_format`, `structured_outputs` (vLLM ≥ 0.11 names) and the
/// older `guided_*` fields. At most one kind.
fn constraint(b: &Body) -> Result<Option<Constraint>, OpenAiError> {
    let mut found = Vec::new();
    if let Some(rf) = &b.response_format {
        match rf.get("type").and_then(Value::as_str) {
            Some("json_schema") => {
                let schema = rf
                    .get("json_schema")
                    .and_then(|j| j.get("schema"))
                    .ok_or_else(|| {
                        OpenAiError::bad_request("response_format.json_schema.schema is required")
                            .with_param("response_format")
                    })?;
                found.push(Constraint::JsonSchema(schema.to_string()));
            }
            Some("json_object") => found.push(Constraint::JsonObject(true)),
            Some("text") | None => {}
            Some("structural_tag") => found.push(Constraint::StructuralTag(rf.to_string())),
            Some(other) => {
                return Err(OpenAiError::bad_request(format!(
                    "unknown response_format type {other:?}"
                ))
                .with_param("response_format"))
            }
        }
    }
    let as_json = |v: &Value| match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    if let Some(so) = b.structured_outputs.as_ref().filter(|v| !v.is_null()) {
        if let Some(v) = so.get("json").filter(|v| !v.is_null()) {
            found.push(Constraint::JsonSchema(as_json(v)));
        }
        if let Some(v) = so.get("regex").and_then(Value::as_str) {
            found.push(Constraint::Regex(v.to_string()));
        }
        if let Some(v) = so.get("choice").and_then(Value::as_array) {
            found.push(Constraint::Choice(ChoiceConstraint {
                choices: v.iter().map(as_json).collect(),
            }));
        }
        if let Some(v) = so.get("grammar").and_then(Value::as_str) {
            found.push(Constraint::Grammar(v.to_string()));
        }
        if so.get("json_object").and_then(Value::as_bool) == Some(true) {
            found.push(Constraint::JsonObject(true));
        }
        if let Some(v) = so.get("structural_tag").and_then(Value::as_str) {
            found.push(Constraint::StructuralTag(v.to_string()));
        }
    }
    if let Some(v) = b.guided_json.as_ref().filter(|v| !v.is_null()) {
        found.push(Constraint::JsonSchema(as_json(v)));
    }
    if let Some(v) = &b.guided_regex {
        found.push(Constraint::Regex(v.clone()));
    }
    if let Some(v) = &b.guided_choice {
        found.push(Constraint::Choice(ChoiceConstraint { choices: v.clone() }));
    }
    if let Some(v) = &b.guided_grammar {
        found.push(Constraint::Grammar(v.clone()));
    }
    if found.len() > 1 {
        return Err(OpenAiError::bad_request(
            "You can only use one kind of structured outputs constraint but multiple are specified",
        ));
    }
    Ok(found.pop())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> ModelContext {
        ModelContext::from_model_dir(
            concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/tiny-llama"),
            "tiny",
            100,
        )
        .unwrap()
    }

    #[test]
    fn fields_map_to_the_engines_sampling_params() {
        let ctx = ctx();
        let g = Generation::parse(
            Endpoint::Completions,
            br#"{"model":"tiny","prompt":["a b","c"],"stop":"x","seed":3,"top_k":5,"logprobs":2,
                "logit_bias":{"7":200},"structured_outputs":{"regex":"[ab]+"},"min_tokens":1}"#,
            &ctx,
        )
        .unwrap();
        let reqs = g.requests("r");
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[1].request_id, "cmpl-r-1");
        let s = reqs[0].sampling_params.as_ref().unwrap();
        assert_eq!(s.stop, ["x"]);
        assert_eq!(
            (s.seed, s.top_k, s.logprobs, s.min_tokens),
            (Some(3), 5, Some(2), 1)
        );
        assert_eq!(s.logit_bias[&7], 100.0);
        assert_eq!(s.constraint, Some(Constraint::Regex("[ab]+".into())));
        assert!(s.skip_special_tokens && s.spaces_between_special_tokens);
        // No max_tokens: what the context leaves.
        assert_eq!(
            s.max_tokens,
            Some(100 - g.prompts[0].token_ids.len() as u32)
        );
        let Some(Input::Tokenized(t)) = &reqs[0].input else {
            panic!()
        };
        assert_eq!(t.original_text, "a b");
    }

    #[test]
    fn chat_takes_max_completion_tokens_and_response_format() {
        let ctx = ctx();
        let g = Generation::parse(
            Endpoint::ChatCompletions,
            br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":9,"max_completion_tokens":4,
                "logprobs":true,"top_logprobs":3,
                "response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"object"}}}}"#,
            &ctx,
        )
        .unwrap();
        let s = &g.sampling[0];
        assert_eq!((s.max_tokens, s.logprobs), (Some(4), Some(3)));
        assert_eq!(
            s.constraint,
            Some(Constraint::JsonSchema(r#"{"type":"object"}"#.into()))
        );
        assert_eq!(g.requests("r")[0].request_id, "chatcmpl-r");
    }

    #[test]
    fn continue_final_message_ends_the_prompt_in_the_last_message() {
        let ctx = ctx();
        let g = Generation::parse(
            Endpoint::ChatCompletions,
            br#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"Sure, the"}],
                "continue_final_message":true,"add_generation_prompt":false}"#,
            &ctx,
        )
        .unwrap();
        assert!(g.prompts[0].text.as_deref().unwrap().ends_with("Sure, the"));
    }

    #[test]
    fn bad_requests_name_the_field() {
        let ctx = ctx();
        let err = |body: &str| {
            Generation::parse(Endpoint::Completions, body.as_bytes(), &ctx).unwrap_err()
        };
        assert_eq!(err(r#"{"prompt":"a","model":"other"}"#).status, 404);
        assert_eq!(
            err(r#"{"prompt":"a","top_p":0}"#).param.as_deref(),
            Some("top_p")
        );
        assert!(err(r#"{"prompt":"a","stop":[""]}"#)
            .message
            .contains("empty string"));
        assert!(
            err(r#"{"prompt":"a","guided_regex":"a","guided_choice":["a"]}"#)
                .message
                .contains("one kind")
        );
        let long = format!(r#"{{"prompt":{:?}}}"#, vec![5u32; 101]);
        assert!(err(&long)
            .message
            .contains("contains at least 101 input tokens"));
    }
}
