//! loadgen: wires the flags, the target, the request set and the load driver together, then
//! prints the report and picks the exit status (2: bad usage or setup, 1: `--fail-on-error`
//! and something failed).

mod chunked;
mod cli;
mod client;
mod driver;
mod lane;
mod observe;
mod progress;
mod report;
mod request;
mod schedule;
mod sse;
mod stats;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;

use crate::cli::{Args, Config};
use crate::lane::{Counters, Run};
use crate::report::{Report, RunFacts};
use crate::request::{RequestSet, Target};
use crate::stats::StatShards;

fn main() -> ExitCode {
    let cfg = match Args::parse().into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    let target = match Target::parse(&cfg.url) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start runtime: {e}");
            return ExitCode::from(2);
        }
    };
    rt.block_on(run(cfg, target))
}

async fn run(cfg: Config, target: Target) -> ExitCode {
    let model = match &cfg.model {
        Some(m) => m.clone(),
        None => match discover_model(&target).await {
            Ok(m) => m,
            Err(e) => {
                eprintln!("loadgen: no --model given and {e}");
                return ExitCode::from(2);
            }
        },
    };
    let requests = RequestSet::build(&cfg, &target, &model);
    let shards = cfg.threads * 4;
    let run = Arc::new(Run {
        cfg,
        target,
        requests,
        stats: StatShards::new(shards),
        counters: Counters::default(),
        stop: AtomicBool::new(false),
    });

    let on_signal = run.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_signal.stop.store(true, Ordering::Relaxed);
            eprintln!("\nloadgen: stopping; waiting for requests in flight (Ctrl-C again to quit)");
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });

    let clock = driver::drive(run.clone()).await;

    let stats = run.stats.merged();
    let report = Report::build(
        &stats,
        &RunFacts {
            cfg: &run.cfg,
            model: &model,
            clock,
            connections: run.counters.connections.load(Ordering::Relaxed),
            interrupted: run.stop.load(Ordering::Relaxed),
        },
    );
    if run.cfg.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.table());
    }
    if run.cfg.fail_on_error && report.problems() > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Asks the server for its models and takes the first id.
async fn discover_model(target: &Target) -> Result<String, String> {
    let request = target.get_request("/v1/models");
    let (status, body) = client::get(target.addr, &request).await?;
    if status != 200 {
        return Err(format!("GET /v1/models answered {status}"));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| format!("GET /v1/models: bad JSON: {e}"))?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| "GET /v1/models listed no model".to_string())
}
