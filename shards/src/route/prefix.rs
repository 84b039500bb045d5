//! The prefix index of one shard: which workers recently received which prompt prefixes,
//! as chained hashes of fixed-size blocks of the routing text (block i's hash covers blocks
//! 0..=i), like vLLM's own KV block hashes. Cheap to compute and compare, and small enough
//! to send to the other shards. Memory is bounded at all times by `capacity` entries
//! (FIFO with a second chance for entries matched since they were queued).

use std::collections::{HashMap, VecDeque};

/// Bytes of routing text per block.
pub const BLOCK: usize = 64;
/// Blocks hashed per request: the first 64 KiB of routing text decide.
pub const MAX_BLOCKS: usize = 1024;

/// Which workers hold a block (bit i = worker i; workers beyond 128 are not indexed).
pub type WorkerMask = u128;

pub fn worker_bit(worker: usize) -> WorkerMask {
    if worker < 128 {
        1u128 << worker
    } else {
        0
    }
}

fn block_hasher() -> ahash::RandomState {
    ahash::RandomState::with_seeds(
        0x9e37_79b9_7f4a_7c15,
        0xbf58_476d_1ce4_e5b9,
        0x94d0_49bb_1331_11eb,
        0x2545_f491_4f6c_dd1d,
    )
}

/// The hash of the block `block` (BLOCK bytes) that follows a prefix whose last block
/// hashed to `prev` (0 for the first block). The KV-event index (`kv_index`) rebuilds a
/// request's hashes from the token ids engines report with this.
pub fn chain(prev: u64, block: &[u8]) -> u64 {
    block_hasher().hash_one((prev, block))
}

/// Chained hashes of the full blocks of the concatenated `segments` (a partial last block
/// is not hashed: engines cache whole blocks only). Returns the number of text bytes the
/// hashes cover at most (for match ratios).
pub fn block_hashes(segments: &[&[u8]], out: &mut Vec<u64>) -> usize {
    out.clear();
    let hasher = block_hasher();
    let mut block = [0u8; BLOCK];
    let mut fill = 0;
    let mut prev = 0u64;
    let mut total = 0;
    'outer: for seg in segments {
        total += seg.len();
        let mut s: &[u8] = seg;
        while !s.is_empty() {
            if out.len() == MAX_BLOCKS {
                break 'outer;
            }
            if fill == 0 && s.len() >= BLOCK {
                prev = hasher.hash_one((prev, &s[..BLOCK]));
                out.push(prev);
                s = &s[BLOCK..];
                continue;
            }
            let n = (BLOCK - fill).min(s.len());
            block[fill..fill + n].copy_from_slice(&s[..n]);
            fill += n;
            s = &s[n..];
            if fill == BLOCK {
                prev = hasher.hash_one((prev, &block[..]));
                out.push(prev);
                fill = 0;
            }
        }
    }
    total.min(MAX_BLOCKS * BLOCK)
}

/// How deep each worker's prefix of `hashes` goes: walks the hashes while some worker of
/// `among` holds every one so far (`holders`: who holds a hash), raising `out[w]` to
/// worker `w`'s depth. Shared by the routed-prefix index and the KV-event index.
pub(crate) fn walk_depths(
    hashes: &[u64],
    among: WorkerMask,
    mut holders: impl FnMut(&u64) -> Option<WorkerMask>,
    out: &mut [u16],
) {
    let mut alive = among;
    for (i, h) in hashes.iter().enumerate() {
        let still = alive & holders(h).unwrap_or(0);
        if still == 0 {
            break;
        }
        alive = still;
        let mut bits = still;
        while bits != 0 {
            let w = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if let Some(d) = out.get_mut(w) {
                *d = (*d).max((i + 1) as u16);
            }
        }
    }
}

struct Entry {
    workers: WorkerMask,
    /// Matched or inserted since it was last queued.
    touched: bool,
    /// The clock ([`PrefixIndex::set_clock`]) at the last insert (of any worker: one stamp
    /// per entry, so a worker sent the block long ago counts as recent while another was
    /// sent it since; an over-estimate bounded by the caller's window).
    stamp: u32,
}

pub struct PrefixIndex {
    map: HashMap<u64, Entry, ahash::RandomState>,
    queue: VecDeque<u64>,
    capacity: usize,
    now: u32,
}

/// The longest indexed prefix of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixMatch {
    /// Leading blocks found.
    pub blocks: usize,
    /// The workers holding all of them.
    pub workers: WorkerMask,
}

impl PrefixIndex {
    /// An index holding at most `capacity` blocks.
    pub fn new(capacity: usize) -> Self {
        PrefixIndex {
            map: HashMap::with_capacity_and_hasher(
                capacity.min(1 << 16),
                ahash::RandomState::new(),
            ),
            queue: VecDeque::with_capacity(capacity.min(1 << 16)),
            capacity: capacity.max(1),
            now: 0,
        }
    }

    /// The time (any monotonic unit) that inserts from now on are stamped with.
    pub fn set_clock(&mut self, now: u32) {
        self.now = now;
    }

    /// For every worker in `among`, how many leading blocks it was sent at or after
    /// `since`, raised into `out[slot]` where that is deeper. Routes the engines have not
    /// reported yet (see `kv_index`).
    pub fn recent_depths(&self, hashes: &[u64], among: WorkerMask, since: u32, out: &mut [u16]) {
        let recent = |h: &u64| {
            let e = self.map.get(h)?;
            (e.stamp >= since).then_some(e.workers)
        };
        walk_depths(hashes, among, recent, out);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Longest run of leading blocks held by at least one worker, and those workers.
    pub fn longest_match(&mut self, hashes: &[u64]) -> PrefixMatch {
        let mut holders: WorkerMask = !0;
        let mut blocks = 0;
        for h in hashes {
            let Some(e) = self.map.get_mut(h) else { break };
            let deeper = holders & e.workers;
            if deeper == 0 {
                break;
            }
            e.touched = true;
            holders = deeper;
            blocks += 1;
        }
        PrefixMatch {
            blocks,
            workers: if blocks == 0 { 0 } else { holders },
        }
    }

    /// For every worker below `workers`, how many leading blocks it holds (into `out`).
    pub fn depths(&mut self, hashes: &[u64], workers: usize, out: &mut Vec<u16>) {
        out.clear();
        out.resize(workers, 0);
        walk_depths(
            hashes,
            !0,
            |h| {
                let e = self.map.get_mut(h)?;
                e.touched = true;
                Some(e.workers)
            },
            out,
        );
    }

    /// Records that `worker` received a text with these block hashes. Appends to `fresh`
    /// the hashes that were news for this worker (what other shards need to hear).
    pub fn insert(&mut self, hashes: &[u64], worker: usize, mut fresh: Option<&mut Vec<u64>>) {
        let bit = worker_bit(worker);
        if bit == 0 {
            return;
        }
        let now = self.now;
        for &h in hashes {
            let queue = &mut self.queue;
            let e = self.map.entry(h).or_insert_with(|| {
                queue.push_back(h);
                Entry {
                    workers: 0,
                    touched: false,
                    stamp: 0,
                }
            });
            e.stamp = now;
            if e.workers & bit == 0 {
                e.workers |= bit;
                if let Some(f) = fresh.as_deref_mut() {
                    f.push(h);
                }
            }
            e.touched = true;
        }
        self.enforce_capacity();
    }

    /// Forgets a worker (removed from the set).
    pub fn remove_worker(&mut self, worker: usize) {
        let bit = worker_bit(worker);
        self.map.retain(|_, e| {
            e.workers &= !bit;
            e.workers != 0
        });
        let map = &self.map;
        self.queue.retain(|h| map.contains_key(h));
    }

    fn enforce_capacity(&mut self) {
        // Each queued entry gets at most one second chance per pass, so this ends.
        let mut budget = 2 * self.queue.len();
        while self.map.len() > self.capacity && budget > 0 {
            budget -= 1;
            let Some(h) = self.queue.pop_front() else {
                break;
            };
            match self.map.get_mut(&h) {
                Some(e) if e.touched => {
                    e.touched = false;
                    self.queue.push_back(h);
                }
                Some(_) => {
                    self.map.remove(&h);
                }
                None => {}
            }
        }
        while self.map.len() > self.capacity {
            let Some(h) = self.queue.pop_front() else {
                break;
            };
            self.map.remove(&h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(text: &str) -> Vec<u64> {
        let mut out = Vec::new();
        block_hashes(&[text.as_bytes()], &mut out);
        out
    }

    #[test]
    fn hashes_do_not_depend_on_how_the_text_is_split() {
        let text = "x".repeat(1000) + &"y".repeat(300);
        let whole = hashes(&text);
        assert_eq!(whole.len(), 1300 / BLOCK);
        for cut in [1, 63, 64, 65, 700] {
            let mut split = Vec::new();
            block_hashes(
                &[&text.as_bytes()[..cut], &text.as_bytes()[cut..]],
                &mut split,
            );
            assert_eq!(split, whole, "cut at {cut}");
        }
    }

    #[test]
    fn chain_is_the_hash_block_hashes_uses() {
        let text = "c".repeat(200);
        let mut prev = 0;
        let by_chain: Vec<u64> = text.as_bytes()[..192]
            .chunks(BLOCK)
            .map(|b| {
                prev = chain(prev, b);
                prev
            })
            .collect();
        assert_eq!(by_chain, hashes(&text));
    }

    #[test]
    fn recent_depths_count_only_routes_since_the_given_time() {
        let mut idx = PrefixIndex::new(1000);
        let h = hashes(&"r".repeat(640));
        idx.set_clock(10);
        idx.insert(&h[..4], 1, None);
        idx.set_clock(20);
        idx.insert(&h, 2, None);
        let mut out = vec![0u16; 4];
        idx.recent_depths(&h, worker_bit(1) | worker_bit(2), 15, &mut out);
        assert_eq!(
            out,
            [0, 4, 10, 0],
            "worker 1's stamp was refreshed by worker 2's insert"
        );
        let mut out = vec![0u16; 4];
        idx.recent_depths(&h, worker_bit(1) | worker_bit(2), 25, &mut out);
        assert_eq!(out, [0, 0, 0, 0]);
    }

    #[test]
    fn shared_prefix_shares_leading_hashes_only() {
        let a = hashes(&("p".repeat(640) + &"a".repeat(128)));
        let b = hashes(&("p".repeat(640) + &"b".repeat(128)));
        assert_eq!(a[..10], b[..10]);
        assert_ne!(a[10], b[10]);
    }

    #[test]
    fn longest_match_finds_the_worker_with_the_deepest_prefix() {
        let mut idx = PrefixIndex::new(10_000);
        let base = "s".repeat(640);
        idx.insert(&hashes(&(base.clone() + &"a".repeat(640))), 1, None);
        idx.insert(&hashes(&(base.clone() + &"b".repeat(64))), 2, None);
        let m = idx.longest_match(&hashes(&(base.clone() + &"a".repeat(640) + "tail")));
        assert_eq!(
            m,
            PrefixMatch {
                blocks: 20,
                workers: worker_bit(1)
            }
        );
        let m = idx.longest_match(&hashes(&(base.clone() + &"zzz".repeat(100))));
        assert_eq!(m.blocks, 10);
        assert_eq!(m.workers, worker_bit(1) | worker_bit(2));
        assert_eq!(idx.longest_match(&hashes(&"q".repeat(200))).blocks, 0);
    }

    #[test]
    fn fresh_reports_only_news() {
        let mut idx = PrefixIndex::new(10_000);
        let h = hashes(&"t".repeat(640));
        let mut fresh = Vec::new();
        idx.insert(&h, 0, Some(&mut fresh));
        assert_eq!(fresh.len(), 10);
        fresh.clear();
        idx.insert(&h, 0, Some(&mut fresh));
        assert!(fresh.is_empty());
        idx.insert(&h, 3, Some(&mut fresh));
        assert_eq!(fresh.len(), 10);
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_unique_prompts() {
        let mut idx = PrefixIndex::new(5_000);
        for i in 0..20_000 {
            let text = format!("{i:08}") + &"u".repeat(2040);
            idx.insert(&hashes(&text), i % 4, None);
            assert!(idx.len() <= 5_000);
            assert!(idx.queue.len() <= 5_000 + 32);
        }
        // A hot prefix, matched again and again, survives the flood.
        let hot = hashes(&"h".repeat(2048));
        idx.insert(&hot, 2, None);
        for i in 0..2_000 {
            let m = idx.longest_match(&hot);
            assert_eq!(m.blocks, hot.len(), "round {i}");
            idx.insert(&hashes(&(format!("{i:08}x") + &"v".repeat(2040))), 1, None);
        }
    }

    #[test]
    fn removing_a_worker_forgets_it() {
        let mut idx = PrefixIndex::new(1000);
        let h = hashes(&"r".repeat(640));
        idx.insert(&h, 0, None);
        idx.insert(&h, 1, None);
        idx.remove_worker(0);
        assert_eq!(idx.longest_match(&h).workers, worker_bit(1));
        idx.remove_worker(1);
        assert!(idx.is_empty());
    }
}
