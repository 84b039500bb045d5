//! Request heads: parsing with httparse into spans of the connection's input buffer (no
//! copies, no per-request allocation once the connection's `RequestHead` has grown), and
//! the framing and persistence rules that keep the router safe from request smuggling.

use std::ops::Range;

use super::ApiError;

/// Most headers a request may carry (431 beyond).
pub const MAX_HEADERS: usize = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Delete,
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

/// One header as two spans of the input buffer.
#[derive(Clone, Copy, Debug)]
pub struct HeaderSpan {
    pub name: (u32, u32),
    pub value: (u32, u32),
}

impl HeaderSpan {
    pub fn name<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.name.0 as usize..self.name.1 as usize]
    }
    pub fn value<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.value.0 as usize..self.value.1 as usize]
    }
}

/// A parsed request head. Spans are relative to the start of the head in the buffer.
#[derive(Debug, Default)]
pub struct RequestHead {
    pub method: Option<Method>,
    pub method_span: Range<usize>,
    pub path: Range<usize>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Length of the head including the blank line.
    pub len: usize,
    pub headers: Vec<HeaderSpan>,
    pub framing: Option<BodyFraming>,
    pub keep_alive: bool,
    pub expect_continue: bool,
    pub request_id: Option<Range<usize>>,
}

#[derive(Debug)]
pub enum ParseOutcome {
    /// The head is complete and valid; `RequestHead` is filled.
    Complete,
    /// More bytes are needed.
    Partial,
}

impl RequestHead {
    pub fn method(&self) -> Method {
        self.method.unwrap_or(Method::Other)
    }
    pub fn framing(&self) -> BodyFraming {
        self.framing.unwrap_or(BodyFraming::None)
    }
    pub fn path<'b>(&self, head: &'b [u8]) -> &'b [u8] {
        &head[self.path.clone()]
    }

    /// Parses the head at the start of `buf`. Errors carry the status to answer with.
    pub fn parse(&mut self, buf: &[u8], max_head: usize) -> Result<ParseOutcome, ApiError> {
        let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut raw);
        let len = match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                if buf.len() >= max_head {
                    return Err(ApiError::new(
                        431,
                        format!("request header block exceeds {max_head} bytes"),
                    ));
                }
                return Ok(ParseOutcome::Partial);
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Err(ApiError::new(
                    431,
                    format!("request has more than {MAX_HEADERS} headers"),
                ))
            }
            Err(e) => return Err(ApiError::bad_request(format!("malformed request: {e}"))),
        };
        if len > max_head {
            return Err(ApiError::new(
                431,
                format!("request header block exceeds {max_head} bytes"),
            ));
        }
        let base = buf.as_ptr() as usize;
        let span = |s: &[u8]| {
            let start = s.as_ptr() as usize - base;
            start..start + s.len()
        };
        let method = req.method.unwrap_or("");
        self.method_span = span(method.as_bytes());
        self.method = Some(match method {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "DELETE" => Method::Delete,
            _ => Method::Other,
        });
        let path = req.path.unwrap_or("");
        if !path.starts_with('/') {
            return Err(ApiError::bad_request(
                "request target must be an absolute path (origin-form)",
            ));
        }
        self.path = span(path.as_bytes());
        self.minor_version = req.version.unwrap_or(1);
        self.len = len;
        self.headers.clear();
        self.request_id = None;
        self.expect_continue = false;

        let mut content_length: Option<u64> = None;
        let mut chunked = false;
        let mut saw_te = false;
        let mut conn_close = false;
        let mut conn_keep_alive = false;
        for h in req.headers.iter() {
            let name = h.name.as_bytes();
            let value = h.value;
            let ns = span(name);
            let vs = span(value);
            self.headers.push(HeaderSpan {
                name: (ns.start as u32, ns.end as u32),
                value: (vs.start as u32, vs.end as u32),
            });
            if name.eq_ignore_ascii_case(b"content-length") {
                let n = parse_content_length(value)?;
                if content_length.is_some_and(|prev| prev != n) {
                    return Err(ApiError::bad_request("conflicting Content-Length headers"));
                }
                content_length = Some(n);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                if saw_te {
                    return Err(ApiError::bad_request("repeated Transfer-Encoding header"));
                }
                saw_te = true;
                if trim(value).eq_ignore_ascii_case(b"chunked") {
                    chunked = true;
                } else {
                    return Err(ApiError::new(
                        501,
                        "unsupported Transfer-Encoding (only 'chunked' is accepted)",
                    ));
                }
            } else if name.eq_ignore_ascii_case(b"connection") {
                for token in value.split(|&b| b == b',') {
                    let t = trim(token);
                    if t.eq_ignore_ascii_case(b"close") {
                        conn_close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                        conn_keep_alive = true;
                    }
                }
            } else if name.eq_ignore_ascii_case(b"expect") {
                if trim(value).eq_ignore_ascii_case(b"100-continue") {
                    self.expect_continue = true;
                } else {
                    return Err(ApiError::new(417, "unsupported Expect header"));
                }
            } else if name.eq_ignore_ascii_case(b"x-request-id") {
                let v = trim(value);
                if !v.is_empty() {
                    self.request_id = Some(span(v));
                }
            }
        }
        if chunked && content_length.is_some() {
            return Err(ApiError::bad_request(
                "request has both Content-Length and Transfer-Encoding",
            ));
        }
        if chunked && self.minor_version == 0 {
            return Err(ApiError::bad_request(
                "Transfer-Encoding is not allowed in HTTP/1.0",
            ));
        }
        self.framing = Some(if chunked {
            BodyFraming::Chunked
        } else {
            match content_length {
                Some(0) | None => BodyFraming::None,
                Some(n) => BodyFraming::Length(n),
            }
        });
        self.keep_alive = if self.minor_version == 0 {
            conn_keep_alive && !conn_close
        } else {
            !conn_close
        };
        Ok(ParseOutcome::Complete)
    }

    /// The value of the first header called `name` (ASCII case-insensitive).
    pub fn header<'b>(&self, head: &'b [u8], name: &[u8]) -> Option<&'b [u8]> {
        self.headers
            .iter()
            .find(|h| h.name(head).eq_ignore_ascii_case(name))
            .map(|h| h.value(head))
    }
}

fn parse_content_length(v: &[u8]) -> Result<u64, ApiError> {
    let v = trim(v);
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return Err(ApiError::bad_request("invalid Content-Length header"));
    }
    Ok(v.iter().fold(0u64, |n, d| n * 10 + (d - b'0') as u64))
}

pub fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &v[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<(ParseOutcome, RequestHead), ApiError> {
        let mut h = RequestHead::default();
        let o = h.parse(raw.as_bytes(), 8192)?;
        Ok((o, h))
    }

    fn status_of(raw: &str) -> u16 {
        match parse(raw) {
            Err(e) => e.status,
            Ok(_) => 0,
        }
    }

    #[test]
    fn post_with_length() {
        let raw = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\nX-Request-Id: abc\r\n\r\n{}";
        let (o, h) = parse(raw).unwrap();
        assert!(matches!(o, ParseOutcome::Complete));
        assert_eq!(h.method(), Method::Post);
        assert_eq!(h.path(raw.as_bytes()), b"/v1/completions");
        assert_eq!(h.framing(), BodyFraming::Length(12));
        assert!(h.keep_alive);
        assert_eq!(&raw.as_bytes()[h.request_id.clone().unwrap()], b"abc");
        assert_eq!(h.len, raw.len() - 2);
        assert_eq!(h.header(raw.as_bytes(), b"HOST"), Some(&b"x"[..]));
    }

    #[test]
    fn partial_head_waits_for_more() {
        assert!(matches!(
            parse("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().0,
            ParseOutcome::Partial
        ));
    }

    #[test]
    fn persistence_rules() {
        assert!(
            !parse("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
                .unwrap()
                .1
                .keep_alive
        );
        assert!(!parse("GET / HTTP/1.0\r\n\r\n").unwrap().1.keep_alive);
        assert!(
            parse("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
                .unwrap()
                .1
                .keep_alive
        );
        assert!(
            parse("GET / HTTP/1.1\r\nConnection: upgrade, keep-alive\r\n\r\n")
                .unwrap()
                .1
                .keep_alive
        );
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        assert_eq!(
            status_of("POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
        assert_eq!(
            status_of("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"),
            400
        );
        assert_eq!(
            status_of("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            400
        );
        assert_eq!(
            status_of("POST / HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n"),
            400
        );
        assert_eq!(
            status_of("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            501
        );
        assert_eq!(
            status_of("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
        // Equal repeated lengths are allowed (RFC 9110 §8.6).
        assert_eq!(
            parse("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n")
                .unwrap()
                .1
                .framing(),
            BodyFraming::Length(3)
        );
    }

    #[test]
    fn malformed_heads_are_400() {
        assert_eq!(status_of("GET / HTTP/1.1\r\nBad Header\r\n\r\n"), 400);
        assert_eq!(status_of("GET /\r\n\r\n"), 400);
        assert_eq!(status_of("GET http://x/ HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status_of("G\x01T / HTTP/1.1\r\n\r\n"), 400);
    }

    #[test]
    fn oversized_heads_are_431() {
        let mut h = RequestHead::default();
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(9000));
        assert_eq!(h.parse(big.as_bytes(), 8192).unwrap_err().status, 431);
        let many: String = (0..200).map(|i| format!("X-{i}: v\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(h.parse(raw.as_bytes(), 1 << 20).unwrap_err().status, 431);
    }

    #[test]
    fn expect_continue() {
        let (_, h) =
            parse("POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n").unwrap();
        assert!(h.expect_continue);
    }
}
