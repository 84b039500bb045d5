//! Admission: `--max-concurrent-requests` as a true in-flight limit across every shard
//! (one shared counter), with a bounded wait queue (`--queue-size`, `--queue-timeout-secs`)
//! beyond which requests get 429, and 408 when their wait runs out.
//!
//! A waiting request is woken when a request on its own shard finishes, and re-checks every
//! few milliseconds for slots freed on other shards; the queue is bounded but not strictly
//! first-come-first-served across shards.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::sync::atomic::{AtomicU32, Ordering::AcqRel, Ordering::Relaxed};
use std::task::{Poll, Waker};
use std::time::Duration;

use monoio::time::Instant;

use crate::http::ApiError;

#[derive(Clone, Copy, Debug)]
pub struct AdmissionConfig {
    /// Requests with a worker at once, across all shards.
    pub max_concurrent: u32,
    /// Requests allowed to wait for a slot; 0 = 429 at once.
    pub queue_size: u32,
    pub queue_timeout: Duration,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            max_concurrent: 32768,
            queue_size: 100,
            queue_timeout: Duration::from_secs(60),
        }
    }
}

/// Shared by every shard.
pub struct Admission {
    cfg: AdmissionConfig,
    in_flight: AtomicU32,
    queued: AtomicU32,
}

/// How often a waiting request looks for slots freed on other shards.
const RECHECK: Duration = Duration::from_millis(5);

impl Admission {
    pub fn new(cfg: AdmissionConfig) -> Self {
        Admission {
            cfg,
            in_flight: AtomicU32::new(0),
            queued: AtomicU32::new(0),
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    pub fn queued(&self) -> u32 {
        self.queued.load(Relaxed)
    }

    fn try_take(&self) -> bool {
        let mut cur = self.in_flight.load(Relaxed);
        loop {
            if cur >= self.cfg.max_concurrent {
                return false;
            }
            match self
                .in_flight
                .compare_exchange_weak(cur, cur + 1, AcqRel, Relaxed)
            {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    fn give_back(&self) {
        self.in_flight.fetch_sub(1, AcqRel);
    }
}

/// A shard's side: its waiters, woken when one of its own requests finishes.
pub struct ShardAdmission {
    shared: std::sync::Arc<Admission>,
    waiters: RefCell<VecDeque<Waker>>,
}

/// A slot; given back when dropped.
pub struct Permit<'a> {
    shard: &'a ShardAdmission,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.shard.shared.give_back();
        if let Some(w) = self.shard.waiters.borrow_mut().pop_front() {
            w.wake();
        }
    }
}

impl ShardAdmission {
    pub fn new(shared: std::sync::Arc<Admission>) -> Self {
        ShardAdmission {
            shared,
            waiters: RefCell::new(VecDeque::new()),
        }
    }

    /// A slot now, or after waiting in the queue; else the error to answer with.
    pub async fn acquire(&self) -> Result<Permit<'_>, ApiError> {
        if self.shared.try_take() {
            return Ok(Permit { shard: self });
        }
        let cfg = &self.shared.cfg;
        if self.shared.queued.fetch_add(1, AcqRel) >= cfg.queue_size {
            self.shared.queued.fetch_sub(1, AcqRel);
            return Err(ApiError::new(
                429,
                format!(
                    "too many requests: {} in flight (--max-concurrent-requests) and {} waiting \
                     (--queue-size)",
                    cfg.max_concurrent, cfg.queue_size
                ),
            ));
        }
        let _queued = Queued(&self.shared);
        let give_up = Instant::now() + cfg.queue_timeout;
        // Whether this wait's waker is in the shard's list (a release pops it).
        let mut listed = false;
        loop {
            let now = Instant::now();
            if now >= give_up {
                return Err(ApiError::new(
                    408,
                    format!(
                        "waited {} s for a free slot (--queue-timeout-secs) and none came",
                        cfg.queue_timeout.as_secs_f64()
                    ),
                ));
            }
            let wake_at = (now + RECHECK).min(give_up);
            let mut parked = false;
            // Boxed: monoio's timer is 640 bytes, 128-aligned, and only a queued request
            // waits on it; inline, every connection's task would carry it.
            let mut sleep = Box::pin(monoio::time::sleep_until(wake_at));
            poll_fn(|cx| {
                // Polling the sleep arms its timer (the recheck for other shards' releases).
                if sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
                if parked {
                    // Woken by a local release, which took the waker off the list.
                    listed = false;
                    return Poll::Ready(());
                }
                parked = true;
                if listed {
                    return Poll::Pending;
                }
                let mut waiters = self.waiters.borrow_mut();
                // Wakers of waits that ended on their timer linger; keep the list short.
                if waiters.len() >= 1024 {
                    waiters.pop_front();
                }
                waiters.push_back(cx.waker().clone());
                listed = true;
                Poll::Pending
            })
            .await;
            if self.shared.try_take() {
                return Ok(Permit { shard: self });
            }
        }
    }
}

/// Counted in the queue while it lives.
struct Queued<'a>(&'a Admission);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;
    use std::sync::Arc;

    fn rt() -> monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>> {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
    }

    #[test]
    fn beyond_the_limit_requests_wait_then_proceed_when_a_slot_frees() {
        rt().block_on(async {
            let shared = Arc::new(Admission::new(AdmissionConfig {
                max_concurrent: 1,
                queue_size: 1,
                queue_timeout: Duration::from_secs(10),
            }));
            let a = Rc::new(ShardAdmission::new(shared.clone()));
            let first = a.acquire().await.unwrap();
            let a2 = a.clone();
            let waiter = monoio::spawn(async move { a2.acquire().await.map(|_| ()) });
            monoio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(shared.queued(), 1);
            let third = a.acquire().await;
            assert_eq!(third.err().map(|e| e.status), Some(429), "queue full");
            drop(first);
            assert!(waiter.await.is_ok());
            assert_eq!(shared.queued(), 0);
            assert_eq!(shared.in_flight(), 0);
        });
    }

    #[test]
    fn a_wait_longer_than_the_queue_timeout_is_408() {
        rt().block_on(async {
            let shared = Arc::new(Admission::new(AdmissionConfig {
                max_concurrent: 1,
                queue_size: 4,
                queue_timeout: Duration::from_millis(30),
            }));
            let a = ShardAdmission::new(shared.clone());
            let _held = a.acquire().await.unwrap();
            let e = a.acquire().await.err().unwrap();
            assert_eq!(e.status, 408);
            assert_eq!(shared.queued(), 0);
        });
    }

    #[test]
    fn a_slot_freed_on_another_shard_is_seen() {
        rt().block_on(async {
            let shared = Arc::new(Admission::new(AdmissionConfig {
                max_concurrent: 1,
                queue_size: 4,
                queue_timeout: Duration::from_secs(10),
            }));
            let other = ShardAdmission::new(shared.clone());
            let held = other.acquire().await.unwrap();
            let me = Rc::new(ShardAdmission::new(shared.clone()));
            let me2 = me.clone();
            let waiter = monoio::spawn(async move { me2.acquire().await.map(|_| ()) });
            monoio::time::sleep(Duration::from_millis(10)).await;
            // Released on "another shard": no local wake; the recheck finds it.
            std::mem::forget(held);
            shared.give_back();
            assert!(waiter.await.is_ok());
        });
    }
}
