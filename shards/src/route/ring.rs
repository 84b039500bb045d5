//! The consistent-hash ring: 160 virtual nodes per worker, one replica per shard, rebuilt
//! when the worker set changes. A key's candidates are the distinct workers met walking the
//! ring clockwise from the key's point, so when the owner is unusable the next one takes
//! over (not "first healthy"), and one failure does not make a hot spot.

use std::hash::BuildHasher;

/// Virtual nodes per worker (vllm-router's figure).
pub const VNODES: usize = 160;

pub struct HashRing {
    /// (point, worker index), sorted by point.
    points: Vec<(u64, u32)>,
    workers: usize,
}

fn seeded() -> ahash::RandomState {
    ahash::RandomState::with_seeds(
        0x2d35_8dcc_aa6c_78a5,
        0x8bb8_4b93_962e_acc9,
        0x4b33_a62e_d433_d4a3,
        0x4d5a_2da5_1de1_aa47,
    )
}

/// The hasher shared by the ring and its keys: fixed seeds, so every shard (and every
/// restart) places keys identically.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    seeded().hash_one(bytes)
}

/// A streaming hasher for keys given in pieces (a routing text's segments).
pub fn text_hasher() -> ahash::AHasher {
    seeded().build_hasher()
}

impl HashRing {
    /// Builds the ring for workers identified by `names` (their URLs).
    pub fn new<S: AsRef<str>>(names: &[S]) -> Self {
        let mut points = Vec::with_capacity(names.len() * VNODES);
        let mut buf = String::new();
        for (w, name) in names.iter().enumerate() {
            for v in 0..VNODES {
                buf.clear();
                buf.push_str(name.as_ref());
                buf.push('#');
                buf.push_str(itoa::Buffer::new().format(v));
                points.push((stable_hash(buf.as_bytes()), w as u32));
            }
        }
        points.sort_unstable();
        HashRing {
            points,
            workers: names.len(),
        }
    }

    /// The workers for `key`, owner first, each once.
    pub fn walk(&self, key: &[u8]) -> RingWalk<'_> {
        self.walk_hash(stable_hash(key))
    }

    /// The workers for a key already hashed.
    pub fn walk_hash(&self, h: u64) -> RingWalk<'_> {
        let start = self.points.partition_point(|&(p, _)| p < h);
        RingWalk {
            ring: self,
            pos: start,
            steps: 0,
            seen: SeenSet::new(self.workers),
            yielded: 0,
        }
    }

    /// The owner of `key`.
    pub fn owner(&self, key: &[u8]) -> Option<usize> {
        self.walk(key).next()
    }
}

pub struct RingWalk<'r> {
    ring: &'r HashRing,
    pos: usize,
    steps: usize,
    seen: SeenSet,
    yielded: usize,
}

impl Iterator for RingWalk<'_> {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        let n = self.ring.points.len();
        while self.yielded < self.ring.workers && self.steps < n {
            let (_, w) = self.ring.points[(self.pos + self.steps) % n];
            self.steps += 1;
            if self.seen.insert(w as usize) {
                self.yielded += 1;
                return Some(w as usize);
            }
        }
        None
    }
}

/// A small bitset of worker indices (inline up to 128 workers).
pub struct SeenSet {
    inline: [u64; 2],
    spill: Vec<u64>,
}

impl SeenSet {
    pub fn new(workers: usize) -> Self {
        SeenSet {
            inline: [0; 2],
            spill: if workers > 128 {
                vec![0; (workers - 128).div_ceil(64)]
            } else {
                Vec::new()
            },
        }
    }

    /// Adds `i`; false if it was there already.
    pub fn insert(&mut self, i: usize) -> bool {
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        let slot = if word < 2 {
            &mut self.inline[word]
        } else {
            &mut self.spill[word - 2]
        };
        let fresh = *slot & bit == 0;
        *slot |= bit;
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("http://10.0.0.{i}:8000")).collect()
    }

    #[test]
    fn walk_yields_every_worker_once_owner_first() {
        let ring = HashRing::new(&names(5));
        for k in 0..100 {
            let key = format!("session-{k}");
            let order: Vec<usize> = ring.walk(key.as_bytes()).collect();
            assert_eq!(order.len(), 5);
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
            assert_eq!(ring.owner(key.as_bytes()), Some(order[0]));
        }
    }

    #[test]
    fn keys_spread_evenly() {
        let ring = HashRing::new(&names(4));
        let mut count = [0usize; 4];
        for k in 0..20_000 {
            count[ring.owner(format!("user-{k}").as_bytes()).unwrap()] += 1;
        }
        for c in count {
            assert!((3_500..6_500).contains(&c), "{count:?}");
        }
    }

    #[test]
    fn adding_or_removing_one_of_n_workers_moves_about_one_nth_of_keys() {
        let keys: Vec<String> = (0..20_000).map(|k| format!("conv-{k}")).collect();
        for n in [4usize, 8, 16] {
            let before = HashRing::new(&names(n));
            let grown = HashRing::new(&names(n + 1));
            let moved = keys
                .iter()
                .filter(|k| before.owner(k.as_bytes()) != grown.owner(k.as_bytes()))
                .count() as f64
                / keys.len() as f64;
            let expect = 1.0 / (n + 1) as f64;
            assert!(
                (moved - expect).abs() < expect * 0.35,
                "add to {n}: moved {moved:.3}, expected ~{expect:.3}"
            );
            // Every moved key moved to the new worker.
            assert!(keys.iter().all(|k| {
                let (a, b) = (before.owner(k.as_bytes()), grown.owner(k.as_bytes()));
                a == b || b == Some(n)
            }));
            // Removing the last worker moves only its keys.
            let shrunk = HashRing::new(&names(n - 1));
            let moved = keys
                .iter()
                .filter(|k| before.owner(k.as_bytes()) != shrunk.owner(k.as_bytes()))
                .count() as f64
                / keys.len() as f64;
            let expect = 1.0 / n as f64;
            assert!(
                (moved - expect).abs() < expect * 0.35,
                "remove from {n}: moved {moved:.3}"
            );
        }
    }

    #[test]
    fn an_unusable_owner_spreads_its_keys_over_the_others() {
        // Keys of a failed worker go to its ring successors, which differ per key.
        let ring = HashRing::new(&names(8));
        let mut next_owner = [0usize; 8];
        for k in 0..8_000 {
            let key = format!("k{k}");
            let mut walk = ring.walk(key.as_bytes());
            if walk.next() == Some(3) {
                next_owner[walk.next().unwrap()] += 1;
            }
        }
        let takers = next_owner.iter().filter(|&&c| c > 0).count();
        assert!(
            takers >= 6,
            "failed worker's keys go to {takers} workers: {next_owner:?}"
        );
    }

    #[test]
    fn seen_set_beyond_128() {
        let mut s = SeenSet::new(300);
        assert!(s.insert(250));
        assert!(!s.insert(250));
        assert!(s.insert(5));
    }
}
