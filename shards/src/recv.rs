//! Reads that hold no buffer while they wait. An io_uring read owns its buffer from the
//! moment it is posted until the bytes come, so every new connection held a 4 KiB buffer
//! while its request came in: in a burst of thousands of new streams, that was the peak
//! the process's memory never came down from. Here a new connection first takes whatever
//! already arrived with a non-blocking `recv()` into a stack buffer; only when nothing
//! has, it waits for the socket to become readable (an io_uring poll, which owns no
//! buffer) and tries again. The request's buffer is then allocated at the size of what
//! came, as nginx does for its idle connections.
//!
//! A new connection's request has usually arrived by the time its task first runs, so its
//! head costs one `recv()` and no ring operation at all. Kept-alive connections read their
//! next request through the ring (proxy.rs, `fill`): in a closed loop it is never there
//! yet, and the failed `recv()` and the poll would cost more than the ring's read.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, RawFd};

use monoio::io::OwnedReadHalf;
use monoio::net::TcpStream;

/// What one `recv()` may take through the stack; a larger request continues with the
/// ring's reads into its own buffer.
const STACK: usize = 16 * 1024;

/// Appends to `buf` what the socket has now, without waiting: `Ok(0)` when the peer
/// closed, `WouldBlock` when nothing has arrived. The bytes go straight into `buf`'s spare
/// room when it has at least 1 KiB, else through the stack, and `buf` grows by exactly
/// what came.
pub fn recv_now(fd: RawFd, buf: &mut Vec<u8>) -> io::Result<usize> {
    let spare = buf.capacity() - buf.len();
    if spare >= 1024 {
        // SAFETY: the pointer is valid for `spare` bytes past `len`, and `recv` writes at
        // most that many; `set_len` covers only the bytes it wrote.
        let n = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr().add(buf.len()).cast(),
                spare,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        unsafe { buf.set_len(buf.len() + n as usize) };
        return Ok(n as usize);
    }
    let mut stack = MaybeUninit::<[u8; STACK]>::uninit();
    // SAFETY: `recv` writes at most STACK bytes into the array, and only the `n` it wrote
    // are read back.
    let n = unsafe { libc::recv(fd, stack.as_mut_ptr().cast(), STACK, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let got = unsafe { std::slice::from_raw_parts(stack.as_ptr().cast::<u8>(), n as usize) };
    buf.reserve_exact(got.len());
    buf.extend_from_slice(got);
    Ok(got.len())
}

/// The client socket's descriptor.
pub fn fd_of(rd: &OwnedReadHalf<TcpStream>) -> RawFd {
    // SAFETY: the halves share the stream; reading its descriptor changes nothing.
    unsafe { &*rd.0.get() }.as_raw_fd()
}

/// Waits until the client socket has something to read (or has closed), holding no
/// buffer. It may wake with nothing there (then `recv_now` says `WouldBlock`).
pub async fn readable(rd: &OwnedReadHalf<TcpStream>) -> io::Result<()> {
    // SAFETY: `readable` takes the stream by shared reference and posts a poll on its
    // descriptor; it touches nothing the write half uses.
    let stream = unsafe { &*rd.0.get() };
    // Not relaxed: the epoll driver then asks the kernel (`poll`) rather than trusting a
    // readiness it saw before, which the `recv()`s here, not its own, have since consumed.
    stream.readable(false).await
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;

    use monoio::io::{AsyncWriteRentExt, Splitable};

    use super::*;
    use crate::test_sockets::{on_both_drivers, pair};

    #[test]
    fn a_request_that_arrived_is_taken_into_a_buffer_of_its_size() {
        on_both_drivers(|| {
            Box::pin(async {
                let (mut client, server) = pair().await;
                let request = b"GET /v1/models HTTP/1.1\r\nHost: r\r\n\r\n".to_vec();
                let (res, _) = client.write_all(request.clone()).await;
                res.unwrap();
                let (rd, _wr) = server.into_split();
                let mut buf = Vec::new();
                readable(&rd).await.unwrap();
                let n = recv_now(fd_of(&rd), &mut buf).unwrap();
                assert_eq!(n, request.len());
                assert_eq!(buf, request);
                // Sized by what came, not by a read posted in advance.
                assert_eq!(buf.capacity(), request.len());
            })
        });
    }

    #[test]
    fn nothing_yet_would_block_and_readiness_waits_for_the_bytes() {
        on_both_drivers(|| {
            Box::pin(async {
                let (mut client, server) = pair().await;
                let (rd, _wr) = server.into_split();
                let mut buf = Vec::new();
                let err = recv_now(fd_of(&rd), &mut buf).unwrap_err();
                assert_eq!(err.kind(), ErrorKind::WouldBlock);
                assert_eq!(buf.capacity(), 0, "a waiting connection holds no buffer");
                let (wait, sent) = monoio::join!(readable(&rd), async {
                    monoio::time::sleep(std::time::Duration::from_millis(20)).await;
                    client.write_all(b"POST".to_vec()).await.0
                });
                wait.unwrap();
                sent.unwrap();
                assert_eq!(recv_now(fd_of(&rd), &mut buf).unwrap(), 4);
                assert_eq!(buf, b"POST");
            })
        });
    }

    #[test]
    fn bytes_go_into_the_spare_room_after_what_the_buffer_holds() {
        on_both_drivers(|| {
            Box::pin(async {
                let (mut client, server) = pair().await;
                let (rd, _wr) = server.into_split();
                let mut buf = Vec::with_capacity(4096);
                buf.extend_from_slice(b"GET / HT");
                let (res, _) = client.write_all(b"TP/1.1\r\n\r\n".to_vec()).await;
                res.unwrap();
                readable(&rd).await.unwrap();
                recv_now(fd_of(&rd), &mut buf).unwrap();
                assert_eq!(buf, b"GET / HTTP/1.1\r\n\r\n");
                assert_eq!(buf.capacity(), 4096);
            })
        });
    }

    #[test]
    fn a_closed_peer_reads_as_zero() {
        on_both_drivers(|| {
            Box::pin(async {
                let (client, server) = pair().await;
                drop(client);
                let (rd, _wr) = server.into_split();
                readable(&rd).await.unwrap();
                let mut buf = Vec::new();
                assert_eq!(recv_now(fd_of(&rd), &mut buf).unwrap(), 0);
            })
        });
    }
}
