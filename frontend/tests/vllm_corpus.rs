//! The front end against vLLM itself: every case in testdata/expected.json was produced by
//! testdata/gen_expected.py from vLLM 0.32 (its FastIncrementalDetokenizer, transformers'
//! tokenizer and chat template), for the tiny test model's byte-level tokenizer and a
//! Llama-2-style byte-fallback one. Each failing case is reported by name, all at once.

use frontend::{ChatTemplate, ContentFormat, SequenceText, StopParams, Tokenizer};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
struct Corpus {
    encode: Vec<EncodeCase>,
    chat: Vec<ChatCase>,
    streams: Vec<StreamCase>,
    #[serde(default)]
    chat_errors: Vec<ChatError>,
    #[serde(default)]
    templates: Vec<TemplateCase>,
}

/// A template given as source, over messages with tools, tool calls, developer and system
/// messages: vLLM's own message shaping, rendered by transformers.
#[derive(Deserialize)]
struct TemplateCase {
    name: String,
    template: String,
    content_format: String,
    /// minijinja's values keep JSON key order (serde_json's do not here), which `tojson` shows.
    messages: minijinja::Value,
    tools: Option<minijinja::Value>,
    prompt: String,
}

#[derive(Deserialize)]
struct EncodeCase {
    text: String,
    add_special_tokens: bool,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct ChatCase {
    messages: serde_json::Value,
    add_generation_prompt: bool,
    prompt: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct ChatError {
    messages: serde_json::Value,
    message: String,
}

#[derive(Deserialize)]
struct StreamCase {
    name: String,
    prompt_ids: Vec<u32>,
    output_ids: Vec<u32>,
    stop: Vec<String>,
    include_stop_str_in_output: bool,
    min_tokens: usize,
    skip_special_tokens: bool,
    spaces_between_special_tokens: bool,
    chunk: usize,
    stop_terminated: bool,
    deltas: Vec<String>,
    stop_reason: Option<String>,
    text: String,
    num_output_tokens: usize,
}

fn corpus() -> BTreeMap<String, Corpus> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/expected.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn tokenizer(name: &str) -> Tokenizer {
    Tokenizer::from_dir(format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// Feeds the case's ids chunk by chunk as vLLM's output processor does.
fn stream(t: &Tokenizer, case: &StreamCase) -> (Vec<String>, Option<String>, String, usize) {
    let params = StopParams {
        stop: case.stop.clone(),
        include_stop_str_in_output: case.include_stop_str_in_output,
        min_tokens: case.min_tokens,
        skip_special_tokens: case.skip_special_tokens,
        spaces_between_special_tokens: case.spaces_between_special_tokens,
    };
    let mut seq = SequenceText::new(t, &case.prompt_ids, &params);
    let chunks: Vec<&[u32]> = case.output_ids.chunks(case.chunk).collect();
    let mut deltas = Vec::new();
    let mut stop_reason = None;
    for (i, ids) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        stop_reason = seq
            .update(t, ids, case.stop_terminated && last)
            .map(str::to_string);
        let finished = last || stop_reason.is_some();
        deltas.push(seq.next_delta(finished).to_string());
        if finished {
            break;
        }
    }
    let text = seq.text(true).to_string();
    (deltas, stop_reason, text, seq.token_ids().len())
}

#[test]
fn matches_vllm_on_every_case() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for (name, corpus) in corpus() {
        let t = tokenizer(&name);
        for case in &corpus.encode {
            checked += 1;
            let ids = t.encode(&case.text, case.add_special_tokens).unwrap();
            if ids != case.ids {
                failures.push(format!(
                    "{name}: encode {:?} (special {}): got {ids:?}, vLLM {:?}",
                    case.text, case.add_special_tokens, case.ids
                ));
            }
        }

        let chat = ChatTemplate::from_tokenizer(&t).unwrap();
        for case in &corpus.chat {
            checked += 1;
            let prompt = chat
                .render(
                    &case.messages.to_string(),
                    case.add_generation_prompt,
                    None,
                    None,
                )
                .unwrap();
            let ids = t.encode(&prompt, false).unwrap();
            if prompt != case.prompt || ids != case.ids {
                failures.push(format!(
                    "{name}: chat {}: got {prompt:?}, vLLM {:?}",
                    case.messages, case.prompt
                ));
            }
        }
        for case in &corpus.chat_errors {
            checked += 1;
            match chat.render(&case.messages.to_string(), true, None, None) {
                Err(e) if e.to_string().contains(&case.message) => {}
                other => failures.push(format!(
                    "{name}: chat {} should fail with {:?}, got {other:?}",
                    case.messages, case.message
                )),
            }
        }

        for case in &corpus.templates {
            checked += 1;
            let chat = ChatTemplate::new(case.template.clone(), &t).unwrap();
            let format = match chat.content_format() {
                ContentFormat::String => "string",
                ContentFormat::OpenAi => "openai",
            };
            if format != case.content_format {
                failures.push(format!(
                    "{name}: template {:?}: content format {format}, vLLM {}",
                    case.name, case.content_format
                ));
            }
            let json = |v: &minijinja::Value| serde_json::to_string(v).unwrap();
            let tools = case.tools.as_ref().map(json);
            match chat.render(&json(&case.messages), true, tools.as_deref(), None) {
                Ok(prompt) if prompt == case.prompt => {}
                other => failures.push(format!(
                    "{name}: template {:?}:\n  got  {other:?}\n  vLLM {:?}",
                    case.name, case.prompt
                )),
            }
        }

        for case in &corpus.streams {
            checked += 1;
            let (deltas, stop_reason, text, n) = stream(&t, case);
            let expected = (
                &case.deltas,
                &case.stop_reason,
                &case.text,
                case.num_output_tokens,
            );
            if (&deltas, &stop_reason, &text, n) != expected {
                failures.push(format!(
                    "{name}: stream {:?}:\n  got  {deltas:?} {stop_reason:?} {text:?} {n}\n  vLLM {:?} {:?} {:?} {}",
                    case.name, case.deltas, case.stop_reason, case.text, case.num_output_tokens
                ));
            }
        }
    }
    assert!(checked > 100, "corpus too small: {checked}");
    assert!(
        failures.is_empty(),
        "{} of {checked} cases differ from vLLM:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn streamed_deltas_concatenate_to_the_non_streamed_text() {
    for (name, corpus) in corpus() {
        let t = tokenizer(&name);
        for case in &corpus.streams {
            let (deltas, _, text, _) = stream(&t, case);
            assert_eq!(deltas.concat(), text, "{name}: {}", case.name);
        }
    }
}

#[test]
fn no_delta_ends_in_a_partial_character() {
    for (name, corpus) in corpus() {
        let t = tokenizer(&name);
        for case in corpus
            .streams
            .iter()
            .filter(|c| !c.name.starts_with("random"))
        {
            let (deltas, _, _, _) = stream(&t, case);
            assert!(
                deltas.iter().all(|d| !d.contains('\u{FFFD}')),
                "{name}: {}: {deltas:?}",
                case.name
            );
        }
    }
}
