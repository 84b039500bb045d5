//! One client connection's life on its shard, as named phases:
//! `read_head` → `read_body` → `route_request` (local answer, or a worker) →
//! `exchange` (pooled connection, upstream request, response head) → `relay_body`.
//!
//! The phases up to the response head run in a box of their own, per request; the body is
//! relayed from the top of the connection's task (`relay_response`) once they returned, so
//! a stream holds only the relay's state for its length, not the routing's and retries'.
//!
//! While a request is with a worker, the client's socket is watched: a client that closes
//! makes the router shut the upstream connection at once (that is how vLLM learns to abort
//! the generation), and such a connection never returns to the pool. Bytes the client
//! pipelines meanwhile are kept for the next request.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;

use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{
    AsyncReadRent, AsyncWriteRentExt, CancelableAsyncReadRent, Canceller, OwnedReadHalf,
    OwnedWriteHalf, Splitable,
};
use monoio::net::TcpStream;
use monoio::time::Instant;
use monoio::BufResult;

use crate::admin::{is_admin_path, AdminCall};
use crate::admission::{Permit, ShardAdmission};
use crate::body::parse_fields;
use crate::breaker::{Admit, Breakers};
use crate::config::DataPlaneConfig;
use crate::http::response::write_simple;
use crate::http::{ApiError, BodyFraming, ChunkedDecoder, Method, ParseOutcome, RequestHead};
use crate::metrics::{now_ns, Leg, RequestRecord, Route, ShardMetrics, WorkerCount};
use crate::recv;
use crate::retry::is_retryable_status;
use crate::route::key::{body_session_key, routing_text, SESSION_HEADERS};
use crate::route::{Candidates, RouteInput, Selector, Worker, WorkerSet};
use crate::send::{self, ClientWriter};
use crate::sync::{Directory, LoadBoard};
use crate::timer::{Timer, Timers};
use crate::upstream::request::{write_upstream_head, UpstreamHeadOpts};
use crate::upstream::response::{write_client_head, ClientHead};
use crate::upstream::{Pool, ResponseFraming, ResponseHead};

mod disagg;
mod grpc;
mod grpc_pd;
pub use disagg::PdRouting;

type ClientRd = OwnedReadHalf<TcpStream>;
/// The client watch's read.
type ClientRead<'a> = dyn Future<Output = BufResult<usize, Vec<u8>>> + 'a;
type ClientWr = ClientWriter<OwnedWriteHalf<TcpStream>>;

/// A shard's state, shared by its connection tasks (single-threaded, so `RefCell`).
pub struct Shard {
    pub id: usize,
    pub cfg: DataPlaneConfig,
    /// Where the control plane publishes worker sets.
    pub directory: std::sync::Arc<Directory>,
    /// This shard's copy of the current worker set (its own `Arc`s, so taking it per
    /// request touches no shared cache line).
    pub workers: RefCell<Rc<WorkerSet>>,
    pub selector: RefCell<Selector>,
    pub board: std::sync::Arc<LoadBoard>,
    pub breakers: std::sync::Arc<Breakers>,
    pub admission: ShardAdmission,
    pub pool: RefCell<Pool>,
    /// HTTP/2 connections to gRPC workers, one per worker.
    pub grpc: crate::grpc::Channels,
    pub ids: RequestIds,
    /// Whether to ask workers for their in-band load report (load-using policies).
    pub asks_for_load: bool,
    /// `Bearer <--api-key>` for workers, if set.
    pub upstream_auth: Option<Vec<u8>>,
    /// The process is draining (see `DataPlane::start_draining`).
    pub draining: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Every worker's breaker was open at the last request: routing ignores them.
    pub panic_routing: std::cell::Cell<bool>,
    /// P/D mode: the prefill workers and their policy (`workers` and `selector` are then
    /// the decode workers').
    pub pd: Option<disagg::PdRouting>,
    /// This shard's counters (written here only).
    pub metrics: Arc<ShardMetrics>,
    /// Every deadline and wait of this shard's connections.
    pub timers: Rc<Timers>,
    /// Warnings that every request of a failing worker would repeat, one per second each.
    pub warn_closed: WarnGate,
    pub warn_silent: WarnGate,
    pub warn_no_kv: WarnGate,
    /// Requests of this shard waiting for a worker's response head (`await_head`).
    pub heads_waiting: Cell<usize>,
}

/// At most one line of a kind per second per shard: a worker that fails under load fails
/// every request it has, and the log says so once a second, with how many lines that one
/// stands for, instead of thousands of times (the metrics count every one).
#[derive(Default)]
pub struct WarnGate {
    last_ns: Cell<u64>,
    suppressed: Cell<u64>,
}

impl WarnGate {
    /// `Some(lines not logged since the last one)` when this one should be logged.
    pub fn pass(&self) -> Option<u64> {
        let now = now_ns();
        if self.last_ns.get() == 0 || now.saturating_sub(self.last_ns.get()) >= 1_000_000_000 {
            self.last_ns.set(now);
            Some(self.suppressed.replace(0))
        } else {
            self.suppressed.set(self.suppressed.get() + 1);
            None
        }
    }
}

impl Shard {
    fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The current worker set, adopting a newer epoch first if one was published.
    fn current_workers(&self) -> Rc<WorkerSet> {
        if self.directory.epoch() != self.workers.borrow().epoch {
            self.adopt(self.directory.current());
        }
        self.workers.borrow().clone()
    }

    fn adopt(&self, set: WorkerSet) {
        let all = WorkerSet::new(set.epoch, set.iter().cloned().collect());
        let local = match &self.pd {
            Some(pd) => {
                pd.adopt(&all);
                all.with_role(crate::route::WorkerRole::Decode)
            }
            None => all.clone(),
        };
        self.selector.borrow_mut().set_workers(&local);
        // Idle connections to workers that left are closed now; those in use close when
        // their response ends (they are not returned to the pool).
        self.pool
            .borrow_mut()
            .retain_slots(|slot| all.by_slot(slot).is_some());
        self.grpc.retain_slots(|slot| all.by_slot(slot).is_some());
        tracing::debug!(
            shard = self.id,
            epoch = local.epoch,
            workers = local.len(),
            "adopted a new worker set"
        );
        *self.workers.borrow_mut() = Rc::new(local);
    }

    /// Workers a request could go to now (not passively down, breaker not open). In P/D
    /// mode, none unless a prefill worker is usable too.
    fn usable_count(&self, set: &WorkerSet) -> usize {
        let usable = |set: &WorkerSet| {
            set.iter()
                .filter(|w| self.board.is_usable(w.slot) && self.breakers.is_closed_or_due(w.slot))
                .count()
        };
        match &self.pd {
            Some(pd) if usable(&pd.prefill.borrow()) == 0 => 0,
            _ => usable(set),
        }
    }
}

/// Request ids for clients that sent none: a random per-shard prefix and a counter.
pub struct RequestIds {
    prefix: u64,
    next: Cell<u64>,
}

impl RequestIds {
    pub fn new(shard: usize) -> Self {
        RequestIds {
            prefix: fastrand::u64(..) ^ (shard as u64).rotate_left(56),
            next: Cell::new(0),
        }
    }

    fn write_next(&self, out: &mut Vec<u8>) {
        let n = self.next.get();
        self.next.set(n.wrapping_add(1));
        write_hex(out, self.prefix);
        write_hex(out, n);
    }
}

fn write_hex(out: &mut Vec<u8>, v: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for i in (0..16).rev() {
        out.push(HEX[((v >> (i * 4)) & 0xf) as usize]);
    }
}

/// Paths whose POST body must be a JSON object before a worker sees it.
fn is_json_route(path: &[u8]) -> bool {
    matches!(
        path,
        b"/v1/completions"
            | b"/v1/chat/completions"
            | b"/v1/embeddings"
            | b"/v1/responses"
            | b"/generate"
    )
}

/// A worker that refused a connection is routed around for this long (passive health;
/// active checks and breakers take over from it later).
const PASSIVE_DOWN: std::time::Duration = std::time::Duration::from_secs(5);

/// Bodies up to this size are copied behind the upstream head and sent in one write.
const COALESCE_BODY: usize = 64 * 1024;
/// Initial size of the buffers of a connection; they grow only when a message needs it.
/// While a response streams, a connection holds little more than the buffer of its pending
/// upstream read (UPBUF) and the client watch's (WATCH): 10,000 open streams fit in tens
/// of MiB.
const INBUF: usize = 4096;
const UPBUF: usize = 1024;
const WATCH: usize = 64;
/// Buffers larger than this are released rather than kept between requests.
const KEEP_BETWEEN_REQUESTS: usize = 16 * 1024;
/// Largest worker response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// The buffers of one client connection, reused request after request.
struct Buffers {
    /// Client bytes; the current request starts at `start` and ends at `request_end`
    /// (once its body has been read).
    inbuf: Vec<u8>,
    start: usize,
    request_end: usize,
    head: RequestHead,
    /// Heads being written (to the worker or to the client).
    out: Vec<u8>,
    /// Bytes from the worker.
    upbuf: Vec<u8>,
    /// A chunked request body, decoded.
    decoded: Vec<u8>,
    /// The request id of the current request.
    rid: Vec<u8>,
    /// Where the client watch reads (pipelined bytes land here first).
    watch: Vec<u8>,
    /// A P/D leg's body (`Body::Leg`), spliced from the client's.
    leg: Vec<u8>,
    /// The current request's facts, counted when it ends.
    rec: RequestRecord,
    /// No request has been read on this connection yet.
    fresh: bool,
}

enum Next {
    KeepAlive,
    Close,
}

/// How a request's phases ended: answered, or with a worker's response to relay from the
/// top of the connection's task (`relay_response`).
enum Handled<'a> {
    Done(Next),
    /// Boxed: the connection's task would otherwise reserve room for it while a request
    /// is still being read and routed.
    Relay(Box<Relay<'a>>),
}

/// A worker's response to relay once the phases that asked for it have returned. Their
/// state (routing, retries, the exchange) is freed by then; a stream would otherwise hold
/// it for its whole length, and with thousands of streams open that was most of the
/// router's memory.
struct Relay<'a> {
    watch: Watch<'a>,
    response: Response<'a>,
    /// The request's admission, held until its last byte.
    permit: Option<Permit<'a>>,
    /// Whether the client's request allows another on its connection.
    keep_alive: bool,
}

/// How an exchange with workers ended: answered (or the client left), or with a worker's
/// response head in hand and its body to relay.
enum Answer<'a> {
    Done(Next),
    Relay(Response<'a>),
}

/// A worker's response whose head arrived: what relaying its body takes.
struct Response<'a> {
    worker: Arc<Worker>,
    up: TcpStream,
    head: ResponseHead,
    how: ClientHead,
    /// The request counts in the worker's load until the response's last byte.
    _in_flight: InFlight<'a>,
}

enum Body {
    /// `len` bytes right after the head in `inbuf`.
    Inline(usize),
    /// Decoded into `decoded`; `raw` bytes of chunked framing followed the head.
    Decoded { raw: usize },
    /// Not the client's body: a P/D leg's, in `leg`.
    Leg,
}

enum Fill {
    Data,
    Closed,
    TimedOut,
}

/// Counts a connection closed when its task ends, however it ends.
struct ConnectionClosed<'a>(&'a ShardMetrics);

impl Drop for ConnectionClosed<'_> {
    fn drop(&mut self) {
        self.0.connections_closed.inc();
    }
}

/// A client connection's task. The stream is split before the task starts, so the task
/// does not carry the whole stream beside its halves.
pub fn serve_connection(shard: Rc<Shard>, stream: TcpStream) -> impl Future<Output = ()> {
    let fd = stream.as_raw_fd();
    let (rd, wr) = stream.into_split();
    serve(shard, rd, ClientWriter::new(wr, fd))
}

async fn serve(shard: Rc<Shard>, mut rd: ClientRd, mut wr: ClientWr) {
    let mut b = Buffers {
        // Sized by the first bytes of a request, when they come (`fill_from_nothing`).
        inbuf: Vec::new(),
        start: 0,
        request_end: 0,
        head: RequestHead::default(),
        // Sized when first written (the upstream head, or an answer).
        out: Vec::new(),
        upbuf: Vec::new(),
        decoded: Vec::new(),
        rid: Vec::with_capacity(40),
        watch: Vec::new(),
        leg: Vec::new(),
        rec: RequestRecord::new(Route::Other, now_ns()),
        fresh: true,
    };
    shard.metrics.connections.inc();
    let _closed = ConnectionClosed(&shard.metrics);
    loop {
        b.rid.clear();
        match read_head(&shard, &mut rd, &mut b).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                b.rec = RequestRecord::new(Route::Other, now_ns());
                respond_error(&mut wr, &mut b, &e, true).await;
                shard.metrics.record(&b.rec, now_ns());
                return;
            }
        }
        // Boxed: the request's phases take most of a connection's state, and it is freed
        // before a response streams.
        let next = match Box::pin(handle_request(&shard, &mut rd, &mut wr, &mut b)).await {
            Handled::Done(next) => next,
            Handled::Relay(relay) => relay_response(&shard, &mut wr, &mut b, relay).await,
        };
        match next {
            // A draining router finishes the request it has, then lets the client go.
            Next::KeepAlive if !shard.is_draining() => {}
            _ => return,
        }
    }
}

/// The request is whole, and waits in `inbuf` until the worker answers (perhaps seconds of
/// prefill): give back the buffer's unused tail (most of INBUF for a small request), so
/// the allocations the exchange makes next reuse it. Every connection in its
/// request phase at once (a burst of new streams) otherwise leaves that tail as a hole
/// between longer-lived allocations, and the heap never shrinks back from the burst.
fn fit_request(b: &mut Buffers) {
    if b.inbuf.capacity() - b.inbuf.len() >= 1024 {
        b.inbuf.shrink_to_fit();
    }
}

/// A new connection's first bytes: taken as they are, usually there by now, and otherwise
/// waited for without a buffer (`recv`), so a burst of new connections holds no buffer
/// for requests still to come, and each request's buffer has its size. A kept-alive
/// connection reads its next request through the ring, as before: in a closed loop the
/// next request is never there yet, and the extra `recv()` and poll cost 6–11% more CPU
/// per non-streamed request.
async fn fill_from_nothing(
    shard: &Shard,
    rd: &mut ClientRd,
    b: &mut Buffers,
    deadline: Instant,
) -> Fill {
    let fd = recv::fd_of(rd);
    loop {
        match recv::recv_now(fd, &mut b.inbuf) {
            Ok(0) => return Fill::Closed,
            Ok(_) => return Fill::Data,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Fill::Closed,
        }
        match shard.timers.timeout_at(deadline, recv::readable(rd)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Fill::Closed,
            Err(_) => return Fill::TimedOut,
        }
    }
}

/// Reads into `inbuf` after its current bytes, until `deadline`.
async fn fill(shard: &Shard, rd: &mut ClientRd, b: &mut Buffers, deadline: Instant) -> Fill {
    if b.start > 0 {
        if b.start == b.inbuf.len() {
            b.inbuf.clear();
            b.start = 0;
        } else if b.inbuf.capacity() - b.inbuf.len() < 1024 {
            b.inbuf.drain(..b.start);
            b.start = 0;
        }
    }
    if b.inbuf.is_empty() && b.fresh {
        return fill_from_nothing(shard, rd, b, deadline).await;
    }
    if b.inbuf.capacity() - b.inbuf.len() < 1024 {
        b.inbuf.reserve(b.inbuf.capacity().max(INBUF));
    }
    let buf = std::mem::take(&mut b.inbuf);
    let len = buf.len();
    match shard
        .timers
        .timeout_at(deadline, rd.read(buf.slice_mut(len..)))
        .await
    {
        Ok((res, slice)) => {
            b.inbuf = slice.into_inner();
            match res {
                Ok(n) if n > 0 => Fill::Data,
                _ => Fill::Closed,
            }
        }
        Err(_) => Fill::TimedOut,
    }
}

/// Phase 1: a complete request head in `b.head`. `Ok(false)`: the client left or idled out.
async fn read_head(shard: &Shard, rd: &mut ClientRd, b: &mut Buffers) -> Result<bool, ApiError> {
    let mut head_deadline: Option<Instant> = None;
    loop {
        if b.inbuf.len() > b.start {
            let outcome = b
                .head
                .parse(&b.inbuf[b.start..], shard.cfg.max_header_bytes)?;
            if let ParseOutcome::Complete = outcome {
                b.fresh = false;
                return Ok(true);
            }
        }
        let deadline = if b.inbuf.len() > b.start {
            *head_deadline.get_or_insert_with(|| Instant::now() + shard.cfg.header_read_timeout)
        } else {
            Instant::now() + shard.cfg.keepalive_timeout
        };
        match fill(shard, rd, b, deadline).await {
            Fill::Data => {}
            Fill::Closed => return Ok(false),
            Fill::TimedOut => {
                if b.inbuf.len() > b.start {
                    tracing::debug!(
                        shard = shard.id,
                        "closing a connection slow to send its request head"
                    );
                }
                return Ok(false);
            }
        }
    }
}

/// Phase 2: the whole body, inline after the head or decoded from chunks.
async fn read_body(
    shard: &Shard,
    rd: &mut ClientRd,
    wr: &mut ClientWr,
    b: &mut Buffers,
) -> Result<Body, Option<ApiError>> {
    let max = shard.cfg.max_payload_size;
    let head_len = b.head.len;
    let too_large = |n: usize| {
        Some(ApiError::new(
            413,
            format!(
                "request body of {n} bytes exceeds the limit of {max} bytes (--max-payload-size)"
            ),
        ))
    };
    match b.head.framing() {
        BodyFraming::None => Ok(Body::Inline(0)),
        BodyFraming::Length(n) => {
            if n > max as u64 {
                return Err(too_large(n as usize));
            }
            let n = n as usize;
            if b.inbuf.len() - b.start < head_len + n {
                if b.head.expect_continue && b.inbuf.len() - b.start == head_len {
                    send_continue(wr).await?;
                }
                b.inbuf.reserve(head_len + n - (b.inbuf.len() - b.start));
            }
            while b.inbuf.len() - b.start < head_len + n {
                let deadline = Instant::now() + shard.cfg.header_read_timeout;
                match fill(shard, rd, b, deadline).await {
                    Fill::Data => {}
                    _ => return Err(None),
                }
            }
            Ok(Body::Inline(n))
        }
        BodyFraming::Chunked => {
            if b.head.expect_continue && b.inbuf.len() - b.start == head_len {
                send_continue(wr).await?;
            }
            b.decoded.clear();
            let mut decoder = ChunkedDecoder::new();
            let mut rel = head_len;
            loop {
                let from = b.start + rel;
                let used = decoder
                    .feed(&b.inbuf[from..], Some(&mut b.decoded))
                    .map_err(|e| {
                        Some(ApiError::bad_request(format!("invalid chunked body: {e}")))
                    })?;
                rel += used;
                if b.decoded.len() > max {
                    return Err(too_large(b.decoded.len()));
                }
                if decoder.is_done() {
                    return Ok(Body::Decoded {
                        raw: rel - head_len,
                    });
                }
                let deadline = Instant::now() + shard.cfg.header_read_timeout;
                match fill(shard, rd, b, deadline).await {
                    Fill::Data => {}
                    _ => return Err(None),
                }
            }
        }
    }
}

async fn send_continue(wr: &mut ClientWr) -> Result<(), Option<ApiError>> {
    let (res, _) = wr.write_all(&b"HTTP/1.1 100 Continue\r\n\r\n"[..]).await;
    res.map(|_| ()).map_err(|_| None)
}

/// Writes a complete local response held in `b.out`.
async fn flush_out(wr: &mut ClientWr, b: &mut Buffers) -> bool {
    let out = std::mem::take(&mut b.out);
    let (res, out) = if b.rec.streamed {
        wr.send_now(out).await
    } else {
        wr.write_all(out).await
    };
    b.out = out;
    b.out.clear();
    res.is_ok()
}

async fn respond_error(wr: &mut ClientWr, b: &mut Buffers, e: &ApiError, close: bool) -> bool {
    b.rec.status = e.status;
    b.rec.router_error = true;
    b.out.clear();
    let rid = if b.rid.is_empty() {
        None
    } else {
        Some(&b.rid[..])
    };
    e.write_response(&mut b.out, rid, close);
    flush_out(wr, b).await
}

/// Phases 2–5 for the request whose head is in `b.head`, then its count in the metrics
/// (and its access log line); or, when a worker's response is to be relayed, phases 2–4,
/// and the rest from the top of the task (`relay_response`).
async fn handle_request<'a>(
    shard: &'a Shard,
    rd: &'a mut ClientRd,
    wr: &mut ClientWr,
    b: &mut Buffers,
) -> Handled<'a> {
    let s = b.start;
    let path = &b.inbuf[s + b.head.path.start..s + b.head.path.end];
    let path = path.split(|&c| c == b'?').next().unwrap_or(path);
    b.rec = RequestRecord::new(Route::of(path), now_ns());
    let handled = handle_request_phases(shard, rd, wr, b).await;
    if let Handled::Done(_) = handled {
        count_request(shard, b);
    }
    handled
}

/// Phase 5 from the top of the connection's task: the response's body relayed, then what
/// the phases below did after it, in the same order: the worker connection back to the
/// pool and the worker's load let go, the watch settled, the admission released, the
/// request's bytes let go, its count in the metrics.
async fn relay_response(
    shard: &Shard,
    wr: &mut ClientWr,
    b: &mut Buffers,
    mut relay: Box<Relay<'_>>,
) -> Next {
    let (next, reusable) = relay_body(shard, &mut relay.watch, wr, b, &mut relay.response).await;
    let Relay {
        mut watch,
        response,
        permit,
        keep_alive,
    } = *relay;
    reuse_upstream(shard, response, reusable);
    let next = watch.settle(b, next).await;
    drop(permit);
    let next = end_request_phases(b, next, keep_alive);
    count_request(shard, b);
    next
}

/// The request's count in the metrics, and its access log line.
fn count_request(shard: &Shard, b: &Buffers) {
    let end = now_ns();
    shard.metrics.record(&b.rec, end);
    if shard.cfg.access_log && !b.rec.skip {
        log_access(shard, b, end);
    }
}

/// One line per request: id, route, status, worker(s), times.
fn log_access(shard: &Shard, b: &Buffers, end: u64) {
    let r = &b.rec;
    let url = |slot: Option<usize>, set: Option<&WorkerSet>| -> String {
        match (slot, set) {
            (Some(slot), Some(set)) => set
                .by_slot(slot)
                .map(|w| w.url.clone())
                .unwrap_or_else(|| format!("slot {slot}")),
            _ => "-".to_string(),
        }
    };
    let workers = shard.workers.borrow().clone();
    let prefill_set = shard.pd.as_ref().map(|pd| pd.prefill.borrow().clone());
    // The client's answer may be a prefill worker's (its refusal passed on).
    let worker = match (r.worker, &prefill_set) {
        (Some(slot), Some(p)) if workers.by_slot(slot).is_none() => url(Some(slot), Some(p)),
        _ => url(r.worker, Some(&workers)),
    };
    let prefill = url(r.prefill, prefill_set.as_deref());
    let ms = |t: u64| (t != 0).then(|| t.saturating_sub(r.start) as f64 / 1e6);
    tracing::info!(
        target: "ringrouter::access",
        request_id = %String::from_utf8_lossy(&b.rid),
        route = %r.route.label(),
        status = r.status,
        worker = %worker,
        prefill = %prefill,
        attempts = r.attempts,
        error = %r.error_type().map(|e| e.label()).unwrap_or("-"),
        ttft_ms = ms(r.first_body),
        total_ms = end.saturating_sub(r.start) as f64 / 1e6,
        "request"
    );
}

async fn handle_request_phases<'a>(
    shard: &'a Shard,
    rd: &'a mut ClientRd,
    wr: &mut ClientWr,
    b: &mut Buffers,
) -> Handled<'a> {
    b.rid.clear();
    if let Some(r) = b.head.request_id.clone() {
        let s = b.start;
        b.rid.extend_from_slice(&b.inbuf[s + r.start..s + r.end]);
    } else {
        shard.ids.write_next(&mut b.rid);
    }
    let body = match read_body(shard, rd, wr, b).await {
        Ok(body) => {
            b.rec.ready = now_ns();
            fit_request(b);
            body
        }
        Err(Some(e)) => {
            respond_error(wr, b, &e, true).await;
            return Handled::Done(Next::Close);
        }
        Err(None) => return Handled::Done(Next::Close),
    };
    let head_len = b.head.len;
    let consumed = head_len
        + match body {
            Body::Inline(n) => n,
            Body::Decoded { raw } => raw,
            Body::Leg => 0,
        };
    let keep_alive = b.head.keep_alive;
    b.request_end = b.start + consumed;
    match route_request(shard, rd, wr, b, &body).await {
        Handled::Done(next) => Handled::Done(end_request_phases(b, next, keep_alive)),
        Handled::Relay(mut relay) => {
            relay.keep_alive = keep_alive;
            Handled::Relay(relay)
        }
    }
}

/// After a request's answer: its bytes let go, and whether its connection goes on.
fn end_request_phases(b: &mut Buffers, next: Next, keep_alive: bool) -> Next {
    // A P/D leg's body, when the request ended before the relay released it.
    if b.leg.capacity() > KEEP_BETWEEN_REQUESTS {
        b.leg = Vec::new();
    }
    // The relay may have released the request's bytes already (then request_end is 0).
    b.start = b.request_end;
    b.request_end = 0;
    match next {
        Next::KeepAlive if keep_alive => Next::KeepAlive,
        _ => Next::Close,
    }
}

/// Phase 3: answer locally or send to a worker.
async fn route_request<'a>(
    shard: &'a Shard,
    rd: &'a mut ClientRd,
    wr: &mut ClientWr,
    b: &mut Buffers,
    body: &Body,
) -> Handled<'a> {
    let method = b.head.method();
    let s = b.start;
    let full_path = &b.inbuf[s + b.head.path.start..s + b.head.path.end];
    let (path, query) = match full_path.iter().position(|&c| c == b'?') {
        Some(q) => (&full_path[..q], &full_path[q + 1..]),
        None => (full_path, &b""[..]),
    };
    let close = !b.head.keep_alive;
    let head_only = method == Method::Head;
    let set = shard.current_workers();
    if !shard.cfg.client_api_keys.is_empty()
        && needs_client_auth(path)
        && !client_authorized(shard, &b.head, &b.inbuf[s..s + b.head.len])
    {
        let e = ApiError::new(
            401,
            "missing or invalid API key: send it as 'Authorization: Bearer <key>'",
        );
        return Handled::Done(if respond_error(wr, b, &e, close).await {
            Next::KeepAlive
        } else {
            Next::Close
        });
    }
    let mut routed: Option<Candidates> = None;
    // A gRPC worker's request, when parsed before routing.
    let mut prepared: Option<Box<grpc::Prepared>> = None;
    // P/D mode: the prefill workers' set and candidates, when this request has a prefill leg.
    let mut prefill: Option<(Rc<WorkerSet>, Candidates)> = None;
    let local: Option<(u16, &str, Vec<u8>)> = match (method, path) {
        (Method::Get | Method::Head, b"/readiness") if shard.is_draining() => {
            let e = ApiError::new(503, "draining: the router is shutting down");
            Some((503, "application/json", e.body()))
        }
        (Method::Get | Method::Head, b"/health") | (Method::Get | Method::Head, b"/readiness") => {
            if shard.usable_count(&set) > 0 {
                Some((200, "application/json", br#"{"status":"ok"}"#.to_vec()))
            } else {
                let e = ApiError::new(503, "no worker is available");
                Some((503, "application/json", e.body()))
            }
        }
        // A fleet of gRPC workers: the router is their OpenAI server.
        (Method::Get | Method::Head, b"/v1/models") if grpc_model(shard, &set).is_some() => {
            let model = grpc_model(shard, &set).expect("guarded");
            Some((200, "application/json", model.models_body()))
        }
        (Method::Get | Method::Head, b"/version")
            if grpc_model(shard, &set).is_some_and(|m| m.version.is_some()) =>
        {
            let v = grpc_model(shard, &set).and_then(|m| m.version.as_deref());
            let v = serde_json::Value::from(v.unwrap_or_default()).to_string();
            Some((
                200,
                "application/json",
                format!(r#"{{"version":{v}}}"#).into_bytes(),
            ))
        }
        (Method::Get | Method::Head, b"/liveness") => {
            Some((200, "application/json", br#"{"status":"ok"}"#.to_vec()))
        }
        (_, p) if is_admin_path(p) => {
            let (status, ctype, payload) = admin_call(shard, method, p, query, b, body).await;
            Some((status, ctype, payload))
        }
        (Method::Post, p) if is_json_route(p) => {
            let bytes = match body {
                Body::Inline(n) => &b.inbuf[s + b.head.len..s + b.head.len + n],
                Body::Decoded { .. } => &b.decoded[..],
                Body::Leg => &b.leg[..],
            };
            match parse_fields(bytes) {
                Ok(fields) => {
                    b.rec.streamed = fields.stream;
                    let head_bytes = &b.inbuf[s..s + b.head.len];
                    // A gRPC fleet: the request is tokenized now, once, and routed by its
                    // token blocks, as the engines' prefix caches hold them.
                    let mut token_text = None;
                    let mut refused = None;
                    if grpc_model(shard, &set).is_some() && grpc::serves(p) {
                        match grpc::prepare(shard, b, body) {
                            Ok(ready) => {
                                token_text = Some(ready.routing_bytes());
                                prepared = Some(Box::new(ready));
                            }
                            Err(e) => refused = Some(e),
                        }
                    }
                    if let Some(e) = refused {
                        Some((e.status, "application/json", e.body()))
                    } else {
                        routed = Some(choose_workers(
                            &shard.selector,
                            &b.head,
                            head_bytes,
                            Some(&fields),
                            token_text.as_deref(),
                        ));
                        // Both legs are chosen from the same routing key.
                        if let Some(pd) =
                            shard.pd.as_ref().filter(|pd| pd.wants_prefill(p, &fields))
                        {
                            let c = choose_workers(
                                &pd.selector,
                                &b.head,
                                head_bytes,
                                Some(&fields),
                                token_text.as_deref(),
                            );
                            prefill = Some((pd.prefill.borrow().clone(), c));
                        }
                        None
                    }
                }
                // A gRPC fleet's client gets the refusal vLLM's own server would give.
                Err(_) if grpc_model(shard, &set).is_some() && grpc::serves(p) => {
                    match grpc::prepare(shard, b, body) {
                        Err(e) => Some((e.status, "application/json", e.body())),
                        Ok(_) => Some((
                            400,
                            "application/json",
                            ApiError::bad_request("request body is not valid JSON").body(),
                        )),
                    }
                }
                Err(e) => Some((400, "application/json", ApiError::bad_request(e.0).body())),
            }
        }
        // Everything else goes to a worker, `/version` included: clients read vLLM's version
        // through the router, as through vllm-router.
        _ => None,
    };
    if let Some((status, ctype, payload)) = local {
        b.rec.status = status;
        if status == 400 && routed.is_none() && is_json_route(path) {
            // The body was refused: the router's own error.
            b.rec.router_error = true;
        } else {
            b.rec.skip = true;
        }
        b.out.clear();
        write_simple(
            &mut b.out,
            status,
            ctype,
            &payload,
            Some(&b.rid),
            close,
            head_only,
        );
        return Handled::Done(if flush_out(wr, b).await {
            Next::KeepAlive
        } else {
            Next::Close
        });
    }
    if set.is_empty() {
        respond_error(wr, b, &ApiError::new(503, "no worker is available"), close).await;
        return Handled::Done(Next::KeepAlive);
    }
    let candidates = match routed {
        Some(c) => c,
        None => choose_workers(
            &shard.selector,
            &b.head,
            &b.inbuf[s..s + b.head.len],
            None,
            None,
        ),
    };
    let permit = match shard.admission.acquire().await {
        Ok(p) => p,
        Err(e) => {
            return Handled::Done(if respond_error(wr, b, &e, close).await {
                Next::KeepAlive
            } else {
                Next::Close
            });
        }
    };
    match proxy(shard, rd, wr, b, body, &set, candidates, prefill, prepared).await {
        Handled::Relay(mut relay) => {
            // Held until the response's last byte.
            relay.permit = Some(permit);
            Handled::Relay(relay)
        }
        done => done,
    }
}

/// The model, when every worker in `set` is a gRPC worker (then the router answers what
/// vLLM's HTTP server would).
fn grpc_model<'s>(shard: &'s Shard, set: &WorkerSet) -> Option<&'s crate::config::Model> {
    // An HTTP fleet has no model: nothing to look at per request.
    let model = shard.cfg.model.as_ref()?;
    let all_grpc = !set.is_empty()
        && set
            .iter()
            .all(|w| w.protocol == crate::route::Protocol::Grpc);
    all_grpc.then_some(model)
}

/// Health probes and the version stay open to anyone; everything else needs the key.
fn needs_client_auth(path: &[u8]) -> bool {
    !matches!(
        path,
        b"/health" | b"/readiness" | b"/liveness" | b"/version"
    )
}

/// `Authorization: Bearer <key>` with one of the configured keys, compared in constant
/// time.
fn client_authorized(shard: &Shard, head: &RequestHead, head_bytes: &[u8]) -> bool {
    let Some(v) = head.header(head_bytes, b"authorization") else {
        return false;
    };
    let Some(key) = v
        .strip_prefix(b"Bearer ")
        .or_else(|| v.strip_prefix(b"bearer "))
    else {
        return false;
    };
    let mut ok = false;
    for k in &shard.cfg.client_api_keys {
        ok |= constant_time_eq(key, k.as_bytes());
    }
    ok
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Hands an admin API request to the control plane and waits for its answer.
async fn admin_call(
    shard: &Shard,
    method: Method,
    path: &[u8],
    query: &[u8],
    b: &Buffers,
    body: &Body,
) -> (u16, &'static str, Vec<u8>) {
    let Some(tx) = shard.cfg.admin.as_ref() else {
        let e = ApiError::new(503, "the worker admin API is not available");
        return (503, "application/json", e.body());
    };
    let method = match method {
        Method::Get | Method::Head => "GET",
        Method::Post => "POST",
        Method::Delete => "DELETE",
        Method::Other => {
            let e = ApiError::new(405, "method not allowed on the worker admin API");
            return (405, "application/json", e.body());
        }
    };
    let s = b.start;
    let bytes = match body {
        Body::Inline(n) => b.inbuf[s + b.head.len..s + b.head.len + n].to_vec(),
        Body::Decoded { .. } => b.decoded.clone(),
        Body::Leg => b.leg.clone(),
    };
    let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
    let call = AdminCall {
        method,
        path: String::from_utf8_lossy(path).into_owned(),
        query: String::from_utf8_lossy(query).into_owned(),
        body: bytes,
        reply: reply_tx,
    };
    if tx.send(call).is_err() {
        let e = ApiError::new(503, "the control plane is not running");
        return (503, "application/json", e.body());
    }
    // Polled, not awaited: the control thread would wake this shard's task from another
    // thread, which monoio (without its `sync` feature) does not allow. Admin calls are
    // rare; a millisecond's poll costs nothing.
    let mut reply_rx = reply_rx;
    loop {
        match reply_rx.try_recv() {
            Ok(r) => return (r.status, r.content_type, r.body),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {
                shard.timers.at(Instant::now() + ADMIN_POLL).await
            }
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                let e = ApiError::new(503, "the control plane did not answer");
                return (503, "application/json", e.body());
            }
        }
    }
}

/// How often a shard looks for the control plane's answer to an admin call.
const ADMIN_POLL: std::time::Duration = std::time::Duration::from_millis(1);

/// The policy's candidates for this request, from its session key (headers first, then
/// body fields) and routing text, as far as the policy reads them.
fn choose_workers(
    selector: &RefCell<Selector>,
    head: &RequestHead,
    head_bytes: &[u8],
    fields: Option<&crate::body::RequestFields<'_>>,
    tokens: Option<&[u8]>,
) -> Candidates {
    let mut selector = selector.borrow_mut();
    let policy = selector.policy();
    let mut segments: Vec<&[u8]> = Vec::new();
    let mut session_key = None;
    if policy == crate::route::Policy::ConsistentHash {
        session_key = SESSION_HEADERS
            .iter()
            .find_map(|h| head.header(head_bytes, h).filter(|v| !v.is_empty()))
            .or_else(|| fields.and_then(body_session_key));
    }
    if policy.reads_text() && session_key.is_none() {
        if let Some(t) = tokens {
            segments.push(t);
        } else if let Some(f) = fields {
            routing_text(f, &mut segments);
        }
    }
    selector.candidates(&RouteInput {
        session_key,
        text: &segments,
    })
}

/// Why waiting on a worker stopped early.
enum Interrupt {
    ClientGone,
    /// `--request-timeout-secs` passed.
    TimedOut,
    /// The worker sent nothing mid-response for the stream idle timeout.
    Idle,
}

/// The client's socket, watched while a worker has the request, and the deadlines: the
/// request's, and once the response streams, the idle one. One timer serves both: it is
/// set to the nearer, and when it fires after progress it is moved on rather than
/// obeyed, so a busy stream costs no timer operation per read.
struct Watch<'a> {
    /// The read on the client's socket. Boxed, so the watch can move: a response is relayed
    /// from the top of the connection's task, after the phases that set it up returned.
    read: Pin<Box<ClientRead<'a>>>,
    /// Ends the read when the exchange is over (`settle`).
    canceller: Option<Canceller>,
    state: WatchState,
    deadline: Timer<'a>,
    request_deadline: Instant,
    /// Set while the response body streams.
    idle: Option<std::time::Duration>,
    /// Reads from the worker so far, and as of when the timer was last set.
    progress: u64,
    progress_at_arm: u64,
}

enum WatchState {
    Pending,
    /// The client sent more bytes (a pipelined request); it is alive.
    Data(Vec<u8>),
    Gone,
}

impl<'a> Watch<'a> {
    /// Runs `f` unless the client leaves or the deadline passes first.
    fn guard<F: Future>(&mut self, f: F) -> Guarded<'_, 'a, F> {
        Guarded { watch: self, f }
    }

    /// The exchange is over: whatever the client sent meanwhile (a pipelined request) is
    /// kept for the next request, and the read is ended.
    async fn settle(&mut self, b: &mut Buffers, next: Next) -> Next {
        let pipelined = match std::mem::replace(&mut self.state, WatchState::Gone) {
            WatchState::Pending => {
                if let Some(c) = self.canceller.take() {
                    let _ = c.cancel();
                }
                let (res, buf) = self.read.as_mut().await;
                match res {
                    Ok(n) if n > 0 => Some(buf),
                    Ok(_) => {
                        // EOF raced with the cancel: the client is gone.
                        return Next::Close;
                    }
                    Err(_) => {
                        b.watch = buf;
                        None
                    }
                }
            }
            WatchState::Data(buf) => Some(buf),
            WatchState::Gone => return Next::Close,
        };
        if let Some(buf) = pipelined {
            b.inbuf.extend_from_slice(&buf);
            b.watch = buf;
        }
        next
    }

    /// From now on, a worker silent for `idle` is cut.
    fn start_idle_timer(&mut self, idle: std::time::Duration) {
        self.idle = Some(idle);
        self.progress_at_arm = self.progress;
        let next = (Instant::now() + idle).min(self.request_deadline);
        self.deadline.reset(next);
    }
}

/// `f` under the watch (`Watch::guard`). A future of its own rather than an `async fn`,
/// which would hold `f` twice (as its argument and pinned), in every state that waits on
/// a worker, for every open request.
struct Guarded<'w, 'a, F> {
    watch: &'w mut Watch<'a>,
    f: F,
}

impl<F: Future> Future for Guarded<'_, '_, F> {
    type Output = Result<F::Output, Interrupt>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        // SAFETY: `f` is never moved out of the pinned struct; `watch` is a reference.
        let this = unsafe { self.get_unchecked_mut() };
        let watch = &mut *this.watch;
        if let WatchState::Gone = watch.state {
            return Poll::Ready(Err(Interrupt::ClientGone));
        }
        if let Poll::Ready(v) = unsafe { Pin::new_unchecked(&mut this.f) }.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        if let WatchState::Pending = watch.state {
            if let Poll::Ready((res, buf)) = watch.read.as_mut().poll(cx) {
                match res {
                    Ok(n) if n > 0 => watch.state = WatchState::Data(buf),
                    _ => {
                        watch.state = WatchState::Gone;
                        return Poll::Ready(Err(Interrupt::ClientGone));
                    }
                }
            }
        }
        while Pin::new(&mut watch.deadline).poll(cx).is_ready() {
            let now = Instant::now();
            if now >= watch.request_deadline {
                return Poll::Ready(Err(Interrupt::TimedOut));
            }
            match watch.idle {
                Some(idle) if watch.progress != watch.progress_at_arm => {
                    watch.progress_at_arm = watch.progress;
                    let next = (now + idle).min(watch.request_deadline);
                    watch.deadline.reset(next);
                }
                Some(_) => return Poll::Ready(Err(Interrupt::Idle)),
                None => return Poll::Ready(Err(Interrupt::TimedOut)),
            }
        }
        Poll::Pending
    }
}

/// Phase 4 around the client watch: the exchange with a worker (in P/D mode, the prefill
/// leg's first). A response to relay leaves with the watch (`Handled::Relay`); otherwise
/// whatever the watch read is kept for the next request.
#[allow(clippy::too_many_arguments)]
async fn proxy<'a>(
    shard: &'a Shard,
    rd: &'a mut ClientRd,
    wr: &mut ClientWr,
    b: &mut Buffers,
    body: &Body,
    set: &WorkerSet,
    candidates: Candidates,
    prefill: Option<(Rc<WorkerSet>, Candidates)>,
    prepared: Option<Box<grpc::Prepared>>,
) -> Handled<'a> {
    let canceller = Canceller::new();
    let mut watch_buf = std::mem::take(&mut b.watch);
    watch_buf.clear();
    if watch_buf.capacity() < WATCH {
        watch_buf.reserve(WATCH);
    }
    let read: Pin<Box<ClientRead<'_>>> =
        Box::pin(rd.cancelable_read(watch_buf, canceller.handle()));
    let request_deadline = Instant::now() + shard.cfg.request_timeout;
    let deadline = shard.timers.at(request_deadline);
    let mut watch = Watch {
        read,
        canceller: Some(canceller),
        state: WatchState::Pending,
        deadline,
        request_deadline,
        idle: None,
        progress: 0,
        progress_at_arm: 0,
    };
    let next = match prefill {
        None => exchange(shard, &mut watch, wr, b, body, set, candidates, prepared).await,
        Some((prefill_set, prefill_candidates)) if prepared.is_some() => {
            Box::pin(grpc_pd::exchange_pd(
                shard,
                &mut watch,
                wr,
                b,
                body,
                (&prefill_set, prefill_candidates),
                (set, candidates),
                prepared.expect("guarded"),
            ))
            .await
        }
        // Boxed: two legs take more state than one, and the task's size is its largest
        // path's, which every connection would otherwise carry.
        Some((prefill_set, prefill_candidates)) => {
            Box::pin(disagg::exchange_pd(
                shard,
                &mut watch,
                wr,
                b,
                body,
                (&prefill_set, prefill_candidates),
                (set, candidates),
            ))
            .await
        }
    };
    match next {
        Answer::Done(next) => Handled::Done(watch.settle(b, next).await),
        Answer::Relay(response) => Handled::Relay(Box::new(Relay {
            watch,
            response,
            permit: None,
            keep_alive: false,
        })),
    }
}

/// A new connection to a worker (the pool had none idle).
async fn connect(shard: &Shard, worker: &Worker) -> std::io::Result<TcpStream> {
    let addr = worker.addr;
    let deadline = Instant::now() + shard.cfg.connect_timeout;
    let s = match shard
        .timers
        .timeout_at(deadline, TcpStream::connect(addr))
        .await
    {
        Ok(r) => r?,
        Err(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ))
        }
    };
    let _ = s.set_nodelay(true);
    shard.pool.borrow_mut().opened += 1;
    Ok(s)
}

/// Shuts a worker connection down now, even with an operation in flight on it (closing the
/// fd would wait for that operation), so the worker sees the abort immediately.
fn abort_upstream(up: &TcpStream) {
    unsafe {
        libc::shutdown(up.as_raw_fd(), libc::SHUT_RDWR);
    }
}

/// A request counted in its worker's load on the board while this lives.
struct InFlight<'a> {
    board: &'a LoadBoard,
    shard: usize,
    worker: usize,
}

impl<'a> InFlight<'a> {
    fn start(shard: &'a Shard, worker: usize) -> Self {
        shard.board.started(shard.id, worker);
        InFlight {
            board: &shard.board,
            shard: shard.id,
            worker,
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.board.finished(self.shard, self.worker);
    }
}

/// What happened on one attempt to get a response head from a worker.
enum Attempt {
    /// The worker's head; whether the router asked for its load report.
    Head(TcpStream, ResponseHead, bool),
    /// Nothing reached the client: try again, on the same worker with a fresh connection
    /// when only a pooled connection was stale (not the worker's fault), else on another.
    Retry { error: String, same_worker: bool },
    /// Answered to the client, or the client is gone.
    Done(Next),
}

/// Candidates that were passively down when their turn came: tried after all others.
#[derive(Default)]
struct Deferred {
    positions: [u32; 8],
    n: u8,
    replayed: u8,
}

/// The worker for a retry: the next in the policy's order; when every worker has had its
/// turn, a new round in the same order (after a backoff), so a single worker or a fleet
/// answering 503 for a moment still gets `--retry-max-retries` attempts.
fn retry_worker<'s>(
    shard: &Shard,
    set: &'s WorkerSet,
    candidates: &mut Candidates,
    order: &Candidates,
    deferred: &mut Deferred,
    backoff: &mut bool,
) -> Option<(&'s Arc<Worker>, bool)> {
    if let Some(w) = next_worker(shard, set, candidates, deferred) {
        return Some(w);
    }
    *candidates = order.clone();
    *deferred = Deferred::default();
    *backoff = true;
    next_worker(shard, set, candidates, deferred)
}

/// The next worker to try: the policy's order, skipping workers whose breaker is open
/// (half-open ones let one probe through) and deferring those passively marked down.
fn next_worker<'s>(
    shard: &Shard,
    set: &'s WorkerSet,
    candidates: &mut Candidates,
    deferred: &mut Deferred,
) -> Option<(&'s Arc<Worker>, bool)> {
    loop {
        let pos = match candidates.next() {
            Some(p) if !shard.board.is_usable(set.get(p).slot) && deferred.n < 8 => {
                deferred.positions[deferred.n as usize] = p as u32;
                deferred.n += 1;
                continue;
            }
            Some(p) => p,
            None if deferred.replayed < deferred.n => {
                deferred.replayed += 1;
                deferred.positions[deferred.replayed as usize - 1] as usize
            }
            None => return None,
        };
        let w = set.get(pos);
        match shard.breakers.admit(w.slot, &w.url) {
            Admit::Yes => return Some((w, false)),
            Admit::Probe => return Some((w, true)),
            Admit::No => continue,
        }
    }
}

/// An attempt's verdict for its worker's breaker; a probe that ends without one (the
/// client left) lets the next probe go.
struct Outcome<'a> {
    breakers: &'a Breakers,
    metrics: &'a ShardMetrics,
    worker: &'a Worker,
    probe: bool,
    reported: bool,
    leg: Leg,
}

impl<'a> Outcome<'a> {
    fn new(shard: &'a Shard, worker: &'a Worker, probe: bool, leg: Leg) -> Self {
        Outcome {
            breakers: &shard.breakers,
            metrics: &shard.metrics,
            worker,
            probe,
            reported: false,
            leg,
        }
    }

    fn success(&mut self) {
        if !self.reported {
            self.reported = true;
            self.metrics
                .worker(self.worker.slot, WorkerCount::CbSuccess)
                .inc();
            self.breakers
                .success(self.worker.slot, self.probe, &self.worker.url);
        }
    }

    fn failure(&mut self) {
        if !self.reported {
            self.reported = true;
            let slot = self.worker.slot;
            self.metrics.worker(slot, WorkerCount::CbFailure).inc();
            match self.leg {
                Leg::Prefill => self
                    .metrics
                    .worker(slot, WorkerCount::PdPrefillErrors)
                    .inc(),
                Leg::Decode => self.metrics.worker(slot, WorkerCount::PdDecodeErrors).inc(),
                Leg::Plain => {}
            }
            self.breakers.failure(slot, self.probe, &self.worker.url);
        }
    }
}

/// Counts an attempt on `worker` in the current leg: the policy's first choice, the
/// P/D leg's requests, retries.
fn count_attempt(shard: &Shard, b: &mut Buffers, worker: &Worker) {
    let rec = &mut b.rec;
    rec.attempts += 1;
    if rec.attempts == 1 {
        shard
            .metrics
            .worker(worker.slot, WorkerCount::Decisions)
            .inc();
    } else {
        rec.retries += 1;
    }
    match rec.leg {
        Leg::Prefill => shard
            .metrics
            .worker(worker.slot, WorkerCount::PdPrefill)
            .inc(),
        Leg::Decode => shard
            .metrics
            .worker(worker.slot, WorkerCount::PdDecode)
            .inc(),
        Leg::Plain => {}
    }
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        if self.probe && !self.reported {
            self.breakers.release_probe(self.worker.slot);
        }
    }
}

/// Phase 4: the request to a worker, then phase 5. A failure before any response byte
/// reached the client (connect error, reset before the head, or a retryable status) is
/// tried again on the policy's next worker, up to `--retry-max-retries` attempts in all;
/// after a retryable status the next attempt waits the backoff first. The last attempt's
/// answer, whatever it is, goes to the client.
#[allow(clippy::too_many_arguments)]
async fn exchange<'s>(
    shard: &'s Shard,
    watch: &mut Watch<'_>,
    wr: &mut ClientWr,
    b: &mut Buffers,
    body: &Body,
    set: &WorkerSet,
    mut candidates: Candidates,
    mut prepared: Option<Box<grpc::Prepared>>,
) -> Answer<'s> {
    let close = !b.head.keep_alive;
    let retry = &shard.cfg.retry;
    let mut last_error = String::new();
    let mut deferred = Deferred::default();
    let mut attempts = 0u32;
    let mut backoff = false;
    let order = candidates.clone();
    b.rec.attempts = 0;
    // A path gRPC workers do not serve, answered so if no HTTP worker serves it either.
    // Boxed: rare, and the exchange's state is held by every request waiting for a head.
    let mut not_served: Option<Box<frontend::openai::OpenAiError>> = None;
    // The status a client gets when every attempt failed (a gRPC engine's UNAVAILABLE: 503).
    let mut last_status = 502;
    let mut next = next_worker(shard, set, &mut candidates, &mut deferred);
    if next.is_none() && !set.is_empty() {
        // Every breaker open. As Envoy does below its panic threshold, route as if none
        // were: a fleet whose breakers all tripped on a burst of bad requests (or on
        // workers since restarted) keeps serving instead of answering 503 for a minute.
        if !shard.panic_routing.replace(true) {
            tracing::warn!(
                shard = shard.id,
                "every worker's circuit breaker is open: routing to them anyway"
            );
        }
        next = order.clone().next().map(|p| (set.get(p), false));
    } else if next.is_some() && shard.panic_routing.get() {
        shard.panic_routing.set(false);
        tracing::info!(
            shard = shard.id,
            "a circuit breaker closed: normal routing again"
        );
    }
    while let Some((worker, probe)) = next.take() {
        attempts += 1;
        count_attempt(shard, b, worker);
        let mut outcome = Outcome::new(shard, worker, probe, b.rec.leg);
        if backoff {
            let wait = retry.backoff(attempts - 1, fastrand::f64());
            if let Err(i) = watch.guard(shard.timers.at(Instant::now() + wait)).await {
                return Answer::Done(Box::pin(interrupted(wr, b, i, close)).await);
            }
        }
        // Counted in the worker's load from the moment it is chosen until its response
        // ended (a stream's last byte), on whichever path this attempt leaves.
        let in_flight = InFlight::start(shard, worker.slot);
        if worker.protocol == crate::route::Protocol::Grpc {
            // Boxed, as the HTTP attempt: only gRPC requests carry its state.
            match Box::pin(grpc::attempt(
                shard,
                watch,
                wr,
                b,
                body,
                worker,
                &mut prepared,
            ))
            .await
            {
                grpc::GrpcAttempt::Retry { error, status } => {
                    tracing::debug!(worker = %worker.url, %error, "retrying on another worker");
                    last_error = error;
                    last_status = status;
                    outcome.failure();
                    backoff = false;
                }
                grpc::GrpcAttempt::NotServed(e) => {
                    // Not the worker's failure: an HTTP worker may serve it.
                    last_error = e.message.clone();
                    not_served = Some(Box::new(e));
                    backoff = false;
                }
                grpc::GrpcAttempt::Done {
                    next,
                    worker_failed,
                } => {
                    if worker_failed {
                        outcome.failure();
                    } else if !b.rec.client_gone {
                        outcome.success();
                    }
                    return Answer::Done(next);
                }
            }
        } else {
            loop {
                // Written out here and in the P/D prefill leg rather than as an `async fn`,
                // which would hold its arguments twice while the head is awaited.
                let got = match Box::pin(send_request(shard, watch, wr, b, body, worker)).await {
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
                                tracing::debug!(worker = %worker.url, status, "retrying on another worker");
                                last_error = format!("{} answered {status}", worker.url);
                                // Its answer is discarded with the connection.
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
                        let how = ClientHead {
                            close,
                            dechunk: false,
                            strip_load_report: asked_load,
                        };
                        return Answer::Relay(Response {
                            worker: worker.clone(),
                            up,
                            head,
                            how,
                            _in_flight: in_flight,
                        });
                    }
                    Attempt::Retry { error, same_worker } => {
                        if same_worker {
                            // A pooled connection the worker had closed: a fresh one, same worker.
                            continue;
                        }
                        tracing::debug!(worker = %worker.url, %error, "retrying on another worker");
                        last_error = error;
                        last_status = 502;
                        outcome.failure();
                        backoff = false;
                        break;
                    }
                    Attempt::Done(next) => return Answer::Done(next),
                }
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
    if let Some(e) = not_served {
        return Answer::Done(grpc::respond_openai_error(wr, b, &e).await);
    }
    let e = if attempts == 0 {
        ApiError::new(503, "no worker is available")
    } else {
        b.rec.exhausted = true;
        ApiError::new(
            last_status,
            format!("no worker could take the request ({attempts} attempts): {last_error}"),
        )
    };
    respond_error(wr, b, &e, close).await;
    Answer::Done(Next::KeepAlive)
}

/// How sending the request to a worker went. Phase 4 on one worker is `send_request`, then
/// `await_head`. Sending (a connect, perhaps, and the writes) takes the larger state and is
/// boxed; the wait for the head, which lasts as long as the worker's queue and prefill
/// (for thousands of requests at once in a burst), keeps only its own smaller state, in
/// the connection's task.
enum Sent {
    /// On its way: `up` carries it (a pooled connection when `reused`).
    Sent {
        up: TcpStream,
        reused: bool,
        asked_load: bool,
    },
    /// Not sent: retry, or the client was answered.
    Not(Attempt),
}

async fn send_request(
    shard: &Shard,
    watch: &mut Watch<'_>,
    wr: &mut ClientWr,
    b: &mut Buffers,
    body: &Body,
    w: &Worker,
) -> Sent {
    let close = !b.head.keep_alive;
    let pooled = shard.pool.borrow_mut().take(w.slot, w.addr);
    let (mut up, reused) = match pooled {
        Some(s) => (s, true),
        // Boxed: a connect (with its timer) is the largest state here and the rarest.
        None => match watch.guard(Box::pin(connect(shard, w))).await {
            Ok(Ok(s)) => (s, false),
            Ok(Err(e)) => {
                if shard.board.mark_down(w.slot, PASSIVE_DOWN) {
                    tracing::warn!(worker = %w.url, error = %e, "worker refused a connection; routing around it for {PASSIVE_DOWN:?}");
                }
                return Sent::Not(Attempt::Retry {
                    error: format!("connect to {}: {e}", w.url),
                    same_worker: false,
                });
            }
            Err(i) => {
                return Sent::Not(Attempt::Done(Box::pin(interrupted(wr, b, i, close)).await))
            }
        },
    };

    // The upstream request: head, then the body (in the same write when small).
    let fd = up.as_raw_fd();
    let s = b.start;
    let head_len = b.head.len;
    let body_len = match body {
        Body::Inline(n) => *n,
        Body::Decoded { .. } => b.decoded.len(),
        Body::Leg => b.leg.len(),
    };
    b.out.clear();
    // One allocation for the head and a coalesced body (not a run of doublings).
    b.out.reserve(
        head_len
            + 256
            + if body_len <= COALESCE_BODY {
                body_len
            } else {
                0
            },
    );
    let asked_load = write_upstream_head(
        &mut b.out,
        &b.inbuf[s..s + head_len],
        &b.head,
        &w.authority,
        &b.rid,
        body_len,
        &UpstreamHeadOpts {
            ask_load: shard.asks_for_load,
            authorization: shard.upstream_auth.as_deref(),
            dp_rank: w.dp_rank,
        },
    );
    let coalesce = body_len <= COALESCE_BODY;
    if coalesce {
        match body {
            Body::Inline(_) => b
                .out
                .extend_from_slice(&b.inbuf[s + head_len..s + head_len + body_len]),
            Body::Decoded { .. } => b.out.extend_from_slice(&b.decoded),
            Body::Leg => b.out.extend_from_slice(&b.leg),
        }
    }
    // A stream's request leaves at once (its TTFT is what the client watches); others
    // batch with the shard's writes, which costs less CPU at high rates.
    let out = std::mem::take(&mut b.out);
    let sent = if b.rec.streamed {
        watch.guard(send::send_now(&mut up, fd, out)).await
    } else {
        watch.guard(up.write_all(out)).await
    };
    let sent = match sent {
        Ok((res, out)) => {
            b.out = out;
            res
        }
        Err(i) => {
            abort_upstream(&up);
            return Sent::Not(Attempt::Done(Box::pin(interrupted(wr, b, i, close)).await));
        }
    };
    let sent = match sent {
        Ok(_) if !coalesce && body_len > 0 => {
            let (buf, range) = match body {
                Body::Inline(_) => (
                    std::mem::take(&mut b.inbuf),
                    s + head_len..s + head_len + body_len,
                ),
                Body::Decoded { .. } => (std::mem::take(&mut b.decoded), 0..body_len),
                Body::Leg => (std::mem::take(&mut b.leg), 0..body_len),
            };
            match watch.guard(up.write_all(buf.slice(range))).await {
                Ok((res, slice)) => {
                    match body {
                        Body::Inline(_) => b.inbuf = slice.into_inner(),
                        Body::Decoded { .. } => b.decoded = slice.into_inner(),
                        Body::Leg => b.leg = slice.into_inner(),
                    }
                    res
                }
                Err(i) => {
                    abort_upstream(&up);
                    return Sent::Not(Attempt::Done(Box::pin(interrupted(wr, b, i, true)).await));
                }
            }
        }
        other => other,
    };
    // The request is with the worker: its copy in `out` is not kept while we wait.
    b.out = Vec::new();
    if let Err(e) = sent {
        abort_upstream(&up);
        // Nothing was read back, so the worker did not act on a partial request.
        return Sent::Not(Attempt::Retry {
            error: format!("write to {}: {e}", w.url),
            same_worker: reused,
        });
    }
    b.rec.sent = now_ns();
    Sent::Sent {
        up,
        reused,
        asked_load,
    }
}

/// Counts a request in its shard's `heads_waiting` while it waits for a head.
struct HeadWait<'a>(&'a Shard);

impl<'a> HeadWait<'a> {
    fn start(shard: &'a Shard) -> Self {
        shard.heads_waiting.set(shard.heads_waiting.get() + 1);
        HeadWait(shard)
    }
}

impl Drop for HeadWait<'_> {
    fn drop(&mut self) {
        self.0.heads_waiting.set(self.0.heads_waiting.get() - 1);
    }
}

/// The worker's response head, after any interim (1xx) ones.
///
/// A shard with many requests waiting for response heads (more than
/// `cfg.head_wait_poll_above`) has each wait for readiness before it takes a buffer. An
/// io_uring read owns its buffer from the moment it is posted, so every waiting request
/// would hold 1 KiB for as long as its worker queues and generates (a non-streamed answer's
/// head comes with its last token); with thousands waiting, that is megabytes the process
/// then keeps. A poll and a `recv()` cost more CPU than one read (6–11% more per
/// non-streamed request, measured on the client side: see recv.rs), so a shard pays them
/// only when that many wait.
#[allow(clippy::too_many_arguments)]
async fn await_head(
    shard: &Shard,
    watch: &mut Watch<'_>,
    wr: &mut ClientWr,
    b: &mut Buffers,
    w: &Worker,
    mut up: TcpStream,
    reused: bool,
    asked_load: bool,
) -> Attempt {
    let close = !b.head.keep_alive;

    // The response head.
    b.upbuf.clear();
    let is_head = b.head.method() == Method::Head;
    let _waiting = HeadWait::start(shard);
    let mut unbuffered = false;
    loop {
        match ResponseHead::parse(&b.upbuf, is_head) {
            Ok(Some(head)) if (100..200).contains(&head.status) && head.status != 101 => {
                // An interim response (100 Continue): drop it, the real head follows.
                b.upbuf.drain(..head.len);
                continue;
            }
            Ok(Some(head)) => {
                b.rec.upstream_head = now_ns();
                shard.board.mark_up(w.slot);
                if let Some((waiting, kv)) = head.load_report {
                    if let Some(n) = waiting {
                        shard.board.set_waiting(w.slot, n);
                    }
                    if let Some(u) = kv {
                        shard.board.set_kv_usage(w.slot, u);
                    }
                }
                return Attempt::Head(up, head, asked_load);
            }
            Ok(None) if b.upbuf.len() >= MAX_RESPONSE_HEAD => {
                abort_upstream(&up);
                return Box::pin(bad_gateway(wr, b, "worker response head too large", close)).await;
            }
            Ok(None) => {}
            Err(e) => {
                abort_upstream(&up);
                let msg = format!("malformed worker response: {e:?}");
                return Box::pin(bad_gateway(wr, b, &msg, close)).await;
            }
        }
        let crowded = shard.heads_waiting.get() > shard.cfg.head_wait_poll_above;
        let got = if crowded && b.upbuf.capacity() < UPBUF {
            // A crowded shard: wait for the answer holding no buffer, then take it at its
            // size (`recv`).
            if !unbuffered {
                unbuffered = true;
                shard.metrics.unbuffered_head_waits.inc();
            }
            match watch.guard(up.readable(false)).await {
                Ok(Ok(())) => match recv::recv_now(up.as_raw_fd(), &mut b.upbuf) {
                    Err(e)
                        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) =>
                    {
                        continue
                    }
                    got => Ok(got),
                },
                Ok(Err(e)) => Ok(Err(e)),
                Err(i) => Err(i),
            }
        } else {
            if b.upbuf.capacity() - b.upbuf.len() < 1024 {
                b.upbuf.reserve(b.upbuf.capacity().max(UPBUF));
            }
            let buf = std::mem::take(&mut b.upbuf);
            let len = buf.len();
            watch
                .guard(up.read(buf.slice_mut(len..)))
                .await
                .map(|(res, slice)| {
                    b.upbuf = slice.into_inner();
                    res
                })
        };
        match got {
            Ok(res) => {
                match res {
                    Ok(n) if n > 0 => {}
                    Ok(_) | Err(_) if reused && b.upbuf.is_empty() => {
                        // The worker closed an idle connection as we reused it.
                        return Attempt::Retry {
                            error: format!("{} closed a pooled connection", w.url),
                            same_worker: true,
                        };
                    }
                    // Reset or closed before answering: another worker may.
                    Ok(_) => {
                        return Attempt::Retry {
                            error: format!("{} closed the connection before responding", w.url),
                            same_worker: false,
                        }
                    }
                    Err(e) => {
                        return Attempt::Retry {
                            error: format!("reading from {}: {e}", w.url),
                            same_worker: false,
                        }
                    }
                }
            }
            Err(i) => {
                abort_upstream(&up);
                return Attempt::Done(Box::pin(interrupted(wr, b, i, close)).await);
            }
        }
    }
}

async fn bad_gateway(wr: &mut ClientWr, b: &mut Buffers, msg: &str, close: bool) -> Attempt {
    let e = ApiError::new(502, msg);
    Attempt::Done(if respond_error(wr, b, &e, close).await {
        Next::KeepAlive
    } else {
        Next::Close
    })
}

/// Before any response byte went to the client: a timeout is a 504; a client that left
/// gets nothing. Callers await it boxed, as `bad_gateway`: writing an answer is the largest
/// state of the phases that wait on a worker, and the rarest, and every request waiting
/// for its head would otherwise carry room for it.
async fn interrupted(wr: &mut ClientWr, b: &mut Buffers, i: Interrupt, close: bool) -> Next {
    match i {
        Interrupt::ClientGone => {
            b.rec.client_gone = true;
            Next::Close
        }
        Interrupt::TimedOut | Interrupt::Idle => {
            let e = ApiError::new(
                504,
                "the worker did not answer within --request-timeout-secs",
            );
            respond_error(wr, b, &e, close).await;
            Next::Close
        }
    }
}

/// Once the response head is out, the request's bytes are no longer needed (no retry can
/// follow): drop them, keeping only what the client pipelined, and give back large buffers,
/// so that a long stream holds as little memory as possible.
fn release_request(b: &mut Buffers) {
    if b.request_end > 0 {
        b.inbuf.drain(..b.request_end.min(b.inbuf.len()));
        b.start = 0;
        b.request_end = 0;
    }
    if b.inbuf.is_empty() {
        b.inbuf = Vec::new();
    }
    b.out = Vec::new();
    if b.decoded.capacity() > 0 {
        b.decoded = Vec::new();
    }
    if b.leg.capacity() > 0 {
        b.leg = Vec::new();
    }
}

/// How much of the body is still to come.
enum BodyLeft {
    Done,
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
}

impl BodyLeft {
    /// Consumes what of `bytes` belongs to the body; returns that count. With `payload`,
    /// a chunked body's payload (framing removed) is appended there.
    fn take(&mut self, bytes: &[u8], payload: Option<&mut Vec<u8>>) -> Result<usize, ()> {
        match self {
            BodyLeft::Done => Ok(0),
            BodyLeft::Length(left) => {
                let n = (*left).min(bytes.len() as u64);
                *left -= n;
                if *left == 0 {
                    *self = BodyLeft::Done;
                }
                Ok(n as usize)
            }
            BodyLeft::Chunked(d) => {
                let n = d.feed(bytes, payload).map_err(|_| ())?;
                if d.is_done() {
                    *self = BodyLeft::Done;
                }
                Ok(n)
            }
            BodyLeft::UntilClose => Ok(bytes.len()),
        }
    }
}

/// Phase 5: the head to the client, then body bytes as they arrive, unmodified.
#[allow(clippy::too_many_arguments)]
async fn relay_body(
    shard: &Shard,
    watch: &mut Watch<'_>,
    wr: &mut ClientWr,
    b: &mut Buffers,
    r: &mut Response<'_>,
) -> (Next, bool) {
    let Response {
        worker,
        up,
        head,
        how,
        ..
    } = r;
    let worker: &Worker = worker;
    let head: &ResponseHead = head;
    let mut how = *how;
    let mut left = match head.framing {
        ResponseFraming::None => BodyLeft::Done,
        ResponseFraming::Length(0) => BodyLeft::Done,
        ResponseFraming::Length(n) => BodyLeft::Length(n),
        ResponseFraming::Chunked => BodyLeft::Chunked(ChunkedDecoder::new()),
        ResponseFraming::UntilClose => BodyLeft::UntilClose,
    };
    let mut reusable = head.reusable;
    // An HTTP/1.0 client cannot read chunked framing: it gets the payload, delimited by
    // the connection closing.
    let dechunk = b.head.minor_version == 0 && head.framing == ResponseFraming::Chunked;
    how.dechunk = dechunk;
    how.close |= dechunk;
    let close_client = how.close;
    b.rec.status = head.status;
    b.rec.router_error = false;
    b.rec.worker = Some(worker.slot);
    shard
        .metrics
        .worker(worker.slot, WorkerCount::Processed)
        .inc();
    b.out.clear();
    b.out.reserve(head.len + 64 + b.rid.len());
    write_client_head(&mut b.out, &b.upbuf, head, &b.rid, how);
    let early = &b.upbuf[head.len..];
    let payload = if dechunk { Some(&mut b.out) } else { None };
    let Ok(n) = left.take(early, payload) else {
        abort_upstream(up);
        return (Next::Close, false);
    };
    if n < early.len() {
        reusable = false;
    }
    if !dechunk {
        b.out.extend_from_slice(&early[..n]);
    }
    let body_bytes = n > 0;
    if !flush_out(wr, b).await {
        abort_upstream(up);
        b.rec.client_gone = true;
        return (Next::Close, false);
    }
    let now = now_ns();
    b.rec.client_head = now;
    if body_bytes {
        b.rec.first_body = now;
    }
    release_request(b);
    if !matches!(left, BodyLeft::Done) {
        watch.start_idle_timer(shard.cfg.stream_idle_timeout);
    }
    while !matches!(left, BodyLeft::Done) {
        let mut buf = std::mem::take(&mut b.upbuf);
        buf.clear();
        // A head taken at its size (`await_head` on a crowded shard) left a small buffer.
        if buf.capacity() < UPBUF {
            buf.reserve(UPBUF);
        }
        let (res, buf) = match watch.guard(up.read(buf)).await {
            Ok(r) => r,
            Err(Interrupt::ClientGone) => {
                // The worker must stop generating now.
                abort_upstream(up);
                b.rec.client_gone = true;
                return (Next::Close, false);
            }
            Err(i) => {
                abort_upstream(up);
                cut_mid_stream(shard, b, worker);
                let why = if let Interrupt::Idle = i {
                    if let Some(suppressed) = shard.warn_silent.pass() {
                        tracing::warn!(worker = %worker.url, idle_secs = shard.cfg.stream_idle_timeout.as_secs_f64(), suppressed, "worker went silent mid-response; cutting it");
                    }
                    "the worker sent nothing for longer than the stream idle timeout"
                } else {
                    "the request took longer than --request-timeout-secs"
                };
                let next =
                    end_with_error(wr, &left, dechunk, head.event_stream, close_client, why).await;
                return (next, false);
            }
        };
        watch.progress += 1;
        let got: usize = res.unwrap_or_default();
        if got == 0 {
            b.upbuf = buf;
            if let BodyLeft::UntilClose = left {
                // EOF ends an until-close body.
                return (Next::Close, false);
            }
            // The worker closed (or reset) mid-body.
            cut_mid_stream(shard, b, worker);
            if let Some(suppressed) = shard.warn_closed.pass() {
                tracing::warn!(worker = %worker.url, suppressed, "worker closed the connection mid-response");
            }
            let next = end_with_error(
                wr,
                &left,
                dechunk,
                head.event_stream,
                close_client,
                "the worker closed the connection mid-response",
            )
            .await;
            return (next, false);
        }
        b.decoded.clear();
        let payload = if dechunk { Some(&mut b.decoded) } else { None };
        let n = match left.take(&buf[..got], payload) {
            Ok(n) => n,
            Err(()) => {
                abort_upstream(up);
                return (Next::Close, false);
            }
        };
        if n < got {
            reusable = false;
        }
        // A stream's first body bytes leave at once; later ones batch with the shard's writes.
        let first = b.rec.streamed && b.rec.first_body == 0;
        let res = if dechunk {
            b.upbuf = buf;
            let decoded = std::mem::take(&mut b.decoded);
            let (res, decoded) = if first {
                wr.send_now(decoded).await
            } else {
                wr.write_all(decoded).await
            };
            b.decoded = decoded;
            res
        } else {
            let (res, slice) = if first {
                wr.send_now(buf.slice(0..n)).await
            } else {
                wr.write_all(buf.slice(0..n)).await
            };
            b.upbuf = slice.into_inner();
            res
        };
        if res.is_err() {
            abort_upstream(up);
            b.rec.client_gone = true;
            return (Next::Close, false);
        }
        if b.rec.first_body == 0 {
            b.rec.first_body = now_ns();
        }
        // Grow the read size for large bodies: a full read suggests more is waiting.
        if got == b.upbuf.capacity() && got < 256 * 1024 {
            b.upbuf.reserve(got * 2);
        }
    }
    if b.upbuf.capacity() > KEEP_BETWEEN_REQUESTS {
        b.upbuf = Vec::new();
    }
    let next = if close_client {
        Next::Close
    } else {
        Next::KeepAlive
    };
    (next, reusable)
}

/// After a response's body: its worker connection back to the pool when it can carry
/// another request and the worker is still in the set (it may have been removed while
/// the response streamed).
fn reuse_upstream(shard: &Shard, r: Response<'_>, reusable: bool) {
    if reusable && shard.current_workers().contains(&r.worker) {
        shard
            .pool
            .borrow_mut()
            .put(r.worker.slot, r.worker.addr, r.up);
    }
}

/// Phase 5 where the response arrived (a P/D prefill worker's refusal, passed on).
async fn relay_here(
    shard: &Shard,
    watch: &mut Watch<'_>,
    wr: &mut ClientWr,
    b: &mut Buffers,
    mut r: Response<'_>,
) -> Next {
    let (next, reusable) = relay_body(shard, watch, wr, b, &mut r).await;
    reuse_upstream(shard, r, reusable);
    next
}

/// The worker failed mid-response: its breaker and the counts hear of it.
fn cut_mid_stream(shard: &Shard, b: &mut Buffers, worker: &Worker) {
    b.rec.cut = true;
    let m = &shard.metrics;
    m.worker(worker.slot, WorkerCount::CbFailure).inc();
    if b.rec.leg == Leg::Decode {
        m.worker(worker.slot, WorkerCount::PdStreamErrors).inc();
    }
    shard.breakers.failure(worker.slot, false, &worker.url);
}

/// Ends a response the worker broke off mid-body. A chunked event stream cut between
/// chunks ends cleanly: vLLM's in-band error event, `[DONE]`, and the last chunk, so
/// clients see an error rather than a hang or a silently short answer. Anything else can
/// only be cut short: closing the connection tells the client the body is incomplete.
async fn end_with_error(
    wr: &mut ClientWr,
    left: &BodyLeft,
    dechunk: bool,
    event_stream: bool,
    close_client: bool,
    message: &str,
) -> Next {
    let clean = event_stream && matches!(left, BodyLeft::Chunked(d) if d.at_chunk_start());
    if !clean {
        return Next::Close;
    }
    let mut event = Vec::with_capacity(160 + message.len());
    event.extend_from_slice(b"data: {\"error\": {\"message\": ");
    crate::http::error::write_json_string(&mut event, message);
    event.extend_from_slice(
        b", \"type\": \"BadGatewayError\", \"param\": null, \"code\": 502}}\n\ndata: [DONE]\n\n",
    );
    let out = if dechunk {
        event
    } else {
        let mut out = Vec::with_capacity(event.len() + 16);
        out.extend_from_slice(format!("{:x}\r\n", event.len()).as_bytes());
        out.extend_from_slice(&event);
        out.extend_from_slice(b"\r\n0\r\n\r\n");
        out
    };
    let (res, _) = wr.write_all(out).await;
    if res.is_err() || dechunk || close_client {
        Next::Close
    } else {
        Next::KeepAlive
    }
}
