//! Circuit breakers, one per worker slot, fed by every shard's outcomes (connect errors,
//! resets, 5xx, timeouts) and read by every shard when it picks a worker. Plain atomics:
//! a success on a healthy worker is one load, a failure one `fetch_add`.
//!
//! Closed → (`failure_threshold` consecutive failures) → Open → (`open_for` elapsed) →
//! HalfOpen, where one probe request at a time may pass → (`success_threshold` successes
//! in a row) → Closed, or (any failure) → Open again.

use std::sync::atomic::{
    AtomicU32, AtomicU64, AtomicU8, Ordering::AcqRel, Ordering::Acquire, Ordering::Relaxed,
    Ordering::Release,
};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
pub struct BreakerConfig {
    pub enabled: bool,
    pub failure_threshold: u32,
    pub success_threshold: u32,
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            enabled: true,
            failure_threshold: 10,
            success_threshold: 3,
            open_for: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl BreakerState {
    pub fn name(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// What the breaker lets a request do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Closed: go.
    Yes,
    /// Half-open: go as the probe; report its outcome (or `release_probe`).
    Probe,
    /// Open, or half-open with its probe already out.
    No,
}

#[derive(Default)]
#[repr(align(64))]
struct Cell {
    state: AtomicU8,
    failures: AtomicU32,
    successes: AtomicU32,
    probe_out: AtomicU8,
    opened_at_ms: AtomicU64,
    /// State changes, `[from * 3 + to]` (rare: a shared `fetch_add` is fine).
    transitions: [AtomicU64; 9],
}

pub struct Breakers {
    cfg: BreakerConfig,
    cells: Box<[Cell]>,
    epoch: Instant,
}

impl Breakers {
    pub fn new(slots: usize, cfg: BreakerConfig) -> Self {
        Breakers {
            cfg,
            cells: (0..slots).map(|_| Cell::default()).collect(),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn moved(&self, c: &Cell, from: BreakerState, to: BreakerState) {
        c.transitions[from as usize * 3 + to as usize].fetch_add(1, Relaxed);
    }

    /// How often the breaker of `slot` went `from` → `to` since its worker took the slot.
    pub fn transitions(&self, slot: usize, from: BreakerState, to: BreakerState) -> u64 {
        self.cells[slot].transitions[from as usize * 3 + to as usize].load(Relaxed)
    }

    pub fn state(&self, slot: usize) -> BreakerState {
        match self.cells[slot].state.load(Relaxed) {
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    /// Whether a request may go to `slot` now; may move Open → HalfOpen.
    pub fn admit(&self, slot: usize, worker: &str) -> Admit {
        if !self.cfg.enabled {
            return Admit::Yes;
        }
        let c = &self.cells[slot];
        // Acquire: a breaker seen open comes with the time it opened (stored before).
        match c.state.load(Acquire) {
            0 => Admit::Yes,
            1 => {
                let opened = c.opened_at_ms.load(Relaxed);
                if self.now_ms() < opened + self.cfg.open_for.as_millis() as u64 {
                    return Admit::No;
                }
                if c.state.compare_exchange(1, 2, AcqRel, Relaxed).is_ok() {
                    self.moved(c, BreakerState::Open, BreakerState::HalfOpen);
                    c.successes.store(0, Relaxed);
                    tracing::info!(worker, "circuit breaker half-open: probing the worker");
                }
                // No probe is out while open (it is given back only after the breaker left
                // half-open), so whichever shard takes it first, winner of the move or not,
                // is the one probe.
                self.take_probe(c)
            }
            _ => self.take_probe(c),
        }
    }

    fn take_probe(&self, c: &Cell) -> Admit {
        if c.probe_out.compare_exchange(0, 1, AcqRel, Relaxed).is_ok() {
            Admit::Probe
        } else {
            Admit::No
        }
    }

    /// Whether `admit` would let a request through (without taking the probe).
    pub fn is_closed_or_due(&self, slot: usize) -> bool {
        if !self.cfg.enabled {
            return true;
        }
        let c = &self.cells[slot];
        match c.state.load(Relaxed) {
            0 => true,
            1 => {
                self.now_ms() >= c.opened_at_ms.load(Relaxed) + self.cfg.open_for.as_millis() as u64
            }
            _ => c.probe_out.load(Relaxed) == 0,
        }
    }

    /// The worker answered (any status below 500).
    pub fn success(&self, slot: usize, probe: bool, worker: &str) {
        if !self.cfg.enabled {
            return;
        }
        let c = &self.cells[slot];
        match c.state.load(Relaxed) {
            // Closed: only write when there is a count to clear (keeps the line shared).
            0 if c.failures.load(Relaxed) != 0 => c.failures.store(0, Relaxed),
            2 => {
                if probe {
                    c.probe_out.store(0, Relaxed);
                }
                let n = c.successes.fetch_add(1, Relaxed) + 1;
                if n >= self.cfg.success_threshold
                    && c.state.compare_exchange(2, 0, Relaxed, Relaxed).is_ok()
                {
                    self.moved(c, BreakerState::HalfOpen, BreakerState::Closed);
                    c.failures.store(0, Relaxed);
                    tracing::info!(worker, "circuit breaker closed: the worker recovered");
                }
            }
            _ => {}
        }
    }

    /// The worker failed: refused, reset, 5xx, or timed out.
    pub fn failure(&self, slot: usize, probe: bool, worker: &str) {
        if !self.cfg.enabled {
            return;
        }
        let c = &self.cells[slot];
        match c.state.load(Relaxed) {
            0 => {
                let n = c.failures.fetch_add(1, Relaxed) + 1;
                if n >= self.cfg.failure_threshold {
                    // The time first, then the state (Release): a shard that sees the breaker
                    // open must not see an old open period and probe at once.
                    c.opened_at_ms.store(self.now_ms(), Relaxed);
                }
                if n >= self.cfg.failure_threshold
                    && c.state.compare_exchange(0, 1, Release, Relaxed).is_ok()
                {
                    self.moved(c, BreakerState::Closed, BreakerState::Open);
                    tracing::warn!(
                        worker,
                        failures = n,
                        open_secs = self.cfg.open_for.as_secs_f64(),
                        "circuit breaker open: not routing to the worker"
                    );
                }
            }
            2 => {
                // As above: the time, then the state; and the probe given back only once the
                // breaker is open, so no other shard takes a second probe in between.
                c.opened_at_ms.store(self.now_ms(), Relaxed);
                if c.state.compare_exchange(2, 1, Release, Relaxed).is_ok() {
                    self.moved(c, BreakerState::HalfOpen, BreakerState::Open);
                    tracing::warn!(worker, "circuit breaker open again: the probe failed");
                }
                if probe {
                    c.probe_out.store(0, Release);
                }
            }
            _ => {}
        }
    }

    /// A probe ended without telling anything (the client left): let another one go.
    pub fn release_probe(&self, slot: usize) {
        self.cells[slot].probe_out.store(0, Relaxed);
    }

    /// A worker back from unhealthy starts closed.
    pub fn reset(&self, slot: usize) {
        let c = &self.cells[slot];
        let was = self.state(slot);
        if was != BreakerState::Closed {
            self.moved(c, was, BreakerState::Closed);
        }
        c.state.store(0, Relaxed);
        c.failures.store(0, Relaxed);
        c.successes.store(0, Relaxed);
        c.probe_out.store(0, Relaxed);
    }

    /// A slot given to a new worker: closed, with no history.
    pub fn assign(&self, slot: usize) {
        self.reset(slot);
        for t in &self.cells[slot].transitions {
            t.store(0, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breakers(open_ms: u64) -> Breakers {
        Breakers::new(
            2,
            BreakerConfig {
                enabled: true,
                failure_threshold: 3,
                success_threshold: 2,
                open_for: Duration::from_millis(open_ms),
            },
        )
    }

    #[test]
    fn shards_racing_at_the_end_of_the_open_period_send_one_probe() {
        for _ in 0..200 {
            let b = std::sync::Arc::new(breakers(1));
            for _ in 0..3 {
                b.failure(0, false, "w");
            }
            std::thread::sleep(Duration::from_millis(2));
            let start = std::sync::Arc::new(std::sync::Barrier::new(4));
            let probes: usize = (0..4)
                .map(|_| {
                    let (b, start) = (b.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        (0..50).filter(|_| b.admit(0, "w") == Admit::Probe).count()
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .sum();
            assert_eq!(probes, 1, "one probe while it is out");
        }
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = breakers(60_000);
        b.failure(0, false, "w");
        b.failure(0, false, "w");
        b.success(0, false, "w");
        b.failure(0, false, "w");
        b.failure(0, false, "w");
        assert_eq!(
            b.state(0),
            BreakerState::Closed,
            "a success resets the count"
        );
        b.failure(0, false, "w");
        assert_eq!(b.state(0), BreakerState::Open);
        assert_eq!(b.admit(0, "w"), Admit::No);
        assert_eq!(b.admit(1, "w"), Admit::Yes, "other workers unaffected");
    }

    #[test]
    fn half_open_lets_one_probe_at_a_time_and_closes_after_successes() {
        let b = breakers(30);
        for _ in 0..3 {
            b.failure(0, false, "w");
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(b.admit(0, "w"), Admit::Probe);
        assert_eq!(b.state(0), BreakerState::HalfOpen);
        assert_eq!(b.admit(0, "w"), Admit::No, "one probe at a time");
        b.success(0, true, "w");
        assert_eq!(b.state(0), BreakerState::HalfOpen, "needs two successes");
        assert_eq!(b.admit(0, "w"), Admit::Probe);
        b.success(0, true, "w");
        assert_eq!(b.state(0), BreakerState::Closed);
        assert_eq!(b.admit(0, "w"), Admit::Yes);
    }

    #[test]
    fn a_failed_probe_opens_it_again() {
        let b = breakers(30);
        for _ in 0..3 {
            b.failure(0, false, "w");
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(b.admit(0, "w"), Admit::Probe);
        b.failure(0, true, "w");
        assert_eq!(b.state(0), BreakerState::Open);
        assert_eq!(b.admit(0, "w"), Admit::No);
    }

    #[test]
    fn disabled_never_opens() {
        let b = Breakers::new(
            1,
            BreakerConfig {
                enabled: false,
                ..BreakerConfig::default()
            },
        );
        for _ in 0..100 {
            b.failure(0, false, "w");
        }
        assert_eq!(b.admit(0, "w"), Admit::Yes);
    }
}
