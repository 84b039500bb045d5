//! What crosses threads, and only this: the worker directory (the control plane publishes
//! a new immutable worker set with a new epoch; shards notice with one atomic load per
//! request), the load board (every shard's in-flight count per worker slot, written by its
//! shard alone, plus what workers report about themselves and passive health), and the
//! prefix feed (each shard's prefix-index inserts, sent to every other shard over lock-free
//! channels). Nothing on the request path waits: readers see values at most one store old.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::route::WorkerSet;

/// The current worker set. The control plane publishes; shards compare epochs on each
/// request and take the new set (a lock, but only once per change) when it moved.
pub struct Directory {
    epoch: AtomicU64,
    set: Mutex<WorkerSet>,
}

impl Directory {
    pub fn new(set: WorkerSet) -> Self {
        Directory {
            epoch: AtomicU64::new(set.epoch),
            set: Mutex::new(set),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn current(&self) -> WorkerSet {
        self.set.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes `set` current (its epoch must be higher than the current one).
    pub fn publish(&self, set: WorkerSet) {
        let epoch = set.epoch;
        *self.set.lock().unwrap_or_else(|e| e.into_inner()) = set;
        self.epoch
            .store(epoch, std::sync::atomic::Ordering::Release);
    }
}

/// 16 counters per cache line, so two shards never write the same line.
#[repr(align(64))]
struct Line([AtomicU32; 16]);

impl Line {
    fn new() -> Self {
        Line(std::array::from_fn(|_| AtomicU32::new(0)))
    }
}

/// What a worker last said about itself (vLLM's `endpoint-load-metrics` header or its
/// `/metrics` gauges). `u32::MAX` = never reported.
pub struct WorkerReport {
    pub waiting: AtomicU32,
    pub running: AtomicU32,
    /// KV-cache usage, a fraction, as `f32` bits (thousandths would read a real vLLM's
    /// 0.0004 as 0: a few short requests on a large cache).
    pub kv_usage: AtomicU32,
}

pub struct LoadBoard {
    workers: usize,
    lines_per_shard: usize,
    /// shard-major: shard s owns lines [s*lines_per_shard, (s+1)*lines_per_shard).
    in_flight: Box<[Line]>,
    reports: Box<[WorkerReport]>,
    /// Passive health: a worker that refused a connection is not routed to until this
    /// time (milliseconds since `epoch`), unless no other worker is usable.
    down_until: Box<[AtomicU64]>,
    epoch: Instant,
}

pub const UNKNOWN: u32 = u32::MAX;

impl LoadBoard {
    pub fn new(shards: usize, workers: usize) -> Self {
        let lines_per_shard = workers.div_ceil(16).max(1);
        LoadBoard {
            workers,
            lines_per_shard,
            in_flight: (0..shards * lines_per_shard).map(|_| Line::new()).collect(),
            reports: (0..workers)
                .map(|_| WorkerReport {
                    waiting: AtomicU32::new(UNKNOWN),
                    running: AtomicU32::new(UNKNOWN),
                    kv_usage: AtomicU32::new(UNKNOWN),
                })
                .collect(),
            down_until: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Takes `worker` out of routing for `period` (it refused a connection). Returns
    /// whether it was usable until now, so the caller logs the change once.
    pub fn mark_down(&self, worker: usize, period: Duration) -> bool {
        let now = self.now_ms();
        let was_usable = self.down_until[worker].load(Relaxed) <= now;
        self.down_until[worker].store(now + period.as_millis() as u64, Relaxed);
        was_usable
    }

    /// Brings `worker` back at once (it answered).
    pub fn mark_up(&self, worker: usize) {
        if self.down_until[worker].load(Relaxed) != 0 {
            self.down_until[worker].store(0, Relaxed);
        }
    }

    pub fn is_usable(&self, worker: usize) -> bool {
        let until = self.down_until[worker].load(Relaxed);
        until == 0 || until <= self.now_ms()
    }

    /// Worker slots on the board.
    pub fn slots(&self) -> usize {
        self.workers
    }

    /// A slot handed to a new worker forgets what its previous holder reported.
    pub fn reset_slot(&self, slot: usize) {
        let r = &self.reports[slot];
        r.waiting.store(UNKNOWN, Relaxed);
        r.running.store(UNKNOWN, Relaxed);
        r.kv_usage.store(UNKNOWN, Relaxed);
        self.down_until[slot].store(0, Relaxed);
    }

    pub fn shards(&self) -> usize {
        self.in_flight.len() / self.lines_per_shard
    }

    fn cell(&self, shard: usize, worker: usize) -> &AtomicU32 {
        &self.in_flight[shard * self.lines_per_shard + worker / 16].0[worker % 16]
    }

    /// Only `shard`'s own thread calls this for its row: a plain load and store suffice.
    pub fn started(&self, shard: usize, worker: usize) {
        let c = self.cell(shard, worker);
        c.store(c.load(Relaxed) + 1, Relaxed);
    }

    pub fn finished(&self, shard: usize, worker: usize) {
        let c = self.cell(shard, worker);
        c.store(c.load(Relaxed).saturating_sub(1), Relaxed);
    }

    /// Requests in flight to any worker from any shard.
    pub fn total_in_flight(&self) -> u32 {
        (0..self.workers).map(|w| self.in_flight(w)).sum()
    }

    /// Requests in flight to `worker` from every shard.
    pub fn in_flight(&self, worker: usize) -> u32 {
        (0..self.shards())
            .map(|s| self.cell(s, worker).load(Relaxed))
            .sum()
    }

    pub fn report(&self, worker: usize) -> &WorkerReport {
        &self.reports[worker]
    }

    /// Requests the worker says are waiting in its queue, if it said.
    pub fn waiting(&self, worker: usize) -> Option<u32> {
        let v = self.reports[worker].waiting.load(Relaxed);
        (v != UNKNOWN).then_some(v)
    }

    pub fn set_waiting(&self, worker: usize, waiting: u32) {
        self.reports[worker].waiting.store(waiting, Relaxed);
    }

    /// Requests the worker says it is running, if it said (only `/metrics` tells).
    pub fn running(&self, worker: usize) -> Option<u32> {
        let v = self.reports[worker].running.load(Relaxed);
        (v != UNKNOWN).then_some(v)
    }

    pub fn set_running(&self, worker: usize, running: u32) {
        self.reports[worker].running.store(running, Relaxed);
    }

    pub fn set_kv_usage(&self, worker: usize, fraction: f64) {
        if fraction.is_nan() {
            return;
        }
        let bits = (fraction.clamp(0.0, 1.0) as f32).to_bits();
        self.reports[worker].kv_usage.store(bits, Relaxed);
    }

    pub fn kv_usage(&self, worker: usize) -> Option<f64> {
        let v = self.reports[worker].kv_usage.load(Relaxed);
        (v != UNKNOWN).then(|| f32::from_bits(v) as f64)
    }
}

/// Parses vLLM's `endpoint-load-metrics` header (`TEXT named_metrics.num_requests_waiting=0.0,
/// named_metrics.kv_cache_usage_perc=0.0` or `JSON {"named_metrics": {...}}`) into
/// (waiting, kv usage fraction).
pub fn parse_endpoint_load_metrics(v: &[u8]) -> (Option<u32>, Option<f64>) {
    let Ok(s) = std::str::from_utf8(v) else {
        return (None, None);
    };
    let mut waiting = None;
    let mut kv = None;
    let mut take = |name: &str, value: &str| {
        let Ok(x) = value
            .trim()
            .trim_end_matches(['}', ','])
            .trim()
            .parse::<f64>()
        else {
            return;
        };
        if name.ends_with("num_requests_waiting") {
            waiting = Some(x.max(0.0) as u32);
        } else if name.ends_with("kv_cache_usage_perc") {
            kv = Some(x);
        }
    };
    if let Some(text) = s.trim().strip_prefix("TEXT") {
        for pair in text.split(',') {
            if let Some((n, v)) = pair.split_once('=') {
                take(n.trim(), v);
            }
        }
    } else if let Some(json) = s.trim().strip_prefix("JSON") {
        // Flat enough to scan: "name": number pairs.
        for part in json.split(',') {
            if let Some((n, v)) = part.rsplit_once(':') {
                let n = n.trim().trim_matches(|c| c == '{' || c == ' ' || c == '"');
                let n = n.rsplit('"').next().unwrap_or(n);
                take(n, v);
            }
        }
    }
    (waiting, kv)
}

/// One shard's prefix-index insert, for the other shards.
pub struct PrefixInsert {
    pub worker: u32,
    pub hashes: Arc<[u64]>,
}

/// Inserts waiting at most this long in a shard's queue; beyond, new ones are dropped
/// (the index is a hint; memory stays bounded).
const FEED_CAPACITY: usize = 4096;

/// A shard's end of the prefix feed: senders to every other shard, its own receiver.
pub struct PrefixFeed {
    peers: Vec<Sender<PrefixInsert>>,
    inbox: Receiver<PrefixInsert>,
    pub dropped: u64,
}

impl PrefixFeed {
    /// One feed per shard, all connected.
    pub fn mesh(shards: usize) -> Vec<PrefixFeed> {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..shards)
            .map(|_| crossbeam_channel::bounded(FEED_CAPACITY))
            .unzip();
        rxs.into_iter()
            .enumerate()
            .map(|(me, inbox)| PrefixFeed {
                peers: txs
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != me)
                    .map(|(_, t)| t.clone())
                    .collect(),
                inbox,
                dropped: 0,
            })
            .collect()
    }

    pub fn publish(&mut self, worker: usize, hashes: &[u64]) {
        if self.peers.is_empty() || hashes.is_empty() {
            return;
        }
        let shared: Arc<[u64]> = Arc::from(hashes);
        for p in &self.peers {
            let msg = PrefixInsert {
                worker: worker as u32,
                hashes: shared.clone(),
            };
            if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = p.try_send(msg) {
                self.dropped += 1;
            }
        }
    }

    /// Inserts from other shards that arrived since the last call.
    pub fn drain(&self) -> impl Iterator<Item = PrefixInsert> + '_ {
        self.inbox.try_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_sums_every_shard() {
        let b = LoadBoard::new(3, 20);
        b.started(0, 17);
        b.started(1, 17);
        b.started(2, 17);
        b.finished(1, 17);
        b.started(2, 3);
        assert_eq!(b.in_flight(17), 2);
        assert_eq!(b.in_flight(3), 1);
        assert_eq!(b.in_flight(0), 0);
        b.finished(0, 0);
        assert_eq!(b.in_flight(0), 0, "never below zero");
    }

    #[test]
    fn a_worker_marked_down_comes_back_after_its_period_or_when_it_answers() {
        let b = LoadBoard::new(1, 2);
        assert!(b.is_usable(1));
        assert!(b.mark_down(1, Duration::from_millis(50)));
        assert!(!b.mark_down(1, Duration::from_millis(50)), "already down");
        assert!(!b.is_usable(1));
        assert!(b.is_usable(0));
        std::thread::sleep(Duration::from_millis(80));
        assert!(b.is_usable(1));
        b.mark_down(1, Duration::from_secs(60));
        b.mark_up(1);
        assert!(b.is_usable(1));
    }

    #[test]
    fn kv_usage_keeps_small_fractions() {
        let b = LoadBoard::new(1, 1);
        assert_eq!(b.kv_usage(0), None);
        b.set_kv_usage(0, 0.000_427_3);
        assert!((b.kv_usage(0).unwrap() - 0.000_427_3).abs() < 1e-9);
        b.set_kv_usage(0, f64::NAN);
        assert!(b.kv_usage(0).unwrap() > 0.0, "NaN is not a report");
        b.set_kv_usage(0, 1.5);
        assert_eq!(b.kv_usage(0), Some(1.0));
    }

    #[test]
    fn endpoint_load_metrics_text_and_json() {
        assert_eq!(
            parse_endpoint_load_metrics(
                b"TEXT named_metrics.num_requests_waiting=3.0, named_metrics.kv_cache_usage_perc=0.25"
            ),
            (Some(3), Some(0.25))
        );
        assert_eq!(
            parse_endpoint_load_metrics(
                br#"JSON {"named_metrics": {"num_requests_waiting": 7.0, "kv_cache_usage_perc": 0.5}}"#
            ),
            (Some(7), Some(0.5))
        );
        assert_eq!(parse_endpoint_load_metrics(b"garbage"), (None, None));
    }

    #[test]
    fn an_insert_on_one_shard_reaches_every_other() {
        let mut feeds = PrefixFeed::mesh(3);
        feeds[0].publish(2, &[1, 2, 3]);
        assert_eq!(feeds[0].drain().count(), 0, "not to itself");
        for f in &feeds[1..] {
            let got: Vec<PrefixInsert> = f.drain().collect();
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].worker, 2);
            assert_eq!(&got[0].hashes[..], &[1, 2, 3]);
        }
    }
}
