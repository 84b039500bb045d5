//! What a running mock knows about itself: counters (`Stats`), the log of received requests,
//! the run-time switches (health, fail rate), the simulated prefix cache and the shutdown
//! signal. Shared by every connection of one mock through an `Arc<MockState>`; counters are
//! relaxed atomics.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use hyper::header::HeaderValue;
use tokio::sync::watch;

use crate::config::MockConfig;
use crate::prefix_cache::{PrefixCache, PrefixHit, PromptBlocks};

/// A snapshot of a mock's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub connections_accepted: u64,
    pub connections_open: u64,
    /// Every HTTP request, any path.
    pub requests: u64,
    /// Streams that sent `data: [DONE]` to the end.
    pub streams_completed: u64,
    /// Streams whose client went away (or the server shut down) before the end.
    pub streams_aborted: u64,
    /// Streams cut on purpose by `drop_after`.
    pub streams_dropped: u64,
    /// Generation requests (completions, chat, responses, embeddings, generate) being served.
    pub in_flight: u64,
    /// Requests carrying `kv_transfer_params.do_remote_decode: true` (NIXL prefill legs).
    pub prefill_legs: u64,
    /// Requests carrying `kv_transfer_params.do_remote_prefill: true` (NIXL decode legs).
    pub decode_legs: u64,
    /// Error responses injected by `fail_rate`, `x-mock-fail` or `x-mock-status`.
    pub injected_errors: u64,
    /// Prompt tokens looked up in the prefix cache (`vllm:prefix_cache_queries_total`). The
    /// mock has no tokenizer: a token is 4 bytes of routing text (this is the total bytes / 4).
    /// 0 while the cache is off.
    pub prefix_cache_queries: u64,
    /// Of those, tokens found cached (`vllm:prefix_cache_hits_total`), same unit.
    pub prefix_cache_hits: u64,
}

/// One request as the mock received it.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    pub query: Option<String>,
    /// Header names are lower-case, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// Which TCP connection carried it (1, 2, ... per mock, in accept order).
    pub connection_id: u64,
}

impl Received {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// The shared state of one mock server.
pub struct MockState {
    config: MockConfig,
    pub(crate) fingerprint: String,
    pub(crate) worker_header: HeaderValue,
    ip: Mutex<IpAddr>,
    port: AtomicU16,
    healthy: AtomicBool,
    fail_rate_bits: AtomicU64,
    next_connection_id: AtomicU64,
    pub(crate) connections_accepted: AtomicU64,
    pub(crate) connections_open: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) streams_completed: AtomicU64,
    pub(crate) streams_aborted: AtomicU64,
    pub(crate) streams_dropped: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    pub(crate) prefill_legs: AtomicU64,
    pub(crate) decode_legs: AtomicU64,
    pub(crate) injected_errors: AtomicU64,
    pub(crate) prompt_tokens_total: AtomicU64,
    pub(crate) generation_tokens_total: AtomicU64,
    pub(crate) success_stop: AtomicU64,
    pub(crate) success_length: AtomicU64,
    pub(crate) success_abort: AtomicU64,
    pub(crate) next_block_id: AtomicU64,
    prefix_cache: Option<Mutex<PrefixCache>>,
    prefix_query_bytes: AtomicU64,
    prefix_hit_bytes: AtomicU64,
    received: Mutex<VecDeque<Received>>,
    shutdown: watch::Sender<bool>,
}

impl MockState {
    pub fn new(config: MockConfig) -> Arc<MockState> {
        let (shutdown, _) = watch::channel(false);
        let fingerprint = format!("vllm-0.32.0-{:08x}", fnv1a(config.name.as_bytes()) as u32);
        let worker_header = HeaderValue::from_str(&config.name)
            .unwrap_or_else(|_| HeaderValue::from_static("mock"));
        let fail_rate_bits = AtomicU64::new(config.fail_rate.to_bits());
        let prefix_cache = (config.prefix_cache_blocks > 0)
            .then(|| Mutex::new(PrefixCache::new(config.prefix_cache_blocks)));
        Arc::new(MockState {
            config,
            fingerprint,
            worker_header,
            ip: Mutex::new(IpAddr::from([127, 0, 0, 1])),
            port: AtomicU16::new(0),
            healthy: AtomicBool::new(true),
            fail_rate_bits,
            next_connection_id: AtomicU64::new(1),
            connections_accepted: AtomicU64::new(0),
            connections_open: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            streams_completed: AtomicU64::new(0),
            streams_aborted: AtomicU64::new(0),
            streams_dropped: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            prefill_legs: AtomicU64::new(0),
            decode_legs: AtomicU64::new(0),
            injected_errors: AtomicU64::new(0),
            prompt_tokens_total: AtomicU64::new(0),
            generation_tokens_total: AtomicU64::new(0),
            success_stop: AtomicU64::new(0),
            success_length: AtomicU64::new(0),
            success_abort: AtomicU64::new(0),
            next_block_id: AtomicU64::new(1),
            prefix_cache,
            prefix_query_bytes: AtomicU64::new(0),
            prefix_hit_bytes: AtomicU64::new(0),
            received: Mutex::new(VecDeque::new()),
            shutdown,
        })
    }

    pub fn config(&self) -> &MockConfig {
        &self.config
    }

    pub fn stats(&self) -> Stats {
        Stats {
            connections_accepted: self.connections_accepted.load(Relaxed),
            connections_open: self.connections_open.load(Relaxed),
            requests: self.requests.load(Relaxed),
            streams_completed: self.streams_completed.load(Relaxed),
            streams_aborted: self.streams_aborted.load(Relaxed),
            streams_dropped: self.streams_dropped.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            prefill_legs: self.prefill_legs.load(Relaxed),
            decode_legs: self.decode_legs.load(Relaxed),
            injected_errors: self.injected_errors.load(Relaxed),
            prefix_cache_queries: self.prefix_cache_queries(),
            prefix_cache_hits: self.prefix_cache_hits(),
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().iter().cloned().collect()
    }

    pub fn clear_received(&self) {
        self.received.lock().unwrap().clear();
    }

    pub(crate) fn record(&self, r: Received) {
        let mut log = self.received.lock().unwrap();
        if log.len() >= self.config.record_limit.max(1) {
            log.pop_front();
        }
        log.push_back(r);
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Relaxed);
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    pub fn set_fail_rate(&self, fail_rate: f64) {
        self.fail_rate_bits.store(fail_rate.to_bits(), Relaxed);
    }

    pub fn fail_rate(&self) -> f64 {
        f64::from_bits(self.fail_rate_bits.load(Relaxed))
    }

    /// The port `serve` listens on (0 before it starts).
    pub fn port(&self) -> u16 {
        self.port.load(Relaxed)
    }

    /// The address `serve` listens on (port 0 before it starts).
    pub fn local_addr(&self) -> SocketAddr {
        SocketAddr::new(*self.ip.lock().unwrap(), self.port())
    }

    pub(crate) fn set_local_addr(&self, addr: SocketAddr) {
        *self.ip.lock().unwrap() = addr.ip();
        self.port.store(addr.port(), Relaxed);
    }

    pub(crate) fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Relaxed)
    }

    /// Ask `serve` and every connection of this state to stop.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    pub fn is_shut_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    pub(crate) fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// (running, waiting) as vLLM's scheduler would report them.
    pub(crate) fn load(&self, exclude: u64) -> (u64, u64) {
        let n = self.in_flight.load(Relaxed).saturating_sub(exclude);
        let cap = self.config.max_num_seqs.max(1) as u64;
        (n.min(cap), n.saturating_sub(cap))
    }

    pub(crate) fn count_success(&self, finish: &str, choices: u64) {
        let counter = match finish {
            "length" => &self.success_length,
            _ => &self.success_stop,
        };
        counter.fetch_add(choices, Relaxed);
    }

    /// Whether a prompt's routing text matters (the prefix cache or the prefill cost is on).
    pub(crate) fn models_prefill(&self) -> bool {
        self.prefix_cache.is_some() || !self.config.prefill_per_kb.is_zero()
    }

    /// An empty block list for the next prompt, sized for a body of `body_len` bytes.
    pub(crate) fn prompt_blocks(&self, body_len: usize) -> PromptBlocks {
        if self.prefix_cache.is_some() {
            PromptBlocks::new(self.config.prefix_block_bytes, body_len)
        } else {
            PromptBlocks::length_only()
        }
    }

    /// Look a prompt up in the prefix cache, insert its blocks and count the query.
    pub(crate) fn prefix_lookup(&self, blocks: &PromptBlocks) -> PrefixHit {
        let prompt_bytes = blocks.len();
        let Some(cache) = &self.prefix_cache else {
            return PrefixHit {
                cached_bytes: 0,
                prompt_bytes,
            };
        };
        let hit_blocks = cache.lock().unwrap().lookup_and_insert(blocks);
        let cached_bytes = hit_blocks * blocks.block_bytes();
        self.prefix_query_bytes
            .fetch_add(prompt_bytes as u64, Relaxed);
        self.prefix_hit_bytes
            .fetch_add(cached_bytes as u64, Relaxed);
        PrefixHit {
            cached_bytes,
            prompt_bytes,
        }
    }

    /// `vllm:prefix_cache_queries_total`, in tokens of 4 bytes.
    pub(crate) fn prefix_cache_queries(&self) -> u64 {
        self.prefix_query_bytes.load(Relaxed) / 4
    }

    /// `vllm:prefix_cache_hits_total`, in tokens of 4 bytes.
    pub(crate) fn prefix_cache_hits(&self) -> u64 {
        self.prefix_hit_bytes.load(Relaxed) / 4
    }

    pub(crate) fn kv_cache_usage(&self, running: u64) -> f64 {
        running as f64 / self.config.max_num_seqs.max(1) as f64
    }

    /// Count one generation request as in flight until the guard is dropped; returns the
    /// guard and how many were already in flight.
    pub(crate) fn enter(self: &Arc<Self>) -> (InFlight, u64) {
        let before = self.in_flight.fetch_add(1, Relaxed);
        (
            InFlight {
                state: self.clone(),
            },
            before,
        )
    }
}

/// One generation request in flight; decrements the count when dropped.
pub(crate) struct InFlight {
    pub(crate) state: Arc<MockState>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Relaxed);
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}
