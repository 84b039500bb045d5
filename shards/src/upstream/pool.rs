//! Idle keep-alive connections to workers, one pool per shard (connections never cross
//! threads). A connection enters the pool only after its response ended cleanly; one that
//! sat idle too long, or that the worker closed meanwhile, is discarded on the way out.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use monoio::net::TcpStream;

struct Idle {
    stream: TcpStream,
    since: Instant,
    /// Where it goes: a slot may pass to another worker, whose requests must not go
    /// over the previous holder's connections.
    addr: SocketAddr,
}

pub struct Pool {
    idle: Vec<Vec<Idle>>,
    max_idle_per_worker: usize,
    idle_timeout: Duration,
    /// Connections opened by this shard (for tests and metrics).
    pub opened: u64,
    pub reused: u64,
}

impl Pool {
    pub fn new(workers: usize, max_idle_per_worker: usize, idle_timeout: Duration) -> Self {
        Pool {
            idle: (0..workers).map(|_| Vec::new()).collect(),
            max_idle_per_worker,
            idle_timeout,
            opened: 0,
            reused: 0,
        }
    }

    /// The most recently used live idle connection to `worker` (at `addr`), if any.
    pub fn take(&mut self, worker: usize, addr: SocketAddr) -> Option<TcpStream> {
        let list = &mut self.idle[worker];
        while let Some(idle) = list.pop() {
            if idle.addr != addr {
                // The slot's previous holder's: all of them are.
                list.clear();
                return None;
            }
            if idle.since.elapsed() < self.idle_timeout && still_open(&idle.stream) {
                self.reused += 1;
                return Some(idle.stream);
            }
        }
        None
    }

    pub fn put(&mut self, worker: usize, addr: SocketAddr, stream: TcpStream) {
        let list = &mut self.idle[worker];
        if list.len() >= self.max_idle_per_worker {
            // Drop the oldest: it is the likeliest to have been closed by the worker.
            list.remove(0);
        }
        if list.first().is_some_and(|i| i.addr != addr) {
            list.clear();
        }
        list.push(Idle {
            stream,
            since: Instant::now(),
            addr,
        });
    }

    /// Closes idle connections to slots that `keep` rejects (workers that left the set).
    pub fn retain_slots(&mut self, keep: impl Fn(usize) -> bool) {
        for (slot, list) in self.idle.iter_mut().enumerate() {
            if !list.is_empty() && !keep(slot) {
                list.clear();
            }
        }
    }

    pub fn idle_count(&self, worker: usize) -> usize {
        self.idle[worker].len()
    }
}

/// A pooled connection is usable when reading from it would block: no EOF and no stray
/// bytes from the worker. One non-blocking `recv(MSG_PEEK)`.
fn still_open(stream: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock
}
