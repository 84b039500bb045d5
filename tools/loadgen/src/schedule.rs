//! Owns time in a run: the measurement window (warmup, duration) and the open-loop arrival
//! schedule (fixed interval or Poisson), computed from the start so rounding never drifts.

use std::time::{Duration, Instant};

use crate::cli::Config;

/// When a run started, when measurement starts, and when sending stops.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub start: Instant,
    /// Requests whose start is before this are warmup and not recorded.
    pub measure_start: Instant,
    /// No request starts at or after this.
    pub deadline: Option<Instant>,
}

impl Clock {
    pub fn starting_now(cfg: &Config) -> Clock {
        let start = Instant::now();
        let measure_start = start + cfg.warmup;
        Clock {
            start,
            measure_start,
            deadline: cfg.duration.map(|d| measure_start + d),
        }
    }

    /// Seconds from measurement start to `end` (0 if `end` is earlier or absent).
    pub fn window(&self, end: Option<Instant>) -> Duration {
        end.map_or(Duration::ZERO, |e| {
            e.saturating_duration_since(self.measure_start)
        })
    }
}

/// Open-loop send times.
#[derive(Debug)]
pub struct Arrivals {
    start: Instant,
    rate: f64,
    poisson: Option<fastrand::Rng>,
    index: u64,
    /// Poisson: seconds from start of the next arrival.
    offset: f64,
}

impl Arrivals {
    pub fn new(start: Instant, rate: f64, poisson: bool, seed: u64) -> Arrivals {
        Arrivals {
            start,
            rate,
            poisson: poisson.then(|| fastrand::Rng::with_seed(seed ^ 0xa771_7a15)),
            index: 0,
            offset: 0.0,
        }
    }

    /// The scheduled time of the next request.
    pub fn next_arrival(&mut self) -> Instant {
        let secs = match &mut self.poisson {
            None => self.index as f64 / self.rate,
            Some(rng) => {
                let at = self.offset;
                // 1 - U is in (0, 1], so the logarithm is finite.
                self.offset += -(1.0 - rng.f64()).ln() / self.rate;
                at
            }
        };
        self.index += 1;
        self.start + Duration::from_secs_f64(secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_interval() {
        let t0 = Instant::now();
        let mut a = Arrivals::new(t0, 4.0, false, 1);
        let times: Vec<Duration> = (0..5).map(|_| a.next_arrival() - t0).collect();
        assert_eq!(
            times,
            [0, 250, 500, 750, 1000].map(Duration::from_millis).to_vec()
        );
    }

    #[test]
    fn poisson_mean_rate() {
        let t0 = Instant::now();
        let mut a = Arrivals::new(t0, 1000.0, true, 7);
        let mut last = t0;
        for _ in 0..20_000 {
            let t = a.next_arrival();
            assert!(t >= last);
            last = t;
        }
        let secs = (last - t0).as_secs_f64();
        assert!(
            (18.0..22.0).contains(&secs),
            "20000 arrivals at 1000/s took {secs}s"
        );
    }
}
