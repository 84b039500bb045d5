//! Routing policies and the per-shard selector state they need: round-robin cursor, RNG,
//! hash ring, prefix index. Each shard decides alone from its own state and the shared
//! load board; no locks on the request path, except a read lock on the engines' KV-event
//! index when gRPC engines report their caches (`kv_index`).

use std::fmt;
use std::hash::Hasher;
use std::str::FromStr;
use std::sync::Arc;

use super::kv_index::KvIndex;
use super::prefix::{block_hashes, worker_bit, PrefixIndex, PrefixMatch, WorkerMask, BLOCK};
use super::ring::HashRing;
use super::WorkerSet;
use crate::metrics::SelectorStats;
use crate::sync::{LoadBoard, PrefixFeed};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    RoundRobin,
    Random,
    ConsistentHash,
    PowerOfTwo,
    CacheAware,
    LoadAware,
}

impl Policy {
    pub const NAMES: [&'static str; 6] = [
        "round_robin",
        "random",
        "consistent_hash",
        "power_of_two",
        "cache_aware",
        "load_aware",
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round_robin",
            Policy::Random => "random",
            Policy::ConsistentHash => "consistent_hash",
            Policy::PowerOfTwo => "power_of_two",
            Policy::CacheAware => "cache_aware",
            Policy::LoadAware => "load_aware",
        }
    }

    /// Policies that read the request's routing text (prompt or messages).
    pub fn reads_text(self) -> bool {
        matches!(
            self,
            Policy::ConsistentHash | Policy::CacheAware | Policy::LoadAware
        )
    }

    /// Policies that use load reports from workers.
    pub fn uses_load(self) -> bool {
        matches!(
            self,
            Policy::PowerOfTwo | Policy::CacheAware | Policy::LoadAware
        )
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "round_robin" => Policy::RoundRobin,
            "random" => Policy::Random,
            "consistent_hash" => Policy::ConsistentHash,
            "power_of_two" => Policy::PowerOfTwo,
            "cache_aware" => Policy::CacheAware,
            "load_aware" => Policy::LoadAware,
            _ => {
                return Err(format!(
                    "unknown policy '{s}' (expected one of: {})",
                    Policy::NAMES.join(", ")
                ))
            }
        })
    }
}

/// Policy settings (vllm-router's names and defaults).
#[derive(Clone, Debug)]
pub struct PolicyConfig {
    pub policy: Policy,
    /// cache_aware: least prefix match ratio that routes by cache.
    pub cache_threshold: f64,
    /// cache_aware: load is imbalanced when max − min > this ...
    pub balance_abs_threshold: u32,
    /// ... and max > min × this.
    pub balance_rel_threshold: f64,
    /// Prefix index bound, in bytes of routing text (blocks of 64 bytes).
    pub max_tree_size: usize,
    /// load_aware: how many queued requests a full prefix hit is worth.
    pub prefix_weight: f64,
}

impl PolicyConfig {
    pub fn new(policy: Policy) -> Self {
        PolicyConfig {
            policy,
            cache_threshold: 0.3,
            balance_abs_threshold: 64,
            balance_rel_threshold: 1.5,
            max_tree_size: 1 << 26,
            prefix_weight: 16.0,
        }
    }
}

/// What a request offers the policy.
#[derive(Default)]
pub struct RouteInput<'a> {
    /// Session key (header or body field), for consistent hashing.
    pub session_key: Option<&'a [u8]>,
    /// The routing text, as segments.
    pub text: &'a [&'a [u8]],
}

/// A shard's policy state. Single-threaded: lives in the shard, never shared.
pub struct Selector {
    cfg: PolicyConfig,
    shard: usize,
    /// The slot of each routable worker, by position in the current worker set.
    slots: Vec<usize>,
    /// The same slots as bits.
    members: WorkerMask,
    cursor: usize,
    rng: fastrand::Rng,
    ring: Option<HashRing>,
    prefix: Option<PrefixIndex>,
    feed: Option<PrefixFeed>,
    board: Arc<LoadBoard>,
    hashes: Vec<u64>,
    fresh: Vec<u64>,
    depth: Vec<u16>,
    /// The engines' own account of their caches, for the workers that stream it.
    kv: Option<Arc<KvIndex>>,
    clock: std::time::Instant,
    /// Its cache_aware decisions, read at scrape time.
    pub stats: Arc<SelectorStats>,
}

/// How long a route counts as held by an event-fed worker before its engine reports the
/// blocks (they are stored once the prompt is scheduled, which may wait in its queue).
pub const PENDING_MS: u32 = 5_000;

impl Selector {
    pub fn new(
        cfg: PolicyConfig,
        shard: usize,
        workers: &WorkerSet,
        board: Arc<LoadBoard>,
        feed: Option<PrefixFeed>,
    ) -> Self {
        let p = cfg.policy;
        let mut s = Selector {
            shard,
            slots: Vec::new(),
            members: 0,
            cursor: shard,
            rng: fastrand::Rng::new(),
            ring: None,
            prefix: matches!(p, Policy::CacheAware | Policy::LoadAware)
                .then(|| PrefixIndex::new((cfg.max_tree_size / BLOCK).max(1))),
            feed,
            board,
            hashes: Vec::new(),
            fresh: Vec::new(),
            depth: Vec::new(),
            kv: None,
            clock: std::time::Instant::now(),
            stats: Default::default(),
            cfg,
        };
        s.set_workers(workers);
        s
    }

    /// Routes over `workers` from now on (a new epoch): the ring is rebuilt from their
    /// URLs (so keys move only off removed workers), and the prefix index forgets workers
    /// that left.
    pub fn set_workers(&mut self, workers: &WorkerSet) {
        let slots: Vec<usize> = workers.iter().map(|w| w.slot).collect();
        if let Some(idx) = self.prefix.as_mut() {
            for &old in &self.slots {
                if !slots.contains(&old) {
                    idx.remove_worker(old);
                }
            }
        }
        if self.cfg.policy == Policy::ConsistentHash {
            let names: Vec<&str> = workers.iter().map(|w| w.url.as_str()).collect();
            self.ring = Some(HashRing::new(&names));
        }
        self.members = slots.iter().fold(0, |m, &s| m | worker_bit(s));
        self.slots = slots;
    }

    fn slot(&self, position: usize) -> usize {
        self.slots[position]
    }

    /// Reads the workers' prefix depths from `kv` for the workers their engines' events
    /// feed (the others' are still guessed from routing).
    pub fn set_kv_index(&mut self, kv: Arc<KvIndex>) {
        self.kv = Some(kv);
    }

    /// This selector's workers fed by KV events, and the clock now (ms), when any are. (The
    /// index serves every selector: in P/D mode the prefill workers are fed too, and a
    /// worker that just left the set may still be.)
    fn event_fed(&self) -> Option<(WorkerMask, u32)> {
        let exact = self.kv.as_ref()?.exact() & self.members;
        (exact != 0).then(|| (exact, self.clock.elapsed().as_millis() as u32))
    }

    /// Every worker's prefix depth into `self.depth` (by slot): from its engine's KV
    /// events, raised by what was routed to it in the last `PENDING_MS`, for the workers in
    /// `exact`; guessed from routing for the rest.
    fn depths(&mut self, fed: Option<(WorkerMask, u32)>) {
        let slot_count = self.slots.last().map_or(0, |&s| s + 1);
        let idx = self.prefix.as_mut().expect("prefix index");
        let (Some((exact, now)), Some(kv)) = (fed, self.kv.as_ref()) else {
            idx.depths(&self.hashes, slot_count, &mut self.depth);
            return;
        };
        if self.slots.iter().all(|&s| exact & worker_bit(s) != 0) {
            // Every worker is event-fed: no guess to read.
            self.depth.clear();
            self.depth.resize(slot_count, 0);
        } else {
            idx.depths(&self.hashes, slot_count, &mut self.depth);
        }
        let mut bits = exact;
        while bits != 0 {
            let s = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if let Some(d) = self.depth.get_mut(s) {
                *d = 0;
            }
        }
        kv.depths(&self.hashes, exact, &mut self.depth);
        idx.recent_depths(
            &self.hashes,
            exact,
            now.saturating_sub(PENDING_MS),
            &mut self.depth,
        );
    }

    pub fn policy(&self) -> Policy {
        self.cfg.policy
    }

    pub fn prefix_len(&self) -> usize {
        self.prefix.as_ref().map_or(0, |p| p.len())
    }

    /// The workers to try for one request, best first. Each worker appears once.
    pub fn candidates(&mut self, input: &RouteInput<'_>) -> Candidates {
        let n = self.slots.len();
        if n == 0 {
            return Candidates::sequential(0, 0);
        }
        match self.cfg.policy {
            Policy::RoundRobin => {
                let s = self.cursor % n;
                self.cursor = self.cursor.wrapping_add(1);
                Candidates::sequential(s, n)
            }
            Policy::Random => Candidates::sequential(self.rng.usize(..n), n),
            Policy::ConsistentHash => self.consistent_hash(input),
            Policy::PowerOfTwo => self.power_of_two(),
            Policy::CacheAware | Policy::LoadAware => self.prefix_aware(input),
        }
    }

    fn consistent_hash(&mut self, input: &RouteInput<'_>) -> Candidates {
        let n = self.slots.len();
        let ring = self.ring.as_ref().expect("ring for consistent_hash");
        let mut c = Candidates::sequential(0, n);
        let walk = match input.session_key {
            Some(k) => ring.walk(k),
            None if super::key::text_len(input.text) > 0 => {
                let mut h = super::ring::text_hasher();
                for s in input.text {
                    h.write(s);
                }
                ring.walk_hash(h.finish())
            }
            None => return Candidates::sequential(self.rng.usize(..n), n),
        };
        for w in walk.take(Candidates::PREFERRED) {
            c.prefer(w);
        }
        c
    }

    fn power_of_two(&mut self) -> Candidates {
        let n = self.slots.len();
        let mut c = Candidates::sequential(self.rng.usize(..n), n);
        if n == 1 {
            return c;
        }
        let a = self.rng.usize(..n);
        let mut b = self.rng.usize(..n - 1);
        if b >= a {
            b += 1;
        }
        let key = |w: usize| {
            let s = self.slot(w);
            (self.board.in_flight(s), self.board.waiting(s).unwrap_or(0))
        };
        let (first, second) = if key(b) < key(a) { (b, a) } else { (a, b) };
        c.prefer(first);
        c.prefer(second);
        c
    }

    /// The least loaded of `among` (slot bits; all workers when 0, or when none of them is
    /// a member), ties broken at random so that cold requests spread. Returns a position.
    fn least_loaded(&mut self, among: WorkerMask) -> usize {
        let mut best = usize::MAX;
        let mut best_load = u64::MAX;
        let mut ties = 0u32;
        for w in 0..self.slots.len() {
            let slot = self.slots[w];
            if among != 0 && among & worker_bit(slot) == 0 {
                continue;
            }
            let load = self.board.in_flight(slot) as u64;
            if load < best_load {
                best = w;
                best_load = load;
                ties = 1;
            } else if load == best_load {
                ties += 1;
                if self.rng.u32(..ties) == 0 {
                    best = w;
                }
            }
        }
        if best == usize::MAX && among != 0 {
            // None of `among` is in the set any more (a prefix another shard recorded for a
            // worker that has just left): any worker will do.
            return self.least_loaded(0);
        }
        best
    }

    fn prefix_aware(&mut self, input: &RouteInput<'_>) -> Candidates {
        let n = self.slots.len();
        let fed = self.event_fed();
        if let (Some((_, now)), Some(idx)) = (fed, self.prefix.as_mut()) {
            idx.set_clock(now);
        }
        // What the other shards routed since we last looked.
        if let (Some(feed), Some(idx)) = (self.feed.as_ref(), self.prefix.as_mut()) {
            for ins in feed.drain() {
                idx.insert(&ins.hashes, ins.worker as usize, None);
            }
        }
        let covered = block_hashes(input.text, &mut self.hashes);
        let chosen = if self.cfg.policy == Policy::CacheAware {
            self.cache_aware_pick(covered, fed)
        } else {
            self.load_aware_pick(covered, fed)
        };
        let chosen_slot = self.slot(chosen);
        if let Some(idx) = self.prefix.as_mut() {
            self.fresh.clear();
            idx.insert(&self.hashes, chosen_slot, Some(&mut self.fresh));
            if let Some(feed) = self.feed.as_mut() {
                feed.publish(chosen_slot, &self.fresh);
            }
        }
        let mut c = Candidates::sequential((chosen + 1) % n, n);
        c.prefer(chosen);
        c
    }

    /// vllm-router's cache_aware: least loaded when the load is imbalanced; else the worker
    /// with the longest cached prefix if the match ratio reaches the threshold; else the
    /// least loaded.
    fn cache_aware_pick(&mut self, covered: usize, fed: Option<(WorkerMask, u32)>) -> usize {
        let (mut max, mut min) = (0u32, u32::MAX);
        for &slot in &self.slots {
            let l = self.board.in_flight(slot);
            max = max.max(l);
            min = min.min(l);
        }
        let imbalanced = max - min > self.cfg.balance_abs_threshold
            && max as f64 > min as f64 * self.cfg.balance_rel_threshold;
        if imbalanced {
            return self.least_loaded(0);
        }
        let m = if fed.is_some() {
            self.depths(fed);
            deepest(&self.depth, self.members)
        } else {
            let idx = self.prefix.as_mut().expect("prefix index");
            idx.longest_match(&self.hashes)
        };
        let ratio = if covered == 0 {
            0.0
        } else {
            (m.blocks * BLOCK) as f64 / covered as f64
        };
        if m.blocks > 0 && ratio >= self.cfg.cache_threshold {
            self.stats.cache_hits.inc();
            self.least_loaded(m.workers)
        } else {
            self.stats.cache_misses.inc();
            self.least_loaded(0)
        }
    }

    /// load_aware: the lowest expected wait, counting a worker's queue (its in-flight
    /// requests from every shard, plus what it reports waiting) against the prefix it
    /// already holds: a full hit is worth `prefix_weight` queued requests. A worker whose
    /// KV cache is nearly full pays extra (it is about to preempt). Cold requests (no match
    /// anywhere) go to the least loaded, ties at random, so they spread.
    fn load_aware_pick(&mut self, covered: usize, fed: Option<(WorkerMask, u32)>) -> usize {
        let total_blocks = self.hashes.len();
        self.depths(fed);
        let any_match = self.depth.iter().any(|&d| d > 0);
        if !any_match || covered == 0 {
            self.stats.cache_misses.inc();
            return self.least_loaded(0);
        }
        self.stats.cache_hits.inc();
        let mut best = 0;
        let mut best_cost = f64::MAX;
        let mut ties = 0u32;
        for w in 0..self.slots.len() {
            let slot = self.slots[w];
            let queue =
                self.board.in_flight(slot) as f64 + self.board.waiting(slot).unwrap_or(0) as f64;
            let hit = if total_blocks == 0 {
                0.0
            } else {
                self.depth.get(slot).copied().unwrap_or(0) as f64 / total_blocks as f64
            };
            let kv_penalty = match self.board.kv_usage(slot) {
                Some(u) if u > 0.9 => (u - 0.9) * 10.0 * self.cfg.prefix_weight,
                _ => 0.0,
            };
            let cost = queue + (1.0 - hit) * self.cfg.prefix_weight + kv_penalty;
            if cost < best_cost - 1e-9 {
                best = w;
                best_cost = cost;
                ties = 1;
            } else if (cost - best_cost).abs() <= 1e-9 {
                ties += 1;
                if self.rng.u32(..ties) == 0 {
                    best = w;
                }
            }
        }
        best
    }

    /// The shard this selector belongs to.
    pub fn shard(&self) -> usize {
        self.shard
    }
}

/// The deepest prefix in `depth` (by slot) among `members` and the members holding it.
fn deepest(depth: &[u16], members: WorkerMask) -> PrefixMatch {
    let member = |slot: usize| members & worker_bit(slot) != 0;
    let blocks = depth
        .iter()
        .enumerate()
        .filter(|&(slot, _)| member(slot))
        .map(|(_, &d)| d)
        .max()
        .unwrap_or(0);
    let mut workers: WorkerMask = 0;
    if blocks > 0 {
        for (slot, &d) in depth.iter().enumerate() {
            if d == blocks && member(slot) {
                workers |= worker_bit(slot);
            }
        }
    }
    PrefixMatch {
        blocks: blocks as usize,
        workers,
    }
}

/// Worker indices in preference order: up to `PREFERRED` picks of the policy, then every
/// other worker in ring order from `start`.
#[derive(Clone)]
pub struct Candidates {
    preferred: [u32; Candidates::PREFERRED],
    npref: usize,
    next_pref: usize,
    start: usize,
    n: usize,
    taken: usize,
}

impl Candidates {
    pub const PREFERRED: usize = 4;

    pub fn sequential(start: usize, n: usize) -> Self {
        Candidates {
            preferred: [0; Self::PREFERRED],
            npref: 0,
            next_pref: 0,
            start,
            n,
            taken: 0,
        }
    }

    fn prefer(&mut self, w: usize) {
        if self.npref < Self::PREFERRED && !self.preferred[..self.npref].contains(&(w as u32)) {
            self.preferred[self.npref] = w as u32;
            self.npref += 1;
        }
    }
}

impl Iterator for Candidates {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        if self.next_pref < self.npref {
            self.next_pref += 1;
            return Some(self.preferred[self.next_pref - 1] as usize);
        }
        while self.taken < self.n {
            let i = (self.start + self.taken) % self.n;
            self.taken += 1;
            if !self.preferred[..self.npref].contains(&(i as u32)) {
                return Some(i);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_of(n: usize) -> WorkerSet {
        let urls: Vec<String> = (0..n)
            .map(|i| format!("http://127.0.0.1:{}", 8000 + i))
            .collect();
        WorkerSet::from_urls(&urls).unwrap()
    }

    #[test]
    fn a_new_epoch_moves_hash_keys_only_off_the_removed_worker() {
        let board = Arc::new(LoadBoard::new(1, 4));
        let all = set_of(4);
        let mut s = Selector::new(
            PolicyConfig::new(Policy::ConsistentHash),
            0,
            &all,
            board,
            None,
        );
        let owner = |s: &mut Selector, set: &WorkerSet, k: &str| {
            let c = s
                .candidates(&RouteInput {
                    session_key: Some(k.as_bytes()),
                    text: &[],
                })
                .next()
                .unwrap();
            set.get(c).slot
        };
        let keys: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
        let before: Vec<usize> = keys.iter().map(|k| owner(&mut s, &all, k)).collect();
        let without_2 = WorkerSet::new(1, all.iter().filter(|w| w.slot != 2).cloned().collect());
        s.set_workers(&without_2);
        for (k, &was) in keys.iter().zip(&before) {
            let now = owner(&mut s, &without_2, k);
            assert_ne!(now, 2);
            if was != 2 {
                assert_eq!(now, was, "{k} stayed on its worker");
            }
        }
    }

    fn selector(policy: Policy, n: usize) -> (Selector, Arc<LoadBoard>) {
        let board = Arc::new(LoadBoard::new(1, n));
        (
            Selector::new(
                PolicyConfig::new(policy),
                0,
                &set_of(n),
                board.clone(),
                None,
            ),
            board,
        )
    }

    fn first(s: &mut Selector, input: &RouteInput<'_>) -> usize {
        s.candidates(input).next().unwrap()
    }

    #[test]
    fn round_robin_cycles_and_offers_every_worker_once() {
        let (mut s, _) = selector(Policy::RoundRobin, 3);
        let none = RouteInput::default();
        let firsts: Vec<usize> = (0..6).map(|_| first(&mut s, &none)).collect();
        assert_eq!(firsts, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(s.candidates(&none).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(s.candidates(&none).collect::<Vec<_>>(), vec![1, 2, 0]);
    }

    #[test]
    fn random_covers_all_workers() {
        let (mut s, _) = selector(Policy::Random, 4);
        let mut seen = [0u32; 4];
        for _ in 0..400 {
            seen[first(&mut s, &RouteInput::default())] += 1;
        }
        assert!(seen.iter().all(|&c| c > 40), "{seen:?}");
    }

    #[test]
    fn consistent_hash_is_sticky_per_key_and_walks_the_ring() {
        let (mut s, _) = selector(Policy::ConsistentHash, 5);
        let key = RouteInput {
            session_key: Some(b"session-42"),
            text: &[],
        };
        let order: Vec<usize> = s.candidates(&key).collect();
        assert_eq!(order.len(), 5);
        for _ in 0..10 {
            assert_eq!(s.candidates(&key).collect::<Vec<_>>(), order);
        }
        // Without a key, the text decides, the same way every time.
        let text: [&[u8]; 2] = [b"Hello ", b"world"];
        let by_text = RouteInput {
            session_key: None,
            text: &text,
        };
        let w = first(&mut s, &by_text);
        assert!((0..10).all(|_| first(&mut s, &by_text) == w));
    }

    #[test]
    fn power_of_two_prefers_the_less_loaded() {
        let (mut s, board) = selector(Policy::PowerOfTwo, 2);
        for _ in 0..5 {
            board.started(0, 0);
        }
        for _ in 0..50 {
            let c: Vec<usize> = s.candidates(&RouteInput::default()).collect();
            assert_eq!(c, vec![1, 0]);
        }
        // Equal in-flight: the worker-reported queue breaks the tie.
        for _ in 0..5 {
            board.started(0, 1);
        }
        board.set_waiting(1, 9);
        board.set_waiting(0, 1);
        assert!((0..50).all(|_| first(&mut s, &RouteInput::default()) == 0));
    }

    fn prompt(group: usize, i: usize) -> String {
        format!(
            "{}{}",
            format!("group-{group}-").repeat(120),
            format!("unique-{i}-").repeat(40)
        )
    }

    #[test]
    fn cache_aware_keeps_a_prefix_group_on_one_worker_while_balanced() {
        let (mut s, _) = selector(Policy::CacheAware, 4);
        let mut owner = [usize::MAX; 8];
        for i in 0..200 {
            let g = i % 8;
            let p = prompt(g, i);
            let text = [p.as_bytes()];
            let w = first(
                &mut s,
                &RouteInput {
                    session_key: None,
                    text: &text,
                },
            );
            if owner[g] == usize::MAX {
                owner[g] = w;
            }
            assert_eq!(w, owner[g], "group {g} moved at request {i}");
        }
        assert!(s.stats.cache_hits.get() >= 190);
    }

    /// Token ids as the gRPC path's routing text (little-endian u32s).
    fn token_text(ids: &[u32]) -> Vec<u8> {
        ids.iter().flat_map(|t| t.to_le_bytes()).collect()
    }

    #[test]
    fn event_fed_workers_are_routed_by_what_their_engines_report() {
        use crate::route::kv_index::{EngineBlocks, KvIndex, StoredBlock};
        for policy in [Policy::CacheAware, Policy::LoadAware] {
            let (mut s, _) = selector(policy, 3);
            let kv = Arc::new(KvIndex::new(3));
            s.set_kv_index(kv.clone());
            let mut engines: Vec<EngineBlocks> =
                (0..3).map(|slot| EngineBlocks::new(&kv, slot)).collect();
            let prompt: Vec<u32> = (100..164).collect();
            let bytes = token_text(&prompt);
            let text = [&bytes[..]];
            let input = RouteInput {
                session_key: None,
                text: &text,
            };
            let store = |kv: &KvIndex, e: &mut EngineBlocks, base: i64| {
                let blocks: Vec<StoredBlock> = prompt
                    .chunks(16)
                    .enumerate()
                    .map(|(i, t)| StoredBlock {
                        engine_hash: base + i as i64,
                        token_ids: t,
                    })
                    .collect();
                e.stored(kv, None, &blocks);
            };
            // Nothing routed yet, but engine 2 reports the prompt: it goes there.
            store(&kv, &mut engines[2], 10);
            assert_eq!(first(&mut s, &input), 2, "{policy}");
            // Engine 2 evicts it and engine 1 stores it. Routing history says 2 (it was
            // routed there within PENDING_MS), so 2 and 1 tie on depth; let the route age.
            engines[2].removed(&kv, &[10, 11, 12, 13]);
            store(&kv, &mut engines[1], 20);
            s.clock -= std::time::Duration::from_millis(PENDING_MS as u64 + 1_000);
            assert_eq!(first(&mut s, &input), 1, "{policy}");
        }
    }

    #[test]
    fn a_prefix_recorded_only_for_a_worker_that_left_falls_back_to_the_least_loaded() {
        // Another shard routed to slot 3 before it saw the epoch that removed it; its
        // insert reaches this shard after this shard forgot slot 3.
        let (mut s, _) = selector(Policy::CacheAware, 4);
        let names: Vec<String> = (0..4).map(|i| format!("http://10.0.0.{i}:8000")).collect();
        let all = WorkerSet::from_urls(&names).unwrap();
        s.set_workers(&WorkerSet::new(
            1,
            all.iter().filter(|w| w.slot != 3).cloned().collect(),
        ));
        let p = prompt(5, 0);
        let text = [p.as_bytes()];
        let mut hashes = Vec::new();
        block_hashes(&text, &mut hashes);
        s.prefix.as_mut().unwrap().insert(&hashes, 3, None);
        let input = RouteInput {
            session_key: None,
            text: &text,
        };
        assert!(first(&mut s, &input) < 3);
    }

    #[test]
    fn blocks_held_by_workers_outside_the_set_do_not_steer_it() {
        // P/D: the decode selector routes over slots 2 and 3 while the prefill worker in
        // slot 0 is event-fed and holds the prompt.
        use crate::route::kv_index::{EngineBlocks, KvIndex, StoredBlock};
        let names: Vec<String> = (0..4).map(|i| format!("grpc://10.0.0.{i}:8000")).collect();
        let all = WorkerSet::from_urls(&names).unwrap();
        let decode = WorkerSet::new(1, all.iter().filter(|w| w.slot >= 2).cloned().collect());
        for policy in [Policy::CacheAware, Policy::LoadAware] {
            let board = Arc::new(LoadBoard::new(1, 4));
            let mut s = Selector::new(PolicyConfig::new(policy), 0, &decode, board, None);
            let kv = Arc::new(KvIndex::new(4));
            s.set_kv_index(kv.clone());
            let prompt: Vec<u32> = (7..71).collect();
            let mut prefill = EngineBlocks::new(&kv, 0);
            let blocks: Vec<StoredBlock> = prompt
                .chunks(16)
                .enumerate()
                .map(|(i, t)| StoredBlock {
                    engine_hash: i as i64,
                    token_ids: t,
                })
                .collect();
            prefill.stored(&kv, None, &blocks);
            let _decode_fed = EngineBlocks::new(&kv, 3);
            let bytes = token_text(&prompt);
            let text = [&bytes[..]];
            let input = RouteInput {
                session_key: None,
                text: &text,
            };
            for _ in 0..20 {
                let w = first(&mut s, &input);
                assert!(w < 2, "{policy}: position {w} of the two decode workers");
            }
        }
    }

    #[test]
    fn cache_aware_moves_to_the_least_loaded_when_imbalanced() {
        let (mut s, board) = selector(Policy::CacheAware, 2);
        let (pa, pc) = (prompt(1, 0), prompt(2, 0));
        let (ta, tc) = ([pa.as_bytes()], [pc.as_bytes()]);
        let a = RouteInput {
            session_key: None,
            text: &ta,
        };
        let c = RouteInput {
            session_key: None,
            text: &tc,
        };
        // Worker 1 is a little busy, so both groups start on worker 0 and stay there.
        board.started(0, 1);
        assert_eq!(first(&mut s, &a), 0);
        assert_eq!(first(&mut s, &c), 0);
        board.finished(0, 1);
        assert_eq!(first(&mut s, &a), 0);
        // Pile load on worker 0 past both thresholds (max − min > 64, max > 1.5 × min).
        for _ in 0..100 {
            board.started(0, 0);
        }
        assert_eq!(first(&mut s, &a), 1, "imbalanced: least loaded");
        // Past the relative threshold no more (100 vs 80): group C, held only by worker 0,
        // goes back to its cache although worker 0 is the busier.
        for _ in 0..80 {
            board.started(0, 1);
        }
        assert_eq!(first(&mut s, &c), 0, "balanced: affinity");
    }

    #[test]
    fn load_aware_keeps_affinity_but_not_into_a_hot_spot() {
        let (mut s, board) = selector(Policy::LoadAware, 4);
        let p = prompt(3, 0);
        let text = [p.as_bytes()];
        let input = RouteInput {
            session_key: None,
            text: &text,
        };
        let w = first(&mut s, &input);
        assert_eq!(first(&mut s, &input), w, "affinity while idle");
        for _ in 0..3 {
            board.started(0, w);
        }
        assert_eq!(first(&mut s, &input), w, "a short queue is worth the hit");
        for _ in 0..20 {
            board.started(0, w);
        }
        assert_ne!(first(&mut s, &input), w, "a long queue is not");
    }

    #[test]
    fn cold_requests_spread() {
        for policy in [Policy::CacheAware, Policy::LoadAware] {
            let (mut s, _) = selector(policy, 4);
            let mut count = [0u32; 4];
            for i in 0..400 {
                let p = format!("{i:06}") + &"x".repeat(20);
                let text = [p.as_bytes()];
                count[first(
                    &mut s,
                    &RouteInput {
                        session_key: None,
                        text: &text,
                    },
                )] += 1;
            }
            assert!(count.iter().all(|&c| c > 50), "{policy}: {count:?}");
        }
    }

    #[test]
    fn an_insert_on_one_shard_steers_the_other() {
        let board = Arc::new(LoadBoard::new(2, 4));
        let names = set_of(4);
        let mut feeds = PrefixFeed::mesh(2).into_iter();
        let mut a = Selector::new(
            PolicyConfig::new(Policy::CacheAware),
            0,
            &names,
            board.clone(),
            feeds.next(),
        );
        let mut b = Selector::new(
            PolicyConfig::new(Policy::CacheAware),
            1,
            &names,
            board,
            feeds.next(),
        );
        for g in 0..4 {
            let p = prompt(g, 0);
            let text = [p.as_bytes()];
            let wa = first(
                &mut a,
                &RouteInput {
                    session_key: None,
                    text: &text,
                },
            );
            let p2 = prompt(g, 1);
            let text2 = [p2.as_bytes()];
            let wb = first(
                &mut b,
                &RouteInput {
                    session_key: None,
                    text: &text2,
                },
            );
            assert_eq!(wa, wb, "group {g}: shard B follows shard A's insert");
        }
    }
}
