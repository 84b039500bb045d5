//! Owns a lane: one client connection and its buffers, running requests one after another
//! (back to back in closed loop, from the shared queue in open loop), reconnecting as needed,
//! and recording each measured request's outcome.
//!
//! A request whose reused keep-alive connection turns out closed before any reply byte is
//! retried once on a fresh connection (counted as a stale retry, not as an error): servers
//! may close idle connections at any time, and HTTP clients do the same.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Mutex};

use crate::cli::Config;
use crate::client::{Conn, READ_BUF};
use crate::observe::Observation;
use crate::request::{RequestSet, Target};
use crate::schedule::Clock;
use crate::stats::{ErrorKind, StatShards, Success};

/// Live counters, read by the progress bar and the report.
#[derive(Debug, Default)]
pub struct Counters {
    /// Measured requests that succeeded / failed.
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// TCP connections opened.
    pub connections: AtomicU64,
    /// Measured requests started (closed loop tickets against `--requests`).
    pub issued: AtomicU64,
    /// Source of per-request prompt nonces.
    pub nonce: AtomicU64,
}

/// What all lanes of a run share.
#[derive(Debug)]
pub struct Run {
    pub cfg: Config,
    pub target: Target,
    pub requests: RequestSet,
    pub stats: StatShards,
    pub counters: Counters,
    /// Set on Ctrl-C: start no more requests.
    pub stop: AtomicBool,
}

/// One request to send: its latency origin and whether it counts.
#[derive(Debug, Clone, Copy)]
pub struct Job {
    pub start: Instant,
    pub measured: bool,
    /// Open loop: `start` is a scheduled time, so record the send delay.
    pub scheduled: bool,
}

/// Open loop: jobs waiting for a lane, and how many lanes are free.
#[derive(Debug)]
pub struct Queue {
    pub rx: Mutex<mpsc::UnboundedReceiver<Job>>,
    /// Lanes not running a job (spawned, waiting, or just finished).
    pub free: AtomicUsize,
    /// Jobs sent but not yet taken by a lane.
    pub queued: AtomicUsize,
}

/// After a connect failure in closed loop, wait this long so a down server is not hammered.
const CONNECT_BACKOFF: Duration = Duration::from_millis(10);

#[derive(Debug)]
pub struct Lane {
    id: usize,
    run: Arc<Run>,
    conn: Option<Conn>,
    read_buf: Vec<u8>,
    request: Vec<u8>,
    obs: Observation,
    rng: fastrand::Rng,
    stale_retry: bool,
}

impl Lane {
    pub fn new(id: usize, run: Arc<Run>) -> Lane {
        let rng = fastrand::Rng::with_seed(
            run.cfg.seed ^ (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        Lane {
            id,
            run,
            conn: None,
            read_buf: vec![0; READ_BUF],
            request: Vec::new(),
            obs: Observation::new(),
            rng,
            stale_retry: false,
        }
    }

    /// Opens the connection ahead of the run (failures are retried by the first request).
    pub async fn preconnect(mut self) -> Lane {
        if let Ok(Ok(c)) =
            tokio::time::timeout(self.run.cfg.timeout, Conn::connect(self.run.target.addr)).await
        {
            self.conn = Some(c);
            self.run
                .counters
                .connections
                .fetch_add(1, Ordering::Relaxed);
        }
        self
    }

    /// Closed loop: send back to back until the deadline, the request budget, or a stop.
    pub async fn run_closed(mut self, clock: Clock) {
        let run = self.run.clone();
        loop {
            if run.stop.load(Ordering::Relaxed) {
                break;
            }
            let now = Instant::now();
            if clock.deadline.is_some_and(|d| now >= d) {
                break;
            }
            let measured = now >= clock.measure_start;
            if measured {
                if let Some(n) = run.cfg.requests {
                    if run.counters.issued.fetch_add(1, Ordering::Relaxed) >= n {
                        break;
                    }
                }
            }
            let job = Job {
                start: now,
                measured,
                scheduled: false,
            };
            if self.run_one(job).await == Some(ErrorKind::Connect) {
                tokio::time::sleep(CONNECT_BACKOFF).await;
            }
        }
    }

    /// Open loop: take jobs from the queue until it closes.
    pub async fn run_open(mut self, queue: Arc<Queue>) {
        loop {
            let job = queue.rx.lock().await.recv().await;
            let Some(job) = job else { break };
            queue.queued.fetch_sub(1, Ordering::AcqRel);
            queue.free.fetch_sub(1, Ordering::AcqRel);
            self.run_one(job).await;
            queue.free.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Sends one request and records it; returns the error kind if it failed.
    async fn run_one(&mut self, job: Job) -> Option<ErrorKind> {
        let run = self.run.clone();
        let nonce = run.counters.nonce.fetch_add(1, Ordering::Relaxed);
        run.requests
            .pick(&mut self.rng)
            .write_into(&mut self.request, nonce);
        self.obs.begin(job.start, run.cfg.stream);
        self.stale_retry = false;

        let result = match tokio::time::timeout(run.cfg.timeout, self.attempt()).await {
            Ok(r) => r,
            Err(_) => {
                self.conn = None;
                Err(ErrorKind::Timeout)
            }
        };
        let end = Instant::now();
        let result = result.and_then(|status| {
            if !(200..300).contains(&status) {
                Err(ErrorKind::Status(status))
            } else if self.obs.scanned() && self.obs.events.in_band_error {
                Err(ErrorKind::InBand)
            } else {
                Ok(())
            }
        });
        if !job.measured {
            return result.err();
        }
        let obs = &self.obs;
        let mut stats = run.stats.shard(self.id);
        if self.stale_retry {
            stats.stale_retries += 1;
        }
        match result {
            Ok(()) => {
                let ev = &obs.events;
                stats.record_success(
                    &Success {
                        total: end.saturating_duration_since(obs.start),
                        head: obs.since_start(obs.head),
                        first_byte: obs.since_start(obs.first_byte),
                        ttft: obs.since_start(ev.first_event),
                        mock_timing: ev.mock_timing_us.map(Duration::from_micros),
                        send_delay: if job.scheduled {
                            obs.since_start(obs.sent)
                        } else {
                            None
                        },
                        gaps_us: &ev.gaps_us,
                        worker: obs.worker(),
                        stream: obs
                            .scanned()
                            .then_some((ev.content_events, ev.ended_with_done)),
                    },
                    end,
                    run.cfg.expect_events,
                );
                drop(stats);
                run.counters.ok.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(kind) => {
                stats.record_error(kind, obs.worker(), end);
                drop(stats);
                run.counters.failed.fetch_add(1, Ordering::Relaxed);
                Some(kind)
            }
        }
    }

    /// Connects if needed and exchanges the request; returns the response status.
    async fn attempt(&mut self) -> Result<u16, ErrorKind> {
        let mut retried = false;
        loop {
            if self.conn.is_none() {
                let conn = Conn::connect(self.run.target.addr)
                    .await
                    .map_err(|_| ErrorKind::Connect)?;
                self.run
                    .counters
                    .connections
                    .fetch_add(1, Ordering::Relaxed);
                self.conn = Some(conn);
            }
            let conn = self.conn.as_mut().expect("connected above");
            let reused = conn.responses > 0;
            let outcome = conn
                .exchange(
                    &self.request,
                    &mut self.read_buf,
                    &self.run.cfg.worker_header,
                    &mut self.obs,
                )
                .await;
            match outcome {
                Ok(f) => {
                    if !f.reusable {
                        self.conn = None;
                    }
                    return Ok(f.status);
                }
                Err(e) => {
                    self.conn = None;
                    if e.nothing_received && reused && !retried {
                        retried = true;
                        self.stale_retry = true;
                        self.obs.retry();
                        continue;
                    }
                    return Err(e.kind);
                }
            }
        }
    }
}
