//! The request head sent to a worker: the client's method, path and end-to-end headers;
//! `Host` is the worker's; the body is always sent with a Content-Length (a chunked client
//! body has been decoded by then); the request id is the one the client sees.

use crate::http::RequestHead;

use super::{is_hop_by_hop, listed_in_connection};

/// Headers the proxy sets itself, so the client's copies are dropped.
fn set_by_proxy(name: &[u8]) -> bool {
    const OWN: [&[u8]; 5] = [
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"expect",
        b"x-request-id",
    ];
    OWN.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// What the router adds to an upstream request beyond the client's.
#[derive(Default)]
pub struct UpstreamHeadOpts<'a> {
    /// Ask vLLM for its in-band load report (`endpoint-load-metrics`) unless the client
    /// asked already.
    pub ask_load: bool,
    /// `Authorization` value for the worker (`Bearer <--api-key>`), replacing the client's.
    pub authorization: Option<&'a [u8]>,
    /// The worker's data-parallel rank (`X-data-parallel-rank`), replacing the client's.
    pub dp_rank: Option<u32>,
}

/// The request header that pins a request to one data-parallel rank of a vLLM server.
pub const DP_RANK: &[u8] = b"x-data-parallel-rank";

/// Writes the upstream request head for `req` (whose spans index `head`) into `out`.
/// Returns whether the router asked for the load report (then the report is the
/// router's, not the client's).
pub fn write_upstream_head(
    out: &mut Vec<u8>,
    head: &[u8],
    req: &RequestHead,
    authority: &str,
    request_id: &[u8],
    body_len: usize,
    opts: &UpstreamHeadOpts<'_>,
) -> bool {
    out.extend_from_slice(&head[req.method_span.clone()]);
    out.push(b' ');
    out.extend_from_slice(&head[req.path.clone()]);
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(authority.as_bytes());
    out.extend_from_slice(b"\r\n");

    let mut connection_values: [&[u8]; 4] = [b""; 4];
    let mut nconn = 0;
    for h in &req.headers {
        if h.name(head).eq_ignore_ascii_case(b"connection") && nconn < 4 {
            connection_values[nconn] = h.value(head);
            nconn += 1;
        }
    }
    for h in &req.headers {
        let name = h.name(head);
        if set_by_proxy(name)
            || is_hop_by_hop(name)
            || (opts.authorization.is_some() && name.eq_ignore_ascii_case(b"authorization"))
            || (opts.dp_rank.is_some() && name.eq_ignore_ascii_case(DP_RANK))
            || (nconn > 0 && listed_in_connection(&connection_values[..nconn], name))
        {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value(head));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"x-request-id: ");
    out.extend_from_slice(request_id);
    out.extend_from_slice(b"\r\n");
    if let Some(auth) = opts.authorization {
        out.extend_from_slice(b"authorization: ");
        out.extend_from_slice(auth);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(rank) = opts.dp_rank {
        out.extend_from_slice(b"x-data-parallel-rank: ");
        out.extend_from_slice(itoa::Buffer::new().format(rank).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let asked = opts.ask_load && req.header(head, LOAD_FORMAT).is_none();
    if asked {
        out.extend_from_slice(b"endpoint-load-metrics-format: TEXT\r\n");
    }
    if body_len > 0 || req.method() == crate::http::Method::Post {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(body_len).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    asked
}

/// The request header that makes vLLM report its load in the response.
pub const LOAD_FORMAT: &[u8] = b"endpoint-load-metrics-format";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_dropped_host_rewritten_id_set() {
        let raw = b"POST /v1/completions?x=1 HTTP/1.1\r\nHost: router:30000\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\nAuthorization: Bearer k\r\nTraceparent: 00-abc-01\r\nX-Request-Id: client-id\r\n\r\n";
        let mut req = RequestHead::default();
        req.parse(raw, 8192).unwrap();
        let mut out = Vec::new();
        let asked = write_upstream_head(
            &mut out,
            raw,
            &req,
            "127.0.0.1:8000",
            b"client-id",
            5,
            &UpstreamHeadOpts::default(),
        );
        assert!(!asked);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /v1/completions?x=1 HTTP/1.1\r\nhost: 127.0.0.1:8000\r\nAuthorization: Bearer k\r\nTraceparent: 00-abc-01\r\nx-request-id: client-id\r\ncontent-length: 5\r\n\r\n"
        );
    }

    #[test]
    fn the_worker_api_key_replaces_the_clients_authorization() {
        let raw = b"POST /v1/completions HTTP/1.1\r\nAuthorization: Bearer client-key\r\n\r\n";
        let mut req = RequestHead::default();
        req.parse(raw, 8192).unwrap();
        let mut out = Vec::new();
        let opts = UpstreamHeadOpts {
            ask_load: false,
            authorization: Some(b"Bearer worker-key"),
            ..Default::default()
        };
        write_upstream_head(&mut out, raw, &req, "w:1", b"id", 2, &opts);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("authorization: Bearer worker-key\r\n"),
            "{text}"
        );
        assert!(!text.contains("client-key"), "{text}");
    }

    #[test]
    fn asks_for_load_unless_the_client_did() {
        let raw = b"POST /v1/completions HTTP/1.1\r\nHost: r\r\n\r\n";
        let mut req = RequestHead::default();
        req.parse(raw, 8192).unwrap();
        let mut out = Vec::new();
        assert!(write_upstream_head(
            &mut out,
            raw,
            &req,
            "w:1",
            b"id",
            2,
            &UpstreamHeadOpts {
                ask_load: true,
                ..Default::default()
            }
        ));
        assert!(String::from_utf8_lossy(&out).contains("endpoint-load-metrics-format: TEXT\r\n"));
        let raw = b"POST /v1/completions HTTP/1.1\r\nendpoint-load-metrics-format: JSON\r\n\r\n";
        req.parse(raw, 8192).unwrap();
        out.clear();
        assert!(!write_upstream_head(
            &mut out,
            raw,
            &req,
            "w:1",
            b"id",
            2,
            &UpstreamHeadOpts {
                ask_load: true,
                ..Default::default()
            }
        ));
        let text = String::from_utf8_lossy(&out).into_owned();
        assert_eq!(
            text.matches("endpoint-load-metrics-format").count(),
            1,
            "{text}"
        );
    }

    #[test]
    fn the_data_parallel_rank_replaces_the_clients() {
        let raw = b"POST /v1/completions HTTP/1.1\r\nX-Data-Parallel-Rank: 7\r\n\r\n";
        let mut req = RequestHead::default();
        req.parse(raw, 8192).unwrap();
        let mut out = Vec::new();
        let opts = UpstreamHeadOpts {
            dp_rank: Some(3),
            ..Default::default()
        };
        write_upstream_head(&mut out, raw, &req, "w:1", b"id", 2, &opts);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("x-data-parallel-rank: 3\r\n"), "{text}");
        assert!(!text.contains(": 7"), "{text}");
        // Without a rank, the client's header goes through.
        let mut out = Vec::new();
        write_upstream_head(
            &mut out,
            raw,
            &req,
            "w:1",
            b"id",
            2,
            &UpstreamHeadOpts::default(),
        );
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("X-Data-Parallel-Rank: 7\r\n"));
    }
}
