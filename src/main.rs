//! ringrouter: flags → configuration → shards. With `--demo`, built-in mock vLLM workers
//! on loopback give the router something to route to.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},monoio=warn", cli.log_level)));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    let worker_urls = cli.worker_urls.clone();
    if worker_urls.is_empty() && !cli.demo {
        tracing::warn!("no --worker-urls given: every routed request will get 503 until workers exist");
    }
    let cfg = match cli.data_plane_config(&worker_urls) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let plane = match shards::start(cfg) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let drivers: Vec<&str> = plane.shards.iter().map(|s| s.driver).collect();
    tracing::info!(listen = %plane.local_addr, shards = plane.shards.len(), ?drivers, policy = %cli.policy, workers = worker_urls.len(), "ringrouter ready");
    plane.join();
    ExitCode::SUCCESS
}
