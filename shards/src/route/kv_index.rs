//! The engines' own account of their prefix caches: which workers hold which prompt
//! blocks, kept from the KV-cache events gRPC engines stream (`SubscribeKvEvents`) rather
//! than guessed from what was routed. The control plane writes it (one [`EngineBlocks`] per
//! subscribed worker); every shard's prefix-aware policy reads it.
//!
//! Keys are the router's own block hashes ([`super::prefix::chain`] over the prompt's token
//! ids as little-endian `u32`s, [`super::prefix::BLOCK`] bytes = 16 tokens per hash), so a
//! request's hashes look up directly. Engine hashes (vLLM's are SHA-256 under a per-process
//! seed) are only used to find a block's parent and to apply removals: each stored block
//! remembers the router chain value at its end, so its children hash on from there.
//! Blocks whose parent the router never saw (stored before it subscribed) cannot be placed
//! and are left out: the index under-reports until they are evicted, never over-reports.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::RwLock;

use super::prefix::{chain, walk_depths, worker_bit, WorkerMask, BLOCK, MAX_BLOCKS};

/// Tokens per router hash.
pub const TOKENS_PER_HASH: usize = BLOCK / 4;

/// Router hash → the subscribed workers (slot bits) whose engines hold that block.
pub struct KvIndex {
    holders: RwLock<HashMap<u64, WorkerMask, ahash::RandomState>>,
    /// Slots whose engines' events feed the index, as two words (no lock to check).
    exact: [AtomicU64; 2],
    /// Engine blocks held, per slot (for metrics).
    held: Box<[AtomicU64]>,
}

impl KvIndex {
    /// An empty index for workers in slots `0..slots`.
    pub fn new(slots: usize) -> Self {
        KvIndex {
            holders: RwLock::new(HashMap::default()),
            exact: Default::default(),
            held: (0..slots).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Engine blocks the worker in `slot` holds, if its events feed the index.
    pub fn held(&self, slot: usize) -> Option<u64> {
        (self.exact() & worker_bit(slot) != 0)
            .then(|| self.held.get(slot).map_or(0, |h| h.load(Relaxed)))
    }

    fn set_held(&self, slot: usize, n: usize) {
        if let Some(h) = self.held.get(slot) {
            h.store(n as u64, Relaxed);
        }
    }

    /// The workers (slot bits) whose prefix depths come from here.
    pub fn exact(&self) -> WorkerMask {
        (self.exact[0].load(Relaxed) as u128) | ((self.exact[1].load(Relaxed) as u128) << 64)
    }

    fn set_exact(&self, slot: usize, on: bool) {
        let bit = worker_bit(slot);
        if bit == 0 {
            return;
        }
        let (word, mask) = if slot < 64 {
            (&self.exact[0], bit as u64)
        } else {
            (&self.exact[1], (bit >> 64) as u64)
        };
        if on {
            word.fetch_or(mask, Relaxed);
        } else {
            word.fetch_and(!mask, Relaxed);
        }
    }

    /// For every worker in `among`, how many leading blocks of `hashes` its engine holds,
    /// raised into `out[slot]` where deeper (other entries untouched).
    pub fn depths(&self, hashes: &[u64], among: WorkerMask, out: &mut [u16]) {
        let holders = self.holders.read().unwrap_or_else(|p| p.into_inner());
        walk_depths(hashes, among, |h| holders.get(h).copied(), out);
    }

    /// Blocks indexed (distinct router hashes, any worker).
    pub fn len(&self) -> usize {
        self.holders.read().map_or(0, |h| h.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One stored block as an engine reported it.
pub struct StoredBlock<'a> {
    pub engine_hash: i64,
    pub token_ids: &'a [u32],
}

/// One engine block the router could place.
struct Placed {
    /// The router chain value at the block's end (its children hash on from here).
    end: u64,
    /// Router hashes from the prompt's start to the block's end.
    depth: usize,
    /// The router hashes it covers (block size / 16 of them) that are indexed: none beyond
    /// the first `MAX_BLOCKS` of a prompt, which is all routing reads.
    hashes: Box<[u64]>,
    /// Physical copies the engine reported (vLLM keeps up to two; each is removed alone).
    copies: u32,
}

/// What one worker's engine holds, as its events said: the writer's side of the index for
/// one slot. Dropping it does not clear the slot; [`EngineBlocks::retire`] does.
pub struct EngineBlocks {
    slot: usize,
    blocks: HashMap<i64, Placed, ahash::RandomState>,
    /// Router hash → engine blocks of this worker covering it.
    counts: HashMap<u64, u32, ahash::RandomState>,
    /// Stored blocks left out: unknown parent, or a size that is not whole router blocks.
    pub unplaced: u64,
}

impl EngineBlocks {
    /// Starts feeding `index` for `slot`: from now on the slot's depths come from events.
    pub fn new(index: &KvIndex, slot: usize) -> Self {
        index.set_exact(slot, true);
        EngineBlocks {
            slot,
            blocks: HashMap::default(),
            counts: HashMap::default(),
            unplaced: 0,
        }
    }

    /// Engine blocks held.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// `blocks`, stored in this order after the block `parent` (None: at the prompt's start).
    pub fn stored(&mut self, index: &KvIndex, parent: Option<i64>, blocks: &[StoredBlock<'_>]) {
        let (mut prev, mut depth) = match parent {
            None => (0, 0),
            Some(p) => match self.blocks.get(&p) {
                Some(b) => (b.end, b.depth),
                None => {
                    self.unplaced += blocks.len() as u64;
                    return;
                }
            },
        };
        let mut holders = index.holders.write().unwrap_or_else(|p| p.into_inner());
        let bit = worker_bit(self.slot);
        for (i, b) in blocks.iter().enumerate() {
            if let Some(placed) = self.blocks.get_mut(&b.engine_hash) {
                placed.copies += 1;
                prev = placed.end;
                depth = placed.depth;
                continue;
            }
            if b.token_ids.is_empty() || b.token_ids.len() % TOKENS_PER_HASH != 0 {
                self.unplaced += (blocks.len() - i) as u64;
                break;
            }
            let mut bytes = [0u8; BLOCK];
            let hashes: Box<[u64]> = b
                .token_ids
                .chunks_exact(TOKENS_PER_HASH)
                .filter_map(|ids| {
                    for (k, id) in ids.iter().enumerate() {
                        bytes[4 * k..4 * k + 4].copy_from_slice(&id.to_le_bytes());
                    }
                    prev = chain(prev, &bytes);
                    depth += 1;
                    (depth <= MAX_BLOCKS).then_some(prev)
                })
                .collect();
            for &h in hashes.iter() {
                let n = self.counts.entry(h).or_insert(0);
                *n += 1;
                if *n == 1 {
                    *holders.entry(h).or_insert(0) |= bit;
                }
            }
            self.blocks.insert(
                b.engine_hash,
                Placed {
                    end: prev,
                    depth,
                    hashes,
                    copies: 1,
                },
            );
        }
        index.set_held(self.slot, self.blocks.len());
    }

    /// The engine evicted these blocks (one physical copy each).
    pub fn removed(&mut self, index: &KvIndex, engine_hashes: &[i64]) {
        let mut holders = index.holders.write().unwrap_or_else(|p| p.into_inner());
        for h in engine_hashes {
            let Some(placed) = self.blocks.get_mut(h) else {
                continue;
            };
            placed.copies -= 1;
            if placed.copies > 0 {
                continue;
            }
            let placed = self.blocks.remove(h).expect("present");
            for rh in placed.hashes.iter() {
                self.release(&mut holders, *rh);
            }
        }
        index.set_held(self.slot, self.blocks.len());
    }

    fn release(&mut self, holders: &mut HashMap<u64, WorkerMask, ahash::RandomState>, h: u64) {
        let Some(n) = self.counts.get_mut(&h) else {
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        self.counts.remove(&h);
        let bit = worker_bit(self.slot);
        if let Some(mask) = holders.get_mut(&h) {
            *mask &= !bit;
            if *mask == 0 {
                holders.remove(&h);
            }
        }
    }

    /// The engine dropped its whole cache, or the router lost track of it (a gap in the
    /// events): nothing is known to be held. The slot stays event-fed.
    pub fn cleared(&mut self, index: &KvIndex) {
        let mut holders = index.holders.write().unwrap_or_else(|p| p.into_inner());
        let bit = worker_bit(self.slot);
        for h in self.counts.keys() {
            if let Some(mask) = holders.get_mut(h) {
                *mask &= !bit;
                if *mask == 0 {
                    holders.remove(h);
                }
            }
        }
        self.counts.clear();
        self.blocks.clear();
        index.set_held(self.slot, 0);
    }

    /// Stops feeding the slot: its blocks leave the index and its depths are guessed again.
    pub fn retire(mut self, index: &KvIndex) {
        self.cleared(index);
        index.set_exact(self.slot, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::prefix::block_hashes;

    fn ids(range: std::ops::Range<u32>) -> Vec<u32> {
        range.collect()
    }

    fn request_hashes(tokens: &[u32]) -> Vec<u64> {
        let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        let mut out = Vec::new();
        block_hashes(&[&bytes], &mut out);
        out
    }

    fn depth(index: &KvIndex, tokens: &[u32], slot: usize) -> u16 {
        let mut out = vec![0u16; 8];
        index.depths(&request_hashes(tokens), index.exact(), &mut out);
        out[slot]
    }

    /// Stores `tokens` on `e` in engine blocks of `block` tokens, chained from the start;
    /// engine hashes are `base + i`.
    fn store(index: &KvIndex, e: &mut EngineBlocks, tokens: &[u32], block: usize, base: i64) {
        let blocks: Vec<StoredBlock> = tokens
            .chunks(block)
            .enumerate()
            .map(|(i, t)| StoredBlock {
                engine_hash: base + i as i64,
                token_ids: t,
            })
            .collect();
        e.stored(index, None, &blocks);
    }

    #[test]
    fn stored_blocks_line_up_with_the_hashes_of_a_request() {
        let index = KvIndex::new(128);
        let mut e = EngineBlocks::new(&index, 3);
        let prompt = ids(1000..1064); // four engine blocks of 16
        store(&index, &mut e, &prompt, 16, 100);
        assert_eq!(index.exact(), worker_bit(3));
        assert_eq!(depth(&index, &prompt, 3), 4);
        assert_eq!(index.held(3), Some(4));
        assert_eq!(index.held(2), None, "not event-fed");
        // A longer request sharing the prefix matches the four blocks held.
        let longer: Vec<u32> = prompt.iter().copied().chain(7..40).collect();
        assert_eq!(depth(&index, &longer, 3), 4);
        // Another prompt matches nothing.
        assert_eq!(depth(&index, &ids(2000..2064), 3), 0);
    }

    #[test]
    fn engine_blocks_larger_than_a_router_hash_cover_several() {
        let index = KvIndex::new(128);
        let mut e = EngineBlocks::new(&index, 0);
        let prompt = ids(0..256); // two engine blocks of 128 = 16 router hashes
        store(&index, &mut e, &prompt, 128, 1);
        assert_eq!(depth(&index, &prompt, 0), 16);
        e.removed(&index, &[2]);
        assert_eq!(depth(&index, &prompt, 0), 8, "the second block is gone");
    }

    #[test]
    fn a_child_stored_later_hashes_on_from_its_parent() {
        let index = KvIndex::new(128);
        let mut e = EngineBlocks::new(&index, 1);
        let prompt = ids(500..548);
        store(&index, &mut e, &prompt[..32], 16, 10);
        e.stored(
            &index,
            Some(11),
            &[StoredBlock {
                engine_hash: 12,
                token_ids: &prompt[32..48],
            }],
        );
        assert_eq!(depth(&index, &prompt, 1), 3);
        // A block whose parent the router never saw cannot be placed.
        e.stored(
            &index,
            Some(999),
            &[StoredBlock {
                engine_hash: 13,
                token_ids: &prompt[..16],
            }],
        );
        assert_eq!(e.unplaced, 1);
    }

    #[test]
    fn removal_takes_every_physical_copy_and_other_workers_keep_theirs() {
        let index = KvIndex::new(128);
        let mut a = EngineBlocks::new(&index, 0);
        let mut b = EngineBlocks::new(&index, 1);
        let prompt = ids(0..32);
        store(&index, &mut a, &prompt, 16, 1);
        store(&index, &mut a, &prompt, 16, 1); // a second copy of each
        store(&index, &mut b, &prompt, 16, 7);
        a.removed(&index, &[1, 2]);
        assert_eq!(depth(&index, &prompt, 0), 2, "one copy left");
        a.removed(&index, &[1, 2]);
        assert_eq!(depth(&index, &prompt, 0), 0);
        assert_eq!(depth(&index, &prompt, 1), 2);
        b.retire(&index);
        assert!(index.is_empty());
        assert_eq!(index.exact(), worker_bit(0));
    }

    #[test]
    fn cleared_forgets_everything_but_keeps_the_slot_event_fed() {
        let index = KvIndex::new(128);
        let mut e = EngineBlocks::new(&index, 5);
        store(&index, &mut e, &ids(0..64), 16, 1);
        e.cleared(&index);
        assert!(index.is_empty() && e.is_empty());
        assert_eq!(index.exact(), worker_bit(5));
    }

    #[test]
    fn blocks_that_are_not_whole_router_hashes_are_left_out() {
        let index = KvIndex::new(128);
        let mut e = EngineBlocks::new(&index, 0);
        store(&index, &mut e, &ids(0..30), 10, 1);
        assert_eq!(e.unplaced, 3);
        assert!(index.is_empty());
    }

    #[test]
    fn only_the_prefix_routing_reads_is_indexed() {
        let index = KvIndex::new(1);
        let mut e = EngineBlocks::new(&index, 0);
        let tokens = (MAX_BLOCKS + 40) * TOKENS_PER_HASH;
        let prompt: Vec<u32> = (0..tokens as u32).collect();
        store(&index, &mut e, &prompt, 128, 1);
        assert_eq!(
            index.len(),
            MAX_BLOCKS,
            "no hash beyond what a request is hashed to"
        );
        assert_eq!(depth(&index, &prompt, 0) as usize, MAX_BLOCKS);
        assert_eq!(index.held(0), Some(tokens.div_ceil(128) as u64));
    }

    #[test]
    fn slots_above_63_are_tracked() {
        let index = KvIndex::new(128);
        let e = EngineBlocks::new(&index, 100);
        assert_eq!(index.exact(), worker_bit(100));
        e.retire(&index);
        assert_eq!(index.exact(), 0);
    }
}
