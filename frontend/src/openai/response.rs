//! The response side: engine messages (`GenerateResponse`) in, the bytes vLLM's OpenAI server
//! would send out: SSE chunks while streaming, one JSON body otherwise. Field order, nulls and
//! absent fields follow vLLM 0.32's pydantic models and its `exclude_unset` dumps.
//!
//! The engine streams delta ids per choice, then a `complete` for each finished choice that
//! repeats the last delta. vLLM puts the finish reason on the chunk carrying the last token, so
//! the finish is predicted from the ids (a stop string, EOS or a stop token id, `max_tokens`,
//! the context length); a `complete` that finishes a choice not yet finished adds a closing
//! chunk with empty text.
//!
//! Logprobs, when asked for, ride on each chunk for the ids it kept (a stop string drops those
//! after it; held-back text does not hold back logprobs) and on the body from the `complete`.
//! `prompt_logprobs` stays null: the engine's `InputLogProbs` carry no ranks.

use grpc_proto::engine::{generate_complete::MatchedStop, generate_response, GenerateResponse};

use super::logprobs::{ChoiceLogprobs, FloatStyle, LogprobsOpts};
use super::{Endpoint, Generation, ModelContext, OpenAiError};
use crate::SequenceText;

#[derive(Debug, Clone, PartialEq, Eq)]
enum StopReason {
    None,
    Str(String),
    Token(u32),
}

struct Choice {
    text: SequenceText,
    prompt_index: usize,
    finish: Option<(String, StopReason)>,
    /// Only when logprobs were asked for.
    logprobs: Option<ChoiceLogprobs>,
    /// Non-streamed: the rendered `logprobs` value.
    logprobs_json: Vec<u8>,
}

pub struct Responder<'a> {
    ctx: &'a ModelContext,
    endpoint: Endpoint,
    stream: bool,
    include_usage: bool,
    continuous: bool,
    n: usize,
    max_tokens: Vec<u32>,
    prompt_lens: Vec<u32>,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    choices: Vec<Choice>,
    /// `{"id":..,"object":..,"created":..,"model":..,"choices":[` for every chunk.
    head: Vec<u8>,
    id: String,
    created: u64,
    started: bool,
    kv_transfer_params: Option<String>,
    logprobs: Option<LogprobsOpts>,
    /// The `logprobs` value of the chunk being written.
    logprobs_buf: Vec<u8>,
}

fn json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec");
}

fn num(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

impl<'a> Responder<'a> {
    pub fn new(
        gen: &Generation,
        ctx: &'a ModelContext,
        request_id: &str,
        created_unix_secs: u64,
    ) -> Self {
        let (prefix, object) = match (gen.endpoint, gen.stream) {
            (Endpoint::Completions, _) => ("cmpl-", "text_completion"),
            (Endpoint::ChatCompletions, true) => ("chatcmpl-", "chat.completion.chunk"),
            (Endpoint::ChatCompletions, false) => ("chatcmpl-", "chat.completion"),
        };
        let id = format!("{prefix}{request_id}");
        let mut head = Vec::with_capacity(128);
        head.extend_from_slice(b"{\"id\":");
        json_str(&mut head, &id);
        head.extend_from_slice(b",\"object\":");
        json_str(&mut head, object);
        head.extend_from_slice(b",\"created\":");
        num(&mut head, created_unix_secs);
        head.extend_from_slice(b",\"model\":");
        json_str(&mut head, &ctx.served_model_name);
        head.extend_from_slice(b",\"choices\":[");
        let n = gen.n as usize;
        let logprobs = gen.sampling[0].logprobs.map(|top| LogprobsOpts {
            top,
            as_ids: gen.return_tokens_as_token_ids,
            chat: gen.endpoint == Endpoint::ChatCompletions,
        });
        let choices = (0..gen.num_choices())
            .map(|i| {
                let p = &gen.prompts[i / n];
                Choice {
                    text: SequenceText::new(&ctx.tokenizer, &p.token_ids, &gen.stop),
                    prompt_index: i / n,
                    finish: None,
                    logprobs: logprobs.map(|_| ChoiceLogprobs::default()),
                    logprobs_json: Vec::new(),
                }
            })
            .collect();
        Self {
            ctx,
            endpoint: gen.endpoint,
            stream: gen.stream,
            include_usage: gen.include_usage,
            continuous: gen.continuous_usage_stats,
            n,
            max_tokens: gen
                .sampling
                .iter()
                .map(|s| s.max_tokens.unwrap_or(u32::MAX))
                .collect(),
            prompt_lens: gen
                .prompts
                .iter()
                .map(|p| p.token_ids.len() as u32)
                .collect(),
            stop_token_ids: gen.stop_token_ids.clone(),
            ignore_eos: gen.ignore_eos,
            choices,
            head,
            id,
            created: created_unix_secs,
            started: false,
            kv_transfer_params: None,
            logprobs,
            logprobs_buf: Vec::new(),
        }
    }

    /// True once every choice has finished.
    pub fn is_finished(&self) -> bool {
        self.choices.iter().all(|c| c.finish.is_some())
    }

    /// Takes one engine message of prompt `prompt_index`'s request. Streaming: appends the SSE
    /// events it produces to `out`. An engine-side error comes back as `Err` (write it with
    /// [`Responder::error_event`] when streaming, as the response otherwise).
    pub fn on_response(
        &mut self,
        prompt_index: usize,
        resp: &GenerateResponse,
        out: &mut Vec<u8>,
    ) -> Result<(), OpenAiError> {
        let tokenizer = &self.ctx.tokenizer;
        match &resp.response {
            None => Ok(()),
            Some(generate_response::Response::Chunk(chunk)) => {
                if !self.stream {
                    return Ok(());
                }
                if self.endpoint == Endpoint::ChatCompletions && !self.started {
                    self.write_role_chunks(out);
                }
                self.started = true;
                let i = prompt_index * self.n + chunk.index as usize;
                let Some(choice) = self.choices.get(i) else {
                    return Err(OpenAiError::internal(format!(
                        "engine sent choice {i}, not asked for"
                    )));
                };
                if choice.finish.is_some() || chunk.token_ids.is_empty() {
                    return Ok(());
                }
                let last = *chunk.token_ids.last().expect("not empty");
                let stop_token = self.stop_token(last);
                let choice = &mut self.choices[i];
                let before = choice.text.token_ids().len();
                let stop_str = choice
                    .text
                    .update(tokenizer, &chunk.token_ids, stop_token.is_some())
                    .map(str::to_string);
                let total = choice.text.token_ids().len() as u32;
                choice.finish = if let Some(s) = stop_str {
                    Some(("stop".into(), StopReason::Str(s)))
                } else if let Some(reason) = stop_token {
                    Some(("stop".into(), reason))
                } else if total >= self.max_tokens[prompt_index]
                    || self.prompt_lens[prompt_index] + total >= self.ctx.max_model_len
                {
                    Some(("length".into(), StopReason::None))
                } else {
                    None
                };
                if let (Some(opts), Some(lp)) = (self.logprobs, choice.logprobs.as_mut()) {
                    // The ids kept (a stop string drops those after it), their logprobs.
                    let kept = choice.text.token_ids().len() - before;
                    self.logprobs_buf.clear();
                    lp.write(
                        &mut self.logprobs_buf,
                        tokenizer,
                        opts,
                        FloatStyle::Pydantic,
                        &chunk.token_ids[..kept.min(chunk.token_ids.len())],
                        chunk.output_logprobs.as_ref(),
                    );
                }
                self.write_delta_chunk(i, out);
                Ok(())
            }
            Some(generate_response::Response::Complete(complete)) => {
                if complete.finish_reason == "error" {
                    return Err(OpenAiError::internal("Internal server error"));
                }
                if self.kv_transfer_params.is_none() {
                    self.kv_transfer_params = complete.kv_transfer_params_json.clone();
                }
                let i = prompt_index * self.n + complete.index as usize;
                let Some(choice) = self.choices.get_mut(i) else {
                    return Err(OpenAiError::internal(format!(
                        "engine sent choice {i}, not asked for"
                    )));
                };
                if choice.finish.is_some() {
                    return Ok(());
                }
                let engine_reason = match &complete.matched_stop {
                    Some(MatchedStop::MatchedStopStr(s)) => StopReason::Str(s.clone()),
                    Some(MatchedStop::MatchedTokenId(t)) => StopReason::Token(*t),
                    None => StopReason::None,
                };
                if self.stream {
                    // The ids came in chunks; this one only says how it ended.
                    choice.finish = Some((complete.finish_reason.clone(), engine_reason));
                    if self.endpoint == Endpoint::ChatCompletions && !self.started {
                        self.started = true;
                        self.write_role_chunks(out);
                    }
                    let choice = &mut self.choices[i];
                    if let (Some(opts), Some(lp)) = (self.logprobs, choice.logprobs.as_mut()) {
                        // No new ids: an empty logprobs value.
                        self.logprobs_buf.clear();
                        lp.write(
                            &mut self.logprobs_buf,
                            tokenizer,
                            opts,
                            FloatStyle::Pydantic,
                            &[],
                            None,
                        );
                    }
                    self.write_delta_chunk(i, out);
                    return Ok(());
                }
                let stop_terminated = complete.finish_reason == "stop"
                    && !matches!(engine_reason, StopReason::Str(_));
                let stop_str = choice
                    .text
                    .update(tokenizer, &complete.output_ids, stop_terminated)
                    .map(str::to_string);
                choice.finish = Some(match stop_str {
                    Some(s) => ("stop".into(), StopReason::Str(s)),
                    None => (complete.finish_reason.clone(), engine_reason),
                });
                if let (Some(opts), Some(lp)) = (self.logprobs, choice.logprobs.as_mut()) {
                    let kept = choice.text.token_ids().len().min(complete.output_ids.len());
                    lp.write(
                        &mut choice.logprobs_json,
                        tokenizer,
                        opts,
                        FloatStyle::Repr,
                        &complete.output_ids[..kept],
                        complete.output_logprobs.as_ref(),
                    );
                }
                Ok(())
            }
        }
    }

    /// Whether `last`, the newest id, ends the sequence in the engine (and how vLLM reports it).
    /// (The engine masks stop ids until `min_tokens`, so an id here is never early.)
    fn stop_token(&self, last: u32) -> Option<StopReason> {
        let eos = self.ctx.tokenizer.eos_token_ids();
        if !self.ignore_eos && eos.first() == Some(&last) {
            return Some(StopReason::None);
        }
        if self.stop_token_ids.contains(&last) || (!self.ignore_eos && eos.contains(&last)) {
            return Some(StopReason::Token(last));
        }
        None
    }

    fn write_role_chunks(&self, out: &mut Vec<u8>) {
        for i in 0..self.n {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(&self.head);
            out.extend_from_slice(b"{\"index\":");
            num(out, i);
            out.extend_from_slice(
                b",\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}]",
            );
            if self.continuous {
                let p = self.prompt_lens[0];
                self.write_usage(out, p, 0, true);
            }
            out.extend_from_slice(b",\"prompt_token_ids\":null,\"prompt_text\":null}\n\n");
        }
    }

    fn write_usage(&self, out: &mut Vec<u8>, prompt: u32, completion: u32, details_null: bool) {
        out.extend_from_slice(b",\"usage\":{\"prompt_tokens\":");
        num(out, prompt);
        out.extend_from_slice(b",\"total_tokens\":");
        num(out, prompt + completion);
        out.extend_from_slice(b",\"completion_tokens\":");
        num(out, completion);
        if details_null {
            out.extend_from_slice(b",\"completion_tokens_details\":null");
        }
        out.push(b'}');
    }

    fn write_delta_chunk(&mut self, i: usize, out: &mut Vec<u8>) {
        let chat = self.endpoint == Endpoint::ChatCompletions;
        let choice = &mut self.choices[i];
        let finished = choice.finish.is_some();
        let prompt_index = choice.prompt_index;
        let completion = choice.text.token_ids().len() as u32;
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&self.head);
        out.extend_from_slice(b"{\"index\":");
        num(out, i);
        if chat {
            out.extend_from_slice(b",\"delta\":{\"content\":");
            json_str(out, choice.text.next_delta(finished));
            out.extend_from_slice(b"},\"logprobs\":");
        } else {
            out.extend_from_slice(b",\"text\":");
            json_str(out, choice.text.next_delta(finished));
            out.extend_from_slice(b",\"logprobs\":");
        }
        if self.logprobs.is_some() {
            out.extend_from_slice(&self.logprobs_buf);
        } else {
            out.extend_from_slice(b"null");
        }
        out.extend_from_slice(b",\"finish_reason\":");
        match &choice.finish {
            Some((reason, stop)) => {
                json_str(out, reason);
                out.extend_from_slice(b",\"stop_reason\":");
                write_stop_reason(out, stop);
            }
            None if chat => out.extend_from_slice(b"null"),
            None => out.extend_from_slice(b"null,\"stop_reason\":null"),
        }
        if !chat {
            out.extend_from_slice(b",\"prompt_token_ids\":null");
        }
        out.extend_from_slice(b",\"token_ids\":null}]");
        if self.continuous {
            let p = self.prompt_lens[prompt_index];
            self.write_usage(out, p, completion, chat);
        }
        if finished && !self.include_usage {
            if let Some(fp) = &self.ctx.system_fingerprint {
                out.extend_from_slice(b",\"system_fingerprint\":");
                json_str(out, fp);
            }
        }
        out.extend_from_slice(b"}\n\n");
    }

    fn usage_totals(&self) -> (u32, u32) {
        let prompt = self.prompt_lens.iter().sum();
        let completion = self
            .choices
            .iter()
            .map(|c| c.text.token_ids().len() as u32)
            .sum();
        (prompt, completion)
    }

    /// Ends the response. Streaming: the usage chunk when asked for, then `data: [DONE]`.
    /// Otherwise the whole JSON body.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.stream {
            if self.include_usage {
                let (prompt, completion) = self.usage_totals();
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&self.head);
                out.push(b']');
                self.write_usage(out, prompt, completion, false);
                if let Some(fp) = &self.ctx.system_fingerprint {
                    out.extend_from_slice(b",\"system_fingerprint\":");
                    json_str(out, fp);
                }
                out.extend_from_slice(b"}\n\n");
            }
            out.extend_from_slice(b"data: [DONE]\n\n");
            return;
        }
        let chat = self.endpoint == Endpoint::ChatCompletions;
        out.extend_from_slice(&self.head);
        for (i, choice) in self.choices.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"index\":");
            num(out, i);
            if chat {
                out.extend_from_slice(b",\"message\":{\"role\":\"assistant\",\"content\":");
                json_str(out, choice.text.text(true));
                out.extend_from_slice(
                    b",\"refusal\":null,\"annotations\":null,\"audio\":null,\"function_call\":null,\"reasoning\":null}",
                );
            } else {
                out.extend_from_slice(b",\"text\":");
                json_str(out, choice.text.text(true));
            }
            out.extend_from_slice(b",\"logprobs\":");
            if self.logprobs.is_some() && choice.finish.is_some() {
                out.extend_from_slice(&choice.logprobs_json);
            } else {
                out.extend_from_slice(b"null");
            }
            out.extend_from_slice(b",\"finish_reason\":");
            let (reason, stop) = match &choice.finish {
                Some((r, s)) => (r.as_str(), s),
                None => ("abort", &StopReason::None),
            };
            json_str(out, reason);
            out.extend_from_slice(b",\"stop_reason\":");
            write_stop_reason(out, stop);
            if chat {
                out.extend_from_slice(b",\"token_ids\":null,\"routed_experts\":null}");
            } else {
                out.extend_from_slice(
                    b",\"token_ids\":null,\"prompt_logprobs\":null,\"prompt_token_ids\":null,\"routed_experts\":null}",
                );
            }
        }
        out.extend_from_slice(b"],\"service_tier\":null,\"system_fingerprint\":");
        match &self.ctx.system_fingerprint {
            Some(fp) => json_str(out, fp),
            None => out.extend_from_slice(b"null"),
        }
        let (prompt, completion) = self.usage_totals();
        out.extend_from_slice(b",\"usage\":{\"prompt_tokens\":");
        num(out, prompt);
        out.extend_from_slice(b",\"total_tokens\":");
        num(out, prompt + completion);
        out.extend_from_slice(b",\"completion_tokens\":");
        num(out, completion);
        out.extend_from_slice(
            b",\"prompt_tokens_details\":null,\"completion_tokens_details\":null}",
        );
        if chat {
            out.extend_from_slice(
                b",\"prompt_logprobs\":null,\"prompt_token_ids\":null,\"prompt_text\":null",
            );
        }
        out.extend_from_slice(b",\"kv_transfer_params\":");
        match &self.kv_transfer_params {
            Some(kv) => out.extend_from_slice(kv.as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"ec_transfer_params\":null,\"metrics\":null}");
    }

    /// An error after the stream began, as vLLM sends it (then `data: [DONE]`).
    pub fn error_event(err: &OpenAiError, out: &mut Vec<u8>) {
        err.write_event(out);
        out.extend_from_slice(b"data: [DONE]\n\n");
    }

    /// The response id (`cmpl-...` / `chatcmpl-...`) and `created`.
    pub fn id(&self) -> (&str, u64) {
        (&self.id, self.created)
    }
}

fn write_stop_reason(out: &mut Vec<u8>, stop: &StopReason) {
    match stop {
        StopReason::None => out.extend_from_slice(b"null"),
        StopReason::Str(s) => json_str(out, s),
        StopReason::Token(t) => num(out, *t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grpc_proto::engine::{GenerateComplete, GenerateStreamChunk};

    fn ctx() -> ModelContext {
        ModelContext::from_model_dir(
            concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/tiny-llama"),
            "tiny",
            8192,
        )
        .unwrap()
    }

    fn chunk(index: u32, ids: &[u32]) -> GenerateResponse {
        GenerateResponse {
            response: Some(generate_response::Response::Chunk(GenerateStreamChunk {
                token_ids: ids.to_vec(),
                index,
                ..Default::default()
            })),
        }
    }

    fn complete(index: u32, ids: &[u32], reason: &str) -> GenerateResponse {
        GenerateResponse {
            response: Some(generate_response::Response::Complete(GenerateComplete {
                output_ids: ids.to_vec(),
                finish_reason: reason.into(),
                index,
                ..Default::default()
            })),
        }
    }

    /// The `text`/`content` of each data event, with its choice index and finish reason.
    fn deltas(out: &[u8]) -> Vec<(u64, String, Option<String>)> {
        String::from_utf8(out.to_vec())
            .unwrap()
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|e| *e != "[DONE]")
            .filter_map(|e| {
                let v: serde_json::Value = serde_json::from_str(e).unwrap();
                let c = v["choices"].get(0)?;
                let text = c
                    .get("text")
                    .or_else(|| c["delta"].get("content"))
                    .and_then(|t| t.as_str())
                    .unwrap_or_default()
                    .to_string();
                Some((
                    c["index"].as_u64().unwrap(),
                    text,
                    c["finish_reason"].as_str().map(str::to_string),
                ))
            })
            .collect()
    }

    fn gen(ctx: &ModelContext, body: &str) -> Generation {
        Generation::parse(Endpoint::Completions, body.as_bytes(), ctx).unwrap()
    }

    #[test]
    fn a_character_split_across_chunks_comes_out_whole() {
        let ctx = ctx();
        let ids = ctx.tokenizer.encode("日本", false).unwrap();
        let g = gen(&ctx, r#"{"prompt":"x","stream":true,"max_tokens":64}"#);
        let mut r = Responder::new(&g, &ctx, "t", 0);
        let mut out = Vec::new();
        for &id in &ids {
            r.on_response(0, &chunk(0, &[id]), &mut out).unwrap();
        }
        r.on_response(0, &complete(0, &[2], "stop"), &mut out)
            .unwrap();
        r.finish(&mut out);
        let d = deltas(&out);
        assert!(ids.len() > 2, "the test wants a character spread over ids");
        let text: String = d.iter().map(|(_, t, _)| t.as_str()).collect();
        assert_eq!(text, "日本");
        assert!(d.iter().all(|(_, t, _)| !t.contains('\u{fffd}')), "{d:?}");
        assert!(out.ends_with(b"data: [DONE]\n\n"));
    }

    #[test]
    fn a_stop_string_spanning_two_chunks_ends_the_choice() {
        let ctx = ctx();
        let a = ctx.tokenizer.encode(" hello wor", false).unwrap();
        let b = ctx.tokenizer.encode("ld again", false).unwrap();
        let g = gen(
            &ctx,
            r#"{"prompt":"x","stream":true,"stop":"world","max_tokens":64}"#,
        );
        let mut r = Responder::new(&g, &ctx, "t", 0);
        let mut out = Vec::new();
        r.on_response(0, &chunk(0, &a), &mut out).unwrap();
        r.on_response(0, &chunk(0, &b), &mut out).unwrap();
        assert!(r.is_finished());
        r.finish(&mut out);
        let d = deltas(&out);
        let text: String = d.iter().map(|(_, t, _)| t.as_str()).collect();
        assert_eq!(text, " hello ");
        assert_eq!(d.last().unwrap().2.as_deref(), Some("stop"));
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains("\"stop_reason\":\"world\""), "{s}");
    }

    #[test]
    fn two_choices_interleave_and_usage_counts_both() {
        let ctx = ctx();
        let g = gen(
            &ctx,
            r#"{"prompt":"x","stream":true,"n":2,"temperature":1,"max_tokens":2,"stream_options":{"include_usage":true}}"#,
        );
        let prompt_len = g.prompts[0].token_ids.len();
        let mut r = Responder::new(&g, &ctx, "t", 0);
        let mut out = Vec::new();
        for (i, id) in [(0, 300), (1, 301), (1, 302), (0, 303)] {
            r.on_response(0, &chunk(i, &[id]), &mut out).unwrap();
        }
        r.on_response(0, &complete(1, &[302], "length"), &mut out)
            .unwrap();
        r.on_response(0, &complete(0, &[303], "length"), &mut out)
            .unwrap();
        r.finish(&mut out);
        let d = deltas(&out);
        let indexes: Vec<u64> = d.iter().map(|x| x.0).collect();
        assert_eq!(indexes, [0, 1, 1, 0]);
        assert_eq!(d[2].2.as_deref(), Some("length"));
        assert_eq!(d[3].2.as_deref(), Some("length"));
        let s = String::from_utf8(out).unwrap();
        let usage = format!(
            "\"choices\":[],\"usage\":{{\"prompt_tokens\":{prompt_len},\"total_tokens\":{},\"completion_tokens\":4}}}}",
            prompt_len + 4
        );
        assert!(s.contains(&usage), "{s}");
        // The terminal chunks do not carry the fingerprint when a usage chunk follows.
        assert!(s.ends_with("data: [DONE]\n\n"));
    }

    #[test]
    fn continuous_usage_rides_on_every_chunk() {
        let ctx = ctx();
        let g = Generation::parse(
            Endpoint::ChatCompletions,
            br#"{"messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":2,"stream_options":{"include_usage":true,"continuous_usage_stats":true}}"#,
            &ctx,
        )
        .unwrap();
        let mut r = Responder::new(&g, &ctx, "t", 0);
        let mut out = Vec::new();
        r.on_response(0, &chunk(0, &[300]), &mut out).unwrap();
        let s = String::from_utf8(out).unwrap();
        let events: Vec<&str> = s.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 2);
        assert!(events[0].contains("\"completion_tokens\":0,\"completion_tokens_details\":null}"));
        assert!(events[1].contains("\"completion_tokens\":1,\"completion_tokens_details\":null}"));
    }

    #[test]
    fn an_engine_error_becomes_vllms_in_band_error() {
        let ctx = ctx();
        let g = gen(&ctx, r#"{"prompt":"x","stream":true,"max_tokens":4}"#);
        let mut r = Responder::new(&g, &ctx, "t", 0);
        let mut out = Vec::new();
        let err = r
            .on_response(0, &complete(0, &[], "error"), &mut out)
            .unwrap_err();
        Responder::error_event(&err, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "data: {\"error\": {\"message\": \"Internal server error\", \"type\": \"InternalServerError\", \"param\": null, \"code\": 500}}\n\ndata: [DONE]\n\n"
        );
    }
}
