//! The control plane's calls to gRPC workers (`grpc://`, vLLM's `VllmEngine` service) over
//! HTTP/2 on its tokio runtime: health (`HealthCheck`), load (`GetLoads`), and, at start,
//! the model's facts (`GetModelInfo`) and tokenizer bundle (`GetTokenizer`). The calls
//! themselves are the data plane's (`shards::grpc::call`), so both sides read the protocol
//! one way.

use std::time::Duration;

use bytes::Bytes;
use grpc_proto::common::{GetTokenizerChunk, GetTokenizerRequest};
use grpc_proto::engine::{
    GetLoadsRequest, GetLoadsResponse, GetModelInfoRequest, GetModelInfoResponse,
    GetServerInfoRequest, GetServerInfoResponse, HealthCheckRequest, HealthCheckResponse,
};
use grpc_proto::path;
use h2::client::SendRequest;
use shards::grpc::{call, unary};

use super::load_scrape::LoadGauges;

/// A new connection to the worker at `url` (`grpc://host:port[@rank]`); its driver runs on
/// the current tokio runtime and ends with the last handle.
pub async fn connect(url: &str) -> Result<(SendRequest<Bytes>, String), String> {
    let w = shards::route::parse_worker_url(url, 0).map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect(w.addr)
        .await
        .map_err(|e| format!("connect to {}: {e}", w.addr))?;
    let _ = tcp.set_nodelay(true);
    let (send, conn) = h2::client::handshake(tcp)
        .await
        .map_err(|e| format!("HTTP/2 handshake with {}: {e}", w.addr))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((send, w.authority))
}

thread_local! {
    /// The periodic calls' connections (health, load), one per worker URL, on the control
    /// thread's runtime: a poll is a stream on an open connection, not a TCP and HTTP/2
    /// handshake the engine's Python server has to serve each time.
    static KEPT: std::cell::RefCell<std::collections::HashMap<String, (SendRequest<Bytes>, String)>> =
        Default::default();
}

/// A unary call on the kept connection to `url` (made if there is none). A kept connection
/// that fails before an answer is dropped and the call made once more on a new one.
async fn kept_unary<M: grpc_proto::Message, R: grpc_proto::Message + Default>(
    url: &str,
    path: &str,
    msg: &M,
) -> Result<R, String> {
    // A server's data-parallel ranks share its connection.
    let key = shards::route::host_url(url);
    for attempt in 0..2 {
        let kept = KEPT.with(|k| k.borrow().get(key).cloned());
        let fresh = kept.is_none();
        let (send, authority) = match kept {
            Some(c) => c,
            None => {
                let c = connect(url).await?;
                KEPT.with(|k| k.borrow_mut().insert(key.to_string(), c.clone()));
                c
            }
        };
        match unary(&send, &authority, path, msg).await {
            Ok(r) => return Ok(r),
            Err(e @ shards::grpc::GrpcError::Transport(_)) => {
                KEPT.with(|k| k.borrow_mut().remove(key));
                if fresh || attempt == 1 {
                    return Err(e.to_string());
                }
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    unreachable!("the second attempt returns")
}

/// `f` (a call on the kept connection to `url`) within `timeout`. A call that fails or
/// times out drops the kept connection, so a connection that went silent (a peer gone
/// without a reset) is not asked again and again.
async fn kept_within<T>(
    url: &str,
    timeout: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    let r = within(timeout, what, f).await;
    if r.is_err() {
        KEPT.with(|k| k.borrow_mut().remove(shards::route::host_url(url)));
    }
    r
}

async fn within<T>(
    timeout: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "{what}: no answer within {} s",
            timeout.as_secs_f64()
        )),
    }
}

/// One health check: `HealthCheck` answering `healthy: true`.
pub async fn check(url: &str, timeout: Duration) -> Result<(), String> {
    kept_within(url, timeout, "HealthCheck", async {
        let r: HealthCheckResponse = kept_unary(url, path::HEALTH_CHECK, &HealthCheckRequest {})
            .await
            .map_err(|e| format!("HealthCheck: {e}"))?;
        if r.healthy {
            Ok(())
        } else {
            Err(format!("HealthCheck: unhealthy: {}", r.message))
        }
    })
    .await
}

/// The engine's load, as `GetLoads` reports it: summed over its data-parallel ranks, or of
/// rank `rank` only.
pub async fn loads(url: &str, rank: Option<u32>, timeout: Duration) -> Option<LoadGauges> {
    kept_within(url, timeout, "GetLoads", async {
        let req = GetLoadsRequest {
            dp_rank: rank.map(|r| r as i32),
            include: vec!["core".into()],
        };
        let r: GetLoadsResponse = kept_unary(url, path::GET_LOADS, &req).await?;
        Ok(gauges(&r, rank))
    })
    .await
    .ok()
}

fn gauges(r: &GetLoadsResponse, rank: Option<u32>) -> LoadGauges {
    let mut g = LoadGauges::default();
    for l in r
        .loads
        .iter()
        .filter(|l| rank.is_none_or(|r| l.dp_rank == r as i32))
    {
        *g.running.get_or_insert(0.0) += l.num_running_reqs.max(0) as f64;
        *g.waiting.get_or_insert(0.0) += l.num_waiting_reqs.max(0) as f64;
        let k = g.kv_usage.get_or_insert(0.0);
        *k = k.max(l.token_usage);
    }
    g
}

/// The engine's vLLM version (as `GetLoads` reports it).
pub async fn version(url: &str, timeout: Duration) -> Result<String, String> {
    within(timeout, "GetLoads", async {
        let (send, authority) = connect(url).await?;
        let r: GetLoadsResponse = unary(
            &send,
            &authority,
            path::GET_LOADS,
            &GetLoadsRequest::default(),
        )
        .await
        .map_err(|e| format!("GetLoads: {e}"))?;
        Ok(r.version)
    })
    .await
}

/// The model's facts (served name, context length, default sampling parameters).
pub async fn model_info(url: &str, timeout: Duration) -> Result<GetModelInfoResponse, String> {
    within(timeout, "GetModelInfo", async {
        let (send, authority) = connect(url).await?;
        unary(
            &send,
            &authority,
            path::GET_MODEL_INFO,
            &GetModelInfoRequest {},
        )
        .await
        .map_err(|e| format!("GetModelInfo: {e}"))
    })
    .await
}

/// The server's facts (KV block size, data-parallel size, connector).
pub async fn server_info(url: &str, timeout: Duration) -> Result<GetServerInfoResponse, String> {
    within(timeout, "GetServerInfo", async {
        let (send, authority) = connect(url).await?;
        unary(
            &send,
            &authority,
            path::GET_SERVER_INFO,
            &GetServerInfoRequest {},
        )
        .await
        .map_err(|e| format!("GetServerInfo: {e}"))
    })
    .await
}

/// The tokenizer bundle (a zip of tokenizer.json, tokenizer_config.json, templates, ...)
/// and the SHA-256 the engine gives for it.
pub async fn tokenizer_bundle(url: &str, timeout: Duration) -> Result<(Vec<u8>, String), String> {
    within(timeout, "GetTokenizer", async {
        let (send, authority) = connect(url).await?;
        let mut c = call::start(
            &send,
            &authority,
            path::GET_TOKENIZER,
            &GetTokenizerRequest {},
        )
        .await
        .map_err(|e| format!("GetTokenizer: {e}"))?;
        let (mut zip, mut sha) = (Vec::new(), String::new());
        while let Some(chunk) = c
            .next::<GetTokenizerChunk>()
            .await
            .map_err(|e| format!("GetTokenizer: {e}"))?
        {
            zip.extend_from_slice(&chunk.data);
            if !chunk.sha256.is_empty() {
                sha = chunk.sha256;
            }
        }
        Ok((zip, sha))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use grpc_proto::engine::SchedulerLoad;

    #[test]
    fn loads_sum_ranks_and_take_the_fullest_cache() {
        let load = |rank, running, waiting, usage| SchedulerLoad {
            dp_rank: rank,
            num_running_reqs: running,
            num_waiting_reqs: waiting,
            token_usage: usage,
            ..Default::default()
        };
        let r = GetLoadsResponse {
            loads: vec![load(0, 3, 1, 0.25), load(1, 2, 7, 0.5)],
            ..Default::default()
        };
        assert_eq!(
            gauges(&r, None),
            LoadGauges {
                running: Some(5.0),
                waiting: Some(8.0),
                kv_usage: Some(0.5)
            }
        );
        assert_eq!(gauges(&r, Some(1)).running, Some(2.0));
        assert_eq!(gauges(&r, Some(4)), LoadGauges::default());
    }
}
