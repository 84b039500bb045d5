//! One RPC on an HTTP/2 connection to a gRPC worker, whatever runtime drives the connection
//! (the shards' monoio for generation, the control plane's tokio for health and model info):
//! the request head gRPC wants, the request message, the response messages as they arrive,
//! and the status from the trailers (or from a trailers-only response's head).

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::RecvStream;
use prost::Message;

use super::codec::{encode, Decoder};

/// Why an RPC failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcError {
    /// No connection, or it broke: nothing says the worker saw the request.
    Transport(String),
    /// The worker answered with a non-OK status.
    Status { code: u32, message: String },
    /// The worker's answer was not gRPC as the router reads it.
    Protocol(String),
}

/// gRPC status codes the router treats specially.
pub mod code {
    pub const CANCELLED: u32 = 1;
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const NOT_FOUND: u32 = 5;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const FAILED_PRECONDITION: u32 = 9;
    pub const OUT_OF_RANGE: u32 = 11;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const UNAVAILABLE: u32 = 14;
}

impl GrpcError {
    /// Whether another worker may be tried: the request cannot have started on this one.
    pub fn is_retryable(&self) -> bool {
        match self {
            GrpcError::Transport(_) => true,
            GrpcError::Status { code: c, .. } => *c == code::UNAVAILABLE,
            GrpcError::Protocol(_) => false,
        }
    }

    /// The HTTP status a client gets for it (as vLLM's own server would answer the same
    /// refusal: a bad argument is the client's 400).
    pub fn http_status(&self) -> u16 {
        match self {
            GrpcError::Transport(_) | GrpcError::Protocol(_) => 502,
            GrpcError::Status { code: c, .. } => match *c {
                code::INVALID_ARGUMENT | code::OUT_OF_RANGE | code::FAILED_PRECONDITION => 400,
                code::NOT_FOUND => 404,
                code::RESOURCE_EXHAUSTED => 429,
                code::UNIMPLEMENTED => 501,
                code::UNAVAILABLE => 503,
                code::DEADLINE_EXCEEDED => 504,
                _ => 500,
            },
        }
    }
}

impl std::fmt::Display for GrpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GrpcError::Transport(e) => write!(f, "gRPC transport: {e}"),
            GrpcError::Status { code, message } => write!(f, "gRPC status {code}: {message}"),
            GrpcError::Protocol(e) => write!(f, "gRPC protocol: {e}"),
        }
    }
}

fn transport(e: h2::Error) -> GrpcError {
    GrpcError::Transport(e.to_string())
}

/// An RPC in flight: its response head, then its messages. Dropping it before the end
/// resets the stream (RST_STREAM CANCEL), which a gRPC server sees as the call cancelled.
pub struct Call {
    state: State,
    decoder: Decoder,
}

enum State {
    Head(ResponseFuture),
    Body(RecvStream),
    Done,
}

/// Sends `msg` to `path` on the connection behind `send` and returns the call.
pub async fn start<M: Message>(
    send: &SendRequest<Bytes>,
    authority: &str,
    path: &str,
    msg: &M,
) -> Result<Call, GrpcError> {
    let mut send = send.clone().ready().await.map_err(transport)?;
    let req = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("http://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("user-agent", "ringrouter")
        .body(())
        .map_err(|e| GrpcError::Protocol(e.to_string()))?;
    let (response, mut body) = send.send_request(req, false).map_err(transport)?;
    body.send_data(encode(msg), true).map_err(transport)?;
    Ok(Call {
        state: State::Head(response),
        decoder: Decoder::default(),
    })
}

/// The status a head or trailers carry, if any: `Ok(())` for 0.
fn status_of(headers: &http::HeaderMap) -> Option<Result<(), GrpcError>> {
    let code = headers.get("grpc-status")?;
    let code: u32 = match code.to_str().ok().and_then(|c| c.trim().parse().ok()) {
        Some(c) => c,
        None => {
            return Some(Err(GrpcError::Protocol(format!(
                "unreadable grpc-status {code:?}"
            ))))
        }
    };
    if code == 0 {
        return Some(Ok(()));
    }
    let message = headers
        .get("grpc-message")
        .map(|m| {
            percent_encoding::percent_decode(m.as_bytes())
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    Some(Err(GrpcError::Status { code, message }))
}

impl Call {
    /// The next response message; `None` once the call ended with status OK.
    pub async fn next<R: Message + Default>(&mut self) -> Result<Option<R>, GrpcError> {
        loop {
            if let Some(m) = self
                .decoder
                .next_message::<R>()
                .map_err(GrpcError::Protocol)?
            {
                return Ok(Some(m));
            }
            match &mut self.state {
                State::Head(response) => {
                    let resp = response.await.map_err(transport)?;
                    let (parts, body) = resp.into_parts();
                    if parts.status != http::StatusCode::OK {
                        self.state = State::Done;
                        return Err(GrpcError::Protocol(format!(
                            "HTTP status {} (is this a gRPC server?)",
                            parts.status
                        )));
                    }
                    // Trailers-only: the status is in the head and nothing follows.
                    if let Some(status) = status_of(&parts.headers) {
                        self.state = State::Done;
                        status?;
                        return Ok(None);
                    }
                    self.state = State::Body(body);
                }
                State::Body(body) => match body.data().await {
                    Some(Ok(data)) => {
                        let _ = body.flow_control().release_capacity(data.len());
                        self.decoder.push(&data);
                    }
                    Some(Err(e)) => {
                        self.state = State::Done;
                        return Err(transport(e));
                    }
                    None => {
                        let trailers = body.trailers().await.map_err(transport)?;
                        self.state = State::Done;
                        if self.decoder.has_partial() {
                            return Err(GrpcError::Protocol(
                                "the stream ended inside a message".into(),
                            ));
                        }
                        return match trailers.as_ref().and_then(status_of) {
                            Some(status) => status.map(|_| None),
                            None => Err(GrpcError::Protocol(
                                "the stream ended without a grpc-status".into(),
                            )),
                        };
                    }
                },
                State::Done => return Ok(None),
            }
        }
    }
}

/// A call with one answer.
pub async fn unary<M: Message, R: Message + Default>(
    send: &SendRequest<Bytes>,
    authority: &str,
    path: &str,
    msg: &M,
) -> Result<R, GrpcError> {
    let mut call = start(send, authority, path, msg).await?;
    let reply = call
        .next::<R>()
        .await?
        .ok_or_else(|| GrpcError::Protocol(format!("{path} ended without an answer")))?;
    // Drain to the status: an error after the answer is still an error.
    while call.next::<R>().await?.is_some() {}
    Ok(reply)
}
