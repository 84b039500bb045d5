//! A shard's connections to its gRPC workers: one multiplexed HTTP/2 connection per worker
//! slot, opened on first use and replaced once it breaks. The connection's driver runs as a
//! task on the shard, over monoio's poll-style TCP stream (io_uring or epoll alike), so a
//! request never leaves its shard.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use monoio::io::IntoPollIo;
use monoio::net::TcpStream;

use super::call::GrpcError;

/// HTTP/2 flow-control windows: a stream's tokens never wait on a WINDOW_UPDATE, and many
/// streams share a connection.
const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;

struct Conn {
    addr: SocketAddr,
    send: SendRequest<Bytes>,
    /// Cleared by the driver task when the connection ends.
    alive: Rc<Cell<bool>>,
}

#[derive(Default)]
pub struct Channels {
    conns: RefCell<HashMap<usize, Conn>>,
}

impl Channels {
    /// The connection to the worker in `slot` at `addr`, opened now if there is none.
    pub async fn get(
        &self,
        slot: usize,
        addr: SocketAddr,
        connect_timeout: Duration,
    ) -> Result<SendRequest<Bytes>, GrpcError> {
        if let Some(c) = self.conns.borrow().get(&slot) {
            if c.addr == addr && c.alive.get() {
                return Ok(c.send.clone());
            }
        }
        let (send, alive) = connect(addr, connect_timeout).await?;
        self.conns.borrow_mut().insert(
            slot,
            Conn {
                addr,
                send: send.clone(),
                alive,
            },
        );
        Ok(send)
    }

    /// Drops the connection of `slot` (after it failed a call); the next call opens another.
    pub fn forget(&self, slot: usize) {
        self.conns.borrow_mut().remove(&slot);
    }

    /// Keeps only the connections of slots `keep` accepts (workers that left are let go).
    pub fn retain_slots(&self, keep: impl Fn(usize) -> bool) {
        self.conns.borrow_mut().retain(|slot, _| keep(*slot));
    }
}

/// A new HTTP/2 connection, its driver spawned on this shard.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(SendRequest<Bytes>, Rc<Cell<bool>>), GrpcError> {
    let t = |e: std::io::Error| GrpcError::Transport(format!("connect to {addr}: {e}"));
    let stream = match monoio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(r) => r.map_err(t)?,
        Err(_) => {
            return Err(GrpcError::Transport(format!(
                "connect to {addr}: timed out after {} s",
                timeout.as_secs_f64()
            )))
        }
    };
    let _ = stream.set_nodelay(true);
    let io = stream.into_poll_io().map_err(t)?;
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| GrpcError::Transport(format!("HTTP/2 handshake with {addr}: {e}")))?;
    let alive = Rc::new(Cell::new(true));
    let flag = alive.clone();
    monoio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%addr, error = %e, "gRPC connection ended");
        }
        flag.set(false);
    });
    Ok((send, alive))
}
