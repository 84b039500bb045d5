//! Owns the shape of the load: closed loop (N lanes back to back) or open loop (a dispatcher
//! thread releasing jobs at their scheduled times to a pool of lanes that grows on demand up to
//! `--max-connections`), and waiting for everything to finish.
//!
//! The open-loop dispatcher is a plain thread sleeping with 1 ns timer slack rather than a
//! tokio timer (1 ms granularity), so jobs leave within microseconds of their scheduled time;
//! latency is measured from the scheduled time, so a request that waits for a free connection
//! is charged for the wait (no coordinated omission).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;

use crate::cli::Load;
use crate::lane::{Job, Lane, Queue, Run};
use crate::progress::Progress;
use crate::schedule::{Arrivals, Clock};

/// Runs the whole load and returns its clock once every request has ended.
pub async fn drive(run: Arc<Run>) -> Clock {
    match run.cfg.load {
        Load::Closed { concurrency } => closed_loop(run, concurrency).await,
        Load::Open {
            rate,
            poisson,
            max_connections,
        } => open_loop(run, rate, poisson, max_connections).await,
    }
}

async fn closed_loop(run: Arc<Run>, concurrency: usize) -> Clock {
    let connecting: Vec<JoinHandle<Lane>> = (0..concurrency)
        .map(|i| tokio::spawn(Lane::new(i, run.clone()).preconnect()))
        .collect();
    let mut lanes = Vec::with_capacity(concurrency);
    for c in connecting {
        lanes.push(c.await.expect("lane task"));
    }
    let clock = Clock::starting_now(&run.cfg);
    let progress = Progress::start(run.clone(), clock);
    let running: Vec<JoinHandle<()>> = lanes
        .into_iter()
        .map(|lane| tokio::spawn(lane.run_closed(clock)))
        .collect();
    for r in running {
        r.await.expect("lane task");
    }
    progress.finish().await;
    clock
}

async fn open_loop(run: Arc<Run>, rate: f64, poisson: bool, max_connections: usize) -> Clock {
    let clock = Clock::starting_now(&run.cfg);
    let progress = Progress::start(run.clone(), clock);
    let (tx, rx) = mpsc::unbounded_channel();
    let queue = Arc::new(Queue {
        rx: Mutex::new(rx),
        free: AtomicUsize::new(0),
        queued: AtomicUsize::new(0),
    });
    let dispatcher = Dispatcher {
        run: run.clone(),
        clock,
        arrivals: Arrivals::new(clock.start, rate, poisson, run.cfg.seed),
        max_connections,
        queue,
        tx,
        handle: Handle::current(),
    };
    let lanes = tokio::task::spawn_blocking(move || dispatcher.dispatch())
        .await
        .expect("dispatcher thread");
    for l in lanes {
        l.await.expect("lane task");
    }
    progress.finish().await;
    clock
}

struct Dispatcher {
    run: Arc<Run>,
    clock: Clock,
    arrivals: Arrivals,
    max_connections: usize,
    queue: Arc<Queue>,
    tx: mpsc::UnboundedSender<Job>,
    handle: Handle,
}

/// Longest single sleep, so Ctrl-C is noticed during slow schedules.
const SLEEP_SLICE: Duration = Duration::from_millis(100);

impl Dispatcher {
    /// Releases jobs at their scheduled times; returns the lanes it spawned.
    fn dispatch(mut self) -> Vec<JoinHandle<()>> {
        set_fine_timer_slack();
        let mut lanes = Vec::new();
        let mut measured = 0u64;
        loop {
            let at = self.arrivals.next_arrival();
            if self.clock.deadline.is_some_and(|d| at >= d) {
                break;
            }
            let is_measured = at >= self.clock.measure_start;
            if is_measured {
                if self.run.cfg.requests.is_some_and(|n| measured >= n) {
                    break;
                }
                measured += 1;
            }
            if !self.sleep_until(at) {
                break;
            }
            let queued = self.queue.queued.fetch_add(1, Ordering::AcqRel);
            if queued >= self.queue.free.load(Ordering::Acquire)
                && lanes.len() < self.max_connections
            {
                self.queue.free.fetch_add(1, Ordering::AcqRel);
                let lane = Lane::new(lanes.len(), self.run.clone());
                lanes.push(self.handle.spawn(lane.run_open(self.queue.clone())));
            }
            let job = Job {
                start: at,
                measured: is_measured,
                scheduled: true,
            };
            if self.tx.send(job).is_err() {
                break;
            }
        }
        lanes
    }

    /// Sleeps until `at`; false if the run was stopped meanwhile.
    fn sleep_until(&self, at: Instant) -> bool {
        loop {
            if self.run.stop.load(Ordering::Relaxed) {
                return false;
            }
            let now = Instant::now();
            if now >= at {
                return true;
            }
            std::thread::sleep((at - now).min(SLEEP_SLICE));
        }
    }
}

/// Asks Linux to wake this thread's sleeps on time instead of up to 50 µs late.
fn set_fine_timer_slack() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}
