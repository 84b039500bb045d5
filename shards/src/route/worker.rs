//! A worker as the data plane knows it: where to connect, what to send as `Host`, and the
//! URL operators wrote (used in logs and, later, metric labels).

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

#[derive(Debug)]
pub struct Worker {
    /// The URL as given, normalised (no trailing slash).
    pub url: String,
    /// `host:port` as sent in the `Host` header.
    pub authority: String,
    /// Resolved at start.
    pub addr: SocketAddr,
}

/// An immutable set of workers; shards share it by `Arc` and index workers by position.
#[derive(Clone, Debug, Default)]
pub struct WorkerSet {
    workers: Arc<Vec<Worker>>,
}

impl WorkerSet {
    pub fn new(workers: Vec<Worker>) -> Self {
        WorkerSet {
            workers: Arc::new(workers),
        }
    }

    pub fn from_urls<S: AsRef<str>>(urls: &[S]) -> Result<Self, WorkerUrlError> {
        let workers = urls
            .iter()
            .map(|u| parse_worker_url(u.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(WorkerSet::new(workers))
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    pub fn get(&self, i: usize) -> &Worker {
        &self.workers[i]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Worker> {
        self.workers.iter()
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

/// Parses `http://host:port` (port defaults to 80; a trailing `/` is ignored).
pub fn parse_worker_url(url: &str) -> Result<Worker, WorkerUrlError> {
    let err = |reason: &str| WorkerUrlError {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let rest = if let Some(rest) = url.strip_prefix("http://") {
        rest
    } else if url.starts_with("https://") {
        return Err(err("https workers are not supported; use http://"));
    } else if url.starts_with("grpc://") {
        return Err(err("grpc:// workers are not supported yet"));
    } else {
        return Err(err("expected http://host:port"));
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() {
        return Err(err("missing host"));
    }
    if authority.contains('/') {
        return Err(err("a worker URL has no path; expected http://host:port"));
    }
    if authority.contains('@') {
        return Err(err("data-parallel ranks (@N) are not supported yet"));
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
    Ok(Worker {
        url: format!("http://{authority}"),
        authority: authority.to_string(),
        addr,
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
        let w = parse_worker_url("http://127.0.0.1:8000/").unwrap();
        assert_eq!(w.url, "http://127.0.0.1:8000");
        assert_eq!(w.authority, "127.0.0.1:8000");
        assert_eq!(w.addr, "127.0.0.1:8000".parse().unwrap());
    }

    #[test]
    fn default_port_is_80() {
        let w = parse_worker_url("http://127.0.0.1").unwrap();
        assert_eq!(w.addr.port(), 80);
        assert_eq!(w.authority, "127.0.0.1");
    }

    #[test]
    fn ipv6_literal() {
        let w = parse_worker_url("http://[::1]:9000").unwrap();
        assert_eq!(w.addr, "[::1]:9000".parse().unwrap());
        let w = parse_worker_url("http://[::1]").unwrap();
        assert_eq!(w.addr.port(), 80);
    }

    #[test]
    fn refuses_what_it_cannot_route_to() {
        assert!(parse_worker_url("127.0.0.1:8000").is_err());
        assert!(parse_worker_url("https://h:1").is_err());
        assert!(parse_worker_url("http://h:1/v1").is_err());
        assert!(parse_worker_url("http://").is_err());
    }
}
