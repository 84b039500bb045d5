//! A worker's response head: how its body is framed, whether the connection can be
//! reused, and the head the client gets (hop-by-hop headers dropped, everything else,
//! `Transfer-Encoding: chunked` included, passed through so body bytes need no re-encoding).

use crate::http::response::{write_status_line, Reason};

use super::{is_hop_by_hop, listed_in_connection};

/// Most headers a worker response may carry.
const MAX_RESPONSE_HEADERS: usize = 96;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseFraming {
    /// No body (HEAD, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
    /// Body runs until the worker closes the connection.
    UntilClose,
}

#[derive(Debug)]
pub struct ResponseHead {
    pub status: u16,
    pub len: usize,
    pub framing: ResponseFraming,
    /// The worker will keep the connection open after this response.
    pub reusable: bool,
    pub has_request_id: bool,
    /// vLLM's in-band load report (`endpoint-load-metrics`): (waiting, KV usage).
    pub load_report: Option<(Option<u32>, Option<f64>)>,
    /// `Content-Type: text/event-stream` (a stream can end with an in-band error event).
    pub event_stream: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ResponseHeadError {
    Malformed(String),
    TooLarge,
}

impl ResponseHead {
    /// Parses the head at the start of `buf`; `Ok(None)` when more bytes are needed.
    pub fn parse(buf: &[u8], request_was_head: bool) -> Result<Option<Self>, ResponseHeadError> {
        let mut raw = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let mut resp = httparse::Response::new(&mut raw);
        let len = match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(ResponseHeadError::TooLarge),
            Err(e) => return Err(ResponseHeadError::Malformed(e.to_string())),
        };
        let status = resp.code.unwrap_or(0);
        let mut content_length = None;
        let mut chunked = false;
        let mut close = resp.version == Some(0);
        let mut has_request_id = false;
        let mut load_report = None;
        let mut event_stream = false;
        for h in resp.headers.iter() {
            let n = h.name.as_bytes();
            if n.eq_ignore_ascii_case(b"content-length") {
                let v = crate::http::request::trim(h.value);
                let parsed = std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok());
                match (parsed, content_length) {
                    (None, _) => {
                        return Err(ResponseHeadError::Malformed(
                            "invalid Content-Length".into(),
                        ))
                    }
                    (Some(a), Some(b)) if a != b => {
                        return Err(ResponseHeadError::Malformed(
                            "conflicting Content-Length".into(),
                        ))
                    }
                    (Some(a), _) => content_length = Some(a),
                }
            } else if n.eq_ignore_ascii_case(b"transfer-encoding") {
                let v = crate::http::request::trim(h.value);
                // `chunked` must be the final coding; anything before it is passed through.
                let last = v.rsplit(|&b| b == b',').next().unwrap_or(b"");
                chunked = crate::http::request::trim(last).eq_ignore_ascii_case(b"chunked");
                if !chunked {
                    close = true;
                }
            } else if n.eq_ignore_ascii_case(b"connection") {
                for t in h.value.split(|&b| b == b',') {
                    let t = crate::http::request::trim(t);
                    if t.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") && resp.version == Some(0) {
                        close = false;
                    }
                }
            } else if n.eq_ignore_ascii_case(b"x-request-id") {
                has_request_id = true;
            } else if n.eq_ignore_ascii_case(b"content-type") {
                event_stream =
                    h.value.len() >= 17 && h.value[..17].eq_ignore_ascii_case(b"text/event-stream");
            } else if n.eq_ignore_ascii_case(LOAD_METRICS) {
                load_report = Some(crate::sync::parse_endpoint_load_metrics(h.value));
            }
        }
        let framing =
            if request_was_head || (100..200).contains(&status) || status == 204 || status == 304 {
                ResponseFraming::None
            } else if chunked {
                ResponseFraming::Chunked
            } else if let Some(n) = content_length {
                ResponseFraming::Length(n)
            } else {
                close = true;
                ResponseFraming::UntilClose
            };
        Ok(Some(ResponseHead {
            status,
            len,
            framing,
            reusable: !close,
            has_request_id,
            load_report,
            event_stream,
        }))
    }
}

/// The response header carrying vLLM's load report.
pub const LOAD_METRICS: &[u8] = b"endpoint-load-metrics";

/// How the client's head differs from the worker's.
#[derive(Clone, Copy, Default)]
pub struct ClientHead {
    /// Add `connection: close`.
    pub close: bool,
    /// Drop `transfer-encoding`: the payload goes out unframed, delimited by the close.
    pub dechunk: bool,
    /// Drop `endpoint-load-metrics`: the router asked for it, not the client.
    pub strip_load_report: bool,
}

/// Writes the head the client receives for the worker head `raw[..len]`.
pub fn write_client_head(
    out: &mut Vec<u8>,
    raw: &[u8],
    head: &ResponseHead,
    request_id: &[u8],
    how: ClientHead,
) {
    let ClientHead {
        close: close_client,
        dechunk,
        strip_load_report,
    } = how;
    let mut hdrs = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut hdrs);
    // Parsed once already; cannot fail the same way twice.
    let _ = resp.parse(&raw[..head.len]);
    write_status_line(
        out,
        head.status,
        Reason::Given(resp.reason.unwrap_or("").as_bytes()),
    );
    let mut connection_values: [&[u8]; 4] = [b""; 4];
    let mut nconn = 0;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") && nconn < 4 {
            connection_values[nconn] = h.value;
            nconn += 1;
        }
    }
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if is_hop_by_hop(name)
            || (nconn > 0 && listed_in_connection(&connection_values[..nconn], name))
            || (dechunk && name.eq_ignore_ascii_case(b"transfer-encoding"))
            || (strip_load_report && name.eq_ignore_ascii_case(LOAD_METRICS))
        {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if !head.has_request_id {
        out.extend_from_slice(b"x-request-id: ");
        out.extend_from_slice(request_id);
        out.extend_from_slice(b"\r\n");
    }
    if close_client || head.framing == ResponseFraming::UntilClose {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_over_chunked_passes_through() {
        let raw = b"HTTP/1.1 200 OK\r\ndate: x\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\n\r\n1a\r\n";
        let h = ResponseHead::parse(raw, false).unwrap().unwrap();
        assert_eq!(h.status, 200);
        assert_eq!(h.framing, ResponseFraming::Chunked);
        assert!(h.reusable);
        assert_eq!(&raw[h.len..], b"1a\r\n");
        let mut out = Vec::new();
        write_client_head(&mut out, raw, &h, b"rid", ClientHead::default());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\ndate: x\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\nx-request-id: rid\r\n\r\n"
        );
    }

    #[test]
    fn framing_rules() {
        let p = |raw: &[u8], head: bool| ResponseHead::parse(raw, head).unwrap().unwrap();
        assert_eq!(
            p(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n", false).framing,
            ResponseFraming::Length(7)
        );
        assert_eq!(
            p(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n", true).framing,
            ResponseFraming::None
        );
        assert_eq!(
            p(b"HTTP/1.1 204 No Content\r\n\r\n", false).framing,
            ResponseFraming::None
        );
        let h = p(b"HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!(h.framing, ResponseFraming::UntilClose);
        assert!(!h.reusable);
        assert!(
            !p(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\ncontent-length: 0\r\n\r\n",
                false
            )
            .reusable
        );
        assert!(!p(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", false).reusable);
        assert!(ResponseHead::parse(
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            false
        )
        .is_err());
        assert!(ResponseHead::parse(b"HTTP/1.1 200 OK\r\n", false)
            .unwrap()
            .is_none());
    }

    #[test]
    fn request_id_kept_when_worker_sends_one() {
        let raw = b"HTTP/1.1 404 Not Found\r\nx-request-id: w\r\ncontent-length: 0\r\n\r\n";
        let h = ResponseHead::parse(raw, false).unwrap().unwrap();
        let mut out = Vec::new();
        write_client_head(
            &mut out,
            raw,
            &h,
            b"rid",
            ClientHead {
                close: true,
                ..Default::default()
            },
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 404 Not Found\r\nx-request-id: w\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
    }

    #[test]
    fn load_report_is_read_and_stripped_when_the_router_asked() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nendpoint-load-metrics: TEXT named_metrics.num_requests_waiting=4.0, named_metrics.kv_cache_usage_perc=0.5\r\n\r\n{}";
        let h = ResponseHead::parse(raw, false).unwrap().unwrap();
        assert_eq!(h.load_report, Some((Some(4), Some(0.5))));
        let mut out = Vec::new();
        let how = ClientHead {
            strip_load_report: true,
            ..Default::default()
        };
        write_client_head(&mut out, raw, &h, b"r", how);
        assert!(!String::from_utf8_lossy(&out).contains("endpoint-load-metrics"));
    }
}
