//! Routing policies and the per-shard selector state they need (round-robin cursor, RNG).
//! `round_robin` and `random` are built; the other vllm-router names parse so that the
//! CLI can say clearly that they are not available yet.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    RoundRobin,
    Random,
    ConsistentHash,
    PowerOfTwo,
    CacheAware,
}

impl Policy {
    pub const NAMES: [&'static str; 5] = [
        "round_robin",
        "random",
        "consistent_hash",
        "power_of_two",
        "cache_aware",
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round_robin",
            Policy::Random => "random",
            Policy::ConsistentHash => "consistent_hash",
            Policy::PowerOfTwo => "power_of_two",
            Policy::CacheAware => "cache_aware",
        }
    }

    /// Whether this build routes with the policy.
    pub fn is_available(self) -> bool {
        matches!(self, Policy::RoundRobin | Policy::Random)
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
            _ => {
                return Err(format!(
                    "unknown policy '{s}' (expected one of: {})",
                    Policy::NAMES.join(", ")
                ))
            }
        })
    }
}

/// A shard's policy state. Single-threaded: lives in the shard, never shared.
pub struct Selector {
    policy: Policy,
    cursor: usize,
    rng: fastrand::Rng,
}

impl Selector {
    /// `shard` offsets the round-robin cursor so shards do not start in lockstep.
    pub fn new(policy: Policy, shard: usize) -> Self {
        Selector {
            policy,
            cursor: shard,
            rng: fastrand::Rng::new(),
        }
    }

    /// The workers to try for one request, best first. Each worker appears once.
    pub fn candidates(&mut self, n_workers: usize) -> Candidates {
        if n_workers == 0 {
            return Candidates {
                start: 0,
                n: 0,
                taken: 0,
            };
        }
        let start = match self.policy {
            Policy::Random => self.rng.usize(..n_workers),
            _ => {
                let s = self.cursor % n_workers;
                self.cursor = self.cursor.wrapping_add(1);
                s
            }
        };
        Candidates {
            start,
            n: n_workers,
            taken: 0,
        }
    }
}

/// Worker indices in preference order: the policy's pick, then the others in ring order.
pub struct Candidates {
    start: usize,
    n: usize,
    taken: usize,
}

impl Iterator for Candidates {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        if self.taken == self.n {
            return None;
        }
        let i = (self.start + self.taken) % self.n;
        self.taken += 1;
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_cycles_and_offers_every_worker_once() {
        let mut s = Selector::new(Policy::RoundRobin, 0);
        let firsts: Vec<usize> = (0..6).map(|_| s.candidates(3).next().unwrap()).collect();
        assert_eq!(firsts, vec![0, 1, 2, 0, 1, 2]);
        let all: Vec<usize> = s.candidates(3).collect();
        assert_eq!(all, vec![0, 1, 2]);
        let all: Vec<usize> = s.candidates(3).collect();
        assert_eq!(all, vec![1, 2, 0]);
    }

    #[test]
    fn random_covers_all_workers() {
        let mut s = Selector::new(Policy::Random, 0);
        let mut seen = [0u32; 4];
        for _ in 0..400 {
            seen[s.candidates(4).next().unwrap()] += 1;
        }
        assert!(seen.iter().all(|&c| c > 40), "{seen:?}");
    }

    #[test]
    fn parses_every_vllm_router_name() {
        for n in Policy::NAMES {
            assert_eq!(n.parse::<Policy>().unwrap().name(), n);
        }
        assert!("fastest"
            .parse::<Policy>()
            .unwrap_err()
            .contains("round_robin"));
    }
}
