//! The data plane's metrics: counters and histograms kept per shard, each written by its own
//! shard only (a plain load and store: no locked instruction, no cache line written by two
//! shards), read and summed when Prometheus scrapes (the control plane encodes them, in
//! vllm-router's names). A request's facts are gathered as it goes in a [`RequestRecord`]
//! and counted once, when it ends.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
#[cfg(test)]
use std::time::Duration;

/// Now, in nanoseconds of the monotonic clock (never 0). What the record's times are in:
/// differences are integer subtractions, cheaper than `Instant`'s.
#[inline]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// A counter with one writer (its shard); any thread may read it.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// vllm-router's buckets for every `*_duration_seconds` histogram.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 45.0, 60.0,
    90.0, 120.0, 180.0, 240.0,
];

/// Buckets for the router's own added time: microseconds to a few milliseconds.
pub const ADDED_BUCKETS: &[f64] = &[
    0.000_005, 0.000_01, 0.000_02, 0.000_05, 0.000_1, 0.000_2, 0.000_5, 0.001, 0.002, 0.005, 0.01,
    0.05,
];

/// Buckets for time to first token / first byte: a millisecond to minutes.
pub const TTFT_BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
    120.0,
];

/// A histogram of durations with fixed bounds; one writer.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// The bounds in nanoseconds, for the comparisons.
    bounds_ns: Box<[u64]>,
    /// Per bucket (not cumulative), the last one for values above every bound.
    counts: Box<[Counter]>,
    sum_ns: Counter,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            bounds_ns: bounds.iter().map(|b| (b * 1e9).round() as u64).collect(),
            counts: (0..=bounds.len()).map(|_| Counter::default()).collect(),
            sum_ns: Counter::default(),
        }
    }

    /// Counts a duration of `ns` nanoseconds.
    #[inline]
    pub fn observe_ns(&self, ns: u64) {
        // `le` buckets: a value equal to a bound belongs to that bound's bucket. A linear
        // scan: the values this sees sit in the first few buckets.
        let i = self
            .bounds_ns
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(self.bounds_ns.len());
        self.counts[i].inc();
        self.sum_ns.add(ns);
    }

    #[cfg(test)]
    fn observe(&self, d: Duration) {
        self.observe_ns(d.as_nanos() as u64);
    }

    /// Adds this histogram's counts to `acc` (which has the same bounds).
    pub fn add_to(&self, acc: &mut HistogramSnapshot) {
        for (a, c) in acc.counts.iter_mut().zip(self.counts.iter()) {
            *a += c.get();
        }
        acc.sum_ns += self.sum_ns.get();
    }

    pub fn empty_snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: self.bounds,
            counts: vec![0; self.bounds.len() + 1],
            sum_ns: 0,
        }
    }
}

/// Histogram counts summed over shards.
#[derive(Clone, Debug)]
pub struct HistogramSnapshot {
    pub bounds: &'static [f64],
    pub counts: Vec<u64>,
    pub sum_ns: u64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn sum_secs(&self) -> f64 {
        self.sum_ns as f64 / 1e9
    }

    /// `(upper bound, cumulative count)` per bucket, without `+Inf`.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut total = 0;
        self.bounds
            .iter()
            .zip(&self.counts)
            .map(|(b, c)| {
                total += c;
                (*b, total)
            })
            .collect()
    }
}

/// The routes counted on their own; anything else is `other` (bounded label values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Completions,
    ChatCompletions,
    Embeddings,
    Responses,
    Generate,
    Models,
    Other,
}

impl Route {
    pub const ALL: [Route; 7] = [
        Route::Completions,
        Route::ChatCompletions,
        Route::Embeddings,
        Route::Responses,
        Route::Generate,
        Route::Models,
        Route::Other,
    ];

    pub fn of(path: &[u8]) -> Route {
        match path {
            b"/v1/completions" => Route::Completions,
            b"/v1/chat/completions" => Route::ChatCompletions,
            b"/v1/embeddings" => Route::Embeddings,
            b"/v1/responses" => Route::Responses,
            b"/generate" => Route::Generate,
            b"/v1/models" => Route::Models,
            _ => Route::Other,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Route::Completions => "/v1/completions",
            Route::ChatCompletions => "/v1/chat/completions",
            Route::Embeddings => "/v1/embeddings",
            Route::Responses => "/v1/responses",
            Route::Generate => "/generate",
            Route::Models => "/v1/models",
            Route::Other => "other",
        }
    }

    /// Counted in `vllm_router_generate_duration_seconds` too.
    pub fn generates(self) -> bool {
        matches!(
            self,
            Route::Completions | Route::ChatCompletions | Route::Responses | Route::Generate
        )
    }
}

/// Why a request ended without a worker's success (`error_type` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorType {
    /// Answered by the router itself:
    BadRequest,
    Unauthorized,
    RequestTimeout,
    TooLarge,
    Overloaded,
    UpstreamError,
    NoWorkers,
    Timeout,
    InvalidRequest,
    InternalError,
    /// The worker's own 4xx, passed on (vllm-router's name).
    NonRetryable,
    /// The worker's own 5xx, passed on (after any retries).
    WorkerError,
    /// The worker failed after the response had started; the stream was ended with an
    /// error event (or cut, when it was not an event stream).
    StreamError,
    /// The client left before the response ended.
    ClientDisconnected,
}

impl ErrorType {
    pub const ALL: [ErrorType; 14] = [
        ErrorType::BadRequest,
        ErrorType::Unauthorized,
        ErrorType::RequestTimeout,
        ErrorType::TooLarge,
        ErrorType::Overloaded,
        ErrorType::UpstreamError,
        ErrorType::NoWorkers,
        ErrorType::Timeout,
        ErrorType::InvalidRequest,
        ErrorType::InternalError,
        ErrorType::NonRetryable,
        ErrorType::WorkerError,
        ErrorType::StreamError,
        ErrorType::ClientDisconnected,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ErrorType::BadRequest => "bad_request",
            ErrorType::Unauthorized => "unauthorized",
            ErrorType::RequestTimeout => "request_timeout",
            ErrorType::TooLarge => "too_large",
            ErrorType::Overloaded => "overloaded",
            ErrorType::UpstreamError => "upstream_error",
            ErrorType::NoWorkers => "no_workers",
            ErrorType::Timeout => "timeout",
            ErrorType::InvalidRequest => "invalid_request",
            ErrorType::InternalError => "internal_error",
            ErrorType::NonRetryable => "non_retryable_error",
            ErrorType::WorkerError => "worker_error",
            ErrorType::StreamError => "stream_error",
            ErrorType::ClientDisconnected => "client_disconnected",
        }
    }

    /// The router's own error answer with `status`.
    fn of_router_status(status: u16) -> ErrorType {
        match status {
            400 => ErrorType::BadRequest,
            401 => ErrorType::Unauthorized,
            408 => ErrorType::RequestTimeout,
            413 | 431 => ErrorType::TooLarge,
            429 => ErrorType::Overloaded,
            502 => ErrorType::UpstreamError,
            503 => ErrorType::NoWorkers,
            504 => ErrorType::Timeout,
            s if s < 500 => ErrorType::InvalidRequest,
            _ => ErrorType::InternalError,
        }
    }
}

/// Why a P/D request failed (`vllm_router_pd_errors_total{error_type}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PdError {
    /// The prefill leg ended the request: no prefill worker, retries spent, or its error
    /// answer passed on.
    PrefillFailed,
    /// The prefill worker answered without `kv_transfer_params`.
    NoKvTransferParams,
    /// The decode leg's error answer.
    DecodeFailed,
    /// The decode stream broke off mid-response.
    StreamError,
}

impl PdError {
    pub const ALL: [PdError; 4] = [
        PdError::PrefillFailed,
        PdError::NoKvTransferParams,
        PdError::DecodeFailed,
        PdError::StreamError,
    ];

    pub fn label(self) -> &'static str {
        match self {
            PdError::PrefillFailed => "prefill_failed",
            PdError::NoKvTransferParams => "no_kv_transfer_params",
            PdError::DecodeFailed => "decode_failed",
            PdError::StreamError => "stream_error",
        }
    }
}

/// Per-worker counters, indexed by [`WorkerCount`].
pub const WORKER_COUNTS: usize = 9;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerCount {
    /// Responses from the worker the router used (passed on, or a prefill leg's).
    Processed,
    /// Times the policy chose the worker first for a request.
    Decisions,
    CbSuccess,
    CbFailure,
    PdPrefill,
    PdDecode,
    PdPrefillErrors,
    PdDecodeErrors,
    PdStreamErrors,
}

/// Which leg of a request an attempt serves (P/D counts them apart).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Leg {
    #[default]
    Plain,
    Prefill,
    Decode,
}

/// Counts for one route.
#[derive(Debug)]
pub struct RouteStats {
    pub requests: Counter,
    pub duration: Histogram,
    pub errors: [Counter; ErrorType::ALL.len()],
    pub retries: Counter,
    pub retries_exhausted: Counter,
    pub pd_requests: Counter,
    pub pd_duration: Histogram,
}

impl RouteStats {
    fn new() -> Self {
        RouteStats {
            requests: Counter::default(),
            duration: Histogram::new(DURATION_BUCKETS),
            errors: std::array::from_fn(|_| Counter::default()),
            retries: Counter::default(),
            retries_exhausted: Counter::default(),
            pd_requests: Counter::default(),
            pd_duration: Histogram::new(DURATION_BUCKETS),
        }
    }
}

/// What a policy's selector counts (cache_aware's prefix decisions).
#[derive(Default, Debug)]
pub struct SelectorStats {
    pub cache_hits: Counter,
    pub cache_misses: Counter,
}

/// One shard's metrics.
#[derive(Debug)]
pub struct ShardMetrics {
    pub routes: [RouteStats; Route::ALL.len()],
    /// Per worker slot.
    workers: Box<[[Counter; WORKER_COUNTS]]>,
    pub generate: Histogram,
    /// From the request written to the worker to the worker's response head.
    pub worker_ttfb: Histogram,
    /// From the request head read to the first response body byte written to the client:
    /// time to first token as the router sees it.
    pub ttft: Histogram,
    /// The router's own time: request fully read → written to the worker (first attempt,
    /// no retry), the worker's response head read → written to the client, and in P/D mode
    /// the prefill response read → the decode request written.
    pub added_to_worker: Histogram,
    pub added_to_client: Histogram,
    pub added_between_legs: Histogram,
    pub pd_errors: [Counter; PdError::ALL.len()],
    pub connections: Counter,
    pub connections_closed: Counter,
    pub requests: Counter,
    /// Response heads awaited holding no read buffer (a crowded shard: proxy.rs,
    /// `await_head`).
    pub unbuffered_head_waits: Counter,
    selectors: Mutex<Vec<Arc<SelectorStats>>>,
}

impl ShardMetrics {
    pub fn new(slots: usize) -> Self {
        ShardMetrics {
            routes: std::array::from_fn(|_| RouteStats::new()),
            workers: (0..slots)
                .map(|_| std::array::from_fn(|_| Counter::default()))
                .collect(),
            generate: Histogram::new(DURATION_BUCKETS),
            worker_ttfb: Histogram::new(TTFT_BUCKETS),
            ttft: Histogram::new(TTFT_BUCKETS),
            added_to_worker: Histogram::new(ADDED_BUCKETS),
            added_to_client: Histogram::new(ADDED_BUCKETS),
            added_between_legs: Histogram::new(ADDED_BUCKETS),
            pd_errors: std::array::from_fn(|_| Counter::default()),
            connections: Counter::default(),
            connections_closed: Counter::default(),
            requests: Counter::default(),
            unbuffered_head_waits: Counter::default(),
            selectors: Mutex::new(Vec::new()),
        }
    }

    #[inline]
    pub fn worker(&self, slot: usize, what: WorkerCount) -> &Counter {
        &self.workers[slot][what as usize]
    }

    /// A selector of this shard (counted with the others at scrape time).
    pub fn add_selector(&self, stats: Arc<SelectorStats>) {
        self.selectors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(stats);
    }

    pub fn cache_counts(&self) -> (u64, u64) {
        let s = self.selectors.lock().unwrap_or_else(|e| e.into_inner());
        s.iter().fold((0, 0), |(h, m), x| {
            (h + x.cache_hits.get(), m + x.cache_misses.get())
        })
    }

    /// Counts a request that ended at `end` (nanoseconds, as `now_ns`).
    pub fn record(&self, r: &RequestRecord, end: u64) {
        if r.skip {
            return;
        }
        self.requests.inc();
        let route = &self.routes[r.route as usize];
        let total = end.saturating_sub(r.start);
        route.requests.inc();
        route.duration.observe_ns(total);
        if r.route.generates() {
            self.generate.observe_ns(total);
        }
        if r.retries > 0 {
            route.retries.add(r.retries as u64);
        }
        if r.exhausted {
            route.retries_exhausted.inc();
        }
        if let Some(e) = r.error_type() {
            route.errors[e as usize].inc();
        }
        if r.sent != 0 && r.upstream_head != 0 {
            self.worker_ttfb
                .observe_ns(r.upstream_head.saturating_sub(r.sent));
        }
        if r.first_body != 0 {
            self.ttft.observe_ns(r.first_body.saturating_sub(r.start));
        }
        if r.ready != 0 && r.sent != 0 && r.attempts == 1 {
            let added = r.sent.saturating_sub(r.ready);
            if r.pd && r.decode_started {
                self.added_between_legs.observe_ns(added);
            } else {
                self.added_to_worker.observe_ns(added);
            }
        }
        if r.upstream_head != 0 && r.client_head != 0 {
            self.added_to_client
                .observe_ns(r.client_head.saturating_sub(r.upstream_head));
        }
        if r.pd {
            route.pd_requests.inc();
            route.pd_duration.observe_ns(total);
            if let Some(e) = r.pd_error() {
                self.pd_errors[e as usize].inc();
            }
        }
    }
}

/// One request's facts, gathered by the proxy's phases and counted when it ends.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub route: Route,
    /// Not counted (the router's own endpoints: health probes, the admin API).
    pub skip: bool,
    /// Times, as `now_ns` (0: not yet). The request head read.
    pub start: u64,
    /// The router had what it needed to send the current leg: the request body read, or
    /// in P/D mode the prefill response.
    pub ready: u64,
    /// The current attempt's request written to its worker.
    pub sent: u64,
    pub upstream_head: u64,
    pub client_head: u64,
    pub first_body: u64,
    /// The status the client got (0: none, the client left or the stream was cut before).
    pub status: u16,
    /// The router answered with an error of its own.
    pub router_error: bool,
    /// Attempts in the current leg, and retries in all legs.
    pub attempts: u16,
    pub retries: u16,
    pub exhausted: bool,
    /// The worker whose response the client got, and the prefill worker (P/D).
    pub worker: Option<usize>,
    pub prefill: Option<usize>,
    pub pd: bool,
    pub decode_started: bool,
    pub no_kv: bool,
    /// The worker failed mid-response.
    pub cut: bool,
    pub client_gone: bool,
    pub leg: Leg,
    /// The client asked for a stream (`"stream": true`): its writes up to the first token
    /// leave at once (`crate::send`).
    pub streamed: bool,
}

impl RequestRecord {
    pub fn new(route: Route, start: u64) -> Self {
        RequestRecord {
            route,
            skip: false,
            start,
            ready: 0,
            sent: 0,
            upstream_head: 0,
            client_head: 0,
            first_body: 0,
            status: 0,
            router_error: false,
            attempts: 0,
            retries: 0,
            exhausted: false,
            worker: None,
            prefill: None,
            pd: false,
            decode_started: false,
            no_kv: false,
            cut: false,
            client_gone: false,
            leg: Leg::Plain,
            streamed: false,
        }
    }

    pub fn error_type(&self) -> Option<ErrorType> {
        if self.cut {
            return Some(ErrorType::StreamError);
        }
        if self.router_error {
            return Some(ErrorType::of_router_status(self.status));
        }
        if self.client_gone {
            return Some(ErrorType::ClientDisconnected);
        }
        match self.status {
            400..=499 => Some(ErrorType::NonRetryable),
            500..=599 => Some(ErrorType::WorkerError),
            _ => None,
        }
    }

    fn pd_error(&self) -> Option<PdError> {
        if self.cut {
            return Some(PdError::StreamError);
        }
        if self.no_kv {
            return Some(PdError::NoKvTransferParams);
        }
        if self.status < 400 {
            return None;
        }
        Some(if self.decode_started {
            PdError::DecodeFailed
        } else {
            PdError::PrefillFailed
        })
    }
}

/// Every shard's metrics, and what the scrape subtracts for worker slots that changed
/// hands (a slot's counts belong to the worker that holds it now).
#[derive(Debug)]
pub struct Metrics {
    pub shards: Vec<Arc<ShardMetrics>>,
    baselines: Mutex<Vec<[u64; WORKER_COUNTS]>>,
}

impl Metrics {
    pub fn new(shards: usize, slots: usize) -> Self {
        Metrics {
            shards: (0..shards)
                .map(|_| Arc::new(ShardMetrics::new(slots)))
                .collect(),
            baselines: Mutex::new(vec![[0; WORKER_COUNTS]; slots]),
        }
    }

    fn raw_worker(&self, slot: usize) -> [u64; WORKER_COUNTS] {
        let mut t = [0u64; WORKER_COUNTS];
        for s in &self.shards {
            for (i, c) in s.workers[slot].iter().enumerate() {
                t[i] += c.get();
            }
        }
        t
    }

    /// A slot given to a new worker: its counts start from zero. Called before the worker
    /// is published to the shards (nothing is in flight on a slot being reused).
    pub fn rebase_slot(&self, slot: usize) {
        let now = self.raw_worker(slot);
        if let Some(b) = self
            .baselines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(slot)
        {
            *b = now;
        }
    }

    /// The counts of the worker in `slot`, over all shards.
    pub fn worker(&self, slot: usize) -> [u64; WORKER_COUNTS] {
        let mut t = self.raw_worker(slot);
        let base = self.baselines.lock().unwrap_or_else(|e| e.into_inner())[slot];
        for (v, b) in t.iter_mut().zip(base) {
            *v = v.wrapping_sub(b);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_on_a_bound_is_in_that_bounds_bucket() {
        let h = Histogram::new(DURATION_BUCKETS);
        h.observe(Duration::from_millis(1));
        h.observe(Duration::from_micros(1001));
        h.observe(Duration::from_secs(1000));
        let mut s = h.empty_snapshot();
        h.add_to(&mut s);
        let cum = s.cumulative();
        assert_eq!(cum[0], (0.001, 1));
        assert_eq!(cum[1], (0.005, 2));
        assert_eq!(cum.last().unwrap().1, 2, "1000 s is above every bound");
        assert_eq!(s.count(), 3);
        assert!((s.sum_secs() - 1000.002001).abs() < 1e-9);
    }

    #[test]
    fn a_reused_slot_starts_from_zero() {
        let m = Metrics::new(2, 4);
        m.shards[0].worker(1, WorkerCount::Processed).add(5);
        m.shards[1].worker(1, WorkerCount::Processed).add(2);
        assert_eq!(m.worker(1)[WorkerCount::Processed as usize], 7);
        m.rebase_slot(1);
        assert_eq!(m.worker(1)[WorkerCount::Processed as usize], 0);
        m.shards[1].worker(1, WorkerCount::Processed).inc();
        assert_eq!(m.worker(1)[WorkerCount::Processed as usize], 1);
    }

    #[test]
    fn errors_are_named_by_who_answered() {
        let mut r = RequestRecord::new(Route::Completions, now_ns());
        r.status = 200;
        assert_eq!(r.error_type(), None);
        r.status = 404;
        assert_eq!(r.error_type(), Some(ErrorType::NonRetryable));
        r.router_error = true;
        r.status = 503;
        assert_eq!(r.error_type(), Some(ErrorType::NoWorkers));
        r.router_error = false;
        r.status = 200;
        r.cut = true;
        assert_eq!(r.error_type(), Some(ErrorType::StreamError));
    }
}
