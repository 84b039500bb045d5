//! The simulated prefix cache: a prompt's routing text cut into fixed-size byte blocks, each
//! block's hash chained on the one before (as vLLM's block hashes are, so a block only matches
//! behind the same prefix), and an LRU of those hashes with a fixed capacity in blocks. It owns
//! the decision "how much of this prompt is already cached"; what the routing text is lives in
//! `request`, what a hit costs or saves (TTFT, counters, the header) in `handler` and `state`.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// The chained block hashes of one prompt, built by feeding its routing text in pieces (so
/// the pieces are never joined). Only full blocks are hashed, as in vLLM: the partial tail
/// block is never cached.
pub(crate) struct PromptBlocks {
    /// 0 = only count bytes (the cache is off).
    block_bytes: usize,
    /// Bytes fed so far.
    len: usize,
    /// Bytes of the current block fed so far.
    fill: usize,
    /// FNV-1a state of the current block (seeded with the previous block's hash).
    state: u64,
    hashes: Vec<u64>,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl PromptBlocks {
    /// Blocks of `block_bytes` (at least 1); `size_hint` = expected prompt bytes, to size the
    /// hash list once.
    pub fn new(block_bytes: usize, size_hint: usize) -> PromptBlocks {
        let block_bytes = block_bytes.max(1);
        PromptBlocks {
            block_bytes,
            len: 0,
            fill: 0,
            state: FNV_OFFSET,
            hashes: Vec::with_capacity(size_hint / block_bytes + 1),
        }
    }

    /// Count the bytes and hash nothing.
    pub fn length_only() -> PromptBlocks {
        PromptBlocks {
            block_bytes: 0,
            len: 0,
            fill: 0,
            state: FNV_OFFSET,
            hashes: Vec::new(),
        }
    }

    /// Append the next piece of the routing text.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        self.len += bytes.len();
        if self.block_bytes == 0 {
            return;
        }
        while !bytes.is_empty() {
            let take = (self.block_bytes - self.fill).min(bytes.len());
            let mut h = self.state;
            for &b in &bytes[..take] {
                h = (h ^ b as u64).wrapping_mul(FNV_PRIME);
            }
            bytes = &bytes[take..];
            self.fill += take;
            if self.fill == self.block_bytes {
                // Finish the block; the next one starts from this block's hash.
                let hash = mix(h);
                self.hashes.push(hash);
                self.state = FNV_OFFSET ^ hash;
                self.fill = 0;
            } else {
                self.state = h;
            }
        }
    }

    /// Bytes fed.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// The chained hashes of the full blocks, in prompt order.
    pub fn hashes(&self) -> &[u64] {
        &self.hashes
    }

    /// How many leading blocks may count as a hit: vLLM always computes at least the last
    /// prompt token, so a prompt that is an exact number of blocks can hit all but the last.
    pub fn matchable(&self) -> usize {
        if self.block_bytes == 0 {
            return 0;
        }
        self.hashes
            .len()
            .min(self.len.saturating_sub(1) / self.block_bytes)
    }
}

/// splitmix64's finalizer: spreads FNV's state over all 64 bits (the LRU's map uses the hash
/// as is).
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// What the prefix cache did for one prompt, in bytes of routing text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PrefixHit {
    pub cached_bytes: usize,
    pub prompt_bytes: usize,
}

impl PrefixHit {
    /// The bytes the "engine" has to prefill.
    pub fn uncached_bytes(&self) -> usize {
        self.prompt_bytes - self.cached_bytes
    }
}

const NIL: u32 = u32::MAX;

struct Node {
    hash: u64,
    /// Towards the most recently used end.
    newer: u32,
    /// Towards the least recently used end.
    older: u32,
}

/// An LRU set of block hashes holding at most `capacity` blocks: a map from hash to slot and
/// a doubly linked recency list threaded through a slot vector (slots are reused on eviction,
/// so a full cache allocates nothing).
pub(crate) struct PrefixCache {
    capacity: usize,
    slots: HashMap<u64, u32, BuildHasherDefault<PassThrough>>,
    nodes: Vec<Node>,
    newest: u32,
    oldest: u32,
}

impl PrefixCache {
    /// A cache of `capacity` blocks (at least 1, at most `u32::MAX - 1`).
    pub fn new(capacity: usize) -> PrefixCache {
        PrefixCache {
            capacity: capacity.clamp(1, (NIL - 1) as usize),
            slots: HashMap::default(),
            nodes: Vec::new(),
            newest: NIL,
            oldest: NIL,
        }
    }

    /// Blocks held now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.len()
    }

    /// Serve one prompt: count its leading blocks already cached (stopping at the first
    /// miss), then insert or refresh all its blocks. They go in from last to first, so the
    /// prompt's head ends most recent and its tail is evicted first (vLLM frees a request's
    /// blocks in reverse for the same reason). Returns the cached blocks.
    pub fn lookup_and_insert(&mut self, blocks: &PromptBlocks) -> usize {
        let hashes = blocks.hashes();
        let hits = hashes[..blocks.matchable()]
            .iter()
            .take_while(|h| self.slots.contains_key(h))
            .count();
        for &hash in hashes.iter().rev() {
            self.touch(hash);
        }
        hits
    }

    /// Make `hash` the most recently used block, inserting it (and evicting the least
    /// recently used one when full) if absent.
    fn touch(&mut self, hash: u64) {
        if let Some(&slot) = self.slots.get(&hash) {
            if slot != self.newest {
                self.unlink(slot);
                self.push_newest(slot);
            }
            return;
        }
        let slot = if self.slots.len() >= self.capacity {
            let slot = self.oldest;
            self.unlink(slot);
            let old = std::mem::replace(&mut self.nodes[slot as usize].hash, hash);
            self.slots.remove(&old);
            slot
        } else {
            self.nodes.push(Node {
                hash,
                newer: NIL,
                older: NIL,
            });
            (self.nodes.len() - 1) as u32
        };
        self.slots.insert(hash, slot);
        self.push_newest(slot);
    }

    fn unlink(&mut self, slot: u32) {
        let Node { newer, older, .. } = self.nodes[slot as usize];
        if newer == NIL {
            self.newest = older;
        } else {
            self.nodes[newer as usize].older = older;
        }
        if older == NIL {
            self.oldest = newer;
        } else {
            self.nodes[older as usize].newer = newer;
        }
    }

    fn push_newest(&mut self, slot: u32) {
        let node = &mut self.nodes[slot as usize];
        node.newer = NIL;
        node.older = self.newest;
        if self.newest == NIL {
            self.oldest = slot;
        } else {
            self.nodes[self.newest as usize].newer = slot;
        }
        self.newest = slot;
    }
}

/// The map's hasher: block hashes are already mixed, so hash them no further.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(FNV_PRIME);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(text: &[u8], block: usize) -> PromptBlocks {
        let mut b = PromptBlocks::new(block, text.len());
        b.feed(text);
        b
    }

    #[test]
    fn pieces_hash_like_the_whole() {
        let text: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let whole = blocks(&text, 64);
        let mut pieces = PromptBlocks::new(64, 0);
        for chunk in text.chunks(37) {
            pieces.feed(chunk);
        }
        assert_eq!(whole.hashes(), pieces.hashes());
        assert_eq!(whole.hashes().len(), 1000 / 64);
        assert_eq!(pieces.len(), 1000);
    }

    #[test]
    fn hashes_chain_on_the_prefix() {
        let a = blocks(&[b'a'; 128], 64);
        let mut other = vec![b'b'; 64];
        other.extend_from_slice(&[b'a'; 64]);
        let b = blocks(&other, 64);
        // Same second block bytes, different prefix: different hash.
        assert_ne!(a.hashes()[1], b.hashes()[1]);
        assert_ne!(a.hashes()[0], a.hashes()[1]);
    }

    #[test]
    fn last_token_is_never_a_hit() {
        assert_eq!(blocks(&[1; 128], 64).matchable(), 1);
        assert_eq!(blocks(&[1; 129], 64).matchable(), 2);
        assert_eq!(blocks(&[1; 63], 64).matchable(), 0);
        assert_eq!(PromptBlocks::length_only().matchable(), 0);
    }

    #[test]
    fn shared_prefix_hits_and_lru_evicts_oldest() {
        let mut cache = PrefixCache::new(8);
        let a = blocks(&[b'a'; 4 * 64 + 1], 64);
        let b = blocks(&[b'b'; 4 * 64 + 1], 64);
        let c = blocks(&[b'c'; 4 * 64 + 1], 64);
        assert_eq!(cache.lookup_and_insert(&a), 0);
        assert_eq!(cache.lookup_and_insert(&a), 4);
        assert_eq!(cache.lookup_and_insert(&b), 0);
        assert_eq!(cache.len(), 8);
        assert_eq!(cache.lookup_and_insert(&a), 4, "a refreshed, b now oldest");
        assert_eq!(cache.lookup_and_insert(&c), 0, "evicts b, not a");
        assert_eq!(cache.len(), 8);
        assert_eq!(cache.lookup_and_insert(&a), 4);
        assert_eq!(cache.lookup_and_insert(&b), 0);
    }

    #[test]
    fn a_prompt_larger_than_the_cache_keeps_its_head() {
        let mut cache = PrefixCache::new(3);
        let a = blocks(&[b'a'; 5 * 64 + 1], 64);
        cache.lookup_and_insert(&a);
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.lookup_and_insert(&a), 3);
    }
}
