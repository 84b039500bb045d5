//! The control plane: one thread with a tokio runtime and a hyper client, never on the
//! request path. For now it scrapes each worker's `/metrics` for vLLM's load gauges and
//! writes them on the shards' load board (the fallback for streamed requests, which carry
//! no in-band load report). Health checks and discovery will live here too.

mod load_scrape;
#[allow(dead_code)] // wired in by the registry (issue 6)
pub mod membership;

use std::sync::Arc;
use std::time::Duration;

use shards::sync::LoadBoard;

/// Starts the control-plane thread.
pub fn start(worker_urls: Vec<String>, board: Arc<LoadBoard>, scrape_every: Option<Duration>) {
    let Some(every) = scrape_every else { return };
    if worker_urls.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "control plane: cannot start its runtime");
                    return;
                }
            };
            rt.block_on(load_scrape::run(worker_urls, board, every));
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "control plane: cannot spawn its thread");
    }
}
