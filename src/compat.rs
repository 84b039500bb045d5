//! vllm-router 0.1.17 flags that ringrouter does not implement. A drop-in replacement must
//! not fail on a command line that worked before, nor pretend to do what it does not: flags
//! whose absence changes nothing a client sees (tuning of features ringrouter lacks, or
//! defaults it already has) are accepted with a warning; flags that would change routing,
//! discovery or security are refused at start with a message naming them.

use clap::Args;

#[derive(Args, Debug, Clone, Default)]
pub struct VllmRouterOnly {
    /// [vllm-router; ignored] kv_aware softmax temperature.
    #[arg(long, value_name = "T")]
    pub router_temperature: Option<String>,
    /// [vllm-router; ignored] kv_aware host-tier credit.
    #[arg(long, value_name = "X")]
    pub kv_penalty_host: Option<String>,
    /// [vllm-router; ignored] kv_aware disk-tier credit.
    #[arg(long, value_name = "X")]
    pub kv_penalty_disk: Option<String>,
    /// [vllm-router; ignored] kv_aware external-tier credit.
    #[arg(long, value_name = "X")]
    pub kv_penalty_external: Option<String>,
    /// [vllm-router; ignored] block size of static KV event sources.
    #[arg(long, value_name = "N")]
    pub kv_event_block_size: Option<String>,
    /// [vllm-router; ignored] model identity of static KV event sources.
    #[arg(long, value_name = "MODEL")]
    pub kv_event_model: Option<String>,
    /// [vllm-router; ignored: --max-concurrent-requests and --queue-size bound the load]
    #[arg(long, value_name = "N")]
    pub rate_limit_tokens_per_second: Option<String>,
    /// [vllm-router; ignored: the request id is read from X-Request-Id only]
    #[arg(long, num_args = 0.., value_name = "HEADER")]
    pub request_id_headers: Option<Vec<String>>,
    /// [vllm-router; not supported: refused] CORS allowed origins.
    #[arg(long, num_args = 0.., value_name = "ORIGIN")]
    pub cors_allowed_origins: Option<Vec<String>>,
    /// [vllm-router; not supported: refused]
    #[arg(long)]
    pub enable_igw: bool,
    /// [vllm-router; not supported: refused]
    #[arg(long)]
    pub mini_lb: bool,
    /// [vllm-router; not supported: refused]
    #[arg(long)]
    pub enable_program_scheduling: bool,
    /// [vllm-router; not supported: refused]
    #[arg(long, value_name = "JSON")]
    pub program_scheduling_config_json: Option<String>,
    /// [vllm-router; not supported: refused]
    #[arg(long, value_name = "SECS")]
    pub kv_aware_session_affinity_ttl_secs: Option<String>,
    /// [vllm-router; not supported: refused]
    #[arg(long, value_name = "WORKER_URL=ENDPOINT")]
    pub kv_event_source: Vec<String>,
    /// [vllm-router; not supported: refused]
    #[arg(long, value_name = "WORKER_URL=ENDPOINT")]
    pub kv_event_replay_source: Vec<String>,
    /// [vllm-router; not supported: refused]
    #[arg(long, value_name = "URL=ENDPOINT")]
    pub pd_kv_events: Vec<String>,
    /// [vllm-router; not supported: refused] ZMQ service discovery for P/D mode.
    #[arg(long, value_name = "ADDR")]
    pub vllm_discovery_address: Option<String>,
    /// [vllm-router] KV connector for P/D mode: only `nixl` (the default) is supported.
    #[arg(long, value_name = "CONNECTOR")]
    pub kv_connector: Option<String>,
    /// [vllm-router; not supported: refused]
    #[arg(long, value_name = "PATH")]
    pub wasm_middleware: Option<String>,
    /// [vllm-router; not supported: refused]
    #[arg(long, value_name = "SHA256")]
    pub wasm_middleware_sha256: Option<String>,
    /// [vllm-router; not supported: refused]
    #[arg(long, value_name = "ROUTE")]
    pub wasm_middleware_route: Vec<String>,
}

impl VllmRouterOnly {
    /// The flags given that ringrouter ignores (to warn about), or the first it refuses.
    pub fn check(&self) -> Result<Vec<&'static str>, String> {
        let refuse = |flag: &str, why: &str| {
            Err(format!(
                "{flag} (vllm-router) is not supported by ringrouter: {why}; remove it"
            ))
        };
        if self.cors_allowed_origins.is_some() {
            return refuse(
                "--cors-allowed-origins",
                "the router sends no CORS headers, so browsers would be refused",
            );
        }
        if self.enable_igw {
            return refuse("--enable-igw", "there is no multi-model gateway mode");
        }
        if self.mini_lb {
            return refuse("--mini-lb", "there is no MiniLB mode");
        }
        if self.enable_program_scheduling || self.program_scheduling_config_json.is_some() {
            return refuse(
                "--enable-program-scheduling",
                "there is no program-level scheduling",
            );
        }
        if self.kv_aware_session_affinity_ttl_secs.is_some() {
            return refuse(
                "--kv-aware-session-affinity-ttl-secs",
                "there is no kv_aware policy (consistent_hash gives session affinity)",
            );
        }
        if !self.kv_event_source.is_empty()
            || !self.kv_event_replay_source.is_empty()
            || !self.pd_kv_events.is_empty()
        {
            return refuse(
                "--kv-event-source / --kv-event-replay-source / --pd-kv-events",
                "KV events are not read (cache_aware and load_aware route by prompt prefix)",
            );
        }
        if self.vllm_discovery_address.is_some() {
            return refuse(
                "--vllm-discovery-address",
                "workers come from --worker-urls, --prefill/--decode, the admin API or \
                 Kubernetes discovery",
            );
        }
        if let Some(c) = self.kv_connector.as_deref().filter(|c| *c != "nixl") {
            return Err(format!(
                "--kv-connector {c}: ringrouter's P/D mode speaks vLLM's NIXL connector only \
                 (--kv-connector nixl, the default)"
            ));
        }
        if self.wasm_middleware.is_some()
            || self.wasm_middleware_sha256.is_some()
            || !self.wasm_middleware_route.is_empty()
        {
            return refuse("--wasm-middleware", "there are no WASM middlewares");
        }
        let mut ignored = Vec::new();
        for (given, flag) in [
            (self.router_temperature.is_some(), "--router-temperature"),
            (self.kv_penalty_host.is_some(), "--kv-penalty-host"),
            (self.kv_penalty_disk.is_some(), "--kv-penalty-disk"),
            (self.kv_penalty_external.is_some(), "--kv-penalty-external"),
            (self.kv_event_block_size.is_some(), "--kv-event-block-size"),
            (self.kv_event_model.is_some(), "--kv-event-model"),
            (
                self.rate_limit_tokens_per_second.is_some(),
                "--rate-limit-tokens-per-second",
            ),
            (self.request_id_headers.is_some(), "--request-id-headers"),
        ] {
            if given {
                ignored.push(flag);
            }
        }
        Ok(ignored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        c: VllmRouterOnly,
    }

    fn check(args: &[&str]) -> Result<Vec<&'static str>, String> {
        let t = T::try_parse_from(std::iter::once("x").chain(args.iter().copied())).unwrap();
        t.c.check()
    }

    #[test]
    fn tuning_of_missing_features_is_accepted_and_named() {
        assert_eq!(check(&[]), Ok(vec![]));
        assert_eq!(
            check(&[
                "--router-temperature",
                "0.5",
                "--request-id-headers",
                "x-trace-id"
            ]),
            Ok(vec!["--router-temperature", "--request-id-headers"])
        );
        assert_eq!(check(&["--kv-connector", "nixl"]), Ok(vec![]));
    }

    #[test]
    fn what_would_change_behaviour_is_refused_by_name() {
        for (args, flag) in [
            (&["--wasm-middleware", "a.wasm"][..], "--wasm-middleware"),
            (&["--enable-igw"][..], "--enable-igw"),
            (
                &["--cors-allowed-origins", "http://x"][..],
                "--cors-allowed-origins",
            ),
            (
                &["--kv-connector", "mooncake"][..],
                "--kv-connector mooncake",
            ),
            (
                &["--vllm-discovery-address", "0.0.0.0:30001"][..],
                "--vllm-discovery-address",
            ),
        ] {
            let e = check(args).unwrap_err();
            assert!(e.contains(flag), "{e}");
        }
    }
}
