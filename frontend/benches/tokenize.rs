//! The front end's cost per request, on the tiny test model's tokenizer (byte-level BPE with a
//! 1024-token vocabulary, so more tokens per byte than a real model's):
//! tokenizing a 1 KB and a 16 KB prompt, rendering a chat template, and detokenizing 256
//! generated tokens one at a time as a stream (with and without stop strings to watch for).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use frontend::{ChatTemplate, SequenceText, StopParams, Tokenizer};
use std::hint::black_box;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/tiny-llama")).unwrap()
}

/// Mixed prose: mostly ASCII, some accents, CJK and emoji, `bytes` long.
fn prompt(bytes: usize) -> String {
    let unit =
        "The quick brown fox jumps over the lazy dog; façade naïve café. 日本語のテキスト 😀 ";
    let mut s = unit.repeat(bytes / unit.len() + 1);
    let mut cut = bytes;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    s
}

fn tokenize(c: &mut Criterion) {
    let t = tokenizer();
    let mut group = c.benchmark_group("tokenize");
    for kb in [1, 16] {
        let text = prompt(kb * 1024);
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(format!("{kb}KB"), |b| {
            b.iter(|| t.encode(black_box(&text), true).unwrap())
        });
    }
    group.finish();
}

fn chat_template(c: &mut Criterion) {
    let t = tokenizer();
    let chat = ChatTemplate::from_tokenizer(&t).unwrap();
    let messages = serde_json::json!([
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": prompt(300)},
        {"role": "assistant", "content": "Sure, here is what I found."},
        {"role": "user", "content": [{"type": "text", "text": "Summarise that."}]},
    ])
    .to_string();
    c.bench_function("chat_template/render 4 turns", |b| {
        b.iter(|| chat.render(black_box(&messages), true, None, None).unwrap())
    });
    c.bench_function("chat_template/render + tokenize 4 turns", |b| {
        b.iter(|| {
            let text = chat.render(black_box(&messages), true, None, None).unwrap();
            t.encode(&text, false).unwrap()
        })
    });
}

fn detokenize(c: &mut Criterion) {
    let t = tokenizer();
    let prompt_ids = t.encode(&prompt(1024), true).unwrap();
    let output_ids: Vec<u32> = t.encode(&prompt(4096), false).unwrap()[..256].to_vec();
    let mut group = c.benchmark_group("detokenize 256 tokens");
    group.throughput(Throughput::Elements(256));
    for (name, stop) in [
        ("no stop", vec![]),
        (
            "2 stop strings",
            vec!["zzz".to_string(), "</answer>".to_string()],
        ),
    ] {
        let params = StopParams {
            stop,
            ..StopParams::default()
        };
        group.bench_function(name, |b| {
            b.iter_batched(
                || SequenceText::new(&t, &prompt_ids, &params),
                |mut seq| {
                    for &id in &output_ids {
                        seq.update(&t, &[id], false);
                        black_box(seq.next_delta(false));
                    }
                    seq
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();

    // vLLM primes the stream with the whole prompt, so the first token decodes all of it.
    let long_prompt = t.encode(&prompt(16 * 1024), true).unwrap();
    c.bench_function("detokenize first token after 16KB prompt", |b| {
        b.iter_batched(
            || SequenceText::new(&t, &long_prompt, &StopParams::default()),
            |mut seq| {
                seq.update(&t, &output_ids[..1], false);
                seq
            },
            BatchSize::SmallInput,
        )
    });
}

/// A streamed chat completion end to end on the front end's side: parse + tokenize the body,
/// then render 256 engine chunks (one id each) and the `complete` into SSE bytes.
fn openai_stream(c: &mut Criterion) {
    use frontend::openai::{Endpoint, Generation, ModelContext, Responder};
    use grpc_proto::engine::{
        generate_response::Response, GenerateComplete, GenerateResponse, GenerateStreamChunk,
    };
    let ctx = ModelContext::from_model_dir(
        concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/tiny-llama"),
        "tiny",
        8192,
    )
    .unwrap();
    let body = serde_json::json!({
        "model": "tiny", "stream": true, "max_tokens": 256, "temperature": 0,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": prompt(300)}],
    })
    .to_string();
    let ids = ctx.tokenizer.encode(&prompt(2048), false).unwrap();
    let msgs: Vec<GenerateResponse> = ids[..256]
        .iter()
        .map(|&id| GenerateResponse {
            response: Some(Response::Chunk(GenerateStreamChunk {
                token_ids: vec![id],
                ..Default::default()
            })),
        })
        .chain(std::iter::once(GenerateResponse {
            response: Some(Response::Complete(GenerateComplete {
                output_ids: vec![ids[255]],
                finish_reason: "length".into(),
                ..Default::default()
            })),
        }))
        .collect();
    c.bench_function("openai/parse + render 256-token streamed chat", |b| {
        let mut out = Vec::with_capacity(64 * 1024);
        b.iter(|| {
            out.clear();
            let g = Generation::parse(Endpoint::ChatCompletions, body.as_bytes(), &ctx).unwrap();
            let mut r = Responder::new(&g, &ctx, "bench", 0);
            for m in &msgs {
                r.on_response(0, m, &mut out).unwrap();
            }
            r.finish(&mut out);
            black_box(out.len())
        })
    });
}

criterion_group!(benches, tokenize, chat_template, detokenize, openai_stream);
criterion_main!(benches);
