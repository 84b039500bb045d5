//! The Prometheus endpoint: `GET /metrics` on `--prometheus-host:--prometheus-port`, served
//! by the control plane (never on the request port). Each scrape sums the shards' counters
//! and reads the registry, the breakers and the load board, and encodes it all in the
//! Prometheus text format with prometheus-client, in vllm-router's metric names and labels
//! (`vllm_router_*`) plus ringrouter's own (`ringrouter_*`).

use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use shards::breaker::{BreakerState, Breakers};
use shards::metrics::{
    ErrorType, HistogramSnapshot, Metrics, PdError, Route, ShardMetrics, WorkerCount,
};
use shards::sync::LoadBoard;
use shards::{Policy, ShardInfo};
use tokio::sync::{mpsc, oneshot};

use super::membership::Role;
use super::registry::{Health, Registry};

/// What the scrape reads besides the registry (fixed at start).
pub struct Sources {
    pub metrics: Arc<Metrics>,
    pub breakers: Arc<Breakers>,
    pub board: Arc<LoadBoard>,
    pub shards: Vec<ShardInfo>,
    pub policy: Policy,
    pub prefill_policy: Option<Policy>,
    pub kv_index: Arc<shards::route::kv_index::KvIndex>,
}

/// Counts kept by the control plane itself.
#[derive(Default, Clone, Debug)]
pub struct ControlCounts {
    pub discovery_updates: u64,
    pub discovery_added: u64,
    pub discovery_removed: u64,
}

/// A scrape asks the control loop (which owns the registry) for the text.
pub type ScrapeRequest = oneshot::Sender<String>;

/// Serves `/metrics` on `listener`; each scrape goes to the control loop on `scrapes`.
pub async fn serve(listener: std::net::TcpListener, scrapes: mpsc::UnboundedSender<ScrapeRequest>) {
    let _ = listener.set_nonblocking(true);
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "metrics listener");
            return;
        }
    };
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: back off rather than spin (this runtime
                // also runs the control loop).
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let scrapes = scrapes.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let scrapes = scrapes.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(req, scrapes).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    scrapes: mpsc::UnboundedSender<ScrapeRequest>,
) -> hyper::Response<Full<Bytes>> {
    let json_error = |status: u16, msg: &str| {
        let e = shards::http::ApiError::new(status, msg.to_string());
        hyper::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(e.body())))
            .unwrap_or_default()
    };
    if req.uri().path() != "/metrics" {
        return json_error(404, "not found: metrics are at /metrics");
    }
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return json_error(405, "method not allowed: GET /metrics");
    }
    let (tx, rx) = oneshot::channel();
    if scrapes.send(tx).is_err() {
        return json_error(503, "the control plane is not running");
    }
    match rx.await {
        Ok(text) => hyper::Response::builder()
            .header(
                "content-type",
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )
            .body(Full::new(Bytes::from(text)))
            .unwrap_or_default(),
        Err(_) => json_error(503, "the control plane did not answer"),
    }
}

/// One worker as the scrape sees it.
#[derive(Debug)]
struct WorkerView {
    url: String,
    role: Role,
    health: Health,
    breaker: BreakerState,
    transitions: Vec<(BreakerState, BreakerState, u64)>,
    in_flight: u32,
    /// Engine KV blocks its KV-cache events say it holds (event-fed gRPC workers only).
    kv_blocks: Option<u64>,
    counts: [u64; shards::metrics::WORKER_COUNTS],
}

/// Everything one scrape encodes, read at once.
#[derive(Debug)]
struct Scrape {
    workers: Vec<WorkerView>,
    shards: Vec<(ShardInfo, Arc<ShardMetrics>)>,
    routes: Vec<RouteTotals>,
    generate: HistogramSnapshot,
    worker_ttfb: HistogramSnapshot,
    ttft: HistogramSnapshot,
    added: Vec<(&'static str, HistogramSnapshot)>,
    pd_errors: Vec<u64>,
    cache: (u64, u64),
    control: ControlCounts,
    policy: Policy,
    prefill_policy: Option<Policy>,
}

#[derive(Debug)]
struct RouteTotals {
    route: Route,
    requests: u64,
    duration: HistogramSnapshot,
    errors: Vec<u64>,
    retries: u64,
    retries_exhausted: u64,
    pd_requests: u64,
    pd_duration: HistogramSnapshot,
}

/// The text of one scrape.
pub fn render(reg: &Registry, src: &Sources, control: &ControlCounts) -> String {
    let scrape = read(reg, src, control);
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut out = String::with_capacity(16 * 1024);
    if prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}

fn read(reg: &Registry, src: &Sources, control: &ControlCounts) -> Scrape {
    let pairs = [
        (BreakerState::Closed, BreakerState::Open),
        (BreakerState::Open, BreakerState::HalfOpen),
        (BreakerState::HalfOpen, BreakerState::Closed),
        (BreakerState::HalfOpen, BreakerState::Open),
        (BreakerState::Open, BreakerState::Closed),
    ];
    let workers = reg
        .entries()
        .iter()
        .map(|e| {
            let slot = e.worker.slot;
            WorkerView {
                url: e.worker.url.clone(),
                role: e.role.clone(),
                health: e.health,
                breaker: src.breakers.state(slot),
                transitions: pairs
                    .iter()
                    .map(|&(f, t)| (f, t, src.breakers.transitions(slot, f, t)))
                    .collect(),
                in_flight: src.board.in_flight(slot),
                kv_blocks: src.kv_index.held(slot),
                counts: src.metrics.worker(slot),
            }
        })
        .collect();
    let first = &src.metrics.shards[0];
    let sum = |pick: &dyn Fn(&ShardMetrics) -> &shards::metrics::Histogram| {
        let mut acc = pick(first).empty_snapshot();
        for s in &src.metrics.shards {
            pick(s).add_to(&mut acc);
        }
        acc
    };
    let routes = Route::ALL
        .iter()
        .enumerate()
        .map(|(i, &route)| {
            let total = |f: &dyn Fn(&ShardMetrics) -> u64| -> u64 {
                src.metrics.shards.iter().map(|s| f(s)).sum()
            };
            RouteTotals {
                route,
                requests: total(&|s| s.routes[i].requests.get()),
                duration: sum(&|s| &s.routes[i].duration),
                errors: (0..ErrorType::ALL.len())
                    .map(|e| total(&|s| s.routes[i].errors[e].get()))
                    .collect(),
                retries: total(&|s| s.routes[i].retries.get()),
                retries_exhausted: total(&|s| s.routes[i].retries_exhausted.get()),
                pd_requests: total(&|s| s.routes[i].pd_requests.get()),
                pd_duration: sum(&|s| &s.routes[i].pd_duration),
            }
        })
        .collect();
    let cache = src
        .metrics
        .shards
        .iter()
        .map(|s| s.cache_counts())
        .fold((0, 0), |(h, m), (a, b)| (h + a, m + b));
    Scrape {
        workers,
        shards: src
            .shards
            .iter()
            .cloned()
            .zip(src.metrics.shards.iter().cloned())
            .collect(),
        routes,
        generate: sum(&|s| &s.generate),
        worker_ttfb: sum(&|s| &s.worker_ttfb),
        ttft: sum(&|s| &s.ttft),
        added: vec![
            ("to_worker", sum(&|s| &s.added_to_worker)),
            ("to_client", sum(&|s| &s.added_to_client)),
            ("between_legs", sum(&|s| &s.added_between_legs)),
        ],
        pd_errors: (0..PdError::ALL.len())
            .map(|e| {
                src.metrics
                    .shards
                    .iter()
                    .map(|s| s.pd_errors[e].get())
                    .sum()
            })
            .collect(),
        cache,
        control: control.clone(),
        policy: src.policy,
        prefill_policy: src.prefill_policy,
    }
}

type Labels = Vec<(&'static str, String)>;

/// Encodes one family of counters (no samples: the family is still described).
fn counters(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        if labels.is_empty() {
            return ConstCounter::new(v).encode(m);
        } else {
            ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

fn gauges(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, f64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        if labels.is_empty() {
            return ConstGauge::new(v).encode(m);
        } else {
            ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

fn histograms<'h>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, &'h HistogramSnapshot)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in samples {
        let buckets: Vec<(f64, u64)> = h
            .bounds
            .iter()
            .copied()
            .zip(h.counts.iter().copied())
            .collect();
        if labels.is_empty() {
            m.encode_histogram::<NoLabelSet>(h.sum_secs(), h.count(), &buckets, None)?;
        } else {
            m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                h.sum_secs(),
                h.count(),
                &buckets,
                None,
            )?;
        }
    }
    Ok(())
}

fn worker(w: &WorkerView) -> Labels {
    vec![("worker", w.url.clone())]
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut enc;
        let wc = |w: &WorkerView, c: WorkerCount| w.counts[c as usize];
        // vllm-router's families.
        counters(
            e,
            "vllm_router_requests",
            "Requests received, by route",
            self.routes
                .iter()
                .filter(|r| r.requests > 0)
                .map(|r| (vec![("route", r.route.label().to_string())], r.requests)),
        )?;
        histograms(
            e,
            "vllm_router_request_duration_seconds",
            "Request duration (head read to last response byte), by route",
            self.routes
                .iter()
                .filter(|r| r.requests > 0)
                .map(|r| (vec![("route", r.route.label().to_string())], &r.duration)),
        )?;
        counters(
            e,
            "vllm_router_request_errors",
            "Requests that did not end in a worker's success, by route and error type",
            self.routes.iter().flat_map(|r| {
                ErrorType::ALL
                    .iter()
                    .zip(&r.errors)
                    .filter(|(_, n)| **n > 0)
                    .map(|(t, n)| {
                        (
                            vec![
                                ("route", r.route.label().to_string()),
                                ("error_type", t.label().to_string()),
                            ],
                            *n,
                        )
                    })
            }),
        )?;
        counters(
            e,
            "vllm_router_retries",
            "Attempts after a request's first, by route",
            self.routes
                .iter()
                .filter(|r| r.retries > 0)
                .map(|r| (vec![("route", r.route.label().to_string())], r.retries)),
        )?;
        counters(
            e,
            "vllm_router_retries_exhausted",
            "Requests whose attempts were all spent, by route",
            self.routes
                .iter()
                .filter(|r| r.retries_exhausted > 0)
                .map(|r| {
                    (
                        vec![("route", r.route.label().to_string())],
                        r.retries_exhausted,
                    )
                }),
        )?;
        counters(
            e,
            "vllm_router_processed_requests",
            "Responses the router used from each worker",
            self.workers
                .iter()
                .map(|w| (worker(w), wc(w, WorkerCount::Processed))),
        )?;
        gauges(
            e,
            "vllm_router_running_requests",
            "Requests the router has in flight with each worker",
            self.workers.iter().map(|w| (worker(w), w.in_flight as f64)),
        )?;
        gauges(
            e,
            "vllm_router_active_workers",
            "Workers routable now (healthy)",
            [(
                vec![],
                self.workers
                    .iter()
                    .filter(|w| w.health == Health::Healthy)
                    .count() as f64,
            )],
        )?;
        gauges(
            e,
            "vllm_router_worker_health",
            "Worker health (1 healthy, 0 not, or not checked yet)",
            self.workers.iter().map(|w| {
                (
                    worker(w),
                    if w.health == Health::Healthy {
                        1.0
                    } else {
                        0.0
                    },
                )
            }),
        )?;
        gauges(
            e,
            "vllm_router_cb_state",
            "Circuit breaker state per worker (0 closed, 1 open, 2 half-open)",
            self.workers
                .iter()
                .map(|w| (worker(w), w.breaker as u8 as f64)),
        )?;
        counters(
            e,
            "vllm_router_cb_state_transitions",
            "Circuit breaker state changes per worker",
            self.workers.iter().flat_map(|w| {
                w.transitions.iter().filter(|t| t.2 > 0).map(|(f, t, n)| {
                    (
                        vec![
                            ("worker", w.url.clone()),
                            ("from", f.name().to_string()),
                            ("to", t.name().to_string()),
                        ],
                        *n,
                    )
                })
            }),
        )?;
        counters(
            e,
            "vllm_router_cb_outcomes",
            "Outcomes the circuit breakers were fed, per worker",
            self.workers.iter().flat_map(|w| {
                [
                    ("success", wc(w, WorkerCount::CbSuccess)),
                    ("failure", wc(w, WorkerCount::CbFailure)),
                ]
                .into_iter()
                .map(|(o, n)| {
                    (
                        vec![("worker", w.url.clone()), ("outcome", o.to_string())],
                        n,
                    )
                })
            }),
        )?;
        histograms(
            e,
            "vllm_router_generate_duration_seconds",
            "Duration of generation requests (completions, chat, responses, generate)",
            [(vec![], &self.generate)],
        )?;
        counters(
            e,
            "vllm_router_cache_hits",
            "cache_aware: requests routed by their cached prefix",
            [(vec![], self.cache.0)],
        )?;
        counters(
            e,
            "vllm_router_cache_misses",
            "cache_aware: requests routed by load (prefix match below --cache-threshold)",
            [(vec![], self.cache.1)],
        )?;
        counters(
            e,
            "vllm_router_policy_decisions",
            "Workers the policy chose first for a request",
            self.workers.iter().map(|w| {
                let policy = match (&w.role, self.prefill_policy) {
                    (Role::Prefill { .. }, Some(p)) => p,
                    _ => self.policy,
                };
                (
                    vec![
                        ("policy", policy.name().to_string()),
                        ("worker", w.url.clone()),
                    ],
                    wc(w, WorkerCount::Decisions),
                )
            }),
        )?;
        // P/D.
        counters(
            e,
            "vllm_router_pd_requests",
            "Requests served with a prefill and a decode leg, by route",
            self.routes
                .iter()
                .filter(|r| r.pd_requests > 0)
                .map(|r| (vec![("route", r.route.label().to_string())], r.pd_requests)),
        )?;
        histograms(
            e,
            "vllm_router_pd_request_duration_seconds",
            "Duration of P/D requests, both legs, by route",
            self.routes
                .iter()
                .filter(|r| r.pd_requests > 0)
                .map(|r| (vec![("route", r.route.label().to_string())], &r.pd_duration)),
        )?;
        let pd_workers =
            |role: fn(&Role) -> bool| self.workers.iter().filter(move |w| role(&w.role));
        let is_prefill = |r: &Role| matches!(r, Role::Prefill { .. });
        let is_decode = |r: &Role| matches!(r, Role::Decode);
        counters(
            e,
            "vllm_router_pd_prefill_requests",
            "Prefill legs sent to each prefill worker (attempts)",
            pd_workers(is_prefill).map(|w| (worker(w), wc(w, WorkerCount::PdPrefill))),
        )?;
        counters(
            e,
            "vllm_router_pd_decode_requests",
            "Decode legs sent to each decode worker (attempts)",
            pd_workers(is_decode).map(|w| (worker(w), wc(w, WorkerCount::PdDecode))),
        )?;
        counters(
            e,
            "vllm_router_pd_errors",
            "P/D requests that failed, by error type",
            PdError::ALL
                .iter()
                .zip(&self.pd_errors)
                .filter(|(_, n)| **n > 0)
                .map(|(t, n)| (vec![("error_type", t.label().to_string())], *n)),
        )?;
        counters(
            e,
            "vllm_router_pd_prefill_errors",
            "Failed prefill legs per prefill worker",
            pd_workers(is_prefill).map(|w| (worker(w), wc(w, WorkerCount::PdPrefillErrors))),
        )?;
        counters(
            e,
            "vllm_router_pd_decode_errors",
            "Failed decode legs per decode worker",
            pd_workers(is_decode).map(|w| (worker(w), wc(w, WorkerCount::PdDecodeErrors))),
        )?;
        counters(
            e,
            "vllm_router_pd_stream_errors",
            "Decode streams that broke off mid-response, per decode worker",
            pd_workers(is_decode).map(|w| (worker(w), wc(w, WorkerCount::PdStreamErrors))),
        )?;
        // Discovery.
        counters(
            e,
            "vllm_router_discovery_updates",
            "Worker changes Kubernetes discovery reported",
            [(vec![], self.control.discovery_updates)],
        )?;
        gauges(
            e,
            "vllm_router_discovery_workers_added",
            "Workers added by the last discovery update",
            [(vec![], self.control.discovery_added as f64)],
        )?;
        gauges(
            e,
            "vllm_router_discovery_workers_removed",
            "Workers removed by the last discovery update",
            [(vec![], self.control.discovery_removed as f64)],
        )?;
        // ringrouter's own.
        gauges(
            e,
            "ringrouter_kv_cache_blocks",
            "KV-cache blocks each gRPC worker's engine reports holding (SubscribeKvEvents), \
             as cache-aware routing sees them; absent for workers routed by guess",
            self.workers
                .iter()
                .filter_map(|w| Some((worker(w), w.kv_blocks? as f64))),
        )?;
        histograms(
            e,
            "ringrouter_time_to_first_token_seconds",
            "Request head read to the first response body byte written to the client",
            [(vec![], &self.ttft)],
        )?;
        histograms(
            e,
            "ringrouter_worker_ttfb_seconds",
            "Request written to the worker to its response head read: the worker's part",
            [(vec![], &self.worker_ttfb)],
        )?;
        histograms(
            e,
            "ringrouter_added_seconds",
            "The router's own time per request: to_worker (request read to written to the \
             worker, first-attempt requests), to_client (worker's head read to written to \
             the client), between_legs (P/D: prefill response read to decode request written)",
            self.added
                .iter()
                .map(|(phase, h)| (vec![("phase", phase.to_string())], h)),
        )?;
        counters(
            e,
            "ringrouter_shard_requests",
            "Requests per shard",
            self.shards
                .iter()
                .map(|(i, m)| (vec![("shard", i.id.to_string())], m.requests.get())),
        )?;
        counters(
            e,
            "ringrouter_shard_connections",
            "Client connections accepted per shard",
            self.shards
                .iter()
                .map(|(i, m)| (vec![("shard", i.id.to_string())], m.connections.get())),
        )?;
        counters(
            e,
            "ringrouter_shard_unbuffered_head_waits",
            "Worker response heads awaited holding no read buffer, because more requests \
             than --head-wait-poll-above waited for heads on the shard",
            self.shards.iter().map(|(i, m)| {
                (
                    vec![("shard", i.id.to_string())],
                    m.unbuffered_head_waits.get(),
                )
            }),
        )?;
        gauges(
            e,
            "ringrouter_shard_open_connections",
            "Client connections open per shard",
            self.shards.iter().map(|(i, m)| {
                let open = m
                    .connections
                    .get()
                    .saturating_sub(m.connections_closed.get());
                (vec![("shard", i.id.to_string())], open as f64)
            }),
        )?;
        gauges(
            e,
            "ringrouter_shard_info",
            "Each shard's io driver (io_uring or epoll), its ring's completion mode \
             (defer_taskrun, coop_taskrun, plain; none on epoll) and core (none: not pinned)",
            self.shards.iter().map(|(i, _)| {
                (
                    vec![
                        ("shard", i.id.to_string()),
                        ("driver", i.driver.to_string()),
                        ("uring_setup", i.uring_setup.to_string()),
                        (
                            "core",
                            i.core.map(|c| c.to_string()).unwrap_or("none".into()),
                        ),
                    ],
                    1.0,
                )
            }),
        )?;
        Ok(())
    }
}
