//! Owns splitting a decoded `text/event-stream` body into events, across read boundaries.
//!
//! Only the `data` field matters to a load generator: each event's data lines are joined with
//! `\n` (as the SSE spec says) and handed out when the blank line that ends the event arrives.
//! Comments (`: keep-alive`), `event:`/`id:`/`retry:` fields and events without data are skipped.
//! Lines end in LF or CRLF. Buffers are reused, so steady state allocates nothing.

/// Incremental SSE event scanner for one response body.
#[derive(Debug, Default)]
pub struct SseScanner {
    /// Bytes of a line whose end has not arrived yet.
    partial_line: Vec<u8>,
    /// Data of the event being assembled.
    data: Vec<u8>,
    has_data: bool,
}

impl SseScanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets any half-read event so the scanner can serve the next response.
    pub fn reset(&mut self) {
        self.partial_line.clear();
        self.data.clear();
        self.has_data = false;
    }

    #[cfg(test)]
    /// True when bytes of an unfinished event are pending (the body stopped mid-event).
    pub fn mid_event(&self) -> bool {
        self.has_data || !self.partial_line.is_empty()
    }

    /// Feeds decoded body bytes; `on_event` gets each complete event's data, in order.
    pub fn feed(&mut self, input: &[u8], mut on_event: impl FnMut(&[u8])) {
        let mut rest = input;
        while let Some(nl) = memchr::memchr(b'\n', rest) {
            let piece = &rest[..nl];
            if self.partial_line.is_empty() {
                self.line(piece, &mut on_event);
            } else {
                let mut line = std::mem::take(&mut self.partial_line);
                line.extend_from_slice(piece);
                self.line(&line, &mut on_event);
                line.clear();
                self.partial_line = line;
            }
            rest = &rest[nl + 1..];
        }
        self.partial_line.extend_from_slice(rest);
    }

    fn line(&mut self, line: &[u8], on_event: &mut impl FnMut(&[u8])) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if self.has_data {
                on_event(&self.data);
            }
            self.data.clear();
            self.has_data = false;
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(c) => {
                let v = &line[c + 1..];
                (&line[..c], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        if field == b"data" {
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
            self.has_data = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(pieces: &[&[u8]]) -> (Vec<String>, bool) {
        let mut s = SseScanner::new();
        let mut events = Vec::new();
        for p in pieces {
            s.feed(p, |d| events.push(String::from_utf8(d.to_vec()).unwrap()));
        }
        (events, s.mid_event())
    }

    const STREAM: &[u8] = b"data: {\"id\":1,\"text\":\"a\"}\n\n\
: keep-alive\n\n\
event: message\r\nid: 7\r\ndata:{\"id\":2}\r\n\r\n\
data: line one\ndata: line two\n\n\
retry: 10\n\n\
data: [DONE]\n\n";

    fn expected() -> Vec<String> {
        vec![
            "{\"id\":1,\"text\":\"a\"}".to_string(),
            "{\"id\":2}".to_string(),
            "line one\nline two".to_string(),
            "[DONE]".to_string(),
        ]
    }

    #[test]
    fn whole_stream() {
        let (events, mid) = scan(&[STREAM]);
        assert_eq!(events, expected());
        assert!(!mid);
    }

    #[test]
    fn split_at_every_byte_boundary() {
        for cut in 0..=STREAM.len() {
            let (events, mid) = scan(&[&STREAM[..cut], &STREAM[cut..]]);
            assert_eq!(events, expected(), "cut at {cut}");
            assert!(!mid, "cut at {cut}");
        }
    }

    #[test]
    fn split_at_every_pair_of_boundaries() {
        for a in 0..=STREAM.len() {
            for b in a..=STREAM.len() {
                let (events, _) = scan(&[&STREAM[..a], &STREAM[a..b], &STREAM[b..]]);
                assert_eq!(events, expected(), "cuts at {a},{b}");
            }
        }
    }

    #[test]
    fn one_byte_at_a_time() {
        let pieces: Vec<&[u8]> = STREAM.chunks(1).collect();
        let (events, _) = scan(&pieces);
        assert_eq!(events, expected());
    }

    #[test]
    fn event_without_blank_line_is_pending() {
        let (events, mid) = scan(&[b"data: x\n\ndata: y\n"]);
        assert_eq!(events, vec!["x".to_string()]);
        assert!(mid);
        let (_, mid) = scan(&[b"data: x\n\nda"]);
        assert!(mid);
    }

    #[test]
    fn reset_drops_half_event() {
        let mut s = SseScanner::new();
        let mut n = 0;
        s.feed(b"data: half", |_| n += 1);
        s.reset();
        s.feed(b"data: whole\n\n", |d| {
            assert_eq!(d, b"whole");
            n += 1
        });
        assert_eq!(n, 1);
    }

    #[test]
    fn data_field_without_value() {
        let (events, _) = scan(&[b"data\n\n"]);
        assert_eq!(events, vec![String::new()]);
    }
}
