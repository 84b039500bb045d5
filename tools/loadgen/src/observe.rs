//! Owns what one request saw: its timestamps, the worker that answered, and for streams the
//! SSE events (TTFT, gaps between content events, `[DONE]`, in-band errors).
//!
//! Event classes, for vLLM-shaped streams:
//! - `[DONE]` ends the stream; any later data event makes the stream count as not ended by it.
//! - an error event (`{"error": ...}` or `"object":"error"`) marks an in-band failure;
//! - a usage-only chunk (`"choices":[]`) and chat's role-only first chunk (`"role":..` with
//!   `"content":""`) are not content;
//! - every other data event is a content event. TTFT is the first data event of any class.

use std::time::{Duration, Instant};

use crate::client::BodySink;
use crate::sse::SseScanner;

/// Counts and times of a stream's events.
#[derive(Debug, Default)]
pub struct EventTally {
    pub first_event: Option<Instant>,
    last_content: Option<Instant>,
    /// Microseconds between consecutive content events.
    pub gaps_us: Vec<u64>,
    pub content_events: u64,
    /// The last data event so far was `[DONE]`.
    pub ended_with_done: bool,
    pub in_band_error: bool,
    /// `"mock_timing_us"` of the first event: the mocks' own part of the TTFT
    /// (tools/mock-vllm `--report-timing`).
    pub mock_timing_us: Option<u64>,
}

impl EventTally {
    fn reset(&mut self) {
        self.first_event = None;
        self.last_content = None;
        self.gaps_us.clear();
        self.content_events = 0;
        self.ended_with_done = false;
        self.in_band_error = false;
        self.mock_timing_us = None;
    }

    pub fn on_event(&mut self, data: &[u8], at: Instant) {
        if self.first_event.is_none() {
            self.first_event = Some(at);
            self.mock_timing_us = json_u64(data, b"\"mock_timing_us\":");
        }
        if data == b"[DONE]" {
            self.ended_with_done = true;
            return;
        }
        self.ended_with_done = false;
        match classify(data) {
            EventClass::Error => self.in_band_error = true,
            EventClass::Meta => {}
            EventClass::Content => {
                self.content_events += 1;
                if let Some(prev) = self.last_content {
                    self.gaps_us
                        .push(at.saturating_duration_since(prev).as_micros() as u64);
                }
                self.last_content = Some(at);
            }
        }
    }
}

/// The unsigned integer right after `key` (a JSON key with its colon), if there is one.
fn json_u64(hay: &[u8], key: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(hay, key)? + key.len();
    let digits = hay[at..].iter().take_while(|c| c.is_ascii_digit()).count();
    std::str::from_utf8(&hay[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventClass {
    Content,
    /// Usage-only or role-only chunk.
    Meta,
    Error,
}

fn classify(data: &[u8]) -> EventClass {
    let trimmed = data.trim_ascii_start();
    if trimmed.starts_with(b"{\"error\"") || has_json_pair(data, b"object", b"\"error\"") {
        EventClass::Error
    } else if has_json_pair(data, b"choices", b"[]")
        || (has_json_pair(data, b"content", b"\"\"")
            && memchr::memmem::find(data, b"\"role\"").is_some())
    {
        EventClass::Meta
    } else {
        EventClass::Content
    }
}

/// True if `"key"` is followed (after optional whitespace, `:`, optional whitespace) by `value`.
fn has_json_pair(hay: &[u8], key: &[u8], value: &[u8]) -> bool {
    let mut from = 0;
    while let Some(i) = memchr::memmem::find(&hay[from..], key) {
        let start = from + i;
        let end = start + key.len();
        from = end;
        if start == 0 || hay[start - 1] != b'"' || hay.get(end) != Some(&b'"') {
            continue;
        }
        let rest = hay[end + 1..].trim_ascii_start();
        if let Some(rest) = rest.strip_prefix(b":") {
            if rest.trim_ascii_start().starts_with(value) {
                return true;
            }
        }
    }
    false
}

/// The observation of one request, reused across requests of a lane.
#[derive(Debug)]
pub struct Observation {
    /// Latency origin: the scheduled send time (open loop) or just before writing (closed).
    pub start: Instant,
    pub sent: Option<Instant>,
    pub head: Option<Instant>,
    pub first_byte: Option<Instant>,
    pub status: u16,
    worker: Vec<u8>,
    has_worker: bool,
    /// Scan the body as SSE (streamed request).
    scan: bool,
    scanner: SseScanner,
    pub events: EventTally,
}

impl Observation {
    pub fn new() -> Self {
        Observation {
            start: Instant::now(),
            sent: None,
            head: None,
            first_byte: None,
            status: 0,
            worker: Vec::new(),
            has_worker: false,
            scan: false,
            scanner: SseScanner::new(),
            events: EventTally::default(),
        }
    }

    /// Starts a new request measured from `start`; `scan` says whether to parse SSE.
    pub fn begin(&mut self, start: Instant, scan: bool) {
        self.start = start;
        self.scan = scan;
        self.retry();
    }

    /// Forgets what an abandoned attempt saw, keeping the start time.
    pub fn retry(&mut self) {
        self.sent = None;
        self.head = None;
        self.first_byte = None;
        self.status = 0;
        self.worker.clear();
        self.has_worker = false;
        self.scanner.reset();
        self.events.reset();
    }

    pub fn worker(&self) -> Option<&[u8]> {
        self.has_worker.then_some(&self.worker[..])
    }

    pub fn scanned(&self) -> bool {
        self.scan
    }

    /// Time from start to `t`.
    pub fn since_start(&self, t: Option<Instant>) -> Option<Duration> {
        t.map(|t| t.saturating_duration_since(self.start))
    }
}

impl Default for Observation {
    fn default() -> Self {
        Self::new()
    }
}

impl BodySink for Observation {
    fn sent(&mut self, at: Instant) {
        self.sent = Some(at);
    }

    fn head(&mut self, status: u16, worker: Option<&[u8]>, at: Instant) {
        self.head = Some(at);
        self.status = status;
        if let Some(w) = worker {
            self.worker.extend_from_slice(w);
            self.has_worker = true;
        }
        // Only successful streams are scanned; error bodies are just drained.
        self.scan &= (200..300).contains(&status);
    }

    fn body(&mut self, data: &[u8], at: Instant) {
        if self.first_byte.is_none() {
            self.first_byte = Some(at);
        }
        if self.scan {
            let tally = &mut self.events;
            self.scanner.feed(data, |ev| tally.on_event(ev, at));
        } else if self.events.mock_timing_us.is_none() {
            // A mock's NIXL prefill answer reports its own time in kv_transfer_params.
            self.events.mock_timing_us = json_u64(data, b"\"mock_service_us\":");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_vllm_chunks() {
        assert_eq!(
            classify(
                br#"{"id":"c","object":"text_completion","choices":[{"index":0,"text":" hi"}]}"#
            ),
            EventClass::Content
        );
        assert_eq!(
            classify(
                br#"{"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#
            ),
            EventClass::Meta
        );
        assert_eq!(
            classify(br#"{"id":"c","choices":[{"index":0,"delta":{"content":""}}]}"#),
            EventClass::Content
        );
        assert_eq!(
            classify(br#"{"id":"c","choices": [],"usage":{"prompt_tokens":5}}"#),
            EventClass::Meta
        );
        assert_eq!(
            classify(br#"{"error":{"message":"boom","type":"x","code":500}}"#),
            EventClass::Error
        );
        assert_eq!(
            classify(br#"{"object": "error","message":"boom"}"#),
            EventClass::Error
        );
        assert_eq!(
            classify(br#"{"choices":[{"text":"the word \"error\""}]}"#),
            EventClass::Content
        );
    }

    #[test]
    fn the_mocks_own_time_is_read_from_the_first_event_or_a_plain_answer() {
        let t = Instant::now();
        let mut o = Observation::new();
        o.begin(t, true);
        o.head(200, None, t);
        o.body(
            b"data: {\"choices\":[{\"text\":\"a\"}],\"mock_timing_us\":70123}\n\n",
            t,
        );
        o.body(
            b"data: {\"choices\":[{\"text\":\"b\"}],\"mock_timing_us\":5}\n\n",
            t,
        );
        assert_eq!(o.events.mock_timing_us, Some(70123), "the first event's");

        o.begin(t, false);
        assert_eq!(o.events.mock_timing_us, None, "forgotten between requests");
        o.head(200, None, t);
        o.body(b"{\"kv_transfer_params\":{\"mock_service_us\":50042}}", t);
        assert_eq!(o.events.mock_timing_us, Some(50042));

        o.begin(t, true);
        o.head(200, None, t);
        o.body(b"data: {\"choices\":[]}\n\n", t);
        assert_eq!(o.events.mock_timing_us, None, "no report, no figure");
    }

    #[test]
    fn stream_through_observation() {
        let mut o = Observation::new();
        let t0 = Instant::now();
        o.begin(t0, true);
        o.head(200, Some(b"w3"), t0);
        let t1 = t0 + Duration::from_millis(5);
        let t2 = t0 + Duration::from_millis(7);
        o.body(
            b"data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: {\"choi",
            t1,
        );
        o.body(
            b"ces\":[{\"text\":\"b\"}]}\n\ndata: {\"choices\":[],\"usage\":{}}\n\ndata: [DONE]\n\n",
            t2,
        );
        assert_eq!(o.first_byte, Some(t1));
        assert_eq!(o.events.first_event, Some(t1));
        assert_eq!(o.events.content_events, 2);
        assert_eq!(o.events.gaps_us, vec![2000]);
        assert!(o.events.ended_with_done);
        assert!(!o.events.in_band_error);
        assert_eq!(o.worker(), Some(&b"w3"[..]));
        assert_eq!(o.since_start(o.first_byte), Some(Duration::from_millis(5)));

        o.begin(t0, true);
        o.head(500, None, t0);
        o.body(b"data: x\n\n", t1);
        assert_eq!(o.events.content_events, 0, "error bodies are not scanned");
        assert_eq!(o.worker(), None);
    }

    #[test]
    fn data_after_done_breaks_integrity() {
        let mut t = EventTally::default();
        let now = Instant::now();
        t.on_event(b"[DONE]", now);
        assert!(t.ended_with_done);
        t.on_event(b"{\"choices\":[{\"text\":\"late\"}]}", now);
        assert!(!t.ended_with_done);
    }
}
