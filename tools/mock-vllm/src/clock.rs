//! Sleeps that end when they are due, not at tokio's next millisecond tick. tokio's timer
//! wheel rounds every deadline up to a whole millisecond, so a 20 ms time to first token
//! took 20–21 ms, and a benchmark that subtracts the mock's own times from what a client
//! sees through a router (perf/pd.py) measured that rounding more than the router.
//!
//! One thread keeps the deadlines in a heap and waits on a condition variable with its
//! timer slack at 1 ns, so a sleep ends within one thread wake-up of its deadline. The
//! first token and a non-streamed answer wait here; gaps between tokens keep tokio's
//! timer (thousands a second per stream would make this thread the mock's busiest).

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use tokio::time::Instant;

/// Resolves at `at`, or at once if it has passed.
pub fn sleep_until(at: Instant) -> Deadline {
    Deadline {
        at: at.into_std(),
        entry: None,
    }
}

pub struct Deadline {
    at: std::time::Instant,
    entry: Option<Arc<Entry>>,
}

impl Deadline {
    pub fn at(&self) -> Instant {
        Instant::from_std(self.at)
    }
}

#[derive(Default)]
struct Entry {
    fired: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

struct Due {
    at: std::time::Instant,
    seq: u64,
    entry: Arc<Entry>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    /// The earliest deadline is the greatest: `BinaryHeap` pops it first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Default)]
struct Clock {
    due: Mutex<BinaryHeap<Due>>,
    changed: Condvar,
    seq: AtomicU64,
}

fn clock() -> &'static Clock {
    static CLOCK: OnceLock<&'static Clock> = OnceLock::new();
    CLOCK.get_or_init(|| {
        let clock: &'static Clock = Box::leak(Box::default());
        std::thread::Builder::new()
            .name("mock-clock".into())
            .spawn(move || clock.run())
            .expect("spawn the mock's clock thread");
        clock
    })
}

impl Clock {
    fn run(&self) {
        // SAFETY: prctl with an integer argument changes only this thread's timer slack.
        unsafe {
            libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
        }
        let mut due = self.due.lock().expect("clock lock");
        loop {
            let now = std::time::Instant::now();
            while due.peek().is_some_and(|d| d.at <= now) {
                let d = due.pop().expect("peeked");
                d.entry.fired.store(true, Relaxed);
                let waker = d.entry.waker.lock().expect("waker lock").take();
                if let Some(w) = waker {
                    w.wake();
                }
            }
            due = match due.peek() {
                Some(d) => {
                    let wait = d.at - now;
                    self.changed.wait_timeout(due, wait).expect("clock lock").0
                }
                None => self.changed.wait(due).expect("clock lock"),
            };
        }
    }

    fn add(&self, at: std::time::Instant, entry: Arc<Entry>) {
        let seq = self.seq.fetch_add(1, Relaxed);
        let mut due = self.due.lock().expect("clock lock");
        let earliest = due.peek().is_none_or(|d| at < d.at);
        due.push(Due { at, seq, entry });
        drop(due);
        if earliest {
            self.changed.notify_one();
        }
    }
}

impl Future for Deadline {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if std::time::Instant::now() >= self.at {
            return Poll::Ready(());
        }
        match &self.entry {
            Some(entry) => {
                if entry.fired.load(Relaxed) {
                    return Poll::Ready(());
                }
                let mut w = entry.waker.lock().expect("waker lock");
                if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
                drop(w);
                // Fired between the check and the new waker: it took the old one.
                if entry.fired.load(Relaxed) {
                    return Poll::Ready(());
                }
            }
            None => {
                let entry = Arc::new(Entry::default());
                *entry.waker.lock().expect("waker lock") = Some(cx.waker().clone());
                clock().add(self.at, entry.clone());
                self.entry = Some(entry);
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "current_thread")]
    async fn sleeps_end_at_or_after_their_deadlines_in_deadline_order() {
        let start = Instant::now();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in (0..8u64).rev() {
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let at = start + Duration::from_millis(2 + 3 * i);
                sleep_until(at).await;
                assert!(Instant::now() >= at, "sleep {i} ended before its deadline");
                order.lock().unwrap().push(i);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (0..8).collect::<Vec<_>>());
    }
}
