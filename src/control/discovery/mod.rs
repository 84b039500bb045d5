//! Kubernetes discovery: watches Pods with kube-rs on the control plane's tokio runtime and
//! announces workers to the registry as `MembershipChange`s. vllm-router's flags
//! (`--service-discovery`, `--selector`, `--service-discovery-port`,
//! `--service-discovery-namespace`, `--prefill-selector`, `--decode-selector`) and its
//! bootstrap annotation `vllm.ai/bootstrap-port`; unlike vllm-router, a pod that turns
//! NotReady leaves the set (see [`pod`] for the rule).
//!
//! One kube-runtime watcher per selector (list, then watch from the list's resourceVersion;
//! a 410 Gone or a restart re-lists), the selector sent to the API server as `labelSelector`
//! and checked again here. Errors back off exponentially (0.8 s doubling to 30 s, jittered,
//! as client-go does), each logged once at warn; the backoff resets once the API server
//! answers again.
//!
//! The router's service account needs `list` and `watch` on `pods`: a Role in the namespace
//! with `--service-discovery-namespace`, a ClusterRole without it.

mod pod;
mod reconcile;
#[cfg(test)]
mod tests;

use std::pin::pin;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, watcher, Event};
use kube::{Api, Client};
use tokio::sync::mpsc;

pub use pod::{parse_label, Label};
use pod::{Kind, Selector, Source};
use reconcile::Reconciler;

use super::membership::MembershipSender;

/// The Kubernetes discovery flags (vllm-router's names and defaults).
#[derive(clap::Args, Clone, Debug)]
#[command(next_help_heading = "Service discovery (Kubernetes)")]
pub struct DiscoveryArgs {
    /// Discover workers from Kubernetes pods: those matching --selector (or, in P/D mode,
    /// --prefill-selector / --decode-selector) that are Running and Ready.
    #[arg(long)]
    pub service_discovery: bool,

    /// Label requirements a worker pod meets, key=value, space separated or repeated
    /// (all must match).
    #[arg(long, num_args = 0.., value_name = "KEY=VALUE", value_parser = parse_label)]
    pub selector: Vec<Label>,

    /// Port of the workers in discovered pods: http://<pod IP>:<port>.
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u16).range(1..))]
    pub service_discovery_port: u16,

    /// Namespace to watch (default: all namespaces).
    #[arg(long, value_name = "NAMESPACE", value_parser = parse_namespace)]
    pub service_discovery_namespace: Option<String>,

    /// P/D mode: label requirements of prefill pods, key=value (bootstrap port from the pod
    /// annotation vllm.ai/bootstrap-port).
    #[arg(long, num_args = 0.., value_name = "KEY=VALUE", value_parser = parse_label)]
    pub prefill_selector: Vec<Label>,

    /// P/D mode: label requirements of decode pods, key=value.
    #[arg(long, num_args = 0.., value_name = "KEY=VALUE", value_parser = parse_label)]
    pub decode_selector: Vec<Label>,
}

fn parse_namespace(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{s}' is not a Kubernetes namespace (at most 63 characters of [a-z0-9-])"
        ))
    }
}

impl DiscoveryArgs {
    /// Checks the flags for a run with `--service-discovery` (Ok when discovery is off), in
    /// P/D mode or not. The error names the flag to fix. Call it at start, before [`run`].
    pub fn validate(&self, pd_mode: bool) -> Result<(), String> {
        if !self.service_discovery {
            return Ok(());
        }
        self.sources(pd_mode).map(|_| ())
    }

    /// The watches to run, prefill before decode (a pod matching both is a prefill worker).
    fn sources(&self, pd_mode: bool) -> Result<Vec<Source>, String> {
        let source = |kind, labels: &[Label]| Source {
            kind,
            selector: Selector::new(labels),
        };
        if pd_mode {
            let sources: Vec<Source> = [
                source(Kind::Prefill, &self.prefill_selector),
                source(Kind::Decode, &self.decode_selector),
            ]
            .into_iter()
            .filter(|s| !s.selector.is_empty())
            .collect();
            if sources.is_empty() {
                return Err(
                    "--service-discovery in P/D mode needs --prefill-selector and/or \
                            --decode-selector key=value"
                        .into(),
                );
            }
            Ok(sources)
        } else if self.selector.is_empty() {
            Err(
                "--service-discovery needs --selector key=value (the labels of the worker pods)"
                    .into(),
            )
        } else {
            Ok(vec![source(Kind::Regular, &self.selector)])
        }
    }
}

/// A client for the cluster this process runs in: the kubeconfig (`$KUBECONFIG` or
/// `~/.kube/config`) if there is one, else the in-cluster service account. Must be called
/// on a tokio runtime (the client spawns its request buffer there).
pub async fn client_from_env() -> Result<Client, String> {
    let config = kube::Config::infer().await.map_err(|e| e.to_string())?;
    Client::try_from(config).map_err(|e| e.to_string())
}

/// A client for an API server at a plain URL, e.g. the stub's in tests. Must be called on a
/// tokio runtime.
#[cfg(test)]
pub fn client_for_url(url: &str) -> Result<Client, String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("'{url}' is not a URL: {e}"))?;
    Client::try_from(kube::Config::new(uri)).map_err(|e| e.to_string())
}

/// Watches pods and sends [`MembershipChange`](super::membership::MembershipChange)s on
/// `tx` until `tx`'s receiver is dropped (or this future is). Runs on the control plane's
/// tokio runtime (a current-thread one is enough); never returns on API errors, which it
/// logs and retries with backoff. Flags are expected to have passed
/// [`DiscoveryArgs::validate`]; if not, it logs the error and returns.
pub async fn run(args: DiscoveryArgs, client: Client, pd_mode: bool, tx: MembershipSender) {
    run_with_backoff(args, client, pd_mode, tx, BackoffPolicy::API_SERVER).await
}

async fn run_with_backoff(
    args: DiscoveryArgs,
    client: Client,
    pd_mode: bool,
    tx: MembershipSender,
    backoff: BackoffPolicy,
) {
    let sources = match args.sources(pd_mode) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("kubernetes discovery not started: {e}");
            return;
        }
    };
    let api: Api<Pod> = match &args.service_discovery_namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let watches = futures_util::future::join_all(sources.iter().enumerate().map(|(i, s)| {
        tracing::info!(
            namespace = args.service_discovery_namespace.as_deref().unwrap_or("(all)"),
            selector = %s.selector,
            role = ?s.kind,
            port = args.service_discovery_port,
            "kubernetes discovery: watching pods"
        );
        watch_pods(
            api.clone(),
            i,
            s.selector.to_string(),
            events_tx.clone(),
            backoff,
        )
    }));
    drop(events_tx);
    let mut reconciler = Reconciler::new(sources, args.service_discovery_port);
    let announce = async {
        while let Some((source, event)) = events.recv().await {
            for change in reconciler.apply(source, event) {
                if tx.send(change).is_err() {
                    return;
                }
            }
        }
    };
    tokio::select! {
        _ = watches => {}
        _ = announce => {}
        _ = tx.closed() => {}
    }
}

/// One selector's watcher: forwards its events, sleeps out errors.
async fn watch_pods(
    api: Api<Pod>,
    source: usize,
    selector: String,
    out: mpsc::UnboundedSender<(usize, Event<Pod>)>,
    backoff: BackoffPolicy,
) {
    let config = watcher::Config::default().labels(&selector);
    let mut stream = pin!(watcher(api, config));
    let mut delays = Backoff::new(backoff);
    let mut failing = false;
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                // `Init` comes before the list request, so it proves nothing about the
                // API server; anything after it does.
                if !matches!(event, Event::Init) {
                    delays.reset();
                    if failing {
                        failing = false;
                        tracing::info!(
                            %selector,
                            "kubernetes discovery: API server answers again"
                        );
                    }
                }
                if out.send((source, event)).is_err() {
                    return;
                }
            }
            Err(e) => {
                let delay = delays.next_delay();
                let retry_in_ms = delay.as_millis() as u64;
                match &e {
                    // The history to resume from was compacted: routine, the watcher
                    // re-lists (after the delay, so a server that keeps answering 410
                    // is not hammered).
                    watcher::Error::WatchError(status) if status.code == 410 => {
                        tracing::info!(
                            %selector,
                            retry_in_ms,
                            "kubernetes discovery: watch expired (410 Gone); re-listing"
                        );
                    }
                    _ => {
                        failing = true;
                        tracing::warn!(
                            %selector,
                            error = %e,
                            retry_in_ms,
                            "kubernetes discovery: watch failed"
                        );
                    }
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// How long to wait after errors: from `initial`, doubling to `max`, each delay jittered
/// down by up to a half so that many routers do not retry in step.
#[derive(Clone, Copy, Debug)]
struct BackoffPolicy {
    initial: Duration,
    max: Duration,
}

impl BackoffPolicy {
    /// client-go's reflector backoff, as kube-runtime's default.
    const API_SERVER: BackoffPolicy = BackoffPolicy {
        initial: Duration::from_millis(800),
        max: Duration::from_secs(30),
    };
}

struct Backoff {
    policy: BackoffPolicy,
    next: Duration,
}

impl Backoff {
    fn new(policy: BackoffPolicy) -> Backoff {
        Backoff {
            policy,
            next: policy.initial,
        }
    }

    fn reset(&mut self) {
        self.next = self.policy.initial;
    }

    fn next_delay(&mut self) -> Duration {
        let full = self.next;
        self.next = (full * 2).min(self.policy.max);
        full.mul_f64(1.0 - fastrand::f64() * 0.5)
    }
}

#[cfg(test)]
mod backoff_tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_resets() {
        let policy = BackoffPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
        };
        let mut b = Backoff::new(policy);
        let mut caps = Vec::new();
        for _ in 0..6 {
            let cap = b.next;
            let d = b.next_delay();
            assert!(d <= cap && d >= cap / 2, "{d:?} within jitter of {cap:?}");
            caps.push(cap.as_millis());
        }
        assert_eq!(caps, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next, Duration::from_millis(100));
    }
}
