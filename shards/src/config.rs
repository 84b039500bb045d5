//! The data plane's settings, as decided by the binary's CLI. Plain data: every shard gets
//! a clone at start.

use std::net::SocketAddr;
use std::time::Duration;

use crate::admission::AdmissionConfig;
use crate::breaker::BreakerConfig;
use crate::retry::RetryConfig;
use crate::route::{Policy, PolicyConfig, WorkerSet};

/// Which io driver each shard runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoDriver {
    /// io_uring when the kernel (and seccomp) allow it, else epoll.
    Auto,
    /// io_uring or fail at start.
    Uring,
    /// epoll (monoio's legacy driver).
    Epoll,
}

#[derive(Clone, Debug)]
pub struct DataPlaneConfig {
    pub listen: SocketAddr,
    pub shards: usize,
    pub pin_cores: bool,
    pub io_driver: IoDriver,
    /// Requests waiting for a response head on one shard above which each waits for
    /// readiness before it takes a read buffer (proxy.rs, `await_head`).
    pub head_wait_poll_above: usize,
    /// The workers at start (the control plane publishes later sets).
    pub workers: WorkerSet,
    /// Worker slots on the load board: the most workers (and DP ranks) routable at once.
    pub max_workers: usize,
    pub policy: PolicyConfig,
    pub retry: RetryConfig,
    pub breaker: BreakerConfig,
    pub admission: AdmissionConfig,
    /// A worker that sends nothing mid-response for this long is cut (and counted as
    /// failed); the client's stream ends with an error event. Checked lazily: the cut
    /// comes between one and two times this after the last byte.
    pub stream_idle_timeout: Duration,
    /// `Authorization: Bearer` keys clients must present (none = no client auth).
    pub client_api_keys: Vec<String>,
    /// Sent to workers as `Authorization: Bearer` (replacing the client's).
    pub worker_api_key: Option<String>,
    /// Where the worker admin API's requests go (the control plane); none = 503.
    pub admin: Option<crate::admin::AdminSender>,
    /// Largest request body accepted (413 beyond).
    pub max_payload_size: usize,
    /// Largest request head accepted (431 beyond).
    pub max_header_bytes: usize,
    /// A whole request, from its head being read to the last response byte.
    pub request_timeout: Duration,
    /// Time a client has to send a complete request head once it started one.
    pub header_read_timeout: Duration,
    /// Time an idle keep-alive client connection is kept open between requests.
    pub keepalive_timeout: Duration,
    /// Time to establish a TCP connection to a worker.
    pub connect_timeout: Duration,
    /// An idle pooled upstream connection older than this is not reused (vLLM's uvicorn
    /// closes idle connections after 5 s).
    pub upstream_idle_timeout: Duration,
    /// Idle upstream connections kept per worker per shard.
    pub pool_max_idle_per_worker: usize,
    /// Prefill/decode disaggregation; `policy` is then the decode workers' policy.
    pub pd: Option<PdConfig>,
    /// One log line per request (target `ringrouter::access`, level info).
    pub access_log: bool,
    /// The OpenAI front end for gRPC workers (none: requests to them are refused).
    pub model: Option<Model>,
}

/// The model gRPC workers serve: the router tokenizes and renders for it.
#[derive(Clone)]
pub struct Model {
    pub ctx: std::sync::Arc<frontend::openai::ModelContext>,
    /// The model's path on the engines (`root` in `/v1/models`).
    pub root: String,
    /// The engines' KV-cache block size in tokens: cache-aware routing hashes whole blocks.
    pub block_tokens: usize,
    /// The engines' vLLM version (`GET /version`), if they said.
    pub version: Option<String>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Model({})", self.ctx.served_model_name)
    }
}

impl Model {
    /// `GET /v1/models` as vLLM answers it.
    pub fn models_body(&self) -> Vec<u8> {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let perm = format!("modelperm-{:016x}", fastrand::u64(..));
        let q = |v: &str| serde_json::Value::from(v).to_string();
        // Written out, for vLLM's key order.
        format!(
            concat!(
                r#"{{"object":"list","data":[{{"id":{id},"object":"model","created":{c},"#,
                r#""owned_by":"vllm","root":{root},"parent":null,"max_model_len":{len},"#,
                r#""permission":[{{"id":"{perm}","object":"model_permission","created":{c},"#,
                r#""allow_create_engine":false,"allow_sampling":true,"allow_logprobs":true,"#,
                r#""allow_search_indices":false,"allow_view":true,"allow_fine_tuning":false,"#,
                r#""organization":"*","group":null,"is_blocking":false}}]}}]}}"#
            ),
            id = q(&self.ctx.served_model_name),
            c = created,
            root = q(&self.root),
            len = self.ctx.max_model_len,
            perm = perm,
        )
        .into_bytes()
    }
}

/// P/D mode: each generation request is a prefill leg on a prefill worker, then a decode
/// leg on a decode worker (see `pd`).
#[derive(Clone, Debug)]
pub struct PdConfig {
    /// How prefill workers are chosen.
    pub prefill_policy: PolicyConfig,
    /// A prefill response without `kv_transfer_params` runs the decode leg with the
    /// client's body as is (the decode worker prefills itself) instead of failing with 502.
    pub fallback_decode_only: bool,
    /// Prompts with less routing text than this many bytes skip the prefill leg.
    pub min_prompt_chars: usize,
}

impl DataPlaneConfig {
    pub fn new(listen: SocketAddr, workers: WorkerSet) -> Self {
        DataPlaneConfig {
            listen,
            shards: 1,
            pin_cores: false,
            io_driver: IoDriver::Auto,
            head_wait_poll_above: 512,
            max_workers: 1024.max(workers.len()),
            workers,
            policy: PolicyConfig::new(Policy::RoundRobin),
            retry: RetryConfig::default(),
            breaker: BreakerConfig::default(),
            admission: AdmissionConfig::default(),
            stream_idle_timeout: Duration::from_secs(300),
            client_api_keys: Vec::new(),
            worker_api_key: None,
            admin: None,
            max_payload_size: 536_870_912,
            max_header_bytes: 64 * 1024,
            request_timeout: Duration::from_secs(1800),
            header_read_timeout: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(75),
            connect_timeout: Duration::from_secs(5),
            upstream_idle_timeout: Duration::from_secs(4),
            pool_max_idle_per_worker: 256,
            pd: None,
            access_log: false,
            model: None,
        }
    }
}
