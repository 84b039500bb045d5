//! ringrouter: flags → configuration → shards. With `--demo`, built-in mock vLLM workers
//! on loopback give the router something to route to.

mod cli;
mod compat;
mod control;
mod demo;
mod dp;
mod logging;
mod model;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = logging::init(
        &cli.log_level,
        cli.access_log,
        cli.log_dir.as_deref(),
        cli.log_json,
    ) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }

    match cli.vllm_router_only.check() {
        Ok(ignored) => {
            for flag in ignored {
                tracing::warn!("{flag} (vllm-router) has no effect in ringrouter: ignored");
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }

    let pd_mode = cli.pd_disaggregation;
    let pd_workers = match cli.pd_workers() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = cli.discovery.validate(pd_mode) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let discovery = cli
        .discovery
        .service_discovery
        .then(|| cli.discovery.clone());
    if discovery.is_some()
        && !pd_mode
        && !(cli.discovery.prefill_selector.is_empty() && cli.discovery.decode_selector.is_empty())
    {
        tracing::warn!(
            "--prefill-selector and --decode-selector are for P/D mode \
             (--vllm-pd-disaggregation): ignored (pods matching --selector are regular workers)"
        );
    }

    if cli.check_config {
        println!("ringrouter: flags ok");
        return ExitCode::SUCCESS;
    }

    // Signals are caught from here on: one that arrives while the router starts is answered
    // by a drain once it listens, never by the default action, which would kill streams
    // that the first clients (told by the "listening" line) already have in flight.
    let signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };

    // The demo's workers live as long as the process.
    let demo = if cli.demo {
        match demo::start_workers() {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("error: cannot start the demo's mock workers: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        None
    };
    let dp_size = cli.intra_node_data_parallel_size;
    let dp_flag = "--intra-node-data-parallel-size";
    let mut worker_urls = dp::expand(dp_flag, &cli.worker_urls, dp_size);
    if let Some(d) = &demo {
        worker_urls.extend(d.urls());
    }
    let mut pd_workers = pd_workers;
    pd_workers.decode = dp::expand(dp_flag, &pd_workers.decode, dp_size);
    pd_workers.prefill = pd_workers
        .prefill
        .iter()
        .flat_map(|(url, port)| {
            dp::expand(dp_flag, std::slice::from_ref(url), dp_size)
                .into_iter()
                .map(move |u| (u, *port))
        })
        .collect();
    if pd_mode
        && discovery.is_none()
        && (pd_workers.prefill.is_empty() || pd_workers.decode.is_empty())
    {
        tracing::warn!(
            "P/D mode without --prefill or --decode workers: generation requests will get 503 \
             until both exist"
        );
    } else if !pd_mode && worker_urls.is_empty() && discovery.is_none() {
        tracing::warn!(
            "no --worker-urls given: every routed request will get 503 until workers exist"
        );
    }
    let grpc = |u: &String| u.starts_with("grpc://");
    let one_kind = |urls: &mut dyn Iterator<Item = &String>| {
        let kinds: Vec<bool> = urls.map(grpc).collect();
        kinds.iter().all(|&g| g) || kinds.iter().all(|&g| !g)
    };
    if pd_mode
        && !one_kind(
            &mut pd_workers
                .prefill
                .iter()
                .map(|(u, _)| u)
                .chain(pd_workers.decode.iter()),
        )
    {
        eprintln!(
            "error: P/D mode needs --prefill and --decode workers of one kind: all http:// or \
             all grpc://"
        );
        return ExitCode::from(2);
    }
    let grpc_urls = grpc_servers(&worker_urls, &pd_workers);
    let model_args = model::ModelArgs {
        model_path: cli.model_path.clone(),
        tokenizer_path: cli.tokenizer_path.clone(),
        chat_template: cli.chat_template.clone(),
    };
    let wait = std::time::Duration::from_secs(cli.reliability.worker_startup_timeout_secs.max(1));
    let model = match model::load(&model_args, &grpc_urls, wait) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let (admin_tx, admin_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut cfg = cli.data_plane_config();
    cfg.model = model.map(|m| shards::config::Model {
        ctx: std::sync::Arc::new(m.ctx),
        root: m.root,
        block_tokens: m.block_tokens,
        version: m.version,
    });
    cfg.admin = Some(admin_tx);
    let cfg_has_model = cfg.model.is_some();
    cfg.max_workers = cfg
        .max_workers
        .max(worker_urls.len() + pd_workers.prefill.len() + pd_workers.decode.len());
    let plane = match shards::start(cfg) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let mut registry = control::registry::Registry::new(
        plane.directory.clone(),
        plane.board.clone(),
        plane.breakers.clone(),
        plane.metrics.clone(),
        cli.health_config(),
    );
    registry.set_dp_size(dp_size);
    registry.set_grpc_ready(cfg_has_model);
    use control::membership::Role;
    let flagged = worker_urls
        .iter()
        .map(|u| ("--worker-urls", u, Role::Regular))
        .chain(pd_workers.prefill.iter().map(|(u, port)| {
            let role = Role::Prefill {
                bootstrap_port: *port,
            };
            ("--prefill", u, role)
        }))
        .chain(
            pd_workers
                .decode
                .iter()
                .map(|u| ("--decode", u, Role::Decode)),
        );
    for (flag, url, role) in flagged {
        if let Err(e) = registry.add(url, role) {
            let why = match e {
                control::registry::AddError::Invalid(m) => m,
                control::registry::AddError::Exists => format!("'{url}' is given twice"),
                control::registry::AddError::Full(n) => format!("more than {n} workers"),
            };
            eprintln!("error: {flag}: {why}");
            return ExitCode::from(2);
        }
    }
    registry.publish();
    let scrape = (cli.uses_load() && cli.load_scrape_interval_ms > 0)
        .then(|| std::time::Duration::from_millis(cli.load_scrape_interval_ms));
    let prometheus = match bind_prometheus(&cli) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let metrics_addr = prometheus.as_ref().and_then(|l| l.local_addr().ok());
    let prometheus = prometheus.map(|listener| {
        let pd = cli.pd_disaggregation;
        let sources = control::metrics::Sources {
            metrics: plane.metrics.clone(),
            breakers: plane.breakers.clone(),
            board: plane.board.clone(),
            shards: plane.shards.clone(),
            policy: if pd {
                cli.decode_policy.unwrap_or(cli.policy)
            } else {
                cli.policy
            },
            prefill_policy: pd.then(|| cli.prefill_policy.unwrap_or(cli.policy)),
            kv_index: plane.kv_index.clone(),
        };
        (listener, sources)
    });
    let (membership_tx, membership_rx) = tokio::sync::mpsc::unbounded_channel();
    let health_timeout = cli.health_config().timeout;
    let first_round = control::start(control::Control {
        registry,
        directory: plane.directory.clone(),
        board: plane.board.clone(),
        admin: admin_rx,
        membership: membership_rx,
        membership_tx,
        scrape_every: scrape,
        discovery,
        pd_mode,
        prometheus,
        kv_index: cli.indexes_prefixes().then(|| plane.kv_index.clone()),
    });
    // Scripts wait for the "listening" line: let the first health checks decide which
    // workers are routable before it (bounded by the check timeout).
    if let Ok(Err(e)) = first_round.recv_timeout(health_timeout + std::time::Duration::from_secs(1))
    {
        eprintln!("error: {e}");
        return ExitCode::from(1);
    }
    let drivers: Vec<&str> = plane.shards.iter().map(|s| s.driver).collect();
    tracing::info!(
        listen = %plane.local_addr,
        shards = plane.shards.len(),
        ?drivers,
        policy = %cli.policy,
        workers = worker_urls.len() + pd_workers.prefill.len() + pd_workers.decode.len(),
        pd = pd_mode,
        "ringrouter ready"
    );
    // One plain line on stdout for scripts and tests to wait for.
    let mut out = std::io::stdout().lock();
    if let Some(a) = metrics_addr {
        let _ = writeln!(out, "ringrouter metrics on http://{a}/metrics");
    }
    let _ = writeln!(out, "ringrouter listening on http://{}", plane.local_addr);
    if demo.is_some() {
        let _ = writeln!(out, "{}", demo::curl_line(plane.local_addr));
    }
    let _ = out.flush();
    drop(out);
    drain_on_signal(
        signals,
        &plane,
        std::time::Duration::from_secs(cli.shutdown_grace_secs),
    )
}

/// The Prometheus endpoint's socket. The default port taken (another router on the host)
/// is a warning and no metrics; a port asked for that cannot be bound is an error.
fn bind_prometheus(cli: &Cli) -> Result<Option<std::net::TcpListener>, String> {
    let port = cli.prometheus_port.unwrap_or(29000);
    let addr = std::net::SocketAddr::new(cli.prometheus_host, port);
    match std::net::TcpListener::bind(addr) {
        Ok(l) => Ok(Some(l)),
        Err(e) if cli.prometheus_port.is_none() => {
            tracing::warn!(%addr, error = %e, "cannot serve metrics on the default port; running without them (set --prometheus-port)");
            Ok(None)
        }
        Err(e) => Err(format!(
            "--prometheus-host/--prometheus-port: cannot listen on {addr}: {e}"
        )),
    }
}

/// Waits for SIGTERM or SIGINT, then drains: no new connections, /readiness 503, requests
/// in flight finish (bounded by `grace`; a second signal cuts it short), exit 0.
fn drain_on_signal(
    mut signals: signal_hook::iterator::Signals,
    plane: &shards::DataPlane,
    grace: std::time::Duration,
) -> ExitCode {
    let Some(sig) = signals.forever().next() else {
        return ExitCode::SUCCESS;
    };
    tracing::info!(
        signal = sig,
        in_flight = plane.in_flight(),
        grace_secs = grace.as_secs(),
        "draining"
    );
    plane.start_draining();
    let deadline = std::time::Instant::now() + grace;
    loop {
        let left = plane.in_flight();
        if left == 0 {
            tracing::info!("drained; exiting");
            return ExitCode::SUCCESS;
        }
        if std::time::Instant::now() >= deadline || signals.pending().next().is_some() {
            tracing::warn!(
                in_flight = left,
                "grace period over; exiting with requests in flight"
            );
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The gRPC servers among the workers given at start (each once, whatever its ranks).
fn grpc_servers(worker_urls: &[String], pd: &cli::PdWorkers) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let all = worker_urls
        .iter()
        .chain(pd.prefill.iter().map(|(u, _)| u))
        .chain(pd.decode.iter());
    for u in all.filter(|u| u.starts_with("grpc://")) {
        let host = shards::route::host_url(u.trim_end_matches('/')).to_string();
        if !out.contains(&host) {
            out.push(host);
        }
    }
    out
}
