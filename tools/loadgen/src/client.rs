//! Owns the HTTP/1.1 client: one keep-alive TCP connection, writing a request, parsing the
//! response head with `httparse`, framing the body (Content-Length, chunked, or until EOF) and
//! deciding whether the connection may carry another request.
//!
//! Body bytes are handed to a [`BodySink`] as they arrive, with the time of the read that
//! brought them, so the caller measures first byte / events without copying the body.

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::chunked::ChunkedDecoder;
use crate::stats::ErrorKind;

/// Receives what a response brings, as it arrives.
pub trait BodySink {
    /// The request has been written.
    fn sent(&mut self, at: Instant);
    /// The (final, non-1xx) response head was parsed; `worker` is the worker header's value.
    fn head(&mut self, status: u16, worker: Option<&[u8]>, at: Instant);
    /// Decoded body bytes (never empty).
    fn body(&mut self, data: &[u8], at: Instant);
}

/// Why an exchange failed, and whether any response byte had arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientError {
    pub kind: ErrorKind,
    /// Nothing of the response was received (a reused connection may just have gone stale).
    pub nothing_received: bool,
}

/// How an exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub status: u16,
    /// The body ended cleanly, no `Connection: close`, nothing extra: the connection can be reused.
    pub reusable: bool,
}

#[derive(Debug)]
enum Framing {
    /// No body (1xx, 204, 304).
    Empty,
    Length(u64),
    Chunked(ChunkedDecoder),
    /// Body ends when the server closes the connection.
    UntilEof,
}

#[derive(Debug)]
struct Head {
    len: usize,
    status: u16,
    framing: Framing,
    close: bool,
}

/// Room for a response head (and the first body bytes that come with it).
pub const READ_BUF: usize = 32 * 1024;
const MAX_HEADERS: usize = 64;

/// One client connection.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    /// Responses completed on this connection.
    pub responses: u64,
}

fn io_error(nothing_received: bool) -> impl Fn(io::Error) -> ClientError {
    move |_| ClientError {
        kind: ErrorKind::Eof,
        nothing_received,
    }
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            responses: 0,
        })
    }

    /// Writes `request` and reads the whole response into `sink`; `buf` is scratch space.
    pub async fn exchange(
        &mut self,
        request: &[u8],
        buf: &mut [u8],
        worker_header: &str,
        sink: &mut impl BodySink,
    ) -> Result<Finished, ClientError> {
        self.stream
            .write_all(request)
            .await
            .map_err(io_error(true))?;
        sink.sent(Instant::now());

        let mut filled = 0;
        let mut at = Instant::now();
        let head = loop {
            match parse_head(&buf[..filled], worker_header, sink, at) {
                Err(()) => return Err(framing(false)),
                Ok(Some(h)) if h.status < 200 && h.status != 101 => {
                    buf.copy_within(h.len..filled, 0);
                    filled -= h.len;
                }
                Ok(Some(h)) => break h,
                Ok(None) => {
                    if filled == buf.len() {
                        return Err(framing(false));
                    }
                    let n = self
                        .stream
                        .read(&mut buf[filled..])
                        .await
                        .map_err(io_error(filled == 0))?;
                    if n == 0 {
                        return Err(ClientError {
                            kind: ErrorKind::Eof,
                            nothing_received: filled == 0,
                        });
                    }
                    filled += n;
                    at = Instant::now();
                }
            }
        };

        let Head {
            len,
            status,
            mut framing,
            close,
        } = head;
        let mut progress = feed_body(&mut framing, &buf[len..filled], sink, at)?;
        while !progress.done {
            let n = self.stream.read(buf).await.map_err(io_error(false))?;
            if n == 0 {
                if matches!(framing, Framing::UntilEof) {
                    progress.done = true;
                    break;
                }
                return Err(ClientError {
                    kind: ErrorKind::Eof,
                    nothing_received: false,
                });
            }
            progress = feed_body(&mut framing, &buf[..n], sink, Instant::now())?;
        }
        let reusable = !close && !progress.extra && !matches!(framing, Framing::UntilEof);
        if reusable {
            self.responses += 1;
        }
        Ok(Finished { status, reusable })
    }
}

/// Issues one GET and returns status and body (for discovery, not measurement).
pub async fn get(addr: SocketAddr, request: &[u8]) -> Result<(u16, Vec<u8>), String> {
    #[derive(Default)]
    struct Collect {
        status: u16,
        body: Vec<u8>,
    }
    impl BodySink for Collect {
        fn sent(&mut self, _: Instant) {}
        fn head(&mut self, status: u16, _: Option<&[u8]>, _: Instant) {
            self.status = status;
        }
        fn body(&mut self, data: &[u8], _: Instant) {
            self.body.extend_from_slice(data);
        }
    }
    let mut conn = Conn::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let mut buf = vec![0; READ_BUF];
    let mut sink = Collect::default();
    conn.exchange(request, &mut buf, "", &mut sink)
        .await
        .map_err(|e| format!("GET from {addr}: {}", e.kind.key()))?;
    Ok((sink.status, sink.body))
}

fn framing(nothing_received: bool) -> ClientError {
    ClientError {
        kind: ErrorKind::Framing,
        nothing_received,
    }
}

#[derive(Debug, Clone, Copy)]
struct BodyProgress {
    done: bool,
    /// Bytes arrived after the body's end (a confused peer): do not reuse.
    extra: bool,
}

fn feed_body(
    framing: &mut Framing,
    input: &[u8],
    sink: &mut impl BodySink,
    at: Instant,
) -> Result<BodyProgress, ClientError> {
    Ok(match framing {
        Framing::Empty => BodyProgress {
            done: true,
            extra: !input.is_empty(),
        },
        Framing::Length(remaining) => {
            let take = (*remaining).min(input.len() as u64) as usize;
            if take > 0 {
                sink.body(&input[..take], at);
            }
            *remaining -= take as u64;
            BodyProgress {
                done: *remaining == 0,
                extra: input.len() > take,
            }
        }
        Framing::Chunked(dec) => {
            let fed = dec
                .feed(input, |d| {
                    if !d.is_empty() {
                        sink.body(d, at)
                    }
                })
                .map_err(|_| framing_error())?;
            BodyProgress {
                done: fed.done,
                extra: fed.consumed < input.len(),
            }
        }
        Framing::UntilEof => {
            if !input.is_empty() {
                sink.body(input, at);
            }
            BodyProgress {
                done: false,
                extra: false,
            }
        }
    })
}

fn framing_error() -> ClientError {
    framing(false)
}

/// Parses a complete head from `buf`, or returns `Ok(None)` if more bytes are needed.
fn parse_head(
    buf: &[u8],
    worker_header: &str,
    sink: &mut impl BodySink,
    at: Instant,
) -> Result<Option<Head>, ()> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf).map_err(|_| ())? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    let status = resp.code.ok_or(())?;
    let http10 = resp.version == Some(0);
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut other_coding = false;
    let mut close = http10;
    let mut worker = None;
    for h in resp.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or(())?;
            if content_length.is_some_and(|c| c != v) {
                return Err(());
            }
            content_length = Some(v);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or(&[]);
            if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                chunked = true;
            } else {
                other_coding = true;
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if http10 && token.eq_ignore_ascii_case(b"keep-alive") {
                    close = false;
                }
            }
        } else if !worker_header.is_empty() && name.eq_ignore_ascii_case(worker_header) {
            worker = Some(h.value);
        }
    }
    let framing = if status < 200 || status == 204 || status == 304 {
        Framing::Empty
    } else if chunked && !other_coding {
        Framing::Chunked(ChunkedDecoder::new())
    } else if other_coding {
        Framing::UntilEof
    } else if let Some(n) = content_length {
        Framing::Length(n)
    } else {
        Framing::UntilEof
    };
    if status >= 200 {
        sink.head(status, worker, at);
    }
    Ok(Some(Head {
        len,
        status,
        framing,
        close,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    #[derive(Default, Debug)]
    struct Seen {
        status: u16,
        worker: Option<Vec<u8>>,
        body: Vec<u8>,
    }
    impl BodySink for Seen {
        fn sent(&mut self, _: Instant) {}
        fn head(&mut self, status: u16, worker: Option<&[u8]>, _: Instant) {
            self.status = status;
            self.worker = worker.map(<[u8]>::to_vec);
        }
        fn body(&mut self, data: &[u8], _: Instant) {
            assert!(!data.is_empty());
            self.body.extend_from_slice(data);
        }
    }

    /// Serves each canned response (written in 3-byte pieces) to one request on one connection.
    async fn serve(responses: Vec<&'static [u8]>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            for r in responses {
                let _ = s.read(&mut buf).await.unwrap();
                for piece in r.chunks(3) {
                    s.write_all(piece).await.unwrap();
                    s.flush().await.unwrap();
                }
            }
        });
        addr
    }

    async fn exchange(conn: &mut Conn) -> (Result<Finished, ClientError>, Seen) {
        let mut buf = vec![0; 64];
        let mut seen = Seen::default();
        let r = conn
            .exchange(
                b"GET / HTTP/1.1\r\n\r\n",
                &mut buf,
                "x-mock-worker",
                &mut seen,
            )
            .await;
        (r, seen)
    }

    #[tokio::test]
    async fn keep_alive_across_framings() {
        let addr = serve(vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nX-Mock-Worker: w1\r\nContent-Length: 5\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 503 Busy\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno",
        ])
        .await;
        let mut conn = Conn::connect(addr).await.unwrap();
        let (r, seen) = exchange(&mut conn).await;
        assert_eq!(
            r.unwrap(),
            Finished {
                status: 200,
                reusable: true
            }
        );
        assert_eq!(seen.body, b"hello");
        assert_eq!(seen.worker.as_deref(), Some(&b"w1"[..]));
        let (r, seen) = exchange(&mut conn).await;
        assert_eq!(
            r.unwrap(),
            Finished {
                status: 200,
                reusable: true
            }
        );
        assert_eq!(seen.body, b"abcde");
        let (r, seen) = exchange(&mut conn).await;
        assert_eq!(
            r.unwrap(),
            Finished {
                status: 204,
                reusable: true
            }
        );
        assert!(seen.body.is_empty());
        let (r, seen) = exchange(&mut conn).await;
        assert_eq!(
            r.unwrap(),
            Finished {
                status: 503,
                reusable: false
            }
        );
        assert_eq!(seen.body, b"no");
        assert_eq!(conn.responses, 3);
    }

    #[tokio::test]
    async fn body_until_eof() {
        let addr = serve(vec![b"HTTP/1.1 200 OK\r\n\r\nuntil close"]).await;
        let mut conn = Conn::connect(addr).await.unwrap();
        let (r, seen) = exchange(&mut conn).await;
        assert_eq!(
            r.unwrap(),
            Finished {
                status: 200,
                reusable: false
            }
        );
        assert_eq!(seen.body, b"until close");
    }

    #[tokio::test]
    async fn eof_mid_body_and_before_response() {
        let addr = serve(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"]).await;
        let mut conn = Conn::connect(addr).await.unwrap();
        let (r, _) = exchange(&mut conn).await;
        assert_eq!(
            r.unwrap_err(),
            ClientError {
                kind: ErrorKind::Eof,
                nothing_received: false
            }
        );
        let addr = serve(vec![b""]).await;
        let mut conn = Conn::connect(addr).await.unwrap();
        let (r, _) = exchange(&mut conn).await;
        assert_eq!(
            r.unwrap_err(),
            ClientError {
                kind: ErrorKind::Eof,
                nothing_received: true
            }
        );
    }

    #[tokio::test]
    async fn bad_framing() {
        for resp in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"[..],
            b"HTTX/1.1 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            // Head larger than the 64-byte test buffer.
            b"HTTP/1.1 200 OK\r\nX-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n",
        ] {
            let addr = serve(vec![resp]).await;
            let mut conn = Conn::connect(addr).await.unwrap();
            let (r, _) = exchange(&mut conn).await;
            assert_eq!(r.unwrap_err().kind, ErrorKind::Framing, "{resp:?}");
        }
    }
}
