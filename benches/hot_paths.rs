//! Micro-benchmarks of the functions every request goes through: request head parsing,
//! body field extraction and routing text at 1 KB / 64 KB / 512 KB, prefix hashing, the
//! prefix index and hash ring lookups, and the chunked/SSE relay scan.
//! Run: `cargo bench --bench hot_paths` (numbers in perf/README.md).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shards::body::parse_fields;
use shards::http::{ChunkedDecoder, RequestHead};
use shards::route::key::routing_text;
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

criterion_group!(benches, request_head, body_fields, prefix, ring, relay_scan);
criterion_main!(benches);
