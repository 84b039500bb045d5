//! Owns the figures of a run: latency histograms, the error taxonomy, per-worker counts and
//! stream-integrity counts, recorded per request into lock-sharded accumulators and merged once.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    /// TCP connect failed.
    Connect,
    /// The response status was not 2xx.
    Status(u16),
    /// Connection reset, or EOF before the response ended.
    Eof,
    /// The request did not finish within `--timeout`.
    Timeout,
    /// Malformed response head or body framing.
    Framing,
    /// A 200 stream carried an error event.
    InBand,
}

impl ErrorKind {
    /// Name used in reports: `connect`, `status_503`, `eof`, `timeout`, `framing`, `in_band`.
    pub fn key(self) -> String {
        match self {
            ErrorKind::Connect => "connect".into(),
            ErrorKind::Status(s) => format!("status_{s}"),
            ErrorKind::Eof => "eof".into(),
            ErrorKind::Timeout => "timeout".into(),
            ErrorKind::Framing => "framing".into(),
            ErrorKind::InBand => "in_band".into(),
        }
    }
}

/// Highest latency a histogram tracks (one hour, in µs); larger values saturate.
const MAX_US: u64 = 3_600_000_000;

/// Four significant digits: at a 70 ms TTFT a bucket is 4 µs wide (with three it was
/// 64 µs, coarser than the router overheads perf/pd.py subtracts from such TTFTs).
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 4).expect("valid histogram bounds")
}

/// Latency histograms, all in microseconds.
#[derive(Debug, Clone)]
pub struct Latencies {
    /// Start → first SSE `data:` event.
    pub ttft: Histogram<u64>,
    /// Start → first response body byte.
    pub first_byte: Histogram<u64>,
    /// Start → response head complete.
    pub head: Histogram<u64>,
    /// Between consecutive content events of a stream.
    pub gap: Histogram<u64>,
    /// Start → response complete.
    pub total: Histogram<u64>,
    /// Scheduled send time → request written (open loop: queueing in the generator and client).
    pub send_delay: Histogram<u64>,
    /// TTFT (a whole non-streamed answer) less the mocks' own time for that request
    /// (`mock_timing_us`, `mock_service_us`): what everything between the client and the
    /// mocks added, request by request.
    pub beyond_mocks: Histogram<u64>,
}

impl Latencies {
    fn new() -> Self {
        Latencies {
            ttft: histogram(),
            first_byte: histogram(),
            head: histogram(),
            gap: histogram(),
            total: histogram(),
            send_delay: histogram(),
            beyond_mocks: histogram(),
        }
    }
}

/// Stream-integrity counters.
#[derive(Debug, Clone, Default)]
pub struct StreamChecks {
    /// Successful streamed responses checked.
    pub checked: u64,
    pub events_total: u64,
    pub events_min: Option<u64>,
    pub events_max: u64,
    /// Streams whose last data event was not `[DONE]`.
    pub missing_done: u64,
    /// Streams whose content-event count differed from `--expect-events`.
    pub wrong_event_count: u64,
}

/// Everything measured about a successful request, as the lane hands it over.
#[derive(Debug)]
pub struct Success<'a> {
    pub total: Duration,
    pub head: Option<Duration>,
    pub first_byte: Option<Duration>,
    pub ttft: Option<Duration>,
    pub send_delay: Option<Duration>,
    /// The mocks' own part of the TTFT, when they report it.
    pub mock_timing: Option<Duration>,
    pub gaps_us: &'a [u64],
    pub worker: Option<&'a [u8]>,
    /// Content-event count and whether it ended with `[DONE]`, for streamed requests.
    pub stream: Option<(u64, bool)>,
}

/// One accumulator; the run keeps several and merges them at the end.
#[derive(Debug, Clone)]
pub struct Stats {
    pub latency: Latencies,
    pub ok: u64,
    pub errors: BTreeMap<ErrorKind, u64>,
    pub workers: HashMap<Vec<u8>, u64>,
    pub streams: StreamChecks,
    /// Retries of a request whose reused keep-alive connection was closed before any reply.
    pub stale_retries: u64,
    /// When the last measured request ended.
    pub last_end: Option<Instant>,
}

fn us(d: Duration) -> u64 {
    d.as_micros().min(u128::from(MAX_US)) as u64
}

impl Stats {
    pub fn new() -> Self {
        Stats {
            latency: Latencies::new(),
            ok: 0,
            errors: BTreeMap::new(),
            workers: HashMap::new(),
            streams: StreamChecks::default(),
            stale_retries: 0,
            last_end: None,
        }
    }

    fn ended(&mut self, at: Instant) {
        if self.last_end.is_none_or(|t| at > t) {
            self.last_end = Some(at);
        }
    }

    pub fn record_success(&mut self, s: &Success, end: Instant, expect_events: Option<u64>) {
        self.ok += 1;
        self.ended(end);
        let l = &mut self.latency;
        l.total.saturating_record(us(s.total));
        if let Some(d) = s.head {
            l.head.saturating_record(us(d));
        }
        if let Some(d) = s.first_byte {
            l.first_byte.saturating_record(us(d));
        }
        if let Some(d) = s.ttft {
            l.ttft.saturating_record(us(d));
        }
        if let Some(m) = s.mock_timing {
            // To the first token of a stream, to the end of any other answer.
            let d = s.ttft.unwrap_or(s.total);
            l.beyond_mocks.saturating_record(us(d.saturating_sub(m)));
        }
        if let Some(d) = s.send_delay {
            l.send_delay.saturating_record(us(d));
        }
        for &g in s.gaps_us {
            l.gap.saturating_record(g.min(MAX_US));
        }
        if let Some(w) = s.worker {
            self.count_worker(w);
        }
        if let Some((events, done)) = s.stream {
            let c = &mut self.streams;
            c.checked += 1;
            c.events_total += events;
            c.events_min = Some(c.events_min.map_or(events, |m| m.min(events)));
            c.events_max = c.events_max.max(events);
            if !done {
                c.missing_done += 1;
            }
            if expect_events.is_some_and(|n| n != events) {
                c.wrong_event_count += 1;
            }
        }
    }

    /// Records a failed request; `worker` is set when a response head named one.
    pub fn record_error(&mut self, kind: ErrorKind, worker: Option<&[u8]>, end: Instant) {
        *self.errors.entry(kind).or_insert(0) += 1;
        self.ended(end);
        if let Some(w) = worker {
            self.count_worker(w);
        }
    }

    fn count_worker(&mut self, w: &[u8]) {
        match self.workers.get_mut(w) {
            Some(n) => *n += 1,
            None => {
                self.workers.insert(w.to_vec(), 1);
            }
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn merge(&mut self, o: &Stats) {
        let (a, b) = (&mut self.latency, &o.latency);
        for (x, y) in [
            (&mut a.ttft, &b.ttft),
            (&mut a.first_byte, &b.first_byte),
            (&mut a.head, &b.head),
            (&mut a.gap, &b.gap),
            (&mut a.total, &b.total),
            (&mut a.send_delay, &b.send_delay),
            (&mut a.beyond_mocks, &b.beyond_mocks),
        ] {
            x.add(y).expect("histograms share bounds");
        }
        self.ok += o.ok;
        for (k, v) in &o.errors {
            *self.errors.entry(*k).or_insert(0) += v;
        }
        for (k, v) in &o.workers {
            *self.workers.entry(k.clone()).or_insert(0) += v;
        }
        let (c, d) = (&mut self.streams, &o.streams);
        c.checked += d.checked;
        c.events_total += d.events_total;
        c.events_min = match (c.events_min, d.events_min) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        };
        c.events_max = c.events_max.max(d.events_max);
        c.missing_done += d.missing_done;
        c.wrong_event_count += d.wrong_event_count;
        self.stale_retries += o.stale_retries;
        if let Some(t) = o.last_end {
            self.ended(t);
        }
    }
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

/// A few mutex-guarded accumulators; lanes spread over them so locks are rarely contended.
#[derive(Debug)]
pub struct StatShards {
    shards: Vec<Mutex<Stats>>,
}

impl StatShards {
    pub fn new(n: usize) -> Self {
        StatShards {
            shards: (0..n.max(1)).map(|_| Mutex::new(Stats::new())).collect(),
        }
    }

    pub fn shard(&self, lane: usize) -> MutexGuard<'_, Stats> {
        self.shards[lane % self.shards.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub fn merged(&self) -> Stats {
        let mut all = Stats::new();
        for s in &self.shards {
            all.merge(&s.lock().unwrap_or_else(|e| e.into_inner()));
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn success(total_ms: u64, events: u64, done: bool, worker: &'static [u8]) -> Success<'static> {
        Success {
            total: Duration::from_millis(total_ms),
            head: Some(Duration::from_millis(1)),
            first_byte: Some(Duration::from_millis(2)),
            ttft: Some(Duration::from_millis(3)),
            send_delay: None,
            mock_timing: None,
            gaps_us: &[100, 200],
            worker: Some(worker),
            stream: Some((events, done)),
        }
    }

    #[test]
    fn records_and_merges() {
        let shards = StatShards::new(2);
        let now = Instant::now();
        shards
            .shard(0)
            .record_success(&success(10, 4, true, b"w0"), now, Some(4));
        shards
            .shard(1)
            .record_success(&success(20, 3, false, b"w1"), now, Some(4));
        shards
            .shard(1)
            .record_error(ErrorKind::Status(503), Some(b"w1"), now);
        shards.shard(2).record_error(ErrorKind::Timeout, None, now);
        let s = shards.merged();
        assert_eq!(s.ok, 2);
        assert_eq!(s.error_count(), 2);
        assert_eq!(s.errors[&ErrorKind::Status(503)], 1);
        assert_eq!(s.workers[&b"w1"[..]], 2);
        assert_eq!(s.workers[&b"w0"[..]], 1);
        assert_eq!(s.latency.gap.len(), 4);
        assert_eq!(s.latency.total.len(), 2);
        assert_eq!(s.latency.send_delay.len(), 0);
        assert_eq!(s.streams.checked, 2);
        assert_eq!(s.streams.events_min, Some(3));
        assert_eq!(s.streams.events_max, 4);
        assert_eq!(s.streams.missing_done, 1);
        assert_eq!(s.streams.wrong_event_count, 1);
        assert_eq!(ErrorKind::Status(503).key(), "status_503");
    }
}
