//! Command-line flags: vllm-router's names and defaults for everything the router does,
//! plus ringrouter's own (shards, pinning, io driver, demo). A bad value fails at start
//! with a message naming the flag.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::{ArgAction, Parser, ValueEnum};
use shards::{DataPlaneConfig, IoDriver, Policy, PolicyConfig, WorkerSet};

#[derive(Parser, Debug)]
#[command(
    name = "ringrouter",
    version,
    about = "Thread-per-core io_uring router for vLLM fleets (drop-in for vllm-router)"
)]
pub struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,

    /// Port to listen on.
    #[arg(long, default_value_t = 30000)]
    pub port: u16,

    /// Worker URLs (http://host:port, or grpc://host:port for an engine behind vLLM's gRPC
    /// API, which the router then serves as its OpenAI front end), space separated or repeated.
    #[arg(long, num_args = 1.., value_name = "URL")]
    pub worker_urls: Vec<String>,

    /// Routing policy: round_robin, random, consistent_hash, power_of_two, cache_aware,
    /// or load_aware (ringrouter's).
    #[arg(long, default_value = "cache_aware", value_parser = parse_policy)]
    pub policy: Policy,

    /// Prefill/decode disaggregation (vLLM with the NIXL connector): each generation request
    /// is a prefill leg on a --prefill worker, then a decode leg on a --decode worker.
    #[arg(long = "vllm-pd-disaggregation", visible_alias = "pd-disaggregation")]
    pub pd_disaggregation: bool,

    /// P/D mode: a prefill worker, and its bootstrap port or `none` (repeatable).
    #[arg(long, num_args = 1..=2, action = ArgAction::Append, value_names = ["URL", "BOOTSTRAP_PORT"])]
    pub prefill: Vec<String>,

    /// P/D mode: a decode worker (repeatable).
    #[arg(long, action = ArgAction::Append, value_name = "URL")]
    pub decode: Vec<String>,

    /// [ringrouter] P/D mode: when a prefill worker answers without `kv_transfer_params`,
    /// run the decode leg on the client's body as is (the decode worker prefills itself)
    /// instead of answering 502.
    #[arg(long)]
    pub pd_fallback_decode_only: bool,

    /// [ringrouter] P/D mode: prompts shorter than this many bytes of text skip the prefill
    /// leg and go straight to a decode worker (0: every prompt is prefilled).
    #[arg(long, default_value_t = 0)]
    pub pd_min_prompt_chars: usize,

    /// gRPC workers: the model's directory (tokenizer.json, tokenizer_config.json, its chat
    /// template, generation_config.json). Without it (or --tokenizer-path) the tokenizer is
    /// fetched from a worker (GetTokenizer).
    #[arg(long, value_name = "DIR")]
    pub model_path: Option<std::path::PathBuf>,

    /// gRPC workers: the tokenizer's directory, if not --model-path.
    #[arg(long, value_name = "DIR")]
    pub tokenizer_path: Option<std::path::PathBuf>,

    /// gRPC workers: the chat template (a file, or the template itself) instead of the
    /// model's.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<String>,

    /// Policy for prefill workers in P/D mode (default: --policy).
    #[arg(long, value_parser = parse_policy)]
    pub prefill_policy: Option<Policy>,

    /// Policy for decode workers in P/D mode (default: --policy).
    #[arg(long, value_parser = parse_policy)]
    pub decode_policy: Option<Policy>,

    /// Data-parallel ranks per worker: each worker URL without an explicit rank becomes
    /// URL@0 .. URL@N-1, each its own routing target, sent `X-data-parallel-rank` (for
    /// workers given at start, the worker's /get_server_info `dp_size` is used instead when
    /// it answers; workers added or discovered later get N ranks).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub intra_node_data_parallel_size: u32,

    /// cache_aware: least prefix match ratio that routes by cache.
    #[arg(long, default_value_t = 0.3, value_parser = parse_ratio)]
    pub cache_threshold: f64,

    /// cache_aware: load is imbalanced when max − min in-flight exceeds this ...
    #[arg(long, default_value_t = 64)]
    pub balance_abs_threshold: u32,

    /// ... and max exceeds min times this.
    #[arg(long, default_value_t = 1.5, value_parser = parse_positive)]
    pub balance_rel_threshold: f64,

    /// cache_aware: vllm-router trims its tree every this many seconds; ringrouter's prefix
    /// index stays within --max-tree-size at all times, so this is accepted and not needed.
    #[arg(long, default_value_t = 120)]
    pub eviction_interval_secs: u64,

    /// cache_aware / load_aware: bound of the prefix index, in bytes of routing text.
    #[arg(long, default_value_t = 67_108_864, value_parser = clap::value_parser!(u64).range(64..))]
    pub max_tree_size: u64,

    /// [ringrouter] Scrape each worker's /metrics for vLLM's load gauges this often, in
    /// milliseconds, for load-using policies (0: off; in-band reports still count).
    #[arg(long, default_value_t = 1000)]
    pub load_scrape_interval_ms: u64,

    /// [ringrouter] load_aware: how many queued requests a full prefix-cache hit is worth.
    #[arg(long, default_value_t = 16.0, value_parser = parse_positive)]
    pub load_aware_prefix_weight: f64,

    /// Largest request body accepted, in bytes (413 beyond).
    #[arg(long, default_value_t = 536_870_912)]
    pub max_payload_size: usize,

    /// Bound on a whole request, in seconds.
    #[arg(long, default_value_t = 1800, value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout_secs: u64,

    /// Log level (vllm-router's `warning` and `critical` are `warn` and `error`; `RUST_LOG`
    /// overrides).
    #[arg(long, default_value = "info", value_parser = log_level_parser())]
    pub log_level: String,

    /// Also write the log to `ringrouter.log` in this directory (created if missing).
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<std::path::PathBuf>,

    /// [ringrouter] Log JSON lines (one object per event) instead of key=value text.
    #[arg(long)]
    pub log_json: bool,

    /// Check the flags (parsing and the checks made before anything starts) and exit: 0
    /// when they are valid. For tests of deployment manifests.
    #[arg(long, hide = true)]
    pub check_config: bool,

    /// [ringrouter] Number of shards (threads with their own io runtime and listener);
    /// default: one per core.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub shards: Option<u16>,

    /// [ringrouter] Pin each shard to its own core (default on).
    #[arg(long = "pin-cores", overrides_with = "no_pin_cores", action = ArgAction::SetTrue)]
    pub pin_cores: bool,

    /// [ringrouter] Do not pin shards to cores.
    #[arg(long = "no-pin-cores", action = ArgAction::SetTrue)]
    pub no_pin_cores: bool,

    /// [ringrouter] io driver: auto (io_uring, else epoll), uring (fail without it), epoll.
    #[arg(long, value_enum, default_value_t = DriverArg::Auto)]
    pub io_driver: DriverArg,

    /// [ringrouter] Requests waiting for a worker's response head on one shard above which
    /// each waits for readiness before it takes a read buffer (1 KiB less per request
    /// waiting, e.g. non-streamed ones whose answer comes whole; a little more CPU per
    /// request); 0: always.
    #[arg(long, default_value_t = 512)]
    pub head_wait_poll_above: usize,

    /// [ringrouter] Largest request head (request line + headers), in bytes (431 beyond).
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u64).range(1024..=16_777_216))]
    pub max_header_size: u64,

    /// [ringrouter] Seconds an idle client keep-alive connection stays open.
    #[arg(long, default_value_t = 75, value_parser = clap::value_parser!(u64).range(1..))]
    pub client_keepalive_timeout_secs: u64,

    /// [ringrouter] Seconds a client has to send a whole request head (and between body reads).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub client_header_timeout_secs: u64,

    /// On SIGTERM/SIGINT: stop accepting, answer /readiness with 503, let requests in flight
    /// finish for at most this many seconds, then exit 0.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace_secs: u64,

    /// [ringrouter] Start 4 built-in mock vLLM workers on loopback and route to them.
    #[arg(long)]
    pub demo: bool,

    /// Address of the Prometheus metrics endpoint (`GET /metrics`).
    #[arg(long, default_value = "127.0.0.1")]
    pub prometheus_host: IpAddr,

    /// Port of the Prometheus metrics endpoint [default: 29000; 0: any free port, printed
    /// at start]. When the default port is taken the router starts without metrics (and
    /// says so); a port given here that cannot be bound fails the start.
    #[arg(long)]
    pub prometheus_port: Option<u16>,

    /// [ringrouter] One log line per request (target `ringrouter::access`): request id,
    /// route, status, worker(s), attempts, error type, time to first token, total time.
    #[arg(long)]
    pub access_log: bool,

    #[command(flatten)]
    pub reliability: ReliabilityArgs,

    #[command(flatten)]
    pub discovery: crate::control::discovery::DiscoveryArgs,

    /// vllm-router's flags for features ringrouter does not have.
    #[command(flatten, next_help_heading = "vllm-router flags not supported")]
    pub vllm_router_only: crate::compat::VllmRouterOnly,
}

/// Health checks, circuit breakers, retries, admission and auth (vllm-router's names and
/// defaults unless marked).
#[derive(clap::Args, Debug)]
#[command(next_help_heading = "Health, breakers, retries, admission, auth")]
pub struct ReliabilityArgs {
    /// Seconds between active health checks of each worker ([ringrouter] 0: no checks;
    /// workers are routable as soon as they are added).
    #[arg(long, default_value_t = 60)]
    pub health_check_interval_secs: u64,

    /// Seconds a health check may take.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub health_check_timeout_secs: u64,

    /// Path checked on each worker (any 2xx is healthy).
    #[arg(long, default_value = "/health", value_parser = parse_endpoint)]
    pub health_check_endpoint: String,

    /// Consecutive failed checks that make a healthy worker unhealthy.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub health_failure_threshold: u32,

    /// Consecutive good checks that make an unhealthy worker healthy again.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub health_success_threshold: u32,

    /// Workers start unknown and are routed to after their first good check; while
    /// unknown they are checked every --worker-startup-check-interval for this long, then
    /// every --health-check-interval-secs. 0: route to workers at once, before any check.
    #[arg(long, default_value_t = 600)]
    pub worker_startup_timeout_secs: u64,

    /// Seconds between checks of a worker that is not yet healthy, during startup.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub worker_startup_check_interval: u64,

    /// Consecutive failures (connect errors, resets, 5xx, timeouts), from any shard, that
    /// open a worker's circuit breaker.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub cb_failure_threshold: u32,

    /// Successful probes in a row that close a half-open breaker.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub cb_success_threshold: u32,

    /// Seconds an open breaker stays open before probing the worker.
    #[arg(long, default_value_t = 60)]
    pub cb_timeout_duration_secs: u64,

    /// Accepted for compatibility: ringrouter's breaker counts consecutive failures, not
    /// failures within a window.
    #[arg(long, default_value_t = 120)]
    pub cb_window_duration_secs: u64,

    /// Never open circuit breakers.
    #[arg(long)]
    pub disable_circuit_breaker: bool,

    /// Attempts per request in all, the first included (retries go to other workers, only
    /// before any response byte reached the client).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub retry_max_retries: u32,

    /// Backoff before the first retry after a retryable status, in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub retry_initial_backoff_ms: u64,

    /// Largest backoff, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    pub retry_max_backoff_ms: u64,

    /// Backoff growth per retry.
    #[arg(long, default_value_t = 1.5, value_parser = parse_positive)]
    pub retry_backoff_multiplier: f64,

    /// Backoff varies by up to this fraction either way.
    #[arg(long, default_value_t = 0.2, value_parser = parse_ratio)]
    pub retry_jitter_factor: f64,

    /// One attempt per request (same as --retry-max-retries 1).
    #[arg(long)]
    pub disable_retries: bool,

    /// Requests with a worker at once, across all shards.
    #[arg(long, default_value_t = 32768, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_requests: u32,

    /// Requests that may wait for a slot beyond --max-concurrent-requests (429 beyond;
    /// 0: 429 at once).
    #[arg(long, default_value_t = 100)]
    pub queue_size: u32,

    /// Seconds a request may wait for a slot (408 after).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub queue_timeout_secs: u64,

    /// [ringrouter] A worker that sends nothing mid-response for this many seconds is cut
    /// and counted as failed; the client's stream ends with an error event.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub stream_idle_timeout_secs: u64,

    /// [ringrouter] Require `Authorization: Bearer <key>` from clients (repeatable: any of
    /// the keys). Health probes and /version stay open.
    #[arg(long = "client-api-key", value_name = "KEY")]
    pub client_api_keys: Vec<String>,

    /// Sent to workers as `Authorization: Bearer <key>` (replacing the client's).
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
}

/// P/D mode's workers from the flags.
#[derive(Debug, Default)]
pub struct PdWorkers {
    /// URL and bootstrap port.
    pub prefill: Vec<(String, Option<u16>)>,
    pub decode: Vec<String>,
}

fn parse_endpoint(s: &str) -> Result<String, String> {
    if s.starts_with('/') {
        Ok(s.to_string())
    } else {
        Err(format!("'{s}' is not a path (it must start with '/')"))
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DriverArg {
    Auto,
    Uring,
    Epoll,
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("'{s}' is not a number between 0 and 1")),
    }
}

/// `--log-level`: ours and vllm-router's names, as the `tracing` level they mean.
fn log_level_parser() -> impl clap::builder::TypedValueParser<Value = String> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new([
        "trace", "debug", "info", "warn", "warning", "error", "critical",
    ])
    .map(|s| {
        match s.as_str() {
            "warning" => "warn",
            "critical" => "error",
            other => other,
        }
        .to_string()
    })
}

fn parse_positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("'{s}' is not a non-negative number")),
    }
}

fn parse_policy(s: &str) -> Result<Policy, String> {
    match s {
        "kv_aware" => Err(concat!(
            "vllm-router's kv_aware (routing by KV events) is not supported by ringrouter; ",
            "cache_aware or load_aware route by prompt prefix"
        )
        .into()),
        "sticky_least_loaded" => Err(concat!(
            "vllm-router's sticky_least_loaded is not supported by ringrouter; ",
            "consistent_hash keeps sessions on a worker"
        )
        .into()),
        _ => s.parse(),
    }
}

impl Cli {
    /// The data plane's settings; it starts with no workers (the control plane publishes
    /// them).
    pub fn data_plane_config(&self) -> DataPlaneConfig {
        let mut cfg =
            DataPlaneConfig::new(SocketAddr::new(self.host, self.port), WorkerSet::default());
        cfg.shards = match self.shards {
            Some(n) => n as usize,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        cfg.pin_cores = !self.no_pin_cores || self.pin_cores;
        cfg.io_driver = match self.io_driver {
            DriverArg::Auto => IoDriver::Auto,
            DriverArg::Uring => IoDriver::Uring,
            DriverArg::Epoll => IoDriver::Epoll,
        };
        cfg.head_wait_poll_above = self.head_wait_poll_above;
        let mut policy = PolicyConfig::new(self.policy);
        policy.cache_threshold = self.cache_threshold;
        policy.balance_abs_threshold = self.balance_abs_threshold;
        policy.balance_rel_threshold = self.balance_rel_threshold;
        policy.max_tree_size = self.max_tree_size as usize;
        policy.prefix_weight = self.load_aware_prefix_weight;
        if self.pd_disaggregation {
            let mut prefill = policy.clone();
            prefill.policy = self.prefill_policy.unwrap_or(self.policy);
            policy.policy = self.decode_policy.unwrap_or(self.policy);
            cfg.pd = Some(shards::config::PdConfig {
                prefill_policy: prefill,
                fallback_decode_only: self.pd_fallback_decode_only,
                min_prompt_chars: self.pd_min_prompt_chars,
            });
        }
        cfg.policy = policy;
        cfg.max_payload_size = self.max_payload_size;
        cfg.max_header_bytes = self.max_header_size as usize;
        cfg.request_timeout = Duration::from_secs(self.request_timeout_secs);
        cfg.keepalive_timeout = Duration::from_secs(self.client_keepalive_timeout_secs);
        cfg.header_read_timeout = Duration::from_secs(self.client_header_timeout_secs);
        let r = &self.reliability;
        cfg.retry = shards::retry::RetryConfig {
            max_attempts: if r.disable_retries {
                1
            } else {
                r.retry_max_retries
            },
            initial_backoff: Duration::from_millis(r.retry_initial_backoff_ms),
            max_backoff: Duration::from_millis(r.retry_max_backoff_ms),
            multiplier: r.retry_backoff_multiplier,
            jitter: r.retry_jitter_factor,
        };
        cfg.breaker = shards::breaker::BreakerConfig {
            enabled: !r.disable_circuit_breaker,
            failure_threshold: r.cb_failure_threshold,
            success_threshold: r.cb_success_threshold,
            open_for: Duration::from_secs(r.cb_timeout_duration_secs),
        };
        cfg.admission = shards::admission::AdmissionConfig {
            max_concurrent: r.max_concurrent_requests,
            queue_size: r.queue_size,
            queue_timeout: Duration::from_secs(r.queue_timeout_secs),
        };
        cfg.stream_idle_timeout = Duration::from_secs(r.stream_idle_timeout_secs);
        cfg.client_api_keys = r.client_api_keys.clone();
        cfg.worker_api_key = r.api_key.clone();
        cfg.access_log = self.access_log;
        cfg
    }

    /// The P/D workers: prefill (with their bootstrap ports) and decode. Checks that the
    /// flags agree with the mode.
    pub fn pd_workers(&self) -> Result<PdWorkers, String> {
        let mut w = PdWorkers::default();
        if !self.pd_disaggregation {
            if !self.prefill.is_empty() || !self.decode.is_empty() {
                return Err("--prefill and --decode need --vllm-pd-disaggregation".into());
            }
            return Ok(w);
        }
        if !self.worker_urls.is_empty() {
            return Err("--worker-urls cannot be used with --vllm-pd-disaggregation: give                         prefill workers as --prefill URL [BOOTSTRAP_PORT] and decode workers as                         --decode URL"
                .into());
        }
        if self.demo {
            return Err("--demo cannot be used with --vllm-pd-disaggregation".into());
        }
        // clap flattens the occurrences' values; a URL has a scheme, a bootstrap port
        // (or `none`) follows its URL.
        let mut has_port = false;
        for v in &self.prefill {
            if v.contains("://") {
                w.prefill.push((v.clone(), None));
                has_port = false;
                continue;
            }
            let Some(last) = w.prefill.last_mut().filter(|_| !has_port) else {
                return Err(format!(
                    "--prefill {v}: expected --prefill URL [BOOTSTRAP_PORT|none], with the URL \
                     as http://host:port"
                ));
            };
            has_port = true;
            if !v.eq_ignore_ascii_case("none") {
                last.1 = Some(v.parse::<u16>().map_err(|_| {
                    format!(
                        "--prefill {} {v}: the bootstrap port must be a port number or 'none'",
                        last.0
                    )
                })?);
            }
        }
        w.decode = self.decode.clone();
        Ok(w)
    }

    /// Whether any policy in use reads worker load.
    pub fn uses_load(&self) -> bool {
        let cfg = self.data_plane_config();
        cfg.policy.policy.uses_load()
            || cfg
                .pd
                .is_some_and(|pd| pd.prefill_policy.policy.uses_load())
    }

    /// Whether a policy keeps a prefix index (cache_aware, load_aware): gRPC engines' KV
    /// events then feed it.
    pub fn indexes_prefixes(&self) -> bool {
        let cfg = self.data_plane_config();
        let prefix =
            |p: shards::Policy| matches!(p, shards::Policy::CacheAware | shards::Policy::LoadAware);
        prefix(cfg.policy.policy) || cfg.pd.is_some_and(|pd| prefix(pd.prefill_policy.policy))
    }

    /// Active health checking as the flags say.
    pub fn health_config(&self) -> crate::control::registry::HealthConfig {
        let r = &self.reliability;
        crate::control::registry::HealthConfig {
            enabled: r.health_check_interval_secs > 0,
            interval: Duration::from_secs(r.health_check_interval_secs.max(1)),
            timeout: Duration::from_secs(r.health_check_timeout_secs),
            endpoint: r.health_check_endpoint.clone(),
            failure_threshold: r.health_failure_threshold,
            success_threshold: r.health_success_threshold,
            startup_timeout: Duration::from_secs(r.worker_startup_timeout_secs),
            startup_check_interval: Duration::from_secs(r.worker_startup_check_interval),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_vllm_router() {
        let cli = Cli::try_parse_from(["ringrouter"]).unwrap();
        assert_eq!(cli.policy, Policy::CacheAware);
        assert_eq!(cli.cache_threshold, 0.3);
        assert_eq!(cli.balance_abs_threshold, 64);
        assert_eq!(cli.balance_rel_threshold, 1.5);
        assert_eq!(cli.eviction_interval_secs, 120);
        assert_eq!(cli.host.to_string(), "127.0.0.1");
        assert_eq!(cli.port, 30000);
        assert_eq!(cli.max_payload_size, 536_870_912);
        assert_eq!(cli.request_timeout_secs, 1800);
        assert_eq!(cli.log_level, "info");
        let cfg = cli.data_plane_config();
        assert!(cfg.pin_cores);
        assert_eq!(cfg.retry.max_attempts, 5);
        assert_eq!(cfg.breaker.failure_threshold, 10);
        assert_eq!(cfg.admission.max_concurrent, 32768);
        assert_eq!(cfg.admission.queue_size, 100);
        let h = cli.health_config();
        assert!(h.enabled);
        assert_eq!(h.interval.as_secs(), 60);
        assert_eq!((h.failure_threshold, h.success_threshold), (3, 2));
        assert_eq!(h.endpoint, "/health");
    }

    #[test]
    fn log_level_takes_vllm_routers_names_too() {
        for (given, level) in [
            ("trace", "trace"),
            ("debug", "debug"),
            ("info", "info"),
            ("warn", "warn"),
            ("warning", "warn"),
            ("error", "error"),
            ("critical", "error"),
        ] {
            let cli = Cli::try_parse_from(["ringrouter", "--log-level", given]).unwrap();
            assert_eq!(cli.log_level, level, "--log-level {given}");
        }
        assert!(Cli::try_parse_from(["ringrouter", "--log-level", "verbose"]).is_err());
        let cli = Cli::try_parse_from(["ringrouter"]).unwrap();
        assert!(cli.log_dir.is_none() && !cli.log_json);
    }

    #[test]
    fn worker_urls_take_several_values() {
        let cli = Cli::try_parse_from([
            "ringrouter",
            "--policy",
            "random",
            "--worker-urls",
            "http://127.0.0.1:1",
            "http://127.0.0.1:2",
            "--no-pin-cores",
        ])
        .unwrap();
        assert_eq!(cli.worker_urls.len(), 2);
        assert!(!cli.data_plane_config().pin_cores);
    }

    #[test]
    fn bad_values_name_their_flag() {
        let e = Cli::try_parse_from(["ringrouter", "--port", "70000"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--port"), "{e}");
        let e = Cli::try_parse_from(["ringrouter", "--cache-threshold", "1.5"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--cache-threshold"), "{e}");
        let e = Cli::try_parse_from(["ringrouter", "--policy", "fastest"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--policy") && e.contains("round_robin"), "{e}");
        let e = Cli::try_parse_from(["ringrouter", "--io-driver", "kqueue"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--io-driver"), "{e}");
        let e = Cli::try_parse_from(["ringrouter", "--health-check-endpoint", "health"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--health-check-endpoint"), "{e}");
        let cli = Cli::try_parse_from(["ringrouter", "--disable-retries"]).unwrap();
        assert_eq!(cli.data_plane_config().retry.max_attempts, 1);
    }

    #[test]
    fn pd_flags_as_vllm_router() {
        let cli = Cli::try_parse_from([
            "ringrouter",
            "--pd-disaggregation",
            "--prefill",
            "http://127.0.0.1:1",
            "8998",
            "--prefill",
            "http://127.0.0.1:2",
            "--prefill",
            "http://127.0.0.1:3",
            "none",
            "--decode",
            "http://127.0.0.1:4",
            "--decode",
            "http://127.0.0.1:5",
            "--policy",
            "random",
            "--prefill-policy",
            "round_robin",
        ])
        .unwrap();
        let w = cli.pd_workers().unwrap();
        assert_eq!(
            w.prefill,
            vec![
                ("http://127.0.0.1:1".to_string(), Some(8998)),
                ("http://127.0.0.1:2".to_string(), None),
                ("http://127.0.0.1:3".to_string(), None),
            ]
        );
        assert_eq!(w.decode.len(), 2);
        let cfg = cli.data_plane_config();
        let pd = cfg.pd.expect("P/D mode");
        assert_eq!(pd.prefill_policy.policy, Policy::RoundRobin);
        assert_eq!(cfg.policy.policy, Policy::Random);
        assert!(!pd.fallback_decode_only);
        assert_eq!(pd.min_prompt_chars, 0);
    }

    #[test]
    fn pd_flags_refused_when_inconsistent() {
        let parse = |args: &[&str]| {
            let mut all = vec!["ringrouter"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).unwrap().pd_workers().unwrap_err()
        };
        let e = parse(&[
            "--vllm-pd-disaggregation",
            "--worker-urls",
            "http://127.0.0.1:1",
        ]);
        assert!(
            e.contains("--worker-urls") && e.contains("--prefill"),
            "{e}"
        );
        let e = parse(&[
            "--vllm-pd-disaggregation",
            "--prefill",
            "http://127.0.0.1:1",
            "port",
        ]);
        assert!(e.contains("bootstrap port"), "{e}");
        let e = parse(&["--prefill", "http://127.0.0.1:1"]);
        assert!(e.contains("--vllm-pd-disaggregation"), "{e}");
        // Plain mode has no P/D config.
        let cli = Cli::try_parse_from(["ringrouter"]).unwrap();
        assert!(cli.data_plane_config().pd.is_none());
    }
}
