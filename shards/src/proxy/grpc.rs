//! Phase 4–5 for a gRPC worker: the router is the engine's OpenAI front end. The client's
//! body is parsed and tokenized once (`frontend::openai::Generation`), sent as one
//! `Generate` call per prompt on the shard's HTTP/2 connection to the worker, and the
//! engine's token ids come back rendered as vLLM's HTTP server would render them (SSE or
//! one JSON body). A failure before anything reached the client is retried on another
//! worker as for HTTP workers; a client that leaves cancels the calls and aborts the
//! engine's requests (`Abort`), so generation stops at once.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use frontend::openai::{Endpoint, Generation, OpenAiError, Responder};
use grpc_proto::engine::{AbortRequest, AbortResponse, GenerateRequest, GenerateResponse};
use grpc_proto::path;
use h2::client::SendRequest;

use super::{
    interrupted, release_request, Body, Buffers, ClientWr, Interrupt, Next, Shard, Watch,
    PASSIVE_DOWN,
};
use crate::grpc::{call, Call, GrpcError};
use crate::http::response::{write_status_line, Reason};
use crate::http::Method;
use crate::metrics::{now_ns, WorkerCount};
use crate::route::Worker;

/// A request parsed for the engine, kept across attempts on several workers.
pub(super) struct Prepared {
    generation: Generation,
    pub(super) requests: Vec<GenerateRequest>,
    /// The engines' KV block size, in tokens.
    block_tokens: usize,
}

impl Prepared {
    /// What cache-aware routing reads: the first prompt's token ids (little-endian bytes),
    /// whole engine blocks only, since an engine caches no partial block.
    pub(super) fn routing_bytes(&self) -> Vec<u8> {
        let ids = self
            .generation
            .prompts
            .first()
            .map_or(&[][..], |p| &p.token_ids[..]);
        let whole = ids.len() / self.block_tokens * self.block_tokens;
        let mut out = Vec::with_capacity(whole * 4);
        for id in &ids[..whole] {
            out.extend_from_slice(&id.to_le_bytes());
        }
        out
    }
}

/// Whether gRPC workers serve `path` (a POST there).
pub(super) fn serves(path: &[u8]) -> bool {
    matches!(path, b"/v1/completions" | b"/v1/chat/completions")
}

pub(super) enum GrpcAttempt {
    /// Nothing reached the client and the worker did not take the request: try another.
    /// `status`: what the client gets if no other worker does (503 for UNAVAILABLE).
    Retry { error: String, status: u16 },
    /// A path gRPC workers do not serve (an HTTP worker may).
    NotServed(OpenAiError),
    /// Answered (or the client left); whether the worker failed it.
    Done { next: Next, worker_failed: bool },
}

fn done(next: Next, worker_failed: bool) -> GrpcAttempt {
    GrpcAttempt::Done {
        next,
        worker_failed,
    }
}

/// The request's body bytes.
fn body_bytes<'a>(b: &'a Buffers, body: &Body) -> &'a [u8] {
    let s = b.start + b.head.len;
    match body {
        Body::Inline(n) => &b.inbuf[s..s + n],
        Body::Decoded { .. } => &b.decoded,
        Body::Leg => &b.leg,
    }
}

/// Answers the client with an OpenAI error body.
pub(super) async fn respond_openai_error(
    wr: &mut ClientWr,
    b: &mut Buffers,
    e: &OpenAiError,
) -> Next {
    let close = !b.head.keep_alive;
    b.rec.status = e.status;
    b.rec.router_error = true;
    b.out.clear();
    crate::http::response::write_simple(
        &mut b.out,
        e.status,
        "application/json",
        &e.body(),
        Some(&b.rid),
        close,
        false,
    );
    if super::flush_out(wr, b).await && !close {
        Next::KeepAlive
    } else {
        Next::Close
    }
}

/// What the engine is asked for: the request's path, if a gRPC worker serves it.
fn endpoint(b: &Buffers) -> Result<Endpoint, OpenAiError> {
    let s = b.start;
    let path = &b.inbuf[s + b.head.path.start..s + b.head.path.end];
    let path = path.split(|&c| c == b'?').next().unwrap_or(path);
    match (b.head.method(), path) {
        (Method::Post, b"/v1/completions") => Ok(Endpoint::Completions),
        (Method::Post, b"/v1/chat/completions") => Ok(Endpoint::ChatCompletions),
        (_, other) => {
            let mut e = OpenAiError::bad_request(format!(
                "{} is not served by gRPC workers: they serve POST /v1/completions and \
                 /v1/chat/completions",
                String::from_utf8_lossy(other)
            ));
            e.status = 404;
            e.kind = "NotFoundError";
            Err(e)
        }
    }
}

/// Parses the client's request for the engine (once per request).
pub(super) fn prepare(shard: &Shard, b: &Buffers, body: &Body) -> Result<Prepared, OpenAiError> {
    let Some(model) = shard.cfg.model.as_ref() else {
        let mut e = OpenAiError::internal(
            "a gRPC worker was chosen but the router has no tokenizer loaded for it",
        );
        e.status = 503;
        return Err(e);
    };
    let endpoint = endpoint(b)?;
    let generation = Generation::parse(endpoint, body_bytes(b, body), &model.ctx)?;
    let rid = String::from_utf8_lossy(&b.rid);
    let requests = generation.requests(&rid);
    Ok(Prepared {
        generation,
        requests,
        block_tokens: model.block_tokens.max(1),
    })
}

/// One attempt on the gRPC worker `w`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn attempt(
    shard: &Shard,
    watch: &mut Watch<'_>,
    wr: &mut ClientWr,
    b: &mut Buffers,
    body: &Body,
    w: &Arc<Worker>,
    prepared: &mut Option<Box<Prepared>>,
) -> GrpcAttempt {
    if let Some(next) = answer_models(shard, wr, b).await {
        return done(next, false);
    }
    if prepared.is_none() {
        if let Err(e) = endpoint(b) {
            return GrpcAttempt::NotServed(e);
        }
        match prepare(shard, b, body) {
            Ok(p) => *prepared = Some(Box::new(p)),
            Err(e) => return done(respond_openai_error(wr, b, &e).await, false),
        }
    }
    let p = prepared.as_deref().expect("prepared above");
    let close = !b.head.keep_alive;
    let connect = shard.grpc.get(w.slot, w.addr, shard.cfg.connect_timeout);
    let send = match watch.guard(connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            if shard.board.mark_down(w.slot, PASSIVE_DOWN) {
                tracing::warn!(worker = %w.url, error = %e, "gRPC worker refused a connection; routing around it for {PASSIVE_DOWN:?}");
            }
            return GrpcAttempt::Retry {
                error: e.to_string(),
                status: 502,
            };
        }
        Err(i) => return done(Box::pin(interrupted(wr, b, i, close)).await, false),
    };
    let mut calls: Vec<Call> = Vec::with_capacity(p.requests.len());
    for req in &p.requests {
        let dp;
        let req = match w.dp_rank {
            Some(rank) => {
                dp = GenerateRequest {
                    data_parallel_rank: Some(rank as i32),
                    ..req.clone()
                };
                &dp
            }
            None => req,
        };
        match watch
            .guard(call::start(&send, &w.authority, path::GENERATE, req))
            .await
        {
            Ok(Ok(c)) => calls.push(c),
            Ok(Err(e)) => {
                shard.grpc.forget(w.slot);
                abort(&send, w, &p.requests[..calls.len()]);
                return GrpcAttempt::Retry {
                    error: format!("{}: {e}", w.url),
                    status: e.http_status(),
                };
            }
            Err(i) => {
                abort(&send, w, &p.requests[..calls.len()]);
                return done(Box::pin(interrupted(wr, b, i, close)).await, false);
            }
        }
    }
    // The first message says whether the engine took the request.
    let first = match watch.guard(calls[0].next::<GenerateResponse>()).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) if e.is_retryable() => {
            shard.grpc.forget(w.slot);
            abort(&send, w, &p.requests);
            return GrpcAttempt::Retry {
                error: format!("{}: {e}", w.url),
                status: e.http_status(),
            };
        }
        Ok(Err(e)) => {
            abort(&send, w, &p.requests);
            b.rec.worker = Some(w.slot);
            let failed = e.http_status() >= 500;
            let err = engine_error(&e);
            let next = respond_openai_error(wr, b, &err).await;
            b.rec.router_error = false;
            return done(next, failed);
        }
        Err(i) => {
            abort(&send, w, &p.requests);
            return done(Box::pin(interrupted(wr, b, i, close)).await, false);
        }
    };
    Box::pin(relay(shard, watch, wr, b, w, &send, p, calls, first)).await
}

/// An engine's refusal as the client sees it.
pub(super) fn engine_error(e: &GrpcError) -> OpenAiError {
    let message = match e {
        GrpcError::Status { message, .. } => message.clone(),
        other => other.to_string(),
    };
    let mut err = OpenAiError::bad_request(message);
    err.status = e.http_status();
    if err.status != 400 {
        err = OpenAiError {
            status: err.status,
            ..OpenAiError::internal(err.message.clone())
        };
    }
    err
}

/// Aborts the engine's requests (after their calls were cancelled), without waiting.
fn abort(send: &SendRequest<Bytes>, w: &Worker, requests: &[GenerateRequest]) {
    if requests.is_empty() {
        return;
    }
    let ids: Vec<String> = requests.iter().map(|r| r.request_id.clone()).collect();
    let (send, authority) = (send.clone(), w.authority.clone());
    monoio::spawn(async move {
        let req = AbortRequest { request_ids: ids };
        if let Err(e) =
            crate::grpc::unary::<_, AbortResponse>(&send, &authority, path::ABORT, &req).await
        {
            tracing::debug!(%authority, error = %e, "Abort failed");
        }
    });
}

/// The next message of whichever open call has one first, and that call's index.
/// (`Call::next` is cancel-safe: the calls that lose keep their state.)
async fn next_of_any(
    calls: &mut [Call],
    open: &[bool],
) -> (usize, Result<Option<GenerateResponse>, GrpcError>) {
    if open.iter().filter(|&&o| o).count() == 1 {
        let i = open.iter().position(|&o| o).expect("one is open");
        return (i, calls[i].next::<GenerateResponse>().await);
    }
    let mut next: Vec<_> = calls
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| open[*i])
        .map(|(i, c)| Box::pin(async move { (i, c.next::<GenerateResponse>().await) }))
        .collect();
    std::future::poll_fn(|cx| {
        for f in next.iter_mut() {
            if let std::task::Poll::Ready(r) = f.as_mut().poll(cx) {
                return std::task::Poll::Ready(r);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Writes `events` to the client as one chunk of a chunked body.
fn frame_chunk(out: &mut Vec<u8>, events: &[u8]) {
    if events.is_empty() {
        return;
    }
    out.extend_from_slice(format!("{:x}\r\n", events.len()).as_bytes());
    out.extend_from_slice(events);
    out.extend_from_slice(b"\r\n");
}

/// Phase 5: the engine's messages, rendered, to the client.
#[allow(clippy::too_many_arguments)]
async fn relay(
    shard: &Shard,
    watch: &mut Watch<'_>,
    wr: &mut ClientWr,
    b: &mut Buffers,
    w: &Arc<Worker>,
    send: &SendRequest<Bytes>,
    p: &Prepared,
    mut calls: Vec<Call>,
    first: Option<GenerateResponse>,
) -> GrpcAttempt {
    let model = &shard.cfg.model.as_ref().expect("checked in prepare").ctx;
    let close = !b.head.keep_alive;
    let stream = p.generation.stream;
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let rid = String::from_utf8_lossy(&b.rid).into_owned();
    let mut responder = Responder::new(&p.generation, model, &rid, created);
    b.rec.worker = Some(w.slot);
    b.rec.router_error = false;
    shard.metrics.worker(w.slot, WorkerCount::Processed).inc();
    let mut events: Vec<u8> = Vec::with_capacity(512);
    // The prompts' calls are read together, as vLLM merges its generators: a later
    // prompt's tokens do not wait for an earlier prompt's end.
    let mut pending = Some((0, first));
    let mut open = vec![true; calls.len()];
    if stream {
        b.rec.status = 200;
        b.out.clear();
        write_status_line(&mut b.out, 200, Reason::Standard);
        b.out.extend_from_slice(
            b"content-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\nx-request-id: ",
        );
        b.out.extend_from_slice(&b.rid);
        b.out.extend_from_slice(b"\r\n");
        if close {
            b.out.extend_from_slice(b"connection: close\r\n");
        }
        b.out.extend_from_slice(b"\r\n");
    }
    let mut head_sent = false;
    loop {
        // Everything the engine has sent for this request so far.
        let (index, msg) = match pending.take() {
            Some(m) => m,
            None => {
                if !open.contains(&true) {
                    break;
                }
                match watch.guard(next_of_any(&mut calls, &open)).await {
                    Ok((i, Ok(m))) => (i, m),
                    Ok((_, Err(e))) => {
                        abort(send, w, &p.requests);
                        if let GrpcError::Transport(_) = e {
                            shard.grpc.forget(w.slot);
                        }
                        return fail_mid_response(shard, wr, b, w, stream, head_sent, &e).await;
                    }
                    Err(Interrupt::ClientGone) => {
                        drop(calls);
                        abort(send, w, &p.requests);
                        b.rec.client_gone = true;
                        return done(Next::Close, false);
                    }
                    Err(i) => {
                        drop(calls);
                        abort(send, w, &p.requests);
                        let e = GrpcError::Status {
                        code: crate::grpc::call::code::DEADLINE_EXCEEDED,
                        message: match i {
                            Interrupt::Idle => "the worker sent nothing for longer than the stream idle timeout".into(),
                            _ => "the request took longer than --request-timeout-secs".into(),
                        },
                    };
                        return fail_mid_response(shard, wr, b, w, stream, head_sent, &e).await;
                    }
                }
            }
        };
        watch.progress += 1;
        let Some(msg) = msg else {
            // This prompt's call ended.
            open[index] = false;
            continue;
        };
        events.clear();
        if let Err(e) = responder.on_response(index, &msg, &mut events) {
            abort(send, w, &p.requests);
            return fail_with(shard, wr, b, w, stream, head_sent, &e).await;
        }
        if stream && (!events.is_empty() || !head_sent) {
            frame_chunk(&mut b.out, &events);
            let out = std::mem::take(&mut b.out);
            // A stream's head and first tokens leave at once; later ones batch.
            let (res, mut out) = if b.rec.streamed && b.rec.first_body == 0 {
                wr.send_now(out).await
            } else {
                wr.write_all(out).await
            };
            out.clear();
            b.out = out;
            if res.is_err() {
                drop(calls);
                abort(send, w, &p.requests);
                b.rec.client_gone = true;
                return done(Next::Close, false);
            }
            if !head_sent {
                head_sent = true;
                b.rec.client_head = now_ns();
                release_request(b);
                watch.start_idle_timer(shard.cfg.stream_idle_timeout);
            }
            if !events.is_empty() && b.rec.first_body == 0 {
                b.rec.first_body = now_ns();
            }
        }
    }
    events.clear();
    responder.finish(&mut events);
    if stream {
        frame_chunk(&mut b.out, &events);
        b.out.extend_from_slice(b"0\r\n\r\n");
    } else {
        b.rec.status = 200;
        b.out.clear();
        crate::http::response::write_simple(
            &mut b.out,
            200,
            "application/json",
            &events,
            Some(&b.rid),
            close,
            false,
        );
    }
    let ok = super::flush_out(wr, b).await;
    if !stream {
        let now = now_ns();
        b.rec.client_head = now;
        b.rec.first_body = now;
    }
    done(if ok { Next::KeepAlive } else { Next::Close }, false)
}

/// The engine failed the request after it was taken.
async fn fail_mid_response(
    shard: &Shard,
    wr: &mut ClientWr,
    b: &mut Buffers,
    w: &Worker,
    stream: bool,
    head_sent: bool,
    e: &GrpcError,
) -> GrpcAttempt {
    if let Some(suppressed) = shard.warn_closed.pass() {
        tracing::warn!(worker = %w.url, error = %e, suppressed, "gRPC worker failed a request mid-response");
    }
    let err = engine_error(e);
    fail_with(shard, wr, b, w, stream, head_sent, &err).await
}

/// Ends the response with `err`: an error event and `[DONE]` once the stream has begun,
/// else an error answer.
async fn fail_with(
    shard: &Shard,
    wr: &mut ClientWr,
    b: &mut Buffers,
    w: &Worker,
    stream: bool,
    head_sent: bool,
    err: &OpenAiError,
) -> GrpcAttempt {
    let failed = err.status >= 500;
    if failed {
        super::cut_mid_stream(shard, b, w);
    }
    if !stream || !head_sent {
        b.out.clear();
        let next = respond_openai_error(wr, b, err).await;
        b.rec.router_error = false;
        return done(next, false);
    }
    let mut events = Vec::new();
    err.write_event(&mut events);
    events.extend_from_slice(b"data: [DONE]\n\n");
    b.out.clear();
    frame_chunk(&mut b.out, &events);
    b.out.extend_from_slice(b"0\r\n\r\n");
    let ok = super::flush_out(wr, b).await;
    done(
        if ok && b.head.keep_alive {
            Next::KeepAlive
        } else {
            Next::Close
        },
        false,
    )
}

/// `GET /v1/models`, which the engine has no RPC for: the router, its OpenAI front end,
/// answers it from the model it loaded, in vLLM's shape (a fleet of gRPC workers only is
/// answered before routing; this serves a mixed fleet's request that met a gRPC worker).
/// `None` for any other request.
async fn answer_models(shard: &Shard, wr: &mut ClientWr, b: &mut Buffers) -> Option<Next> {
    let model = shard.cfg.model.as_ref()?;
    let s = b.start;
    let path = &b.inbuf[s + b.head.path.start..s + b.head.path.end];
    let path = path.split(|&c| c == b'?').next().unwrap_or(path);
    let method = b.head.method();
    if path != b"/v1/models" || !matches!(method, Method::Get | Method::Head) {
        return None;
    }
    let body = model.models_body();
    let close = !b.head.keep_alive;
    b.rec.status = 200;
    b.rec.router_error = false;
    b.out.clear();
    crate::http::response::write_simple(
        &mut b.out,
        200,
        "application/json",
        &body,
        Some(&b.rid),
        close,
        method == Method::Head,
    );
    Some(if super::flush_out(wr, b).await && !close {
        Next::KeepAlive
    } else {
        Next::Close
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use frontend::openai::ModelContext;

    fn prepared(prompt: &str, block_tokens: usize) -> Prepared {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../frontend/testdata/tiny-llama"
        );
        let ctx = ModelContext::from_model_dir(dir, "tiny", 2048).unwrap();
        let body = serde_json::json!({"model": "tiny", "prompt": prompt, "max_tokens": 1});
        let generation =
            Generation::parse(Endpoint::Completions, body.to_string().as_bytes(), &ctx).unwrap();
        let requests = generation.requests("r");
        Prepared {
            generation,
            requests,
            block_tokens,
        }
    }

    #[test]
    fn routing_reads_whole_engine_blocks_of_token_ids() {
        let long = "the quick brown fox jumps over the lazy dog ".repeat(8);
        let p = prepared(&long, 16);
        let ids = &p.generation.prompts[0].token_ids;
        assert!(ids.len() > 32, "{} tokens", ids.len());
        let bytes = p.routing_bytes();
        assert_eq!(bytes.len(), ids.len() / 16 * 16 * 4);
        assert_eq!(&bytes[..4], &ids[0].to_le_bytes());
        // A prompt that differs only after its whole blocks routes the same.
        let cut = p.routing_bytes().len() / 4;
        let text_of_blocks = long.clone() + "and then something else entirely";
        let q = prepared(&text_of_blocks, 16);
        assert_eq!(&q.routing_bytes()[..cut * 4], &bytes[..]);
        // Shorter than a block: nothing to route by.
        assert!(prepared("hi", 16).routing_bytes().is_empty());
    }
}
