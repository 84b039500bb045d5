//! Owns the progress bar: drawn on stderr only when it is a terminal, `--quiet` is off, and the
//! run has lasted more than a couple of seconds; cleared before the report is printed.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;

use crate::lane::Run;
use crate::schedule::Clock;

/// Runs shorter than this get no bar.
const SHOW_AFTER: Duration = Duration::from_secs(2);
const TICK: Duration = Duration::from_millis(200);

/// Handle on the progress task.
pub struct Progress {
    task: Option<(JoinHandle<()>, Arc<AtomicBool>)>,
}

impl Progress {
    pub fn start(run: Arc<Run>, clock: Clock) -> Progress {
        if run.cfg.quiet || !std::io::stderr().is_terminal() {
            return Progress { task: None };
        }
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let task = tokio::spawn(async move {
            while Instant::now() < clock.start + SHOW_AFTER {
                if flag.load(Ordering::Relaxed) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let (len, by_count) = match run.cfg.requests {
                Some(n) => (n, true),
                None => {
                    let total = run.cfg.warmup + run.cfg.duration.unwrap_or_default();
                    (total.as_millis() as u64, false)
                }
            };
            let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr())
                .with_elapsed(clock.start.elapsed());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {percent:>3}% {msg}",
                )
                .expect("valid template"),
            );
            while !flag.load(Ordering::Relaxed) {
                let c = &run.counters;
                let ok = c.ok.load(Ordering::Relaxed);
                let failed = c.failed.load(Ordering::Relaxed);
                let now = Instant::now();
                let pos = if by_count {
                    ok + failed
                } else {
                    (now - clock.start).as_millis() as u64
                };
                bar.set_position(pos.min(len));
                let window = clock.window(Some(now)).as_secs_f64();
                let rate = if window > 0.0 {
                    ok as f64 / window
                } else {
                    0.0
                };
                let phase = if now < clock.measure_start {
                    "warmup "
                } else {
                    ""
                };
                bar.set_message(format!("{phase}{ok} ok, {failed} failed, {rate:.0} req/s"));
                tokio::time::sleep(TICK).await;
            }
            bar.finish_and_clear();
        });
        Progress {
            task: Some((task, done)),
        }
    }

    /// Stops and clears the bar.
    pub async fn finish(self) {
        if let Some((task, done)) = self.task {
            done.store(true, Ordering::Relaxed);
            let _ = task.await;
        }
    }
}
