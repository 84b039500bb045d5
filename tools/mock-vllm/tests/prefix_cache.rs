//! The simulated prefix cache over real sockets: requests sharing a prefix report it cached
//! (`x-mock-prefix-hit`, `Stats`, `/metrics`), the cache is an LRU of fixed capacity, and
//! TTFT grows with the uncached part of the prompt.

mod common;

use std::time::{Duration, Instant};

use common::*;
use mock_vllm::{MockConfig, MockServer};
use serde_json::json;

const BLOCK: usize = 64;

/// `len` bytes of lower-case text that differs for every seed and never repeats a block.
fn text(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (b'a' + (x % 26) as u8) as char
        })
        .collect()
}

fn cached_mock(blocks: usize, prefill_per_kb: Duration) -> MockServer {
    MockServer::spawn(MockConfig {
        prefix_cache_blocks: blocks,
        prefill_per_kb,
        ..MockConfig::named("w0")
    })
    .unwrap()
}

/// (cached bytes, prompt bytes) from `x-mock-prefix-hit`.
fn prefix_hit(r: &Resp) -> (usize, usize) {
    let v = r.header("x-mock-prefix-hit").expect("x-mock-prefix-hit");
    let (cached, prompt) = v.split_once('/').expect("cached/prompt");
    (cached.parse().unwrap(), prompt.parse().unwrap())
}

fn complete(m: &MockServer, prompt: &str) -> Resp {
    let body = json!({"prompt": prompt, "max_tokens": 1}).to_string();
    let r = post(m.addr(), "/v1/completions", &body, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    r
}

#[test]
fn a_shared_prefix_is_served_from_the_cache() {
    let m = cached_mock(1024, Duration::ZERO);
    let shared = text(1, 2048);
    let first = format!("{shared} What is the first question?");
    let second = format!("{shared} And a second, different one, somewhat longer than that.");

    let r = complete(&m, &first);
    assert_eq!(prefix_hit(&r), (0, first.len()), "cold cache");
    let r = complete(&m, &second);
    let (cached, prompt) = prefix_hit(&r);
    assert_eq!(prompt, second.len());
    assert!(cached >= 2048 / BLOCK * BLOCK, "{cached}");
    assert!(cached < prompt && cached % BLOCK == 0, "{cached}");

    // Counters in tokens of 4 bytes, as vLLM's are in tokens.
    let stats = m.stats();
    assert_eq!(
        stats.prefix_cache_queries,
        ((first.len() + second.len()) / 4) as u64
    );
    assert_eq!(stats.prefix_cache_hits, (cached / 4) as u64);
    let metrics = get(m.addr(), "/metrics").text();
    let labels = r#"{engine="0",model_name="mock-model"}"#;
    assert!(
        metrics.contains(&format!(
            "vllm:prefix_cache_queries_total{labels} {}.0\n",
            stats.prefix_cache_queries
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "vllm:prefix_cache_hits_total{labels} {}.0\n",
            stats.prefix_cache_hits
        )),
        "{metrics}"
    );

    // A different prefix shares nothing, even with the same suffix.
    let other = format!("{} What is the first question?", text(2, 2048));
    assert_eq!(prefix_hit(&complete(&m, &other)), (0, other.len()));
    assert_eq!(m.stats().prefix_cache_hits, (cached / 4) as u64);

    // The same prompt again: everything but the block holding the last byte.
    let (cached, prompt) = prefix_hit(&complete(&m, &first));
    assert_eq!(cached, (first.len() - 1) / BLOCK * BLOCK);
    assert_eq!(prompt, first.len());
}

#[test]
fn chat_and_token_prompts_share_prefixes_too() {
    let m = cached_mock(1024, Duration::ZERO);
    let system = text(3, 1024);
    let chat = |question: &str, stream: bool| {
        let body = json!({
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": [{"type": "text", "text": question}]}
            ],
            "max_tokens": 2,
            "stream": stream,
        })
        .to_string();
        let r = post(m.addr(), "/v1/chat/completions", &body, &[]);
        assert_eq!(r.status, 200, "{}", r.text());
        r
    };
    let r = chat("first?", false);
    assert_eq!(prefix_hit(&r), (0, 1024 + 6));
    // Streams carry the header as well.
    let r = chat("second, in a stream?", true);
    assert!(r.complete);
    assert_eq!(prefix_hit(&r), (1024, 1024 + 20));

    // Token ids: 4 bytes per id, so 16 ids make a block.
    let ids: Vec<u32> = (1000..1000 + 40).collect();
    let body = json!({"prompt": ids, "max_tokens": 1}).to_string();
    let r = post(m.addr(), "/v1/completions", &body, &[]);
    assert_eq!(prefix_hit(&r), (0, 160));
    let r = post(m.addr(), "/v1/completions", &body, &[]);
    assert_eq!(prefix_hit(&r), (128, 160));
}

#[test]
fn the_cache_evicts_the_least_recently_used_blocks() {
    // Room for two prompts of 16 full blocks each.
    let m = cached_mock(32, Duration::ZERO);
    let prompt = |seed| format!("{}?", text(seed, 16 * BLOCK));
    let (a, b, c) = (prompt(10), prompt(11), prompt(12));
    let hit = |p: &str| prefix_hit(&complete(&m, p)).0;
    assert_eq!(hit(&a), 0);
    assert_eq!(hit(&b), 0);
    assert_eq!(hit(&a), 16 * BLOCK, "both fit");
    // c needs 16 blocks: b's are the least recently used, so they go, not a's.
    assert_eq!(hit(&c), 0);
    assert_eq!(hit(&a), 16 * BLOCK);
    assert_eq!(hit(&b), 0, "evicted");
    // b took the room of c, the least recently used now.
    assert_eq!(hit(&a), 16 * BLOCK);
    assert_eq!(hit(&c), 0, "evicted");
}

#[test]
fn ttft_grows_with_the_uncached_prompt() {
    const PER_KB: Duration = Duration::from_millis(25);
    let m = cached_mock(1024, PER_KB);
    let shared = text(20, 2048);
    let timed = |prompt: &str| {
        let t0 = Instant::now();
        let r = complete(&m, prompt);
        (t0.elapsed(), prefix_hit(&r))
    };
    // 2 KiB uncached: at least 50 ms.
    let (cold, (cached, _)) = timed(&format!("{shared} one"));
    assert_eq!(cached, 0);
    assert!(cold >= 2 * PER_KB, "{cold:?}");
    // Same prefix: only the short tail is prefilled.
    let (warm, (cached, _)) = timed(&format!("{shared} two"));
    assert_eq!(cached, 2048);
    assert!(warm + PER_KB < cold, "warm {warm:?} vs cold {cold:?}");

    // Streams: the first token waits for the prefill too.
    let body = json!({"prompt": text(21, 2048), "max_tokens": 1, "stream": true}).to_string();
    let mut c = Conn::open(m.addr());
    let t0 = Instant::now();
    c.send("POST", "/v1/completions", &[JSON], &body);
    let r = read_response(&mut c.reader).unwrap();
    assert!(r.complete);
    assert!(t0.elapsed() >= 2 * PER_KB, "{:?}", t0.elapsed());

    // A NIXL decode leg gets its KV from the prefill leg: no prefill cost.
    let body = json!({
        "prompt": text(22, 2048),
        "max_tokens": 1,
        "kv_transfer_params": {"do_remote_prefill": true},
    })
    .to_string();
    let t0 = Instant::now();
    let r = post(m.addr(), "/v1/completions", &body, &[]);
    assert_eq!(r.status, 200);
    // A cold 2 KiB prefill would take 2 × PER_KB; the decode leg takes none of it.
    assert!(t0.elapsed() < 2 * PER_KB, "{:?}", t0.elapsed());

    // Without the cache every request pays for its whole prompt.
    let m = MockServer::spawn(MockConfig {
        prefill_per_kb: PER_KB,
        ..MockConfig::default()
    })
    .unwrap();
    let prompt = format!("{shared} one");
    for _ in 0..2 {
        let t0 = Instant::now();
        let r = complete(&m, &prompt);
        assert!(t0.elapsed() >= 2 * PER_KB, "{:?}", t0.elapsed());
        assert_eq!(prefix_hit(&r), (0, prompt.len()));
    }
    assert_eq!(m.stats().prefix_cache_queries, 0, "no cache, no queries");
}

#[test]
fn off_by_default() {
    let m = MockServer::spawn(MockConfig::default()).unwrap();
    let r = complete(&m, &text(30, 2048));
    assert_eq!(r.header("x-mock-prefix-hit"), None);
    assert_eq!(m.stats().prefix_cache_queries, 0);
    assert!(get(m.addr(), "/metrics")
        .text()
        .contains("vllm:prefix_cache_hits_total{engine=\"0\",model_name=\"mock-model\"} 0.0\n"));
}
