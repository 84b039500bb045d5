//! The control plane: one thread with a tokio runtime and a hyper client, never on the
//! request path. It owns worker membership (the registry), runs the active health checks,
//! answers the worker admin API for the shards, applies membership changes from other
//! sources (Kubernetes discovery), scrapes vLLM's load gauges onto the load board, follows
//! gRPC engines' KV-cache events into the prefix index, and serves the router's own
//! Prometheus metrics.
//! Every change to the routable set reaches the shards as a new worker-set epoch.

mod admin_api;
pub mod discovery;
pub mod engine;
mod health;
mod kv_events;
mod load_scrape;
pub mod membership;
pub mod metrics;
pub mod registry;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use shards::admin::AdminCall;
use shards::route::host_url;
use shards::sync::{Directory, LoadBoard};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::time::Instant;

use membership::MembershipChange;
use registry::{Health, Registry};

/// What the control plane is started with.
pub struct Control {
    pub registry: Registry,
    pub directory: Arc<Directory>,
    pub board: Arc<LoadBoard>,
    pub admin: UnboundedReceiver<AdminCall>,
    pub membership: UnboundedReceiver<MembershipChange>,
    /// Keeps the membership channel open when no source holds a sender.
    pub membership_tx: UnboundedSender<MembershipChange>,
    pub scrape_every: Option<Duration>,
    /// Kubernetes discovery (`--service-discovery`), its flags validated: it sends what it
    /// finds on `membership_tx`.
    pub discovery: Option<discovery::DiscoveryArgs>,
    /// P/D mode: discovery watches the prefill and decode selectors.
    pub pd_mode: bool,
    /// The Prometheus endpoint's listener (bound at start) and what a scrape reads.
    pub prometheus: Option<(std::net::TcpListener, metrics::Sources)>,
    /// Set when a policy keeps a prefix index: gRPC engines' KV-cache events feed it.
    pub kv_index: Option<Arc<shards::route::kv_index::KvIndex>>,
}

/// Starts the control-plane thread. The returned receiver gets one message when the
/// first round of health checks is over (at once when checks are off or not needed), or
/// an error at once if the control plane cannot start (no runtime; discovery on but no
/// Kubernetes configuration to be found).
pub fn start(mut control: Control) -> std::sync::mpsc::Receiver<Result<(), String>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ =
                        ready_tx.send(Err(format!("control plane: cannot start its runtime: {e}")));
                    return;
                }
            };
            if let Some(args) = control.discovery.take() {
                // The kubeconfig ($KUBECONFIG or ~/.kube/config), else the pod's service
                // account: local files and variables only, so a failure here is a setup
                // error, reported at start. The API server itself may come later.
                match rt.block_on(discovery::client_from_env()) {
                    Ok(client) => {
                        rt.spawn(discovery::run(
                            args,
                            client,
                            control.pd_mode,
                            control.membership_tx.clone(),
                        ));
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!(
                            "--service-discovery: no Kubernetes client from $KUBECONFIG, \
                             ~/.kube/config or the in-cluster service account: {e}"
                        )));
                        return;
                    }
                }
            }
            rt.block_on(run(control, ready_tx));
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "control plane: cannot spawn its thread");
    }
    ready_rx
}

async fn run(mut c: Control, ready: std::sync::mpsc::Sender<Result<(), String>>) {
    let client = health::client();
    let started = Instant::now();
    let (results_tx, mut results) =
        tokio::sync::mpsc::unbounded_channel::<(String, Result<(), String>)>();
    // When each worker is next checked; checks in flight are not started twice.
    let mut due: HashMap<String, Instant> = HashMap::new();
    let mut checking: HashMap<String, ()> = HashMap::new();
    let mut first_round: Option<usize> = None;
    if c.registry.health.enabled {
        let now = Instant::now();
        // One check per server: its data-parallel ranks share it.
        for e in c.registry.entries() {
            due.insert(e.worker.host_url().to_string(), now);
        }
        first_round = Some(due.len());
    }
    if first_round.is_none_or(|n| n == 0) {
        let _ = ready.send(Ok(()));
        first_round = None;
    }
    if let Some(every) = c.scrape_every {
        tokio::spawn(load_scrape::run(
            c.directory.clone(),
            c.board.clone(),
            every,
        ));
    }
    if let Some(index) = c.kv_index.take() {
        tokio::spawn(kv_events::run(
            c.directory.clone(),
            c.registry.subscribe(),
            index,
        ));
    }
    let (scrape_tx, mut scrapes) = tokio::sync::mpsc::unbounded_channel();
    let prometheus = c.prometheus.take().map(|(listener, sources)| {
        tokio::spawn(metrics::serve(listener, scrape_tx.clone()));
        sources
    });
    let mut counts = metrics::ControlCounts::default();
    let _keep_open = c.membership_tx.clone();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            Some(call) = c.admin.recv() => {
                let (reply, effect) = admin_api::handle(&mut c.registry, &call);
                match effect {
                    admin_api::Effect::Added(url) => {
                        c.registry.publish();
                        if c.registry.health.enabled {
                            due.insert(host_url(&url).to_string(), Instant::now());
                        }
                    }
                    admin_api::Effect::Removed => c.registry.publish(),
                    admin_api::Effect::None => {}
                }
                let _ = call.reply.send(reply);
            }
            Some(reply) = scrapes.recv() => {
                if let Some(sources) = &prometheus {
                    let _ = reply.send(metrics::render(&c.registry, sources, &counts));
                }
            }
            Some(change) = c.membership.recv() => {
                counts.discovery_updates += 1;
                let adds = matches!(change, MembershipChange::Add { .. });
                counts.discovery_added = adds as u64;
                counts.discovery_removed = !adds as u64;
                if let Some(url) = apply(&mut c.registry, change) {
                    if c.registry.health.enabled {
                        due.insert(host_url(&url).to_string(), Instant::now());
                    }
                }
            }
            Some((url, result)) = results.recv() => {
                checking.remove(&url);
                let failed = result.as_ref().err().cloned();
                if let Some(state) = c.registry.record_check(&url, result) {
                    match state {
                        Health::Healthy => tracing::info!(worker = %url, "worker healthy: routing to it"),
                        Health::Unhealthy => tracing::warn!(worker = %url, error = failed.as_deref().unwrap_or(""), "worker unhealthy: not routing to it"),
                        Health::Unknown => {}
                    }
                    c.registry.publish();
                } else if let Some(err) = failed {
                    tracing::debug!(worker = %url, error = %err, "health check failed");
                }
                if let Some(e) = c.registry.get_host(&url) {
                    let startup = e.health == Health::Unknown
                        && started.elapsed() < c.registry.health.startup_timeout;
                    let next = if startup {
                        c.registry.health.startup_check_interval.min(c.registry.health.interval)
                    } else {
                        c.registry.health.interval
                    };
                    due.insert(url, Instant::now() + next);
                } else {
                    due.remove(&url);
                }
                if let Some(n) = first_round.as_mut() {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        first_round = None;
                        let _ = ready.send(Ok(()));
                    }
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let h = &c.registry.health;
                for (url, at) in due.iter() {
                    if *at > now || checking.contains_key(url) {
                        continue;
                    }
                    checking.insert(url.clone(), ());
                    let (client, url, tx) = (client.clone(), url.clone(), results_tx.clone());
                    let (endpoint, timeout) = (h.endpoint.clone(), h.timeout);
                    tokio::spawn(async move {
                        let r = if url.starts_with("grpc://") {
                            engine::check(&url, timeout).await
                        } else {
                            health::check(&client, &url, &endpoint, timeout).await
                        };
                        let _ = tx.send((url, r));
                    });
                }
            }
        }
    }
}

/// Applies a change from a membership source; returns the URL of a worker to check. A
/// rank-less URL is the server's data-parallel ranks (`Registry::add_server`,
/// `remove_server`).
fn apply(reg: &mut Registry, change: MembershipChange) -> Option<String> {
    match change {
        MembershipChange::Add { url, role } => {
            let have = reg.named(&url);
            let mut removed = false;
            if !have.is_empty() {
                if have.iter().all(|e| e.role == role) {
                    return None;
                }
                // Its role changed: the server comes back in the new one.
                removed = !reg.remove_server(&url).is_empty();
            }
            match reg.add_server(&url, role) {
                Ok(added) => {
                    tracing::info!(worker = %url, targets = ?added, "worker added");
                    reg.publish();
                    added.into_iter().next()
                }
                Err(e) => {
                    tracing::warn!(worker = %url, error = ?e, "cannot add worker");
                    if removed {
                        reg.publish();
                    }
                    None
                }
            }
        }
        MembershipChange::Remove { url } => {
            let removed = reg.remove_server(&url);
            if !removed.is_empty() {
                tracing::info!(worker = %url, targets = removed.len(), "worker removed");
                reg.publish();
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::membership::Role;
    use super::*;
    use shards::breaker::{BreakerConfig, Breakers};
    use shards::metrics::Metrics;
    use shards::route::WorkerSet;

    fn registry(dp_size: u32) -> (Registry, Arc<Directory>) {
        let directory = Arc::new(Directory::new(WorkerSet::default()));
        let mut r = Registry::new(
            directory.clone(),
            Arc::new(LoadBoard::new(1, 8)),
            Arc::new(Breakers::new(8, BreakerConfig::default())),
            Arc::new(Metrics::new(1, 8)),
            registry::HealthConfig {
                enabled: false,
                interval: Duration::from_secs(60),
                timeout: Duration::from_secs(5),
                endpoint: "/health".into(),
                failure_threshold: 3,
                success_threshold: 2,
                startup_timeout: Duration::ZERO,
                startup_check_interval: Duration::from_secs(1),
            },
        );
        r.set_dp_size(dp_size);
        (r, directory)
    }

    fn published(r: &Registry) -> Vec<(String, shards::route::WorkerRole)> {
        r.entries()
            .iter()
            .map(|e| (e.worker.url.clone(), e.worker.role))
            .collect()
    }

    fn add(url: &str, role: Role) -> MembershipChange {
        MembershipChange::Add {
            url: url.into(),
            role,
        }
    }

    #[test]
    fn discovered_servers_are_their_ranks_and_leave_together() {
        use shards::route::WorkerRole::{Decode, Prefill};
        let (mut r, directory) = registry(2);
        let p = "http://10.0.0.1:8000";
        let d = "http://10.0.0.2:8000";
        let prefill = Role::Prefill {
            bootstrap_port: Some(8998),
        };
        let check = apply(&mut r, add(p, prefill.clone()));
        assert_eq!(check.as_deref().map(host_url), Some(p));
        apply(&mut r, add(d, Role::Decode));
        assert_eq!(
            published(&r),
            [
                (format!("{p}@0"), Prefill),
                (format!("{p}@1"), Prefill),
                (format!("{d}@0"), Decode),
                (format!("{d}@1"), Decode),
            ]
        );
        assert_eq!(directory.current().len(), 4, "published");
        assert!(r.entries()[..2].iter().all(|e| e.role == prefill));

        // Announced again with the same role: nothing changes.
        assert_eq!(apply(&mut r, add(p, prefill.clone())), None);
        assert_eq!(r.entries().len(), 4);

        // Its role changed: all its ranks come back in the new one.
        apply(&mut r, add(p, Role::Decode));
        assert_eq!(
            published(&r),
            [
                (format!("{d}@0"), Decode),
                (format!("{d}@1"), Decode),
                (format!("{p}@0"), Decode),
                (format!("{p}@1"), Decode),
            ]
        );

        apply(&mut r, MembershipChange::Remove { url: p.into() });
        assert_eq!(
            published(&r),
            [(format!("{d}@0"), Decode), (format!("{d}@1"), Decode)]
        );
        assert_eq!(directory.current().len(), 2, "published");
    }
}
