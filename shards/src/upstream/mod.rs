//! The client side of the proxy: per-shard keep-alive pools of worker connections, the
//! request head sent to a worker, and the response head and body framing of what comes
//! back (relayed byte for byte; see `proxy`).

pub mod pool;
pub mod request;
pub mod response;

pub use pool::Pool;
pub use response::{ResponseFraming, ResponseHead};

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    const HOP: [&[u8]; 8] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    ];
    HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// Whether a `Connection` header value lists `name` as hop-by-hop.
pub fn listed_in_connection(connection_values: &[&[u8]], name: &[u8]) -> bool {
    connection_values.iter().any(|v| {
        v.split(|&b| b == b',')
            .any(|t| crate::http::request::trim(t).eq_ignore_ascii_case(name))
    })
}
