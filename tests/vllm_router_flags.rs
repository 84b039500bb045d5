//! A vllm-router command line works on ringrouter: every flag vllm-router 0.1.17 accepts is
//! accepted; those for features ringrouter lacks are either ignored with a warning (when
//! nothing a client sees changes) or refused at start by name.

use std::process::Command;

/// `vllm-router --help` of the PyPI wheel 0.1.17, every long flag.
const VLLM_ROUTER_0_1_17: &[&str] = &[
    "--api-key",
    "--balance-abs-threshold",
    "--balance-rel-threshold",
    "--cache-threshold",
    "--cb-failure-threshold",
    "--cb-success-threshold",
    "--cb-timeout-duration-secs",
    "--cb-window-duration-secs",
    "--cors-allowed-origins",
    "--decode",
    "--decode-policy",
    "--decode-selector",
    "--disable-circuit-breaker",
    "--disable-retries",
    "--enable-igw",
    "--enable-program-scheduling",
    "--eviction-interval-secs",
    "--health-check-endpoint",
    "--health-check-interval-secs",
    "--health-check-timeout-secs",
    "--health-failure-threshold",
    "--health-success-threshold",
    "--host",
    "--intra-node-data-parallel-size",
    "--kv-aware-session-affinity-ttl-secs",
    "--kv-connector",
    "--kv-event-block-size",
    "--kv-event-model",
    "--kv-event-replay-source",
    "--kv-event-source",
    "--kv-penalty-disk",
    "--kv-penalty-external",
    "--kv-penalty-host",
    "--log-dir",
    "--log-level",
    "--max-concurrent-requests",
    "--max-payload-size",
    "--max-tree-size",
    "--mini-lb",
    "--pd-kv-events",
    "--policy",
    "--port",
    "--prefill",
    "--prefill-policy",
    "--prefill-selector",
    "--program-scheduling-config-json",
    "--prometheus-host",
    "--prometheus-port",
    "--queue-size",
    "--queue-timeout-secs",
    "--rate-limit-tokens-per-second",
    "--request-id-headers",
    "--request-timeout-secs",
    "--retry-backoff-multiplier",
    "--retry-initial-backoff-ms",
    "--retry-jitter-factor",
    "--retry-max-backoff-ms",
    "--retry-max-retries",
    "--router-temperature",
    "--selector",
    "--service-discovery",
    "--service-discovery-namespace",
    "--service-discovery-port",
    "--vllm-discovery-address",
    "--vllm-pd-disaggregation",
    "--wasm-middleware",
    "--wasm-middleware-route",
    "--wasm-middleware-sha256",
    "--worker-startup-check-interval",
    "--worker-startup-timeout-secs",
    "--worker-urls",
];

fn ringrouter(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ringrouter"))
        .args(args)
        .arg("--check-config")
        .env_remove("RUST_LOG")
        .output()
        .expect("run ringrouter")
}

#[test]
fn every_vllm_router_flag_is_known() {
    let help = Command::new(env!("CARGO_BIN_EXE_ringrouter"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let missing: Vec<_> = VLLM_ROUTER_0_1_17
        .iter()
        .filter(|f| !help.contains(&format!("{f} ")) && !help.contains(&format!("{f}\n")))
        .collect();
    assert!(missing.is_empty(), "not accepted: {missing:?}");
}

#[test]
fn tuning_of_features_ringrouter_lacks_is_ignored_with_a_warning() {
    let out = ringrouter(&[
        "--router-temperature",
        "0.5",
        "--kv-penalty-host",
        "0.1",
        "--request-id-headers",
        "x-request-id",
        "x-trace-id",
        "--rate-limit-tokens-per-second",
        "100",
        "--kv-connector",
        "nixl",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    for flag in [
        "--router-temperature",
        "--kv-penalty-host",
        "--request-id-headers",
        "--rate-limit-tokens-per-second",
    ] {
        assert!(
            err.contains(&format!("{flag} (vllm-router) has no effect")),
            "{flag}: {err}"
        );
    }
    assert!(
        !err.contains("--kv-connector"),
        "nixl is what ringrouter speaks: {err}"
    );
}

#[test]
fn features_that_would_change_behaviour_are_refused_by_name() {
    for (args, named) in [
        (&["--wasm-middleware", "mw.wasm"][..], "--wasm-middleware"),
        (&["--enable-igw"][..], "--enable-igw"),
        (
            &["--cors-allowed-origins", "https://a.example"][..],
            "--cors-allowed-origins",
        ),
        (
            &["--vllm-discovery-address", "0.0.0.0:30001"][..],
            "--vllm-discovery-address",
        ),
        (
            &["--kv-connector", "mooncake"][..],
            "--kv-connector mooncake",
        ),
        (&["--policy", "kv_aware"][..], "kv_aware"),
        (
            &["--policy", "sticky_least_loaded"][..],
            "sticky_least_loaded",
        ),
    ] {
        let out = ringrouter(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(named), "{args:?}: {err}");
        assert!(
            err.contains("not supported by ringrouter") || err.contains("NIXL"),
            "{err}"
        );
    }
}
