//! One client connection's life on its shard, as named phases:
//! `read_head` → `read_body` → `route_request` (local answer, or a worker) →
//! `exchange` (pooled connection, upstream request, response head) → `relay_body`.
//!
//! While a request is with a worker, the client's socket is watched: a client that closes
//! makes the router shut the upstream connection at once (that is how vLLM learns to abort
//! the generation), and such a connection never returns to the pool. Bytes the client
//! pipelines meanwhile are kept for the next request.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::os::fd::AsRawFd;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::Poll;

use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{
    AsyncReadRent, AsyncWriteRentExt, CancelableAsyncReadRent, Canceller, OwnedReadHalf,
    OwnedWriteHalf, Splitable,
};
use monoio::net::TcpStream;
use monoio::time::{sleep_until, timeout_at, Instant, Sleep};
use monoio::BufResult;

use crate::body::parse_fields;
use crate::config::DataPlaneConfig;
use crate::http::response::write_simple;
use crate::http::{ApiError, BodyFraming, ChunkedDecoder, Method, ParseOutcome, RequestHead};
use crate::route::key::{body_session_key, routing_text, SESSION_HEADERS};
use crate::route::{Candidates, RouteInput, Selector, WorkerSet};
use crate::sync::LoadBoard;
use crate::upstream::request::write_upstream_head;
use crate::upstream::response::{write_client_head, ClientHead};
use crate::upstream::{Pool, ResponseFraming, ResponseHead};

type ClientRd = OwnedReadHalf<TcpStream>;
type ClientWr = OwnedWriteHalf<TcpStream>;

/// A shard's state, shared by its connection tasks (single-threaded, so `RefCell`).
pub struct Shard {
    pub id: usize,
    pub cfg: DataPlaneConfig,
    pub workers: WorkerSet,
    pub selector: RefCell<Selector>,
    pub board: std::sync::Arc<LoadBoard>,
    pub pool: RefCell<Pool>,
    pub ids: RequestIds,
    /// Whether to ask workers for their in-band load report (load-using policies).
    pub asks_for_load: bool,
    /// The process is draining (see `DataPlane::start_draining`).
    pub draining: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Shard {
    fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
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
}

enum Next {
    KeepAlive,
    Close,
}

enum Body {
    /// `len` bytes right after the head in `inbuf`.
    Inline(usize),
    /// Decoded into `decoded`; `raw` bytes of chunked framing followed the head.
    Decoded { raw: usize },
}

enum Fill {
    Data,
    Closed,
    TimedOut,
}

pub async fn serve_connection(shard: Rc<Shard>, stream: TcpStream) {
    let (mut rd, mut wr) = stream.into_split();
    let mut b = Buffers {
        inbuf: Vec::with_capacity(INBUF),
        start: 0,
        request_end: 0,
        head: RequestHead::default(),
        out: Vec::with_capacity(1024),
        upbuf: Vec::new(),
        decoded: Vec::new(),
        rid: Vec::with_capacity(40),
        watch: Vec::new(),
    };
    loop {
        b.rid.clear();
        match read_head(&shard, &mut rd, &mut b).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                respond_error(&mut wr, &mut b, &e, true).await;
                return;
            }
        }
        match handle_request(&shard, &mut rd, &mut wr, &mut b).await {
            // A draining router finishes the request it has, then lets the client go.
            Next::KeepAlive if !shard.is_draining() => {}
            _ => return,
        }
    }
}

/// Reads into `inbuf` after its current bytes, until `deadline`.
async fn fill(rd: &mut ClientRd, b: &mut Buffers, deadline: Instant) -> Fill {
    if b.start > 0 {
        if b.start == b.inbuf.len() {
            b.inbuf.clear();
            b.start = 0;
        } else if b.inbuf.capacity() - b.inbuf.len() < 1024 {
            b.inbuf.drain(..b.start);
            b.start = 0;
        }
    }
    if b.inbuf.capacity() - b.inbuf.len() < 1024 {
        b.inbuf.reserve(b.inbuf.capacity().max(INBUF));
    }
    let buf = std::mem::take(&mut b.inbuf);
    let len = buf.len();
    match timeout_at(deadline, rd.read(buf.slice_mut(len..))).await {
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
                return Ok(true);
            }
        }
        let deadline = if b.inbuf.len() > b.start {
            *head_deadline.get_or_insert_with(|| Instant::now() + shard.cfg.header_read_timeout)
        } else {
            Instant::now() + shard.cfg.keepalive_timeout
        };
        match fill(rd, b, deadline).await {
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
                match fill(rd, b, deadline).await {
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
                match fill(rd, b, deadline).await {
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
    let (res, out) = wr.write_all(std::mem::take(&mut b.out)).await;
    b.out = out;
    b.out.clear();
    res.is_ok()
}

async fn respond_error(wr: &mut ClientWr, b: &mut Buffers, e: &ApiError, close: bool) -> bool {
    b.out.clear();
    let rid = if b.rid.is_empty() {
        None
    } else {
        Some(&b.rid[..])
    };
    e.write_response(&mut b.out, rid, close);
    flush_out(wr, b).await
}

/// Phases 2–5 for the request whose head is in `b.head`.
async fn handle_request(
    shard: &Shard,
    rd: &mut ClientRd,
    wr: &mut ClientWr,
    b: &mut Buffers,
) -> Next {
    b.rid.clear();
    if let Some(r) = b.head.request_id.clone() {
        let s = b.start;
        b.rid.extend_from_slice(&b.inbuf[s + r.start..s + r.end]);
    } else {
        shard.ids.write_next(&mut b.rid);
    }
    let body = match read_body(shard, rd, wr, b).await {
        Ok(body) => body,
        Err(Some(e)) => {
            respond_error(wr, b, &e, true).await;
            return Next::Close;
        }
        Err(None) => return Next::Close,
    };
    let head_len = b.head.len;
    let consumed = head_len
        + match body {
            Body::Inline(n) => n,
            Body::Decoded { raw } => raw,
        };
    let keep_alive = b.head.keep_alive;
    b.request_end = b.start + consumed;
    // The request waits in `inbuf` until the worker answers (perhaps seconds of prefill):
    // hold it in as little memory as it needs.
    if b.inbuf.capacity() > b.inbuf.len() + INBUF {
        b.inbuf.shrink_to(b.inbuf.len());
    }
    let next = route_request(shard, rd, wr, b, &body).await;
    // The relay may have released the request's bytes already (then request_end is 0).
    b.start = b.request_end;
    b.request_end = 0;
    match next {
        Next::KeepAlive if keep_alive => Next::KeepAlive,
        _ => Next::Close,
    }
}

/// Phase 3: answer locally or send to a worker.
async fn route_request(
    shard: &Shard,
    rd: &mut ClientRd,
    wr: &mut ClientWr,
    b: &mut Buffers,
    body: &Body,
) -> Next {
    let method = b.head.method();
    let s = b.start;
    let full_path = &b.inbuf[s + b.head.path.start..s + b.head.path.end];
    let path = match full_path.iter().position(|&c| c == b'?') {
        Some(q) => &full_path[..q],
        None => full_path,
    };
    let close = !b.head.keep_alive;
    let head_only = method == Method::Head;
    let mut routed: Option<Candidates> = None;
    let local: Option<(u16, &str, Vec<u8>)> = match (method, path) {
        (Method::Get | Method::Head, b"/readiness") if shard.is_draining() => {
            let e = ApiError::new(503, "draining: the router is shutting down");
            Some((503, "application/json", e.body()))
        }
        (Method::Get | Method::Head, b"/health") | (Method::Get | Method::Head, b"/readiness") => {
            if shard.board.usable_count() > 0 {
                Some((200, "application/json", br#"{"status":"ok"}"#.to_vec()))
            } else {
                let e = ApiError::new(503, "no worker is available");
                Some((503, "application/json", e.body()))
            }
        }
        (Method::Get | Method::Head, b"/liveness") => {
            Some((200, "application/json", br#"{"status":"ok"}"#.to_vec()))
        }
        (Method::Get | Method::Head, b"/version") => Some((
            200,
            "application/json",
            format!("{{\"version\":\"{}\"}}", env!("CARGO_PKG_VERSION")).into_bytes(),
        )),
        (Method::Post, p) if is_json_route(p) => {
            let bytes = match body {
                Body::Inline(n) => &b.inbuf[s + b.head.len..s + b.head.len + n],
                Body::Decoded { .. } => &b.decoded[..],
            };
            match parse_fields(bytes) {
                Ok(fields) => {
                    let head_bytes = &b.inbuf[s..s + b.head.len];
                    routed = Some(choose_workers(shard, &b.head, head_bytes, Some(&fields)));
                    None
                }
                Err(e) => Some((400, "application/json", ApiError::bad_request(e.0).body())),
            }
        }
        _ => None,
    };
    if let Some((status, ctype, payload)) = local {
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
        return if flush_out(wr, b).await {
            Next::KeepAlive
        } else {
            Next::Close
        };
    }
    if shard.workers.is_empty() {
        respond_error(wr, b, &ApiError::new(503, "no worker is available"), close).await;
        return Next::KeepAlive;
    }
    let candidates = match routed {
        Some(c) => c,
        None => choose_workers(shard, &b.head, &b.inbuf[s..s + b.head.len], None),
    };
    proxy(shard, rd, wr, b, body, candidates).await
}

/// The policy's candidates for this request, from its session key (headers first, then
/// body fields) and routing text, as far as the policy reads them.
fn choose_workers(
    shard: &Shard,
    head: &RequestHead,
    head_bytes: &[u8],
    fields: Option<&crate::body::RequestFields<'_>>,
) -> Candidates {
    let mut selector = shard.selector.borrow_mut();
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
        if let Some(f) = fields {
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
    TimedOut,
}

/// The client's socket, watched while a worker has the request, and the request deadline.
struct Watch<'a, W> {
    read: Pin<&'a mut W>,
    state: WatchState,
    deadline: Pin<&'a mut Sleep>,
}

enum WatchState {
    Pending,
    /// The client sent more bytes (a pipelined request); it is alive.
    Data(Vec<u8>),
    Gone,
}

impl<W: Future<Output = BufResult<usize, Vec<u8>>>> Watch<'_, W> {
    /// Runs `f` unless the client leaves or the deadline passes first.
    async fn guard<F: Future>(&mut self, f: F) -> Result<F::Output, Interrupt> {
        if let WatchState::Gone = self.state {
            return Err(Interrupt::ClientGone);
        }
        let mut f = pin!(f);
        poll_fn(|cx| {
            if let Poll::Ready(v) = f.as_mut().poll(cx) {
                return Poll::Ready(Ok(v));
            }
            if let WatchState::Pending = self.state {
                if let Poll::Ready((res, buf)) = self.read.as_mut().poll(cx) {
                    match res {
                        Ok(n) if n > 0 => self.state = WatchState::Data(buf),
                        _ => {
                            self.state = WatchState::Gone;
                            return Poll::Ready(Err(Interrupt::ClientGone));
                        }
                    }
                }
            }
            if self.deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(Interrupt::TimedOut));
            }
            Poll::Pending
        })
        .await
    }
}

/// Phase 4 and 5 around the client watch: the exchange with a worker, then whatever the
/// watch read is kept for the next request.
async fn proxy(
    shard: &Shard,
    rd: &mut ClientRd,
    wr: &mut ClientWr,
    b: &mut Buffers,
    body: &Body,
    candidates: Candidates,
) -> Next {
    let canceller = Canceller::new();
    let mut watch_buf = std::mem::take(&mut b.watch);
    watch_buf.clear();
    if watch_buf.capacity() < WATCH {
        watch_buf.reserve(WATCH);
    }
    let read = pin!(rd.cancelable_read(watch_buf, canceller.handle()));
    let deadline = pin!(sleep_until(Instant::now() + shard.cfg.request_timeout));
    let mut watch = Watch {
        read,
        state: WatchState::Pending,
        deadline,
    };
    let next = exchange(shard, &mut watch, wr, b, body, candidates).await;
    let pipelined = match std::mem::replace(&mut watch.state, WatchState::Gone) {
        WatchState::Pending => {
            let _ = canceller.cancel();
            let (res, buf) = watch.read.await;
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

/// A new connection to a worker (the pool had none idle).
async fn connect(shard: &Shard, worker: usize) -> std::io::Result<TcpStream> {
    let addr = shard.workers.get(worker).addr;
    let s = match monoio::time::timeout(shard.cfg.connect_timeout, TcpStream::connect(addr)).await {
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
    /// Nothing reached the worker that it could have acted on: try again, on the same
    /// worker with a fresh connection when only a pooled connection was stale.
    Retry { error: String, same_worker: bool },
    /// Answered to the client, or the client is gone.
    Done(Next),
}

/// Phase 4: the request to a worker (trying the policy's candidates in order while the
/// failure is one the worker cannot have acted on), then phase 5.
async fn exchange<W: Future<Output = BufResult<usize, Vec<u8>>>>(
    shard: &Shard,
    watch: &mut Watch<'_, W>,
    wr: &mut ClientWr,
    b: &mut Buffers,
    body: &Body,
    candidates: Candidates,
) -> Next {
    let close = !b.head.keep_alive;
    let mut last_error = String::new();
    // Workers marked down are tried only after every usable one failed.
    let mut candidates = candidates;
    let mut skipped: [usize; 8] = [0; 8];
    let (mut nskipped, mut replayed) = (0, 0);
    loop {
        let next = loop {
            match candidates.next() {
                Some(w) if !shard.board.is_usable(w) && nskipped < skipped.len() => {
                    skipped[nskipped] = w;
                    nskipped += 1;
                }
                Some(w) => break Some(w),
                None if replayed < nskipped => {
                    replayed += 1;
                    break Some(skipped[replayed - 1]);
                }
                None => break None,
            }
        };
        let Some(worker) = next else { break };
        // Counted in the worker's load from the moment it is chosen until its response
        // ended (a stream's last byte), on whichever path this attempt leaves.
        let _in_flight = InFlight::start(shard, worker);
        // Stale pooled connections are retried on the same worker; the pool drops each
        // one it hands out that failed, so this ends.
        loop {
            // Boxed: connecting and sending take more state than relaying, and only the
            // relay's should stay allocated for the length of a stream.
            match Box::pin(attempt(shard, watch, wr, b, body, worker)).await {
                Attempt::Head(up, head, asked_load) => {
                    let how = ClientHead {
                        close,
                        dechunk: false,
                        strip_load_report: asked_load,
                    };
                    return relay_body(shard, watch, wr, b, worker, up, head, how).await;
                }
                Attempt::Retry { error, same_worker } => {
                    last_error = error;
                    if !same_worker {
                        break;
                    }
                }
                Attempt::Done(next) => return next,
            }
        }
    }
    let e = ApiError::new(
        502,
        format!("no worker could take the request: {last_error}"),
    );
    respond_error(wr, b, &e, close).await;
    Next::KeepAlive
}

async fn attempt<W: Future<Output = BufResult<usize, Vec<u8>>>>(
    shard: &Shard,
    watch: &mut Watch<'_, W>,
    wr: &mut ClientWr,
    b: &mut Buffers,
    body: &Body,
    worker: usize,
) -> Attempt {
    let close = !b.head.keep_alive;
    let w = shard.workers.get(worker);
    let pooled = shard.pool.borrow_mut().take(worker);
    let (mut up, reused) = match pooled {
        Some(s) => (s, true),
        // Boxed: a connect (with its timer) is the largest state here and the rarest.
        None => match watch.guard(Box::pin(connect(shard, worker))).await {
            Ok(Ok(s)) => (s, false),
            Ok(Err(e)) => {
                if shard.board.mark_down(worker, PASSIVE_DOWN) {
                    tracing::warn!(worker = %w.url, error = %e, "worker refused a connection; routing around it for {PASSIVE_DOWN:?}");
                }
                return Attempt::Retry {
                    error: format!("connect to {}: {e}", w.url),
                    same_worker: false,
                };
            }
            Err(i) => return Attempt::Done(interrupted(wr, b, i, close).await),
        },
    };

    // The upstream request: head, then the body (in the same write when small).
    let s = b.start;
    let head_len = b.head.len;
    let (body_len, inline) = match body {
        Body::Inline(n) => (*n, true),
        Body::Decoded { .. } => (b.decoded.len(), false),
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
        shard.asks_for_load,
    );
    let coalesce = body_len <= COALESCE_BODY;
    if coalesce {
        if inline {
            b.out
                .extend_from_slice(&b.inbuf[s + head_len..s + head_len + body_len]);
        } else {
            b.out.extend_from_slice(&b.decoded);
        }
    }
    let sent = match watch.guard(up.write_all(std::mem::take(&mut b.out))).await {
        Ok((res, out)) => {
            b.out = out;
            res
        }
        Err(i) => {
            abort_upstream(&up);
            return Attempt::Done(interrupted(wr, b, i, close).await);
        }
    };
    let sent = match sent {
        Ok(_) if !coalesce && body_len > 0 => {
            let (buf, range) = if inline {
                (
                    std::mem::take(&mut b.inbuf),
                    s + head_len..s + head_len + body_len,
                )
            } else {
                (std::mem::take(&mut b.decoded), 0..body_len)
            };
            match watch.guard(up.write_all(buf.slice(range))).await {
                Ok((res, slice)) => {
                    if inline {
                        b.inbuf = slice.into_inner();
                    } else {
                        b.decoded = slice.into_inner();
                    }
                    res
                }
                Err(i) => {
                    abort_upstream(&up);
                    return Attempt::Done(interrupted(wr, b, i, true).await);
                }
            }
        }
        other => other,
    };
    // The request is with the worker: its copy in `out` is not needed while we wait.
    if b.out.capacity() > 2048 {
        b.out = Vec::new();
    }
    if let Err(e) = sent {
        abort_upstream(&up);
        // Nothing was read back, so the worker did not act on a partial request.
        return Attempt::Retry {
            error: format!("write to {}: {e}", w.url),
            same_worker: reused,
        };
    }

    // The response head.
    b.upbuf.clear();
    if b.upbuf.capacity() < UPBUF {
        b.upbuf.reserve(UPBUF);
    }
    let is_head = b.head.method() == Method::Head;
    loop {
        match ResponseHead::parse(&b.upbuf, is_head) {
            Ok(Some(head)) if (100..200).contains(&head.status) && head.status != 101 => {
                // An interim response (100 Continue): drop it, the real head follows.
                b.upbuf.drain(..head.len);
                continue;
            }
            Ok(Some(head)) => {
                shard.board.mark_up(worker);
                if let Some((waiting, kv)) = head.load_report {
                    if let Some(n) = waiting {
                        shard.board.set_waiting(worker, n);
                    }
                    if let Some(u) = kv {
                        shard.board.set_kv_usage(worker, u);
                    }
                }
                return Attempt::Head(up, head, asked_load);
            }
            Ok(None) if b.upbuf.len() >= MAX_RESPONSE_HEAD => {
                abort_upstream(&up);
                return bad_gateway(wr, b, "worker response head too large", close).await;
            }
            Ok(None) => {}
            Err(e) => {
                abort_upstream(&up);
                return bad_gateway(wr, b, &format!("malformed worker response: {e:?}"), close)
                    .await;
            }
        }
        if b.upbuf.capacity() - b.upbuf.len() < 1024 {
            b.upbuf.reserve(b.upbuf.capacity());
        }
        let buf = std::mem::take(&mut b.upbuf);
        let len = buf.len();
        match watch.guard(up.read(buf.slice_mut(len..))).await {
            Ok((res, slice)) => {
                b.upbuf = slice.into_inner();
                match res {
                    Ok(n) if n > 0 => {}
                    Ok(_) | Err(_) if reused && b.upbuf.is_empty() => {
                        // The worker closed an idle connection as we reused it.
                        return Attempt::Retry {
                            error: format!("{} closed a pooled connection", w.url),
                            same_worker: true,
                        };
                    }
                    Ok(_) => {
                        return bad_gateway(
                            wr,
                            b,
                            &format!("{} closed the connection before responding", w.url),
                            close,
                        )
                        .await
                    }
                    Err(e) => {
                        return bad_gateway(wr, b, &format!("reading from {}: {e}", w.url), close)
                            .await
                    }
                }
            }
            Err(i) => {
                abort_upstream(&up);
                return Attempt::Done(interrupted(wr, b, i, close).await);
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
/// gets nothing.
async fn interrupted(wr: &mut ClientWr, b: &mut Buffers, i: Interrupt, close: bool) -> Next {
    match i {
        Interrupt::ClientGone => Next::Close,
        Interrupt::TimedOut => {
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
async fn relay_body<W: Future<Output = BufResult<usize, Vec<u8>>>>(
    shard: &Shard,
    watch: &mut Watch<'_, W>,
    wr: &mut ClientWr,
    b: &mut Buffers,
    worker: usize,
    mut up: TcpStream,
    head: ResponseHead,
    mut how: ClientHead,
) -> Next {
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
    b.out.clear();
    b.out.reserve(head.len + 64 + b.rid.len());
    write_client_head(&mut b.out, &b.upbuf, &head, &b.rid, how);
    let early = &b.upbuf[head.len..];
    let payload = if dechunk { Some(&mut b.out) } else { None };
    let Ok(n) = left.take(early, payload) else {
        abort_upstream(&up);
        return Next::Close;
    };
    if n < early.len() {
        reusable = false;
    }
    if !dechunk {
        b.out.extend_from_slice(&early[..n]);
    }
    if !flush_out(wr, b).await {
        abort_upstream(&up);
        return Next::Close;
    }
    release_request(b);
    while !matches!(left, BodyLeft::Done) {
        let mut buf = std::mem::take(&mut b.upbuf);
        buf.clear();
        let (res, buf) = match watch.guard(up.read(buf)).await {
            Ok(r) => r,
            Err(_) => {
                // Client gone or deadline passed mid-body: the worker must stop now.
                abort_upstream(&up);
                return Next::Close;
            }
        };
        // EOF (or a reset) ends an until-close body; any other body is truncated, and
        // closing the client connection is how the client sees that.
        let got: usize = res.unwrap_or_default();
        if got == 0 {
            b.upbuf = buf;
            return Next::Close;
        }
        b.decoded.clear();
        let payload = if dechunk { Some(&mut b.decoded) } else { None };
        let n = match left.take(&buf[..got], payload) {
            Ok(n) => n,
            Err(()) => {
                abort_upstream(&up);
                return Next::Close;
            }
        };
        if n < got {
            reusable = false;
        }
        let res = if dechunk {
            b.upbuf = buf;
            let (res, decoded) = wr.write_all(std::mem::take(&mut b.decoded)).await;
            b.decoded = decoded;
            res
        } else {
            let (res, slice) = wr.write_all(buf.slice(0..n)).await;
            b.upbuf = slice.into_inner();
            res
        };
        if res.is_err() {
            abort_upstream(&up);
            return Next::Close;
        }
        // Grow the read size for large bodies: a full read suggests more is waiting.
        if got == b.upbuf.capacity() && got < 256 * 1024 {
            b.upbuf.reserve(got * 2);
        }
    }
    if reusable {
        shard.pool.borrow_mut().put(worker, up);
    }
    if b.upbuf.capacity() > KEEP_BETWEEN_REQUESTS {
        b.upbuf = Vec::new();
    }
    if close_client {
        Next::Close
    } else {
        Next::KeepAlive
    }
}
