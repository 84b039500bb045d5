//! mock-vllm: a fake vLLM 0.32 OpenAI server for tests, benchmarks and `ringrouter --demo`.
//!
//! This module owns the public face of the crate: [`MockServer`], which runs one mock on its
//! own thread with its own tokio runtime, plus re-exports of the configuration and the
//! observable state ([`Stats`], [`Received`]). The wire shapes live in `wire`, the request
//! flow in `handler`, the SSE body in `stream`, the simulated prefix cache in
//! `prefix_cache`; `testdata/real-vllm-0.32/` holds the real server's bytes they are checked
//! against.
//!
//! ```no_run
//! use mock_vllm::{MockConfig, MockServer};
//! let mock = MockServer::spawn(MockConfig::default()).unwrap();
//! println!("{}", mock.url()); // http://127.0.0.1:PORT
//! let stats = mock.stats();
//! # let _ = stats;
//! ```

mod clock;
mod config;
mod errors;
pub mod grpc;
mod handler;
mod info;
mod knobs;
mod prefix_cache;
mod request;
mod server;
mod state;
mod stream;
mod validate;
mod wire;

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;

pub use config::MockConfig;
pub use server::serve;
pub use state::{MockState, Received, Stats};
pub use wire::token_text;

/// One mock vLLM server running on a background thread. Dropping it (or calling
/// [`MockServer::shutdown`]) stops accepting, closes every connection and joins the thread.
pub struct MockServer {
    addr: SocketAddr,
    state: Arc<MockState>,
    thread: Option<JoinHandle<()>>,
}

impl MockServer {
    /// Bind `127.0.0.1:0` and serve `config` on a background thread; returns at once.
    pub fn spawn(config: MockConfig) -> std::io::Result<MockServer> {
        Self::spawn_on(SocketAddr::from(([127, 0, 0, 1], 0)), config)
    }

    /// Bind `addr` and serve `config` on a background thread; returns at once. The socket is
    /// bound before this returns, so the address is connectable immediately.
    pub fn spawn_on(addr: SocketAddr, config: MockConfig) -> std::io::Result<MockServer> {
        let std_listener = StdTcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let threads = config.threads.max(1);
        let state = MockState::new(config);
        let runtime = if threads == 1 {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("mock-vllm")
                .enable_all()
                .build()?
        };
        let thread_state = state.clone();
        let thread = std::thread::Builder::new()
            .name(format!("mock-vllm-{}", state.config().name))
            .spawn(move || {
                runtime.block_on(async move {
                    match tokio::net::TcpListener::from_std(std_listener) {
                        Ok(listener) => {
                            let _ = serve(listener, thread_state).await;
                        }
                        Err(e) => eprintln!("mock-vllm: cannot register listener: {e}"),
                    }
                });
                // Dropping the runtime here cancels every connection task still alive,
                // which closes their sockets.
                drop(runtime);
            })?;
        Ok(MockServer {
            addr,
            state,
            thread: Some(thread),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The configuration this mock runs with.
    pub fn config(&self) -> &MockConfig {
        self.state.config()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.state.stats()
    }

    /// Every request received so far (oldest first; bounded by `config.record_limit`).
    /// Empty when `config.record` is false.
    pub fn received(&self) -> Vec<Received> {
        self.state.received()
    }

    /// Forget the recorded requests.
    pub fn clear_received(&self) {
        self.state.clear_received()
    }

    /// Make `/health` answer 200 (true) or 503 (false), as vLLM does when its engine is dead.
    pub fn set_healthy(&self, healthy: bool) {
        self.state.set_healthy(healthy)
    }

    /// Change the fraction of generation requests answered 500 from now on.
    pub fn set_fail_rate(&self, fail_rate: f64) {
        self.state.set_fail_rate(fail_rate)
    }

    /// The shared state, for callers that want to keep it past the server's life.
    pub fn state(&self) -> Arc<MockState> {
        self.state.clone()
    }

    /// Stop accepting, close every connection and join the server thread.
    pub fn shutdown(self) {
        drop(self)
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.state.shutdown();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
