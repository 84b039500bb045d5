//! The mock engine's shared state: its configuration, the failure knobs tests flip at run
//! time, and what it saw (Generate requests, cancelled streams, aborted ids, calls per
//! method), read by tests through [`GrpcState::stats`].

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use grpc_proto::common::{KvCacheEvent, KvEventBatch};
use tokio::sync::watch;

use super::GrpcConfig;

/// How Generate fails, when a test asks it to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Answer every Generate with this gRPC status (trailers-only), e.g. 14 UNAVAILABLE or
    /// 3 INVALID_ARGUMENT.
    Status { code: u32, message: String },
    /// Streams: after `after` tokens of choice 0, reset the HTTP/2 stream (INTERNAL_ERROR).
    ResetAfter { after: usize },
    /// Streams: after `after` tokens of choice 0, end with this status in the trailers.
    StatusAfter {
        after: usize,
        code: u32,
        message: String,
    },
    /// Streams: after `after` tokens, send nothing more (until the client cancels).
    HangAfter { after: usize },
}

/// One Generate call as the engine received it.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub request_id: String,
    pub input_ids: Vec<u32>,
    pub stream: bool,
    pub max_tokens: Option<u32>,
    pub n: u32,
    /// `kv_transfer_params_json` as sent (P/D legs).
    pub kv_transfer_params_json: Option<String>,
    /// The rank the request was pinned to, if any.
    pub data_parallel_rank: Option<i32>,
}

/// What the engine saw so far.
#[derive(Clone, Debug, Default)]
pub struct GrpcStats {
    /// Generate calls received (refused ones included).
    pub generate_calls: usize,
    /// Generate calls finished with status OK.
    pub generate_ok: usize,
    /// Generate streams the client reset (RST_STREAM) before they ended.
    pub cancelled: usize,
    /// Request ids named by Abort calls, in arrival order.
    pub aborted: Vec<String>,
    pub health_checks: usize,
    pub model_info_calls: usize,
    pub server_info_calls: usize,
    pub loads_calls: usize,
    pub tokenizer_calls: usize,
    /// TCP connections accepted.
    pub connections: usize,
    /// SubscribeKvEvents calls answered with a stream.
    pub kv_subscriptions: usize,
    /// Generate calls running now.
    pub running: usize,
    /// Every Generate request, oldest first.
    pub requests: Vec<SeenRequest>,
}

pub struct GrpcState {
    pub config: GrpcConfig,
    healthy: AtomicBool,
    failure: Mutex<Option<Failure>>,
    pub(super) running: AtomicUsize,
    stats: Mutex<GrpcStats>,
    shutdown: watch::Sender<bool>,
    /// KV-event batches, to every subscriber.
    pub(super) kv_events: tokio::sync::broadcast::Sender<KvEventBatch>,
    /// The last sequence number published.
    kv_sequence: AtomicU64,
}

impl GrpcState {
    pub fn new(config: GrpcConfig) -> Arc<GrpcState> {
        Arc::new(GrpcState {
            config,
            healthy: AtomicBool::new(true),
            failure: Mutex::new(None),
            running: AtomicUsize::new(0),
            stats: Mutex::new(GrpcStats::default()),
            shutdown: watch::channel(false).0,
            kv_events: tokio::sync::broadcast::channel(4096).0,
            kv_sequence: AtomicU64::new(0),
        })
    }

    /// Publishes one KV-event batch (the next sequence number) to every subscriber.
    pub fn publish_kv_events(&self, events: Vec<KvCacheEvent>) {
        let seq = self.kv_sequence.fetch_add(1, Relaxed) + 1;
        let _ = self.kv_events.send(KvEventBatch {
            sequence_number: seq,
            events,
            dp_rank: Some(0),
            ..Default::default()
        });
    }

    /// Reports the whole blocks of `prompt` stored (parents first, from the prompt's start).
    pub fn kv_store(&self, prompt: &[u32]) {
        self.publish_kv_events(vec![super::kv_events::stored(
            prompt,
            self.config.block_size,
        )]);
    }

    /// Reports the whole blocks of `prompt` evicted.
    pub fn kv_evict(&self, prompt: &[u32]) {
        self.publish_kv_events(vec![super::kv_events::removed(
            prompt,
            self.config.block_size,
        )]);
    }

    /// Loses a batch: the next one published skips a sequence number.
    pub fn kv_skip_sequence(&self) {
        self.kv_sequence.fetch_add(1, Relaxed);
    }

    /// What HealthCheck answers from now on.
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Relaxed);
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    /// How Generate fails from now on (None: it does not).
    pub fn set_failure(&self, failure: Option<Failure>) {
        *self.failure.lock().unwrap() = failure;
    }

    pub fn failure(&self) -> Option<Failure> {
        self.failure.lock().unwrap().clone()
    }

    pub fn stats(&self) -> GrpcStats {
        let mut s = self.stats.lock().unwrap().clone();
        s.running = self.running.load(Relaxed);
        s
    }

    pub(super) fn record(&self, f: impl FnOnce(&mut GrpcStats)) {
        f(&mut self.stats.lock().unwrap())
    }

    /// Stops the server: no more connections, and the open ones are closed.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    pub(super) fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }
}
