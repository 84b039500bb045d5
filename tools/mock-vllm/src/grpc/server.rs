//! Serving the mock engine: one tokio task per TCP connection running h2's server, one per
//! call; gRPC's framing (a flag byte, a 4-byte length, the protobuf bytes); the unary
//! methods (HealthCheck, GetModelInfo, GetServerInfo, GetLoads, Abort) and GetTokenizer. Generate is in
//! `generate`. Unknown methods get UNIMPLEMENTED.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use grpc_proto::common::GetTokenizerChunk;
use grpc_proto::engine::{
    AbortRequest, AbortResponse, GenerateRequest, GetLoadsResponse, GetModelInfoResponse,
    GetServerInfoResponse, HealthCheckResponse, SchedulerLoad,
};
use grpc_proto::{path, Message};
use h2::server::SendResponse;
use h2::RecvStream;
use http::{HeaderMap, HeaderValue, Request, Response};
use tokio::net::TcpListener;

use super::state::GrpcState;
use super::{bundle, generate, kv_events};

pub const OK: u32 = 0;
pub const INVALID_ARGUMENT: u32 = 3;
pub const FAILED_PRECONDITION: u32 = 9;
pub const UNIMPLEMENTED: u32 = 12;
pub const INTERNAL: u32 = 13;

/// Serves `state` on `listener` until `state.shutdown()`.
pub async fn serve(listener: TcpListener, state: Arc<GrpcState>) {
    let mut shutdown = state.shutdown_signal();
    loop {
        let tcp = tokio::select! {
            a = listener.accept() => match a {
                Ok((tcp, _)) => tcp,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        state.record(|s| s.connections += 1);
        let state = state.clone();
        let mut conn_shutdown = state.shutdown_signal();
        tokio::spawn(async move {
            let Ok(mut conn) = h2::server::handshake(tcp).await else {
                return;
            };
            loop {
                let next = tokio::select! {
                    n = conn.accept() => n,
                    _ = conn_shutdown.changed() => return,
                };
                match next {
                    Some(Ok((req, respond))) => {
                        tokio::spawn(call(req, respond, state.clone()));
                    }
                    _ => return,
                }
            }
        });
    }
}

/// One call: the request message, then the method's answer.
async fn call(req: Request<RecvStream>, mut respond: SendResponse<Bytes>, state: Arc<GrpcState>) {
    let method = req.uri().path().to_string();
    let body = match read_message(req.into_body()).await {
        Ok(b) => b,
        Err(e) => {
            send_status(&mut respond, INTERNAL, &e);
            return;
        }
    };
    let cfg = &state.config;
    match method.as_str() {
        path::GENERATE => match GenerateRequest::decode(body) {
            Ok(r) => generate::generate(r, respond, &state).await,
            Err(e) => send_status(&mut respond, INVALID_ARGUMENT, &e.to_string()),
        },
        path::HEALTH_CHECK => {
            state.record(|s| s.health_checks += 1);
            let healthy = state.healthy();
            let message = if healthy {
                "Health"
            } else {
                "Engine is not alive"
            };
            unary_reply(
                respond,
                &HealthCheckResponse {
                    healthy,
                    message: message.into(),
                },
            );
        }
        path::GET_MODEL_INFO => {
            state.record(|s| s.model_info_calls += 1);
            unary_reply(
                respond,
                &GetModelInfoResponse {
                    model_path: format!("/models/{}", cfg.served_model_name),
                    is_generation: true,
                    max_context_length: cfg.max_context_length,
                    vocab_size: cfg.vocab_size,
                    served_model_name: cfg.served_model_name.clone(),
                    model_type: "llama".into(),
                    eos_token_ids: vec![cfg.eos_token_id as i32],
                    max_req_input_len: cfg.max_context_length as i32,
                    ..Default::default()
                },
            );
        }
        path::GET_SERVER_INFO => {
            state.record(|s| s.server_info_calls += 1);
            unary_reply(
                respond,
                &GetServerInfoResponse {
                    active_requests: state.running.load(Relaxed) as u32,
                    server_type: "vllm-grpc".into(),
                    data_parallel_size: cfg.data_parallel_size as i32,
                    block_size: cfg.block_size as i32,
                    max_num_seqs: cfg.max_num_seqs as i32,
                    ..Default::default()
                },
            );
        }
        path::GET_LOADS => {
            state.record(|s| s.loads_calls += 1);
            let n = state.running.load(Relaxed);
            let running = n.min(cfg.max_num_seqs) as i32;
            let waiting = n.saturating_sub(cfg.max_num_seqs) as i32;
            unary_reply(
                respond,
                &GetLoadsResponse {
                    version: cfg.version.clone(),
                    dp_rank_count: 1,
                    loads: vec![SchedulerLoad {
                        num_running_reqs: running,
                        num_waiting_reqs: waiting,
                        num_total_reqs: running + waiting,
                        max_running_requests: cfg.max_num_seqs as i32,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            );
        }
        path::ABORT => {
            let ids = AbortRequest::decode(body)
                .map(|r| r.request_ids)
                .unwrap_or_default();
            state.record(|s| s.aborted.extend(ids));
            unary_reply(respond, &AbortResponse {});
        }
        path::SUBSCRIBE_KV_EVENTS => kv_events::subscribe(respond, state.clone()).await,
        path::GET_TOKENIZER => {
            state.record(|s| s.tokenizer_calls += 1);
            let Some(dir) = cfg.tokenizer_dir.as_ref() else {
                send_status(
                    &mut respond,
                    FAILED_PRECONDITION,
                    "the engine has no tokenizer directory",
                );
                return;
            };
            match bundle::zip_dir(dir) {
                Ok((zip, sha)) => {
                    let chunks: Vec<GetTokenizerChunk> = bundle::chunks(&zip, &sha);
                    let Some(mut send) = send_head(&mut respond) else {
                        return;
                    };
                    for c in &chunks {
                        if send.send_data(encode(c), false).is_err() {
                            return;
                        }
                    }
                    let _ = send.send_trailers(trailers(OK, ""));
                }
                Err(e) => send_status(&mut respond, INTERNAL, &e),
            }
        }
        other => send_status(
            &mut respond,
            UNIMPLEMENTED,
            &format!("Method not found: {other}"),
        ),
    }
}

/// The one request message of a call (the body up to its end).
async fn read_message(mut body: RecvStream) -> Result<Bytes, String> {
    let mut buf = BytesMut::new();
    while let Some(data) = body.data().await {
        let data = data.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(data.len());
        buf.extend_from_slice(&data);
    }
    if buf.len() < 5 || buf[0] != 0 {
        return Err("expected one uncompressed gRPC message".into());
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    buf.advance(5);
    if buf.len() != len {
        return Err(format!("message of {} bytes, framed as {len}", buf.len()));
    }
    Ok(buf.freeze())
}

pub fn encode<M: Message>(m: &M) -> Bytes {
    let len = m.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.extend_from_slice(&[0]);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    m.encode(&mut buf).expect("capacity reserved");
    buf.freeze()
}

pub fn trailers(code: u32, message: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("grpc-status", HeaderValue::from(code));
    if !message.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
            h.insert("grpc-message", v);
        }
    }
    h
}

/// gRPC's grpc-message encoding: bytes outside printable ASCII, and `%`, as %XX.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The 200 head of a call whose messages follow.
pub fn send_head(respond: &mut SendResponse<Bytes>) -> Option<h2::SendStream<Bytes>> {
    let resp = Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(())
        .expect("static head");
    respond.send_response(resp, false).ok()
}

/// A trailers-only answer: the status in the head, nothing after.
pub fn send_status(respond: &mut SendResponse<Bytes>, code: u32, message: &str) {
    let mut resp = Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(())
        .expect("static head");
    *resp.headers_mut() = {
        let mut h = trailers(code, message);
        h.insert("content-type", HeaderValue::from_static("application/grpc"));
        h
    };
    let _ = respond.send_response(resp, true);
}

fn unary_reply<M: Message>(mut respond: SendResponse<Bytes>, m: &M) {
    if let Some(mut send) = send_head(&mut respond) {
        if send.send_data(encode(m), false).is_ok() {
            let _ = send.send_trailers(trailers(OK, ""));
        }
    }
}
