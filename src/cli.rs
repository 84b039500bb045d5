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

    /// Worker URLs (http://host:port), space separated or repeated.
    #[arg(long, num_args = 1.., value_name = "URL")]
    pub worker_urls: Vec<String>,

    /// Routing policy: round_robin, random, consistent_hash, power_of_two, cache_aware,
    /// or load_aware (ringrouter's).
    #[arg(long, default_value = "cache_aware", value_parser = parse_policy)]
    pub policy: Policy,

    /// Policy for prefill workers in P/D mode (default: --policy).
    #[arg(long, value_parser = parse_policy)]
    pub prefill_policy: Option<Policy>,

    /// Policy for decode workers in P/D mode (default: --policy).
    #[arg(long, value_parser = parse_policy)]
    pub decode_policy: Option<Policy>,

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

    /// Log level.
    #[arg(long, default_value = "info", value_parser = ["trace", "debug", "info", "warn", "error"])]
    pub log_level: String,

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

fn parse_positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("'{s}' is not a non-negative number")),
    }
}

fn parse_policy(s: &str) -> Result<Policy, String> {
    s.parse()
}

impl Cli {
    /// The data plane's configuration for these flags and the given worker URLs.
    pub fn data_plane_config(&self, worker_urls: &[String]) -> Result<DataPlaneConfig, String> {
        let workers =
            WorkerSet::from_urls(worker_urls).map_err(|e| format!("--worker-urls: {e}"))?;
        let mut cfg = DataPlaneConfig::new(SocketAddr::new(self.host, self.port), workers);
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
        let mut policy = PolicyConfig::new(self.policy);
        policy.cache_threshold = self.cache_threshold;
        policy.balance_abs_threshold = self.balance_abs_threshold;
        policy.balance_rel_threshold = self.balance_rel_threshold;
        policy.max_tree_size = self.max_tree_size as usize;
        policy.prefix_weight = self.load_aware_prefix_weight;
        cfg.policy = policy;
        cfg.max_payload_size = self.max_payload_size;
        cfg.max_header_bytes = self.max_header_size as usize;
        cfg.request_timeout = Duration::from_secs(self.request_timeout_secs);
        cfg.keepalive_timeout = Duration::from_secs(self.client_keepalive_timeout_secs);
        cfg.header_read_timeout = Duration::from_secs(self.client_header_timeout_secs);
        Ok(cfg)
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
        let cfg = cli.data_plane_config(&[]).unwrap();
        assert!(cfg.pin_cores);
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
        assert!(!cli.data_plane_config(&cli.worker_urls).unwrap().pin_cores);
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
        let cli = Cli::try_parse_from([
            "ringrouter",
            "--policy",
            "random",
            "--worker-urls",
            "localhost:8000",
        ])
        .unwrap();
        let e = cli.data_plane_config(&cli.worker_urls).unwrap_err();
        assert!(e.contains("--worker-urls"), "{e}");
    }
}
