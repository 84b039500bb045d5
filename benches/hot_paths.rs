//! Micro-benchmarks of the functions every request goes through: request head parsing,
//! body field extraction and routing text at 1 KB / 64 KB / 512 KB, prefix hashing, the
//! prefix index and hash ring lookups, the chunked/SSE relay scan, and the P/D body splice
//! (against a serde_json parse-edit-serialise of the same body).
//! Run: `cargo bench --bench hot_paths` (numbers in perf/README.md).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shards::body::{check_nesting, parse_fields};
use shards::http::{ChunkedDecoder, RequestHead};
use shards::pd::splice::{KvTransferParams, ObjectIndex};
use shards::route::key::routing_text;
use shards::route::kv_index::{EngineBlocks, KvIndex, StoredBlock};
use shards::route::prefix::{block_hashes, PrefixIndex};
use shards::route::ring::HashRing;
use shards::route::{Policy, PolicyConfig, RouteInput, Selector, WorkerSet};
use shards::sync::LoadBoard;

const HEAD: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\nHost: router.example:30000\r\nUser-Agent: OpenAI/Python 1.54.0\r\nAccept: application/json\r\nContent-Type: application/json\r\nAuthorization: Bearer sk-0123456789abcdef\r\nX-Stainless-Lang: python\r\nX-Stainless-Package-Version: 1.54.0\r\nX-Request-Id: 4b1c2d3e-0000-4000-8000-000000000001\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nContent-Length: 2048\r\n\r\n";

fn chat_body(bytes: usize) -> Vec<u8> {
    let filler = "The quick brown fox jumps over the lazy dog. \\n".repeat(bytes / 46 + 1);
    let content = &filler[..bytes.saturating_sub(200)];
    format!(
        r#"{{"model":"meta-llama/Llama-3.1-8B-Instruct","messages":[{{"role":"system","content":"You are helpful."}},{{"role":"user","content":"{content}"}}],"max_tokens":16,"temperature":0,"stream":true,"user":"u-42"}}"#
    )
    .into_bytes()
}

/// A long agent conversation: many small messages, so more brackets than the nesting
/// check's fast path admits.
fn many_messages_body(bytes: usize) -> Vec<u8> {
    let msg = r#"{"role":"user","content":"The quick brown fox [jumps] {over} the lazy dog."},"#;
    let n = bytes / msg.len() + 1;
    format!(
        r#"{{"model":"m","messages":[{}{{"role":"user","content":"end"}}],"stream":true}}"#,
        msg.repeat(n)
    )
    .into_bytes()
}

const PREFILL_ANSWER: &[u8] = br#"{"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":" the","logprobs":null,"finish_reason":"length","stop_reason":null}],"usage":{"prompt_tokens":5,"total_tokens":6,"completion_tokens":1},"kv_transfer_params":{"do_remote_prefill":true,"do_remote_decode":false,"remote_block_ids":[1,2,3,4,5,6,7,8],"remote_engine_id":"4f1c2d3e-0000-4000-8000-000000000001","remote_request_id":"cmpl-x-0","remote_host":"10.0.0.7","remote_port":5600,"tp_size":1}}"#;

fn sse_stream(events: usize) -> Vec<u8> {
    let mut wire = Vec::new();
    for i in 0..events {
        let ev = format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" tok{i}\"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
        );
        wire.extend_from_slice(format!("{:x}\r\n{ev}\r\n", ev.len()).as_bytes());
    }
    wire.extend_from_slice(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n");
    wire
}

fn request_head(c: &mut Criterion) {
    let mut head = RequestHead::default();
    c.bench_function("request_head_parse", |b| {
        b.iter(|| {
            head.parse(black_box(HEAD), 65536).unwrap();
            black_box(head.len)
        })
    });
}

fn body_fields(c: &mut Criterion) {
    let mut g = c.benchmark_group("body_fields");
    for size in [1 << 10, 64 << 10, 512 << 10] {
        let body = chat_body(size);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::new("parse_fields", size), &body, |b, body| {
            b.iter(|| {
                let f = parse_fields(black_box(body)).unwrap();
                black_box(f.stream)
            })
        });
        g.bench_with_input(
            BenchmarkId::new("fields_and_routing_text", size),
            &body,
            |b, body| {
                b.iter(|| {
                    let f = parse_fields(black_box(body)).unwrap();
                    let mut segs = Vec::new();
                    routing_text(&f, &mut segs);
                    black_box(segs.len())
                })
            },
        );
    }
    g.finish();
}

fn nesting(c: &mut Criterion) {
    let mut g = c.benchmark_group("nesting_check");
    for size in [64 << 10, 512 << 10] {
        let body = chat_body(size);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::new("prompt", size), &body, |b, body| {
            b.iter(|| check_nesting(black_box(body)).unwrap())
        });
        let body = many_messages_body(size);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::new("many_messages", size), &body, |b, body| {
            b.iter(|| check_nesting(black_box(body)).unwrap())
        });
    }
    g.finish();
}

fn pd_splice(c: &mut Criterion) {
    let mut g = c.benchmark_group("pd_splice");
    let kv = KvTransferParams::from_prefill_response(PREFILL_ANSWER)
        .unwrap()
        .unwrap();
    for size in [1 << 10, 64 << 10, 512 << 10] {
        let body = chat_body(size);
        g.throughput(Throughput::Bytes(body.len() as u64));
        let mut out = Vec::with_capacity(body.len() + 512);
        g.bench_with_input(BenchmarkId::new("prefill_leg", size), &body, |b, body| {
            b.iter(|| {
                out.clear();
                let index = ObjectIndex::parse(black_box(body)).unwrap();
                index.prefill_leg(KvTransferParams::NIXL_PREFILL, &mut out);
                black_box(out.len())
            })
        });
        g.bench_with_input(BenchmarkId::new("decode_leg", size), &body, |b, body| {
            b.iter(|| {
                out.clear();
                let index = ObjectIndex::parse(black_box(body)).unwrap();
                index.decode_leg(kv, &mut out);
                black_box(out.len())
            })
        });
        // What the P/D path does per request: the answer's params, then both legs from one
        // index of the client's body.
        let mut out2 = Vec::with_capacity(body.len() + 512);
        g.bench_with_input(BenchmarkId::new("both_legs", size), &body, |b, body| {
            b.iter(|| {
                out.clear();
                out2.clear();
                let index = ObjectIndex::parse(black_box(body)).unwrap();
                index.prefill_leg(KvTransferParams::NIXL_PREFILL, &mut out);
                let kv = KvTransferParams::from_prefill_response(black_box(PREFILL_ANSWER))
                    .unwrap()
                    .unwrap();
                index.decode_leg(kv, &mut out2);
                black_box(out.len() + out2.len())
            })
        });
        // The alternative: parse into a tree, edit, serialise (vllm-router's way).
        g.bench_with_input(
            BenchmarkId::new("serde_json_prefill_leg", size),
            &body,
            |b, body| {
                b.iter(|| {
                    let mut v: serde_json::Value = serde_json::from_slice(black_box(body)).unwrap();
                    let o = v.as_object_mut().unwrap();
                    o.insert("max_tokens".into(), 1.into());
                    if o.contains_key("max_completion_tokens") {
                        o.insert("max_completion_tokens".into(), 1.into());
                    }
                    o.insert("stream".into(), false.into());
                    o.remove("stream_options");
                    o.insert(
                        "kv_transfer_params".into(),
                        serde_json::from_slice(KvTransferParams::NIXL_PREFILL.as_bytes()).unwrap(),
                    );
                    black_box(serde_json::to_vec(&v).unwrap().len())
                })
            },
        );
    }
    g.finish();
}

fn prefix(c: &mut Criterion) {
    let body = chat_body(2048);
    let text: Vec<&[u8]> = vec![&body[..]];
    let mut hashes = Vec::new();
    c.bench_function("block_hashes_2k", |b| {
        b.iter(|| black_box(block_hashes(black_box(&text), &mut hashes)))
    });
    let mut idx = PrefixIndex::new(1 << 20);
    block_hashes(&text, &mut hashes);
    idx.insert(&hashes, 1, None);
    c.bench_function("prefix_longest_match_2k", |b| {
        b.iter(|| black_box(idx.longest_match(black_box(&hashes))))
    });
    let names: Vec<String> = (0..16).map(|i| format!("http://10.0.0.{i}:8000")).collect();
    let board = Arc::new(LoadBoard::new(2, 16));
    let set = WorkerSet::from_urls(&names).unwrap();
    let mut sel = Selector::new(PolicyConfig::new(Policy::CacheAware), 0, &set, board, None);
    c.bench_function("cache_aware_select_2k_16_workers", |b| {
        b.iter(|| {
            let input = RouteInput {
                session_key: None,
                text: &text,
            };
            black_box(sel.candidates(&input).next())
        })
    });
    // gRPC engines feeding the index with their KV events: all 16 workers event-fed, one
    // holding the prompt's blocks (the 2 KB body read as token ids, 16 per block).
    let kv = Arc::new(KvIndex::new(16));
    let engines: Vec<EngineBlocks> = (0..16).map(|w| EngineBlocks::new(&kv, w)).collect();
    let ids: Vec<u32> = body
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let blocks: Vec<StoredBlock> = ids
        .chunks_exact(16)
        .enumerate()
        .map(|(i, t)| StoredBlock {
            engine_hash: i as i64,
            token_ids: t,
        })
        .collect();
    let mut holder = engines.into_iter().nth(3).unwrap();
    holder.stored(&kv, None, &blocks);
    let board = Arc::new(LoadBoard::new(2, 16));
    let mut sel = Selector::new(PolicyConfig::new(Policy::CacheAware), 0, &set, board, None);
    sel.set_kv_index(kv);
    c.bench_function("cache_aware_select_2k_16_workers_kv_events", |b| {
        b.iter(|| {
            let input = RouteInput {
                session_key: None,
                text: &text,
            };
            black_box(sel.candidates(&input).next())
        })
    });
}

fn ring(c: &mut Criterion) {
    let names: Vec<String> = (0..16).map(|i| format!("http://10.0.0.{i}:8000")).collect();
    let ring = HashRing::new(&names);
    c.bench_function("ring_owner_16_workers", |b| {
        b.iter(|| black_box(ring.owner(black_box(b"session-1234567"))))
    });
}

fn relay_scan(c: &mut Criterion) {
    let wire = sse_stream(16);
    let mut g = c.benchmark_group("relay_scan");
    g.throughput(Throughput::Bytes(wire.len() as u64));
    g.bench_function("chunked_sse_16_events", |b| {
        b.iter(|| {
            let mut d = ChunkedDecoder::new();
            let n = d.feed(black_box(&wire), None).unwrap();
            assert!(d.is_done());
            black_box(n)
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    request_head,
    body_fields,
    nesting,
    pd_splice,
    prefix,
    ring,
    relay_scan
);
criterion_main!(benches);
