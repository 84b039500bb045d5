//! A worker as the data plane knows it (where to connect, what to send as `Host`, the URL
//! operators wrote, its slot on the load board), and the worker set: the immutable list of
//! routable workers for one epoch, as the control plane publishes it.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

#[derive(Debug)]
pub struct Worker {
    /// The URL as given, normalised (no trailing slash).
    pub url: String,
    /// `host:port` as sent in the `Host` header.
    pub authority: String,
    /// Resolved when the worker was added.
    pub addr: SocketAddr,
    /// Its row on the load board and in the pools, stable for as long as it is a member
    /// (the control plane reuses a slot only once nothing is in flight on it).
    pub slot: usize,
    /// Which requests it takes: any (plain mode), or one P/D leg.
    pub role: WorkerRole,
    /// The data-parallel rank this target is (`http://h:p@N`), sent to the worker as
    /// `X-data-parallel-rank`; each rank is its own routing target.
    pub dp_rank: Option<u32>,
    /// How the router talks to it.
    pub protocol: Protocol,
}

/// An OpenAI-compatible HTTP server (`http://`), or an engine behind vLLM's gRPC API
/// (`grpc://`), for which the router itself is the OpenAI front end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    #[default]
    Http,
    Grpc,
}

impl Protocol {
    pub fn scheme(self) -> &'static str {
        match self {
            Protocol::Http => "http://",
            Protocol::Grpc => "grpc://",
        }
    }
}

impl Worker {
    /// The URL of the server behind this target (without `@rank`): what health checks and
    /// metrics scrapes go to, once per server.
    pub fn host_url(&self) -> &str {
        host_url(&self.url)
    }
}

/// `url` without its `@rank`.
pub fn host_url(url: &str) -> &str {
    match url.rfind('@') {
        Some(i) => &url[..i],
        None => url,
    }
}

/// What a worker serves. In P/D mode a shard routes prefill legs over the `Prefill`
/// workers and decode legs (and everything else) over the `Decode` ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WorkerRole {
    #[default]
    Regular,
    Prefill,
    Decode,
}

/// The workers routable in one epoch, in slot order. Shards share it by `Arc`; policies
/// index its members by position, the load board by slot.
#[derive(Clone, Debug, Default)]
pub struct WorkerSet {
    pub epoch: u64,
    members: Arc<[Arc<Worker>]>,
}

impl WorkerSet {
    /// `members` in any order; they are kept in slot order.
    pub fn new(epoch: u64, mut members: Vec<Arc<Worker>>) -> Self {
        members.sort_by_key(|w| w.slot);
        WorkerSet {
            epoch,
            members: members.into(),
        }
    }

    /// Workers from URLs, in slots 0.. in the order given (epoch 0).
    pub fn from_urls<S: AsRef<str>>(urls: &[S]) -> Result<Self, WorkerUrlError> {
        let workers = urls
            .iter()
            .enumerate()
            .map(|(slot, u)| parse_worker_url(u.as_ref(), slot).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(WorkerSet::new(0, workers))
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The member at `position` (what policies return).
    pub fn get(&self, position: usize) -> &Arc<Worker> {
        &self.members[position]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Worker>> {
        self.members.iter()
    }

    /// The member in `slot`, if any.
    /// The members with `role`, same epoch (slots unchanged).
    pub fn with_role(&self, role: WorkerRole) -> WorkerSet {
        WorkerSet::new(
            self.epoch,
            self.iter().filter(|w| w.role == role).cloned().collect(),
        )
    }

    pub fn by_slot(&self, slot: usize) -> Option<&Arc<Worker>> {
        self.members
            .binary_search_by_key(&slot, |w| w.slot)
            .ok()
            .map(|i| &self.members[i])
    }

    /// Whether `w` (this very worker, not a later one in its slot) is a member.
    pub fn contains(&self, w: &Arc<Worker>) -> bool {
        self.by_slot(w.slot).is_some_and(|m| Arc::ptr_eq(m, w))
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct WorkerUrlError {
    pub url: String,
    pub reason: String,
}

impl fmt::Display for WorkerUrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid worker URL '{}': {}", self.url, self.reason)
    }
}

impl std::error::Error for WorkerUrlError {}

/// Parses `http://host:port` or `grpc://host:port` (the port defaults to 80; a trailing
/// `/` is ignored) into a worker for `slot`.
pub fn parse_worker_url(url: &str, slot: usize) -> Result<Worker, WorkerUrlError> {
    let err = |reason: &str| WorkerUrlError {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let (protocol, rest) = if let Some(rest) = url.strip_prefix("http://") {
        (Protocol::Http, rest)
    } else if let Some(rest) = url.strip_prefix("grpc://") {
        (Protocol::Grpc, rest)
    } else if url.starts_with("https://") || url.starts_with("grpcs://") {
        return Err(err(
            "TLS to workers is not supported; use http:// or grpc://",
        ));
    } else {
        return Err(err("expected http://host:port or grpc://host:port"));
    };
    let rest = rest.trim_end_matches('/');
    let (authority, dp_rank) = match rest.rsplit_once('@') {
        Some((a, rank)) => {
            let rank = rank
                .parse::<u32>()
                .map_err(|_| err("a data-parallel rank is written http://host:port@N"))?;
            (a.trim_end_matches('/'), Some(rank))
        }
        None => (rest, None),
    };
    if authority.is_empty() {
        return Err(err("missing host"));
    }
    if authority.contains('/') {
        return Err(err("a worker URL has no path; expected http://host:port"));
    }
    if authority.contains('@') {
        return Err(err("a data-parallel rank is written http://host:port@N"));
    }
    let with_port = if has_port(authority) {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| err(&format!("cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| err("host resolves to no address"))?;
    let scheme = protocol.scheme();
    let url = match dp_rank {
        Some(r) => format!("{scheme}{authority}@{r}"),
        None => format!("{scheme}{authority}"),
    };
    Ok(Worker {
        url,
        authority: authority.to_string(),
        addr,
        slot,
        role: WorkerRole::Regular,
        dp_rank,
        protocol,
    })
}

fn has_port(authority: &str) -> bool {
    // `[::1]` has colons but no port; `[::1]:80` and `h:80` have one.
    if authority.starts_with('[') {
        authority.contains("]:")
    } else {
        authority.contains(':')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_and_port() {
        let w = parse_worker_url("http://127.0.0.1:8000/", 0).unwrap();
        assert_eq!(w.url, "http://127.0.0.1:8000");
        assert_eq!(w.authority, "127.0.0.1:8000");
        assert_eq!(w.addr, "127.0.0.1:8000".parse().unwrap());
    }

    #[test]
    fn default_port_is_80() {
        let w = parse_worker_url("http://127.0.0.1", 0).unwrap();
        assert_eq!(w.addr.port(), 80);
        assert_eq!(w.authority, "127.0.0.1");
    }

    #[test]
    fn ipv6_literal() {
        let w = parse_worker_url("http://[::1]:9000", 0).unwrap();
        assert_eq!(w.addr, "[::1]:9000".parse().unwrap());
        let w = parse_worker_url("http://[::1]", 0).unwrap();
        assert_eq!(w.addr.port(), 80);
    }

    #[test]
    fn data_parallel_ranks() {
        let w = parse_worker_url("http://127.0.0.1:8000@3", 0).unwrap();
        assert_eq!(w.url, "http://127.0.0.1:8000@3");
        assert_eq!(w.host_url(), "http://127.0.0.1:8000");
        assert_eq!(w.authority, "127.0.0.1:8000");
        assert_eq!(w.dp_rank, Some(3));
        let w = parse_worker_url("http://127.0.0.1:8000/@0", 0).unwrap();
        assert_eq!(
            (w.url.as_str(), w.dp_rank),
            ("http://127.0.0.1:8000@0", Some(0))
        );
        assert_eq!(
            parse_worker_url("http://127.0.0.1:1", 0).unwrap().dp_rank,
            None
        );
        assert!(parse_worker_url("http://127.0.0.1:8000@x", 0).is_err());
        assert!(parse_worker_url("http://127.0.0.1:8000@-1", 0).is_err());
        assert!(parse_worker_url("http://u@127.0.0.1:8000@1", 0).is_err());
    }

    #[test]
    fn grpc_workers() {
        let w = parse_worker_url("grpc://127.0.0.1:50051/", 0).unwrap();
        assert_eq!(w.url, "grpc://127.0.0.1:50051");
        assert_eq!(w.protocol, Protocol::Grpc);
        assert_eq!(w.addr, "127.0.0.1:50051".parse().unwrap());
        let w = parse_worker_url("grpc://127.0.0.1:50051@2", 0).unwrap();
        assert_eq!(
            (w.host_url(), w.dp_rank),
            ("grpc://127.0.0.1:50051", Some(2))
        );
        assert_eq!(
            parse_worker_url("http://127.0.0.1:1", 0).unwrap().protocol,
            Protocol::Http
        );
    }

    #[test]
    fn refuses_what_it_cannot_route_to() {
        assert!(parse_worker_url("127.0.0.1:8000", 0).is_err());
        assert!(parse_worker_url("https://h:1", 0).is_err());
        assert!(parse_worker_url("grpcs://h:1", 0).is_err());
        assert!(parse_worker_url("http://h:1/v1", 0).is_err());
        assert!(parse_worker_url("http://", 0).is_err());
    }
}
