//! P/D mode with gRPC workers: for each prompt, a prefill `Generate` on a prefill engine
//! (one token, not streamed, NIXL's request for a remote decode in
//! `kv_transfer_params_json`), then the decode leg as a plain gRPC request whose
//! `kv_transfer_params_json` is the prefill's answer, verbatim. Both legs carry the same
//! request id. Failures before the decode leg move the prefill to another prefill worker
//! (connection failures, UNAVAILABLE), or reach the client as the engine's refusal.

use frontend::openai::OpenAiError;
use grpc_proto::engine::generate_response::Response;
use grpc_proto::engine::{GenerateRequest, GenerateResponse};
use grpc_proto::path;

use super::grpc::{engine_error, respond_openai_error, Prepared};
use super::{
    count_attempt, exchange, interrupted, next_worker, retry_worker, Answer, Body, Buffers,
    ClientWr, Deferred, InFlight, Interrupt, Next, Outcome, Shard, Watch, PASSIVE_DOWN,
};
use crate::grpc::{call, GrpcError};
use crate::metrics::{now_ns, Leg};
use crate::pd::splice::KvTransferParams;
use crate::route::{Candidates, Protocol, Worker, WorkerSet};

/// Why one prefill attempt stopped without an answer.
enum Stop {
    Grpc(GrpcError),
    Interrupted(Interrupt),
}

/// The prefill leg of `req` on `w`: the transfer parameters its engine returned, if any.
async fn prefill_once(
    shard: &Shard,
    watch: &mut Watch<'_>,
    w: &Worker,
    req: &GenerateRequest,
) -> Result<Option<String>, Stop> {
    let connect = shard.grpc.get(w.slot, w.addr, shard.cfg.connect_timeout);
    let send = watch
        .guard(connect)
        .await
        .map_err(Stop::Interrupted)?
        .map_err(Stop::Grpc)?;
    let ranked;
    let req = match w.dp_rank {
        Some(r) => {
            ranked = GenerateRequest {
                data_parallel_rank: Some(r as i32),
                ..req.clone()
            };
            &ranked
        }
        None => req,
    };
    let mut c = watch
        .guard(call::start(&send, &w.authority, path::GENERATE, req))
        .await
        .map_err(Stop::Interrupted)?
        .map_err(Stop::Grpc)?;
    let mut kv = None;
    // Dropping the call (the client left) resets its stream: the engine aborts the prefill.
    while let Some(m) = watch
        .guard(c.next::<GenerateResponse>())
        .await
        .map_err(Stop::Interrupted)?
        .map_err(Stop::Grpc)?
    {
        if let Some(Response::Complete(done)) = m.response {
            kv = done.kv_transfer_params_json;
        }
    }
    Ok(kv)
}

/// The prefill request for one prompt: one token, not streamed, NIXL's remote decode.
fn prefill_request(decode: &GenerateRequest) -> GenerateRequest {
    let mut req = decode.clone();
    req.stream = false;
    if let Some(s) = req.sampling_params.as_mut() {
        s.max_tokens = Some(1);
        s.min_tokens = s.min_tokens.min(1);
        s.n = 1;
    }
    let nixl = std::str::from_utf8(KvTransferParams::NIXL_PREFILL.as_bytes()).expect("ASCII");
    req.kv_transfer_params_json = Some(nixl.to_string());
    req
}

/// Prefill on a worker from `candidates`, retried as plain mode retries; `Err` once the
/// client has its answer (or left).
#[allow(clippy::too_many_arguments)]
async fn prefill_leg(
    shard: &Shard,
    watch: &mut Watch<'_>,
    wr: &mut ClientWr,
    b: &mut Buffers,
    set: &WorkerSet,
    order: &Candidates,
    req: &GenerateRequest,
) -> Result<Option<String>, Next> {
    let close = !b.head.keep_alive;
    let retry = shard.cfg.retry;
    let mut candidates = order.clone();
    let mut deferred = Deferred::default();
    let mut backoff = false;
    let mut attempts = 0u32;
    let mut last_error = String::new();
    b.rec.attempts = 0;
    let mut next = next_worker(shard, set, &mut candidates, &mut deferred);
    while let Some((w, probe)) = next.take() {
        attempts += 1;
        count_attempt(shard, b, w);
        let mut outcome = Outcome::new(shard, w, probe, Leg::Prefill);
        let _in_flight = InFlight::start(shard, w.slot);
        b.rec.prefill = Some(w.slot);
        if w.protocol != Protocol::Grpc {
            let mut e = OpenAiError::internal(format!(
                "prefill worker {} is not a gRPC worker, but the decode workers are",
                w.url
            ));
            e.status = 502;
            return Err(respond_openai_error(wr, b, &e).await);
        }
        match prefill_once(shard, watch, w, req).await {
            Ok(kv) => {
                outcome.success();
                return Ok(kv);
            }
            Err(Stop::Interrupted(i)) => return Err(Box::pin(interrupted(wr, b, i, close)).await),
            Err(Stop::Grpc(e)) if e.is_retryable() && attempts < retry.max_attempts => {
                if let GrpcError::Transport(_) = e {
                    shard.grpc.forget(w.slot);
                    shard.board.mark_down(w.slot, PASSIVE_DOWN);
                }
                outcome.failure();
                tracing::debug!(worker = %w.url, error = %e, "prefill leg: retrying on another worker");
                last_error = format!("{}: {e}", w.url);
                next = retry_worker(
                    shard,
                    set,
                    &mut candidates,
                    order,
                    &mut deferred,
                    &mut backoff,
                );
            }
            Err(Stop::Grpc(e)) => {
                if e.http_status() >= 500 {
                    outcome.failure();
                }
                last_error = format!("{}: {e}", w.url);
                if !e.is_retryable() {
                    let answered = respond_openai_error(wr, b, &engine_error(&e)).await;
                    b.rec.router_error = false;
                    return Err(answered);
                }
            }
        }
    }
    let mut e = if attempts == 0 {
        OpenAiError::internal("no prefill worker is available")
    } else {
        b.rec.exhausted = true;
        OpenAiError::internal(format!(
            "no prefill worker could take the request ({attempts} attempts): {last_error}"
        ))
    };
    e.status = if attempts == 0 { 503 } else { 502 };
    Err(respond_openai_error(wr, b, &e).await)
}

/// The prefill legs (one per prompt), then the decode leg on `decode`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn exchange_pd<'s>(
    shard: &'s Shard,
    watch: &mut Watch<'_>,
    wr: &mut ClientWr,
    b: &mut Buffers,
    body: &Body,
    prefill: (&WorkerSet, Candidates),
    decode: (&WorkerSet, Candidates),
    mut prepared: Box<Prepared>,
) -> Answer<'s> {
    b.rec.pd = true;
    b.rec.leg = Leg::Prefill;
    let fallback = shard
        .pd
        .as_ref()
        .is_some_and(|pd| pd.cfg.fallback_decode_only);
    for i in 0..prepared.requests.len() {
        let req = prefill_request(&prepared.requests[i]);
        let kv = match prefill_leg(shard, watch, wr, b, prefill.0, &prefill.1, &req).await {
            Ok(kv) => kv,
            Err(next) => return Answer::Done(next),
        };
        match kv {
            Some(kv) => prepared.requests[i].kv_transfer_params_json = Some(kv),
            None if fallback => {
                tracing::debug!("prefill answered without kv_transfer_params; decoding without it (--pd-fallback-decode-only)");
            }
            None => {
                b.rec.no_kv = true;
                if let Some(suppressed) = shard.warn_no_kv.pass() {
                    tracing::warn!(
                        suppressed,
                        "gRPC prefill worker answered without kv_transfer_params_json"
                    );
                }
                let mut e = OpenAiError::internal(
                    "the prefill worker answered without kv_transfer_params (is it running \
                     vLLM with a NIXL --kv-transfer-config?)",
                );
                e.status = 502;
                return Answer::Done(respond_openai_error(wr, b, &e).await);
            }
        }
    }
    b.rec.ready = now_ns();
    b.rec.decode_started = true;
    b.rec.leg = Leg::Decode;
    exchange(
        shard,
        watch,
        wr,
        b,
        body,
        decode.0,
        decode.1,
        Some(prepared),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use grpc_proto::engine::SamplingParams;

    #[test]
    fn the_prefill_request_is_one_token_unstreamed_with_nixls_request() {
        let decode = GenerateRequest {
            request_id: "chatcmpl-r".into(),
            stream: true,
            sampling_params: Some(SamplingParams {
                max_tokens: Some(100),
                min_tokens: 5,
                n: 2,
                ..Default::default()
            }),
            ..Default::default()
        };
        let p = prefill_request(&decode);
        assert_eq!(p.request_id, decode.request_id);
        assert!(!p.stream);
        let s = p.sampling_params.unwrap();
        assert_eq!((s.max_tokens, s.min_tokens, s.n), (Some(1), 1, 1));
        let kv: serde_json::Value =
            serde_json::from_str(p.kv_transfer_params_json.as_deref().unwrap()).unwrap();
        assert_eq!(kv["do_remote_decode"], true);
        assert_eq!(kv["do_remote_prefill"], false);
    }
}
