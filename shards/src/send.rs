//! Writes that leave at once. monoio hands an io_uring write to the kernel only when the
//! shard parks, after it has run every ready task; on a busy shard that wait, not the work,
//! was most of the time the router added to a request. So the writes on the way to a
//! stream's first token (the request to the worker, each P/D leg, the response head, the
//! first body bytes) are first tried as a non-blocking `send()` from the task itself: on
//! an uncongested socket the kernel takes all of it there and then. Whatever it does not
//! take (a full send buffer) goes through the runtime's write, which waits for room.
//!
//! Everything else batches into one `io_uring_enter` per park: the rest of a stream (each
//! token sent at once cost a syscall of its own: 16% more CPU per streamed request) and
//! non-streamed requests, whose client waits for the whole answer anyway (sent at once,
//! they cost 20–30% more CPU at high rates). perf/README.md, "Writes that leave at once".
//!
//! Callers never have a write in flight on the socket when they call this (each write is
//! awaited before the next), so bytes cannot overtake one another.

use std::io;
use std::os::fd::RawFd;

use monoio::buf::IoBuf;
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt};
use monoio::BufResult;

/// Writes all of `buf` to `w`, whose socket is `fd`: as much as the socket takes now, the
/// rest through the runtime.
pub async fn send_now<W: AsyncWriteRent, T: IoBuf + 'static>(
    w: &mut W,
    fd: RawFd,
    buf: T,
) -> BufResult<usize, T> {
    let len = buf.bytes_init();
    if len == 0 {
        return (Ok(0), buf);
    }
    // SAFETY: `read_ptr` is valid for `bytes_init` bytes while `buf` is alive, and the
    // call returns before `buf` moves.
    let sent = unsafe {
        libc::send(
            fd,
            buf.read_ptr().cast(),
            len,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if sent < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => w.write_all(buf).await,
            _ => (Err(e), buf),
        };
    }
    let sent = sent as usize;
    if sent == len {
        return (Ok(len), buf);
    }
    let (res, rest) = w.write_all(buf.slice(sent..)).await;
    (res.map(|n| sent + n), rest.into_inner())
}

/// The write half of a client connection, with its socket's descriptor for [`send_now`].
pub struct ClientWriter<W> {
    half: W,
    fd: RawFd,
}

impl<W: AsyncWriteRent> ClientWriter<W> {
    pub fn new(half: W, fd: RawFd) -> Self {
        ClientWriter { half, fd }
    }

    /// All of `buf`, as much of it as the socket takes at once (see the module's comment).
    pub async fn send_now<T: IoBuf + 'static>(&mut self, buf: T) -> BufResult<usize, T> {
        send_now(&mut self.half, self.fd, buf).await
    }

    /// All of `buf`, through the runtime: batched with the shard's other writes.
    pub async fn write_all<T: IoBuf + 'static>(&mut self, buf: T) -> BufResult<usize, T> {
        self.half.write_all(buf).await
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::os::fd::AsRawFd;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use monoio::io::AsyncReadRentExt;

    use super::*;
    use crate::test_sockets::{on_both_drivers, pair};

    #[test]
    fn a_write_the_socket_has_room_for_is_done_on_its_first_poll() {
        on_both_drivers(|| {
            Box::pin(async {
                let (mut a, mut b) = pair().await;
                let fd = a.as_raw_fd();
                let mut cx = Context::from_waker(Waker::noop());
                let mut write = pin!(send_now(&mut a, fd, b"data: {}\n\n".to_vec()));
                // The runtime's own write would wait for the shard to park.
                let Poll::Ready((res, _)) = write.as_mut().poll(&mut cx) else {
                    panic!("the write waited for the runtime");
                };
                assert_eq!(res.unwrap(), 10);
                let (res, got) = b.read_exact(vec![0u8; 10]).await;
                res.unwrap();
                assert_eq!(got, b"data: {}\n\n");
            })
        });
    }

    #[test]
    fn a_write_larger_than_the_send_buffer_arrives_whole_and_in_order() {
        on_both_drivers(|| {
            Box::pin(async {
                let (mut a, mut b) = pair().await;
                let fd = a.as_raw_fd();
                let body: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
                let expect = body.clone();
                let reader = monoio::spawn(async move {
                    let (res, got) = b.read_exact(vec![0u8; 8 << 20]).await;
                    res.unwrap();
                    got
                });
                let (res, back) = send_now(&mut a, fd, body).await;
                assert_eq!(res.unwrap(), 8 << 20);
                assert_eq!(back.len(), 8 << 20, "the buffer comes back whole");
                assert!(reader.await == expect, "bytes lost or out of order");
            })
        });
    }

    #[test]
    fn a_write_to_a_peer_that_reset_fails() {
        on_both_drivers(|| {
            Box::pin(async {
                let (mut a, b) = pair().await;
                let fd = a.as_raw_fd();
                // Close with a reset (linger 0), so the next send fails at once.
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: a valid socket and option of the right size.
                unsafe {
                    libc::setsockopt(
                        b.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&linger as *const libc::linger).cast(),
                        std::mem::size_of::<libc::linger>() as _,
                    );
                }
                drop(b);
                let mut failed = false;
                for _ in 0..100 {
                    let (res, _) = send_now(&mut a, fd, vec![b'x'; 1024]).await;
                    if res.is_err() {
                        failed = true;
                        break;
                    }
                    monoio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                assert!(failed, "writes to a reset peer kept succeeding");
            })
        });
    }
}
