//! The mock's behaviour knobs, fixed for its life (two of them, health and fail rate, can be
//! changed at run time through `MockState`). Per-request overrides by header live in `knobs`.

use std::time::Duration;

/// How one mock vLLM worker behaves.
#[derive(Clone, Debug)]
pub struct MockConfig {
    /// Worker name, sent back in every response as `x-mock-worker`.
    pub name: String,
    /// The one served model name (`--served-model-name`); other names get vLLM's 404.
    pub model: String,
    /// Time to first token.
    pub ttft: Duration,
    /// Inter-token delay.
    pub itl: Duration,
    /// Completion tokens when the request gives no `max_tokens` (finish_reason "stop").
    pub tokens: usize,
    /// Fraction of generation requests answered 500 with a vLLM-style JSON error.
    pub fail_rate: f64,
    /// Streams: stop sending after N tokens and keep the connection open until the client
    /// leaves (or the server shuts down).
    pub hang_after: Option<usize>,
    /// Streams: close the connection without finishing the response after N tokens.
    pub drop_after: Option<usize>,
    /// Extra TTFT per generation request already in flight on this worker.
    pub ttft_per_inflight: Duration,
    /// How long a NIXL prefill leg (`kv_transfer_params.do_remote_decode: true`) takes.
    pub prefill_delay: Duration,
    /// Tokio worker threads for [`crate::MockServer`] (1 = current-thread runtime).
    pub threads: usize,
    /// Record every request in `received()`.
    pub record: bool,
    /// At most this many recorded requests are kept (oldest dropped first).
    pub record_limit: usize,
    /// `max_model_len` reported by `/v1/models` and `/tokenize`.
    pub max_model_len: usize,
    /// Requests beyond this many in flight count as waiting in `/metrics` and the ORCA header.
    pub max_num_seqs: usize,
    /// `--sse-keep-alive-interval`: send `: keep-alive\n\n` when a stream is idle this long.
    pub sse_keep_alive: Option<Duration>,
    /// `--report-timing`: a generation's own time rides with it, so a benchmark can take
    /// exactly the mocks' part out of what its client measured: a NIXL prefill answer
    /// carries `mock_service_us` in its `kv_transfer_params` (a router copies them to the
    /// decode leg), and a stream's first token carries `mock_timing_us`, the time from the
    /// request's arrival to that token plus any `mock_service_us` its request carried.
    pub report_timing: bool,
    /// `--enable-request-id-headers`: echo `x-request-id` (or a fresh one) on every response.
    /// Real vLLM's default is off; the mock's default is on.
    pub request_id_headers: bool,
    /// Simulated prefix cache capacity, in blocks of `prefix_block_bytes` (0 = no cache). See
    /// `prefix_cache`: a request's leading blocks found in the cache are not prefilled again.
    pub prefix_cache_blocks: usize,
    /// Prefix cache block size, in bytes of routing text (vLLM's blocks are 16 tokens; 64
    /// bytes is 16 tokens at 4 bytes a token).
    pub prefix_block_bytes: usize,
    /// Extra TTFT per KiB of prompt routing text not found in the prefix cache (all of it when
    /// the cache is off). Not charged to NIXL decode legs, whose KV comes from the prefill leg.
    pub prefill_per_kb: Duration,
    /// Answer `/v1/embeddings` (as vLLM serving an embedding model). Off by default: vLLM
    /// serving a generative model, as the mock does, has no such route (404
    /// `{"detail":"Not Found"}`).
    pub embeddings: bool,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            name: "mock".to_string(),
            model: "mock-model".to_string(),
            ttft: Duration::ZERO,
            itl: Duration::ZERO,
            tokens: 16,
            fail_rate: 0.0,
            hang_after: None,
            drop_after: None,
            ttft_per_inflight: Duration::ZERO,
            prefill_delay: Duration::ZERO,
            threads: 1,
            record: true,
            record_limit: 10_000,
            max_model_len: 4096,
            max_num_seqs: 256,
            sse_keep_alive: None,
            report_timing: false,
            request_id_headers: true,
            prefix_cache_blocks: 0,
            prefix_block_bytes: 64,
            prefill_per_kb: Duration::ZERO,
            embeddings: false,
        }
    }
}

impl MockConfig {
    /// Default config with this worker name.
    pub fn named(name: impl Into<String>) -> Self {
        MockConfig {
            name: name.into(),
            ..MockConfig::default()
        }
    }
}
