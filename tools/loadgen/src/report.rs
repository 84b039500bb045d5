//! Owns the results as the user sees them: one [`Report`] built from the merged stats, printed
//! either as a JSON object (latencies in microseconds) or as a readable table (milliseconds).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cli::{Config, Load};
use crate::schedule::Clock;
use crate::stats::Stats;

#[derive(Debug, Serialize)]
pub struct Report {
    /// "closed" or "open".
    pub mode: &'static str,
    pub url: String,
    pub endpoint: &'static str,
    pub stream: bool,
    pub model: String,
    pub prompt_bytes: usize,
    pub max_tokens: u32,
    pub prefix_groups: usize,
    pub concurrency: Option<usize>,
    pub target_rate: Option<f64>,
    pub poisson: bool,
    pub max_connections: Option<usize>,
    pub threads: usize,
    pub warmup_s: f64,
    /// Measurement window: warmup end to the end of the last measured request.
    pub duration_s: f64,
    pub requests: Requests,
    /// Successful requests per second over the window.
    pub requests_per_sec: f64,
    pub connections_opened: u64,
    pub stale_connection_retries: u64,
    pub latency_us: LatencyReport,
    pub errors: ErrorReport,
    /// Requests per value of the worker header (e.g. `x-mock-worker`).
    pub workers: BTreeMap<String, u64>,
    pub streams: StreamReport,
    /// The run was cut short by Ctrl-C.
    pub interrupted: bool,
}

#[derive(Debug, Serialize)]
pub struct Requests {
    pub total: u64,
    pub ok: u64,
    pub failed: u64,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p99_9: u64,
    pub max: u64,
}

impl Summary {
    fn of(h: &Histogram<u64>) -> Summary {
        if h.is_empty() {
            return Summary {
                count: 0,
                min: 0,
                mean: 0.0,
                p50: 0,
                p90: 0,
                p99: 0,
                p99_9: 0,
                max: 0,
            };
        }
        Summary {
            count: h.len(),
            min: h.min(),
            mean: (h.mean() * 10.0).round() / 10.0,
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p99_9: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct LatencyReport {
    /// Start to first SSE data event (start = scheduled time in open loop).
    pub ttft: Summary,
    /// Start to first response body byte.
    pub first_byte: Summary,
    /// Start to complete response head.
    pub head: Summary,
    /// Between consecutive content events.
    pub gap: Summary,
    /// Start to end of response.
    pub total: Summary,
    /// Open loop: scheduled time to request written.
    pub send_delay: Summary,
    /// TTFT (non-streamed: total) less the mocks' own time (mocks started with
    /// `--report-timing`).
    pub beyond_mocks: Summary,
}

#[derive(Debug, Serialize)]
pub struct ErrorReport {
    pub total: u64,
    /// `connect`, `status_NNN`, `eof`, `timeout`, `framing`, `in_band`.
    pub by_kind: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
pub struct StreamReport {
    /// Successful streamed responses checked.
    pub checked: u64,
    pub events_total: u64,
    pub events_min: u64,
    pub events_max: u64,
    pub expected_events: Option<u64>,
    pub missing_done: u64,
    pub wrong_event_count: u64,
}

/// What the report needs beyond the stats.
pub struct RunFacts<'a> {
    pub cfg: &'a Config,
    pub model: &'a str,
    pub clock: Clock,
    pub connections: u64,
    pub interrupted: bool,
}

impl Report {
    pub fn build(stats: &Stats, f: &RunFacts) -> Report {
        let cfg = f.cfg;
        let window = f.clock.window(stats.last_end).as_secs_f64();
        let failed = stats.error_count();
        let (mode, concurrency, target_rate, poisson, max_connections) = match cfg.load {
            Load::Closed { concurrency } => ("closed", Some(concurrency), None, false, None),
            Load::Open {
                rate,
                poisson,
                max_connections,
            } => ("open", None, Some(rate), poisson, Some(max_connections)),
        };
        let l = &stats.latency;
        Report {
            mode,
            url: cfg.url.clone(),
            endpoint: cfg.endpoint.name(),
            stream: cfg.stream,
            model: f.model.to_string(),
            prompt_bytes: cfg.prompt_bytes,
            max_tokens: cfg.max_tokens,
            prefix_groups: cfg.prefix_groups,
            concurrency,
            target_rate,
            poisson,
            max_connections,
            threads: cfg.threads,
            warmup_s: cfg.warmup.as_secs_f64(),
            duration_s: (window * 1e6).round() / 1e6,
            requests: Requests {
                total: stats.ok + failed,
                ok: stats.ok,
                failed,
            },
            requests_per_sec: if window > 0.0 {
                ((stats.ok as f64 / window) * 100.0).round() / 100.0
            } else {
                0.0
            },
            connections_opened: f.connections,
            stale_connection_retries: stats.stale_retries,
            latency_us: LatencyReport {
                ttft: Summary::of(&l.ttft),
                first_byte: Summary::of(&l.first_byte),
                head: Summary::of(&l.head),
                gap: Summary::of(&l.gap),
                total: Summary::of(&l.total),
                send_delay: Summary::of(&l.send_delay),
                beyond_mocks: Summary::of(&l.beyond_mocks),
            },
            errors: ErrorReport {
                total: failed,
                by_kind: stats.errors.iter().map(|(k, v)| (k.key(), *v)).collect(),
            },
            workers: stats
                .workers
                .iter()
                .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), *v))
                .collect(),
            streams: StreamReport {
                checked: stats.streams.checked,
                events_total: stats.streams.events_total,
                events_min: stats.streams.events_min.unwrap_or(0),
                events_max: stats.streams.events_max,
                expected_events: cfg.expect_events,
                missing_done: stats.streams.missing_done,
                wrong_event_count: stats.streams.wrong_event_count,
            },
            interrupted: f.interrupted,
        }
    }

    /// Failed requests plus streams failing an integrity check.
    pub fn problems(&self) -> u64 {
        self.errors.total + self.streams.missing_done + self.streams.wrong_event_count
    }

    pub fn json(&self) -> String {
        serde_json::to_string(self).expect("report serializes")
    }

    pub fn table(&self) -> String {
        let mut s = String::new();
        let load = match (self.concurrency, self.target_rate) {
            (Some(c), _) => format!("closed loop, concurrency {c}"),
            (None, Some(r)) => format!(
                "open loop, {} arrivals at {r} req/s, up to {} connections",
                if self.poisson {
                    "Poisson"
                } else {
                    "fixed-interval"
                },
                self.max_connections.unwrap_or(0)
            ),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "{} {} {}  model {:?}  prompt {} B  max_tokens {}{}",
            self.url,
            self.endpoint,
            if self.stream { "stream" } else { "no-stream" },
            self.model,
            self.prompt_bytes,
            self.max_tokens,
            if self.prefix_groups > 0 {
                format!("  prefix groups {}", self.prefix_groups)
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            s,
            "{load}; {} requests ({} ok, {} failed) in {:.3} s = {:.1} req/s; {} connections opened{}",
            self.requests.total,
            self.requests.ok,
            self.requests.failed,
            self.duration_s,
            self.requests_per_sec,
            self.connections_opened,
            if self.interrupted { "; INTERRUPTED" } else { "" }
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<12} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "latency ms", "count", "mean", "p50", "p90", "p99", "p99.9", "max"
        );
        let l = &self.latency_us;
        let mut rows = vec![
            ("ttft", &l.ttft),
            ("first byte", &l.first_byte),
            ("head", &l.head),
            ("event gap", &l.gap),
            ("total", &l.total),
        ];
        if self.target_rate.is_some() {
            rows.push(("send delay", &l.send_delay));
        }
        if l.beyond_mocks.count > 0 {
            rows.push(("past mocks", &l.beyond_mocks));
        }
        for (name, m) in rows {
            if m.count == 0 {
                let _ = writeln!(s, "{name:<12} {:>8} {:>10}", 0, "-");
                continue;
            }
            let ms = |v: u64| format!("{:.3}", v as f64 / 1000.0);
            let _ = writeln!(
                s,
                "{name:<12} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
                m.count,
                format!("{:.3}", m.mean / 1000.0),
                ms(m.p50),
                ms(m.p90),
                ms(m.p99),
                ms(m.p99_9),
                ms(m.max)
            );
        }
        let _ = writeln!(s);
        if self.errors.total == 0 {
            let _ = writeln!(s, "errors: none");
        } else {
            let kinds: Vec<String> = self
                .errors
                .by_kind
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(s, "errors: {} ({})", self.errors.total, kinds.join(", "));
        }
        if self.stale_connection_retries > 0 {
            let _ = writeln!(
                s,
                "stale keep-alive retries: {}",
                self.stale_connection_retries
            );
        }
        if self.workers.is_empty() {
            let _ = writeln!(s, "workers: no worker header seen");
        } else {
            let w: Vec<String> = self
                .workers
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(s, "workers: {}", w.join(", "));
        }
        if self.stream {
            let st = &self.streams;
            let expected = match st.expected_events {
                Some(n) => format!(
                    ", wrong event count {} (expected {n})",
                    st.wrong_event_count
                ),
                None => String::new(),
            };
            let _ = writeln!(
                s,
                "streams: {} checked, content events {} total ({}..{} per stream), missing [DONE] {}{}",
                st.checked, st.events_total, st.events_min, st.events_max, st.missing_done, expected
            );
        }
        s
    }
}
