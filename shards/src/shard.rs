//! A shard: one thread, one monoio runtime, optionally pinned to one core, with its own
//! SO_REUSEPORT listener and its own connection pools and policy state. This module owns
//! the per-core lifecycle (driver choice, pinning, binding, accepting); what happens on a
//! connection is `proxy`'s.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use monoio::net::{ListenerOpts, TcpListener};
use monoio::time::TimeDriver;
use monoio::{FusionRuntime, IoUringDriver, LegacyDriver, RuntimeBuilder};

use crate::admission::{Admission, ShardAdmission};
use crate::breaker::Breakers;
use crate::config::{DataPlaneConfig, IoDriver};
use crate::metrics::Metrics;
use crate::proxy::{serve_connection, Shard};
use crate::route::kv_index::KvIndex;
use crate::route::Selector;
use crate::sync::{Directory, LoadBoard, PrefixFeed};
use crate::upstream::Pool;

/// What a shard reports once it is serving.
#[derive(Clone, Debug)]
pub struct ShardInfo {
    pub id: usize,
    /// The shard's listening socket (shut down to stop accepting when draining).
    pub listener_fd: i32,
    /// `io_uring` or `epoll`.
    pub driver: &'static str,
    /// With io_uring, how its ring runs completions (`UringSetup::name`); `none` on epoll.
    pub uring_setup: &'static str,
    pub core: Option<usize>,
}

/// The running data plane.
pub struct DataPlane {
    pub local_addr: SocketAddr,
    /// Set when the process drains: shards stop accepting, /readiness answers 503, and
    /// connections close after their current response.
    pub draining: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The load view the shards route by; the control plane writes worker reports on it.
    pub board: std::sync::Arc<LoadBoard>,
    /// Where the control plane publishes new worker sets.
    pub directory: Arc<Directory>,
    pub breakers: Arc<Breakers>,
    pub admission: Arc<Admission>,
    /// Every shard's counters, summed when Prometheus scrapes.
    pub metrics: Arc<Metrics>,
    /// What gRPC engines report holding in their KV caches; the control plane writes it.
    pub kv_index: Arc<KvIndex>,
    pub shards: Vec<ShardInfo>,
    threads: Vec<JoinHandle<()>>,
}

impl DataPlane {
    /// Stops accepting on every shard and marks the data plane as draining; requests in
    /// flight go on. Returns at once.
    pub fn start_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for s in &self.shards {
            unsafe {
                libc::shutdown(s.listener_fd, libc::SHUT_RD);
            }
        }
    }

    /// Requests still with a worker.
    pub fn in_flight(&self) -> u32 {
        self.board.total_in_flight()
    }

    /// Blocks until every shard thread ends (they serve until the process exits).
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// What every shard shares.
#[derive(Clone)]
struct Shared {
    board: Arc<LoadBoard>,
    directory: Arc<Directory>,
    breakers: Arc<Breakers>,
    admission: Arc<Admission>,
    metrics: Arc<Metrics>,
    kv_index: Arc<KvIndex>,
}

type Runtime = FusionRuntime<TimeDriver<IoUringDriver>, TimeDriver<LegacyDriver>>;

/// io_uring submission queue size per shard.
const URING_ENTRIES: u32 = 4096;

/// How a shard's ring has the kernel finish its completions, cheapest first. By default the
/// kernel interrupts the shard (an IPI, or a signal-like task-work run) for every socket
/// event that completes an operation. A shard only looks at completions when it parks, so
/// it asks to have that work deferred until then (`DEFER_TASKRUN`, kernel 6.1; one thread
/// owns the ring, `SINGLE_ISSUER`), or else run at its next entry into the kernel
/// (`COOP_TASKRUN`, 5.19). Side by side with the plain ring in perf/ (2026-12-07, three
/// runs): 2–17% less router CPU per streamed request; perf/README has the tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UringSetup {
    DeferTaskrun,
    CoopTaskrun,
    Plain,
}

impl UringSetup {
    pub(crate) const PREFERENCE: [UringSetup; 3] =
        [Self::DeferTaskrun, Self::CoopTaskrun, Self::Plain];

    pub(crate) fn builder(self) -> io_uring::Builder {
        let mut b = io_uring::IoUring::builder();
        match self {
            Self::DeferTaskrun => {
                b.setup_single_issuer().setup_defer_taskrun();
            }
            Self::CoopTaskrun => {
                b.setup_coop_taskrun();
            }
            Self::Plain => {}
        }
        b
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::DeferTaskrun => "defer_taskrun",
            Self::CoopTaskrun => "coop_taskrun",
            Self::Plain => "plain",
        }
    }
}

/// The shard's runtime on the driver asked for; with io_uring, on the cheapest setup the
/// kernel grants (an older kernel refuses the newer flags with EINVAL).
fn build_runtime(driver: IoDriver) -> Result<(Runtime, &'static str, Option<UringSetup>), String> {
    if driver == IoDriver::Epoll {
        let rt = RuntimeBuilder::<LegacyDriver>::new()
            .enable_timer()
            .build()
            .map_err(|e| format!("cannot start the epoll runtime: {e}"))?;
        return Ok((rt.into(), "epoll", None));
    }
    let mut refused = None;
    for setup in UringSetup::PREFERENCE {
        let built: std::io::Result<Runtime> = if driver == IoDriver::Uring {
            RuntimeBuilder::<IoUringDriver>::new()
                .with_entries(URING_ENTRIES)
                .uring_builder(setup.builder())
                .enable_timer()
                .build()
                .map(Into::into)
        } else {
            // `auto`: io_uring in this setup, or epoll where io_uring is refused outright.
            RuntimeBuilder::<monoio::FusionDriver>::new()
                .with_entries(URING_ENTRIES)
                .uring_builder(setup.builder())
                .enable_timer()
                .build()
        };
        match built {
            Ok(rt) => {
                let (name, setup) = match rt {
                    FusionRuntime::Uring(_) => ("io_uring", Some(setup)),
                    FusionRuntime::Legacy(_) => ("epoll", None),
                };
                return Ok((rt, name, setup));
            }
            Err(e) => refused = Some(e),
        }
    }
    let e = refused.expect("at least one setup was tried");
    Err(match driver {
        IoDriver::Uring => format!(
            "--io-driver uring: io_uring is not available ({e}); a seccomp profile \
             (Docker's default) or the kernel refuses it. Use --io-driver auto or epoll, \
             or allow io_uring_setup/io_uring_enter/io_uring_register"
        ),
        _ => format!("cannot start the io runtime: {e}"),
    })
}

/// Starts every shard and returns once all of them listen, or with the first error.
pub fn start(cfg: DataPlaneConfig) -> Result<DataPlane, String> {
    let cores = if cfg.pin_cores {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut listen = cfg.listen;
    let slots = cfg.max_workers.max(cfg.workers.len());
    let board = Arc::new(LoadBoard::new(cfg.shards, slots));
    let shared = Shared {
        board: board.clone(),
        directory: Arc::new(Directory::new(cfg.workers.clone())),
        breakers: Arc::new(Breakers::new(slots, cfg.breaker)),
        admission: Arc::new(Admission::new(cfg.admission)),
        metrics: Arc::new(Metrics::new(cfg.shards, slots)),
        kv_index: Arc::new(KvIndex::new(slots)),
    };
    let mut feeds = PrefixFeed::mesh(cfg.shards).into_iter();
    // P/D mode: the prefill workers' prefix index has its own.
    let mut prefill_feeds =
        PrefixFeed::mesh(if cfg.pd.is_some() { cfg.shards } else { 0 }).into_iter();
    let draining = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut infos = Vec::with_capacity(cfg.shards);
    let mut threads = Vec::with_capacity(cfg.shards);
    // Shard 0 binds first so that port 0 resolves to one port that the others share.
    for id in 0..cfg.shards {
        let core = if cores.is_empty() {
            None
        } else {
            Some(cores[id % cores.len()])
        };
        let (tx, rx) = mpsc::channel::<Result<(ShardInfo, SocketAddr), String>>();
        let mut shard_cfg = cfg.clone();
        shard_cfg.listen = listen;
        let shared = shared.clone();
        let feed = (feeds.next(), prefill_feeds.next());
        let drain = draining.clone();
        let t = std::thread::Builder::new()
            .name(format!("shard-{id}"))
            .spawn(move || run_shard(id, core, shard_cfg, shared, feed, drain, tx))
            .map_err(|e| format!("cannot spawn shard thread: {e}"))?;
        match rx.recv() {
            Ok(Ok((info, addr))) => {
                listen = addr;
                infos.push(info);
                threads.push(t);
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(format!("shard {id} died during start")),
        }
    }
    Ok(DataPlane {
        local_addr: listen,
        draining,
        board,
        directory: shared.directory,
        breakers: shared.breakers,
        admission: shared.admission,
        metrics: shared.metrics,
        kv_index: shared.kv_index,
        shards: infos,
        threads,
    })
}

fn run_shard(
    id: usize,
    core: Option<core_affinity::CoreId>,
    cfg: DataPlaneConfig,
    shared: Shared,
    // The prefix inserts of this shard's selector, and of its prefill selector (P/D).
    (feed, prefill_feed): (Option<PrefixFeed>, Option<PrefixFeed>),
    draining: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ready: mpsc::Sender<Result<(ShardInfo, SocketAddr), String>>,
) {
    let pinned = core
        .filter(|c| core_affinity::set_for_current(*c))
        .map(|c| c.id);
    let (mut rt, driver, uring_setup) = match build_runtime(cfg.io_driver) {
        Ok(x) => x,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    rt.block_on(async move {
        let opts = ListenerOpts::new().reuse_port(true).backlog(4096);
        let listener = match TcpListener::bind_with_config(cfg.listen, &opts) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(format!("cannot listen on {}: {e}", cfg.listen)));
                return;
            }
        };
        let addr = listener.local_addr().unwrap_or(cfg.listen);
        let uring_setup = uring_setup.map_or("none", UringSetup::name);
        tracing::info!(shard = id, driver, uring_setup, core = ?pinned, listen = %addr, "shard started");
        let info = ShardInfo {
            id,
            listener_fd: std::os::fd::AsRawFd::as_raw_fd(&listener),
            driver,
            uring_setup,
            core: pinned,
        };
        let _ = ready.send(Ok((info, addr)));
        let workers = shared.directory.current();
        let all = crate::route::WorkerSet::new(workers.epoch, workers.iter().cloned().collect());
        // In P/D mode, `workers` and `selector` are the decode workers'.
        let pd = cfg.pd.clone().map(|pd| {
            crate::proxy::PdRouting::new(pd, id, &all, shared.board.clone(), prefill_feed)
        });
        let local = if pd.is_some() {
            all.with_role(crate::route::WorkerRole::Decode)
        } else {
            all
        };
        let metrics = shared.metrics.shards[id].clone();
        let mut selector =
            Selector::new(cfg.policy.clone(), id, &local, shared.board.clone(), feed);
        selector.set_kv_index(shared.kv_index.clone());
        metrics.add_selector(selector.stats.clone());
        if let Some(pd) = &pd {
            let mut prefill = pd.selector.borrow_mut();
            prefill.set_kv_index(shared.kv_index.clone());
            metrics.add_selector(prefill.stats.clone());
        }
        let timers = Rc::new(crate::timer::Timers::default());
        monoio::spawn(timers.clone().drive());
        let shard = Rc::new(Shard {
            id,
            timers,
            selector: RefCell::new(selector),
            metrics,
            warn_closed: Default::default(),
            warn_silent: Default::default(),
            warn_no_kv: Default::default(),
            heads_waiting: Default::default(),
            workers: RefCell::new(Rc::new(local)),
            directory: shared.directory,
            board: shared.board.clone(),
            breakers: shared.breakers,
            admission: ShardAdmission::new(shared.admission),
            grpc: crate::grpc::Channels::default(),
            pool: RefCell::new(Pool::new(
                shared.board.slots(),
                cfg.pool_max_idle_per_worker,
                cfg.upstream_idle_timeout,
            )),
            ids: crate::proxy::RequestIds::new(id),
            draining: draining.clone(),
            panic_routing: std::cell::Cell::new(false),
            pd,
            asks_for_load: cfg.policy.policy.uses_load()
                || cfg
                    .pd
                    .as_ref()
                    .is_some_and(|pd| pd.prefill_policy.policy.uses_load()),
            upstream_auth: cfg
                .worker_api_key
                .as_ref()
                .map(|k| format!("Bearer {k}").into_bytes()),
            cfg,
        });
        loop {
            match listener.accept().await {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    monoio::spawn(serve_connection(shard.clone(), stream));
                }
                Err(_) if draining.load(std::sync::atomic::Ordering::Relaxed) => {
                    tracing::info!(shard = id, "stopped accepting (draining)");
                    // In-flight connections are their own tasks; keep the runtime running.
                    std::future::pending::<()>().await;
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(shard = id, error = %e, "accept failed");
                    monoio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    });
}
