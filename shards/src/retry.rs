//! When a failed attempt is tried again on another worker, and after how long. Only before
//! any response byte reached the client: connect errors and resets before the response
//! head, and the statuses below. vllm-router's flags and defaults.

use std::time::Duration;

#[derive(Clone, Copy, Debug)]
pub struct RetryConfig {
    /// Attempts in all (the first included); 1 = no retries.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub multiplier: f64,
    /// The backoff varies by up to this fraction either way.
    pub jitter: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(30),
            multiplier: 1.5,
            jitter: 0.2,
        }
    }
}

/// Statuses that another worker may answer better.
pub fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

impl RetryConfig {
    /// The wait before retry number `retry` (1 = the first retry), jittered with `unit`,
    /// a random number in [0, 1).
    pub fn backoff(&self, retry: u32, unit: f64) -> Duration {
        let base = self.initial_backoff.as_secs_f64()
            * self
                .multiplier
                .max(1.0)
                .powi(retry.saturating_sub(1) as i32);
        let base = base.min(self.max_backoff.as_secs_f64());
        let j = self.jitter.clamp(0.0, 1.0);
        let factor = 1.0 - j + 2.0 * j * unit;
        Duration::from_secs_f64((base * factor).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_by_the_multiplier_up_to_the_cap() {
        let r = RetryConfig::default();
        assert_eq!(r.backoff(1, 0.5), Duration::from_millis(50));
        assert_eq!(r.backoff(2, 0.5), Duration::from_millis(75));
        assert_eq!(r.backoff(3, 0.5), Duration::from_secs_f64(0.1125));
        assert_eq!(r.backoff(100, 0.5), Duration::from_secs(30));
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        let r = RetryConfig::default();
        assert_eq!(r.backoff(1, 0.0), Duration::from_millis(40));
        assert!(r.backoff(1, 0.999) <= Duration::from_millis(60));
    }

    #[test]
    fn which_statuses_are_retried() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(is_retryable_status(s));
        }
        for s in [200, 400, 401, 404, 422, 501] {
            assert!(!is_retryable_status(s));
        }
    }
}
