//! P/D mode's exchange: the prefill leg, then the decode leg.
//!
//! The prefill leg (the client's body spliced by [`crate::pd::splice`]: one token, not
//! streamed, the NIXL request for a remote decode) goes to a prefill worker, with the same
//! request id as the decode leg. Its whole JSON response is read here and never reaches the
//! client, except when it is an answer the client must see: a 4xx (the request itself is
//! wrong), or a failure status once retries are spent. Connect errors, resets and
//! retryable statuses move the prefill leg to another prefill worker, as plain mode does.
//!
//! The decode leg is the client's body with the prefill response's `kv_transfer_params`,
//! byte for byte; it then runs exactly as a plain-mode request ([`super::exchange`]): its
//! retries, its relay, and its worker's in-flight count lasting until the stream ends.
//!
//! The client watch runs throughout: a client that leaves during the prefill leg gets its
//! prefill connection shut at once (vLLM aborts the prefill), as during decode.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use monoio::io::AsyncReadRent;
use monoio::net::TcpStream;

use super::{
    abort_upstream, await_head, count_attempt, exchange, interrupted, next_worker, relay_here,
    respond_error, retry_worker, send_request, Answer, Attempt, Body, BodyLeft, Buffers, ClientWr,
    Deferred, InFlight, Interrupt, Next, Outcome, Response, Sent, Shard, Watch,
};
use crate::body::RequestFields;
use crate::config::PdConfig;
use crate::http::ApiError;
use crate::metrics::{Leg, WorkerCount};
use crate::pd::splice::{KvTransferParams, ObjectIndex};
use crate::retry::is_retryable_status;
use crate::route::key::routing_text;
use crate::route::{Candidates, Selector, Worker, WorkerRole, WorkerSet};
use crate::sync::{LoadBoard, PrefixFeed};
use crate::upstream::response::ClientHead;
use crate::upstream::{ResponseFraming, ResponseHead};

/// Largest prefill response read (it carries one token; more means something is wrong).
const MAX_PREFILL_RESPONSE: usize = 16 * 1024 * 1024;

/// A shard's prefill workers and their policy.
pub struct PdRouting {
    pub cfg: PdConfig,
    /// This shard's copy of the current prefill workers.
    pub prefill: RefCell<Rc<WorkerSet>>,
    pub selector: RefCell<Selector>,
}

impl PdRouting {
    /// For a shard starting with `all` (every role).
    pub fn new(
        cfg: PdConfig,
        shard: usize,
        all: &WorkerSet,
        board: Arc<LoadBoard>,
        feed: Option<PrefixFeed>,
    ) -> Self {
        let prefill = all.with_role(WorkerRole::Prefill);
        let selector = Selector::new(cfg.prefill_policy.clone(), shard, &prefill, board, feed);
        PdRouting {
            cfg,
            prefill: RefCell::new(Rc::new(prefill)),
            selector: RefCell::new(selector),
        }
    }

    /// A new epoch: its prefill workers.
    pub(super) fn adopt(&self, all: &WorkerSet) {
        let prefill = all.with_role(WorkerRole::Prefill);
        self.selector.borrow_mut().set_workers(&prefill);
        *self.prefill.borrow_mut() = Rc::new(prefill);
    }

    /// Whether a request on `path` with `fields` gets a prefill leg: generation routes
    /// only, and (with `--pd-min-prompt-chars`) prompts at least that long.
    pub(super) fn wants_prefill(&self, path: &[u8], fields: &RequestFields<'_>) -> bool {
        if !matches!(path, b"/v1/completions" | b"/v1/chat/completions") {
            return false;
        }
        let min = self.cfg.min_prompt_chars;
        if min == 0 {
            return true;
        }
        let mut segments = Vec::new();
        routing_text(fields, &mut segments);
        segments.iter().map(|s| s.len()).sum::<usize>() >= min
    }
}

/// The prefill leg on `prefill`, then the decode leg on `decode`.
pub(super) async fn exchange_pd<'s>(
    shard: &'s Shard,
    watch: &mut Watch<'_>,
    wr: &mut ClientWr,
    b: &mut Buffers,
    body: &Body,
    prefill: (&WorkerSet, Candidates),
    decode: (&WorkerSet, Candidates),
) -> Answer<'s> {
    let close = !b.head.keep_alive;
    b.rec.pd = true;
    b.rec.leg = Leg::Prefill;
    let fallback = shard
        .pd
        .as_ref()
        .is_some_and(|pd| pd.cfg.fallback_decode_only);

    // The prefill leg's body. The index of the client's body is kept for the decode leg.
    let mut leg = std::mem::take(&mut b.leg);
    leg.clear();
    // SAFETY: a request has a prefill leg only when `parse_fields` accepted its body
    // (`route_request`), and the body has not changed since.
    let spliced = unsafe { ObjectIndex::parse_accepted(client_body(b, body)) }.map(|index| {
        index.prefill_leg(KvTransferParams::NIXL_PREFILL, &mut leg);
        index.into_spans()
    });
    b.leg = leg;
    let spans = match spliced {
        Ok(spans) => spans,
        Err(e) => {
            return Answer::Done(answer(wr, b, ApiError::bad_request(e.to_string()), close).await)
        }
    };

    let (response, worker) = match prefill_leg(shard, watch, wr, b, prefill.0, prefill.1).await {
        Ok(r) => r,
        Err(next) => return Answer::Done(next),
    };

    // The decode leg's body. (The prefill leg's own time first: the record keeps one
    // leg's times.)
    let r = &b.rec;
    if r.attempts == 1 && r.ready != 0 && r.sent != 0 {
        shard
            .metrics
            .added_to_worker
            .observe_ns(r.sent.saturating_sub(r.ready));
    }
    b.rec.ready = crate::metrics::now_ns();
    b.rec.decode_started = true;
    b.rec.leg = Leg::Decode;
    let kv = match KvTransferParams::from_prefill_response(&response) {
        Ok(Some(kv)) => kv,
        Ok(None) if fallback => {
            tracing::debug!(worker = %worker.url, "prefill answered without kv_transfer_params; decoding without it (--pd-fallback-decode-only)");
            b.leg = Vec::new();
            return exchange(shard, watch, wr, b, body, decode.0, decode.1, None).await;
        }
        Ok(None) => {
            b.rec.no_kv = true;
            if let Some(suppressed) = shard.warn_no_kv.pass() {
                tracing::warn!(worker = %worker.url, suppressed, "prefill worker answered without kv_transfer_params");
            }
            let e = ApiError::new(
                502,
                "the prefill worker answered without kv_transfer_params (is it running vLLM \
                 with a NIXL --kv-transfer-config?)",
            );
            return Answer::Done(answer(wr, b, e, close).await);
        }
        Err(e) => {
            let e = ApiError::new(502, format!("the prefill worker's response: {e}"));
            return Answer::Done(answer(wr, b, e, close).await);
        }
    };
    let mut leg = std::mem::take(&mut b.leg);
    leg.clear();
    match spans.over(client_body(b, body)) {
        Some(index) => index.decode_leg(kv, &mut leg),
        None => {
            // The client's body is where the prefill leg found it: cannot happen, but never
            // send a broken leg.
            b.leg = leg;
            let e = ApiError::new(500, "the client's body moved between the P/D legs");
            return Answer::Done(answer(wr, b, e, close).await);
        }
    }
    b.leg = leg;
    drop(response);
    exchange(shard, watch, wr, b, &Body::Leg, decode.0, decode.1, None).await
}

/// The client's request body.
fn client_body<'b>(b: &'b Buffers, body: &Body) -> &'b [u8] {
    let s = b.start + b.head.len;
    match body {
        Body::Inline(n) => &b.inbuf[s..s + n],
        Body::Decoded { .. } => &b.decoded,
        Body::Leg => &b.leg,
    }
}

async fn answer(wr: &mut ClientWr, b: &mut Buffers, e: ApiError, close: bool) -> Next {
    if respond_error(wr, b, &e, close).await && !close {
        Next::KeepAlive
    } else {
        Next::Close
    }
}

/// The prefill leg (its body in `b.leg`): a 2xx response's body and the worker that sent
/// it, or the client has been answered (`Err`).
async fn prefill_leg<'s>(
    shard: &Shard,
    watch: &mut Watch<'_>,
    wr: &mut ClientWr,
    b: &mut Buffers,
    set: &'s WorkerSet,
    mut candidates: Candidates,
) -> Result<(Vec<u8>, &'s Arc<Worker>), Next> {
    let close = !b.head.keep_alive;
    let retry = shard.cfg.retry;
    let mut last_error = String::new();
    let mut deferred = Deferred::default();
    let mut attempts = 0u32;
    let mut backoff = false;
    let order = candidates.clone();
    b.rec.attempts = 0;
    let mut next = next_worker(shard, set, &mut candidates, &mut deferred);
    if next.is_none() && !set.is_empty() {
        // Every prefill breaker open: route as if none were (as plain mode does).
        next = order.clone().next().map(|p| (set.get(p), false));
    }
    while let Some((worker, probe)) = next.take() {
        attempts += 1;
        count_attempt(shard, b, worker);
        let mut outcome = Outcome::new(shard, worker, probe, Leg::Prefill);
        if backoff {
            let wait = retry.backoff(attempts - 1, fastrand::f64());
            if let Err(i) = watch
                .guard(shard.timers.at(monoio::time::Instant::now() + wait))
                .await
            {
                return Err(Box::pin(interrupted(wr, b, i, close)).await);
            }
        }
        let in_flight = InFlight::start(shard, worker.slot);
        loop {
            let got = match Box::pin(send_request(shard, watch, wr, b, &Body::Leg, worker)).await {
                Sent::Sent {
                    up,
                    reused,
                    asked_load,
                } => await_head(shard, watch, wr, b, worker, up, reused, asked_load).await,
                Sent::Not(a) => a,
            };
            match got {
                Attempt::Head(up, head, asked_load) => {
                    let status = head.status;
                    if (200..300).contains(&status) {
                        match read_response(shard, watch, b, worker, up, &head).await {
                            Ok(body) => {
                                outcome.success();
                                b.rec.prefill = Some(worker.slot);
                                shard
                                    .metrics
                                    .worker(worker.slot, WorkerCount::Processed)
                                    .inc();
                                return Ok((body, worker));
                            }
                            Err(ReadError::Interrupted(i)) => {
                                return Err(Box::pin(interrupted(wr, b, i, close)).await)
                            }
                            Err(ReadError::TooLarge) => {
                                outcome.failure();
                                let e = ApiError::new(
                                    502,
                                    format!(
                                        "the prefill worker's response exceeds {MAX_PREFILL_RESPONSE} bytes"
                                    ),
                                );
                                return Err(answer(wr, b, e, close).await);
                            }
                            Err(ReadError::Broken(error)) => {
                                tracing::debug!(worker = %worker.url, %error, "retrying the prefill on another worker");
                                outcome.failure();
                                last_error = error;
                                backoff = false;
                                break;
                            }
                        }
                    }
                    if is_retryable_status(status) && attempts < retry.max_attempts {
                        backoff = true;
                        if let Some(other) = retry_worker(
                            shard,
                            set,
                            &mut candidates,
                            &order,
                            &mut deferred,
                            &mut backoff,
                        ) {
                            if status >= 500 {
                                outcome.failure();
                            }
                            tracing::debug!(worker = %worker.url, status, "retrying the prefill on another worker");
                            last_error = format!("{} answered {status}", worker.url);
                            drop(up);
                            next = Some(other);
                            break;
                        }
                    }
                    if status >= 500 {
                        outcome.failure();
                    } else {
                        outcome.success();
                    }
                    if is_retryable_status(status) && retry.max_attempts > 1 {
                        b.rec.exhausted = true;
                    }
                    // The client's request was refused (4xx), or retries are spent: the
                    // prefill worker's answer is the client's.
                    let how = ClientHead {
                        close,
                        dechunk: false,
                        strip_load_report: asked_load,
                    };
                    let response = Response {
                        worker: worker.clone(),
                        up,
                        head,
                        how,
                        _in_flight: in_flight,
                    };
                    return Err(relay_here(shard, watch, wr, b, response).await);
                }
                Attempt::Retry { error, same_worker } => {
                    if same_worker {
                        continue;
                    }
                    tracing::debug!(worker = %worker.url, %error, "retrying the prefill on another worker");
                    last_error = error;
                    outcome.failure();
                    backoff = false;
                    break;
                }
                Attempt::Done(next) => return Err(next),
            }
        }
        if next.is_none() && attempts < retry.max_attempts {
            next = retry_worker(
                shard,
                set,
                &mut candidates,
                &order,
                &mut deferred,
                &mut backoff,
            );
        }
    }
    let e = if attempts == 0 {
        ApiError::new(503, "no prefill worker is available")
    } else {
        b.rec.exhausted = true;
        ApiError::new(
            502,
            format!("no prefill worker could take the request ({attempts} attempts): {last_error}"),
        )
    };
    Err(answer(wr, b, e, close).await)
}

enum ReadError {
    Interrupted(Interrupt),
    /// Cut off or malformed: another worker may do better.
    Broken(String),
    TooLarge,
}

/// The whole body of a response whose head is `head` (its first bytes in `b.upbuf`); the
/// connection goes back to the pool when it can carry another request.
async fn read_response(
    shard: &Shard,
    watch: &mut Watch<'_>,
    b: &mut Buffers,
    worker: &Arc<Worker>,
    mut up: TcpStream,
    head: &ResponseHead,
) -> Result<Vec<u8>, ReadError> {
    let mut left = match head.framing {
        ResponseFraming::None | ResponseFraming::Length(0) => BodyLeft::Done,
        ResponseFraming::Length(n) => BodyLeft::Length(n),
        ResponseFraming::Chunked => BodyLeft::Chunked(crate::http::ChunkedDecoder::new()),
        ResponseFraming::UntilClose => BodyLeft::UntilClose,
    };
    let mut reusable = head.reusable;
    let mut body = Vec::new();
    let malformed = || ReadError::Broken(format!("malformed response body from {}", worker.url));
    let early = &b.upbuf[head.len..];
    let n = take_into(&mut left, early, &mut body).map_err(|_| malformed())?;
    if n < early.len() {
        reusable = false;
    }
    while !matches!(left, BodyLeft::Done) {
        if body.len() > MAX_PREFILL_RESPONSE {
            abort_upstream(&up);
            return Err(ReadError::TooLarge);
        }
        let mut buf = std::mem::take(&mut b.upbuf);
        buf.clear();
        if buf.capacity() < 16 * 1024 {
            buf.reserve(16 * 1024);
        }
        let (res, buf) = match watch.guard(up.read(buf)).await {
            Ok(r) => r,
            Err(i) => {
                abort_upstream(&up);
                return Err(ReadError::Interrupted(i));
            }
        };
        let got = res.unwrap_or_default();
        if got == 0 {
            b.upbuf = buf;
            if let BodyLeft::UntilClose = left {
                reusable = false;
                break;
            }
            return Err(ReadError::Broken(format!(
                "{} closed the connection mid-response",
                worker.url
            )));
        }
        let n = take_into(&mut left, &buf[..got], &mut body);
        b.upbuf = buf;
        let n = n.map_err(|_| {
            abort_upstream(&up);
            malformed()
        })?;
        if n < got {
            reusable = false;
        }
    }
    if reusable {
        shard.current_workers();
        let member = shard
            .pd
            .as_ref()
            .is_some_and(|pd| pd.prefill.borrow().contains(worker));
        if member {
            shard.pool.borrow_mut().put(worker.slot, worker.addr, up);
        }
    }
    Ok(body)
}

/// Consumes what of `bytes` belongs to the body, appending its payload to `body`.
fn take_into(left: &mut BodyLeft, bytes: &[u8], body: &mut Vec<u8>) -> Result<usize, ()> {
    if let BodyLeft::Chunked(_) = left {
        return left.take(bytes, Some(body));
    }
    let n = left.take(bytes, None)?;
    body.extend_from_slice(&bytes[..n]);
    Ok(n)
}
