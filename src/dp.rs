//! Data parallelism (`--intra-node-data-parallel-size N`): a vLLM server running N
//! data-parallel ranks is N routing targets, `http://h:p@0` .. `@N-1`, each with its own
//! load and breaker, all sent to `http://h:p` with `X-data-parallel-rank: r`. URLs written
//! with a rank are kept as given (a node that owns global ranks 4..7 is `@4` .. `@7`).
//!
//! How many ranks a server runs: at start, its `/get_server_info` `dp_size` if it answers
//! (SGLang does; vLLM answers 404, so the flag's value is the normal case, and is logged);
//! for a gRPC engine (`grpc://`), `GetServerInfo`'s `data_parallel_size`, which vLLM fills.
//! A gRPC engine's ranks are sent as `data_parallel_rank` in each `GenerateRequest`.
//! Workers added at run time (admin API, discovery) get the flag's value without a probe
//! (`Registry::add_server`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// How long the `/get_server_info` probe of one server may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// `urls` with each rank-less URL expanded to its ranks (`size` unless the server says).
/// Unchanged when `size` is 1.
pub fn expand(flag: &str, urls: &[String], size: u32) -> Vec<String> {
    if size <= 1 {
        return urls.to_vec();
    }
    let mut out = Vec::with_capacity(urls.len() * size as usize);
    for url in urls {
        let url = url.trim_end_matches('/');
        if url.contains('@') {
            out.push(url.to_string());
            continue;
        }
        let (asked, answer) = if url.starts_with("grpc://") {
            ("GetServerInfo", engine_dp_size(url))
        } else {
            ("/get_server_info", server_dp_size(url))
        };
        let n = match answer {
            Ok(n) => {
                tracing::info!(worker = %url, dp_size = n, "data-parallel size from {asked}");
                n
            }
            Err(why) => {
                tracing::info!(
                    worker = %url,
                    dp_size = size,
                    reason = %why,
                    "no data-parallel size from {asked}: using {flag} {size} (fallback)"
                );
                size
            }
        };
        out.extend((0..n).map(|r| format!("{url}@{r}")));
    }
    out
}

/// The `data_parallel_size` a gRPC engine reports (`GetServerInfo`).
fn engine_dp_size(url: &str) -> Result<u32, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let info = rt.block_on(crate::control::engine::server_info(url, PROBE_TIMEOUT))?;
    match info.data_parallel_size {
        n if n >= 1 => Ok(n as u32),
        n => Err(format!("data_parallel_size {n}")),
    }
}

/// The `dp_size` a server reports on `GET /get_server_info`.
fn server_dp_size(url: &str) -> Result<u32, String> {
    let w = shards::route::parse_worker_url(url, 0).map_err(|e| e.to_string())?;
    let mut s = TcpStream::connect_timeout(&w.addr, PROBE_TIMEOUT).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(PROBE_TIMEOUT))
        .and_then(|_| s.set_write_timeout(Some(PROBE_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let req = format!(
        "GET /get_server_info HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
        w.authority
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    let _ = s.take(1 << 20).read_to_end(&mut resp);
    parse_dp_size(&resp)
}

/// `dp_size` from a raw HTTP response (Content-Length or close-delimited JSON).
fn parse_dp_size(resp: &[u8]) -> Result<u32, String> {
    let head_end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no complete response")?;
    let head = String::from_utf8_lossy(&resp[..head_end]);
    let status = head.split(' ').nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("answered {status}"));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&resp[head_end + 4..]).map_err(|e| format!("not JSON: {e}"))?;
    match v["dp_size"].as_u64() {
        Some(n) if (1..=4096).contains(&n) => Ok(n as u32),
        _ => Err("no dp_size in the answer".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dp_size_from_the_answer() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 25\r\n\r\n{\"dp_size\":4,\"x\":\"y\"}";
        assert_eq!(parse_dp_size(ok), Ok(4));
        let missing = b"HTTP/1.1 404 Not Found\r\n\r\n{\"detail\":\"Not Found\"}";
        assert!(parse_dp_size(missing).unwrap_err().contains("404"));
        assert!(parse_dp_size(b"HTTP/1.1 200 OK\r\n\r\n{}").is_err());
        assert!(parse_dp_size(b"HTTP/1.1 200 OK\r\n\r\n{\"dp_size\":0}").is_err());
        assert!(parse_dp_size(b"garbage").is_err());
    }

    #[test]
    fn size_one_changes_nothing_and_explicit_ranks_are_kept() {
        let urls = vec!["http://127.0.0.1:1".to_string()];
        assert_eq!(expand("--x", &urls, 1), urls);
        let urls = vec![
            "http://127.0.0.1:1@4".to_string(),
            "http://127.0.0.1:1@5".to_string(),
        ];
        assert_eq!(expand("--x", &urls, 8), urls);
    }
}
