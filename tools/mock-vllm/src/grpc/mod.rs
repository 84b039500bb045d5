//! A fake vLLM gRPC engine (`vllm.grpc.engine.VllmEngine`, as vLLM's `smg_grpc_servicer`
//! serves it) for the router's gRPC workers: Generate, HealthCheck, GetModelInfo,
//! GetServerInfo, GetLoads, GetTokenizer and Abort over plain HTTP/2 (the `h2` server, no
//! tonic), with prost messages from `grpc-proto`.
//!
//! Generated ids are deterministic: choice `i` of a prompt of `p` tokens cycles through
//! [`WORDS`] starting at `(p + i) % WORDS.len()` (ordinary tokens of the tiny Llama tokenizer
//! in `frontend/testdata/tiny-llama`), so a test can compute the text it expects with
//! [`expected_ids`] / [`expected_text`].
//!
//! - `state`: the knobs (health, failures, delays) and what the engine saw ([`GrpcStats`]).
//! - `server`: accepting connections, gRPC framing, the unary methods.
//! - `generate`: the Generate stream.
//! - `bundle`: the GetTokenizer zip bundle.
//! - `kv_events`: the KV-cache events (`SubscribeKvEvents`).
//!
//! ```no_run
//! use mock_vllm::grpc::{GrpcConfig, GrpcMock};
//! let engine = GrpcMock::spawn(GrpcConfig::default()).unwrap();
//! println!("{}", engine.url()); // grpc://127.0.0.1:PORT
//! ```

mod bundle;
mod generate;
mod kv_events;
mod server;
mod state;

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub use server::serve;
pub use state::{Failure, GrpcState, GrpcStats, SeenRequest};

/// The ids and texts (as the tiny Llama tokenizer decodes them) generated tokens cycle through.
pub const WORDS: [(u32, &str); 4] = [
    (449, " alpha"),
    (444, " beta"),
    (427, " gamma"),
    (431, " delta"),
];

/// The ids the mock generates for choice `index` of a prompt of `prompt_len` tokens (before
/// any EOS), `count` of them.
pub fn expected_ids(prompt_len: usize, index: usize, count: usize) -> Vec<u32> {
    (0..count)
        .map(|k| WORDS[(prompt_len + index + k) % WORDS.len()].0)
        .collect()
}

/// The text of [`expected_ids`].
pub fn expected_text(prompt_len: usize, index: usize, count: usize) -> String {
    (0..count)
        .map(|k| WORDS[(prompt_len + index + k) % WORDS.len()].1)
        .collect()
}

/// How one mock engine behaves (the failure knobs can also be changed at run time through
/// [`GrpcState`]).
#[derive(Clone, Debug)]
pub struct GrpcConfig {
    pub name: String,
    /// `GetModelInfo.served_model_name`.
    pub served_model_name: String,
    /// `GetModelInfo.max_context_length`.
    pub max_context_length: u32,
    /// Ids at or above this are refused (INVALID_ARGUMENT, "Token id N is out of vocabulary").
    pub vocab_size: u32,
    /// The EOS id, sent after `tokens` ordinary tokens unless `max_tokens` ends the choice
    /// first or `ignore_eos` is set.
    pub eos_token_id: u32,
    /// Ordinary tokens before EOS.
    pub tokens: usize,
    /// Delay before the first token of a streamed choice (and before a non-streamed answer).
    pub first_token_delay: Duration,
    /// Delay between streamed tokens.
    pub inter_token_delay: Duration,
    /// Requests beyond this many running count as waiting in GetLoads.
    pub max_num_seqs: usize,
    /// `GetServerInfo.block_size`: the KV block size in tokens.
    pub block_size: u32,
    /// `GetServerInfo.data_parallel_size` (and GetLoads' rank count).
    pub data_parallel_size: u32,
    /// `GetLoads.version`: the vLLM version.
    pub version: String,
    /// The directory GetTokenizer zips (its plain files); None: FAILED_PRECONDITION.
    pub tokenizer_dir: Option<PathBuf>,
    /// A NIXL KV connector: a prefill leg (`do_remote_decode: true`) is answered with
    /// `kv_transfer_params_json`; without one, never.
    pub kv_connector: bool,
    /// KV-cache events (`SubscribeKvEvents`): each Generate's whole prompt blocks are
    /// reported stored when it is admitted; tests store, evict and skip more through
    /// [`GrpcState`]. Without: UNIMPLEMENTED, as vLLM without `--kv-events-config`.
    pub kv_events: bool,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            name: "grpc-mock".into(),
            served_model_name: "mock-model".into(),
            max_context_length: 2048,
            vocab_size: 1024,
            eos_token_id: 2,
            tokens: 16,
            first_token_delay: Duration::ZERO,
            inter_token_delay: Duration::ZERO,
            max_num_seqs: 256,
            block_size: 16,
            data_parallel_size: 1,
            version: "0.32.0".into(),
            tokenizer_dir: None,
            kv_connector: true,
            kv_events: false,
        }
    }
}

/// One mock engine on a background thread with its own tokio runtime. Dropping it stops
/// accepting, closes every connection and joins the thread.
pub struct GrpcMock {
    addr: SocketAddr,
    state: Arc<GrpcState>,
    thread: Option<JoinHandle<()>>,
}

impl GrpcMock {
    /// Binds `127.0.0.1:0` and serves `config`; the socket is bound when this returns.
    pub fn spawn(config: GrpcConfig) -> std::io::Result<GrpcMock> {
        let std_listener = StdTcpListener::bind(("127.0.0.1", 0))?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let state = GrpcState::new(config);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread_state = state.clone();
        let thread = std::thread::Builder::new()
            .name(format!("grpc-mock-{}", state.config.name))
            .spawn(move || {
                runtime.block_on(async move {
                    match tokio::net::TcpListener::from_std(std_listener) {
                        Ok(listener) => serve(listener, thread_state).await,
                        Err(e) => eprintln!("grpc mock: cannot register listener: {e}"),
                    }
                });
                drop(runtime);
            })?;
        Ok(GrpcMock {
            addr,
            state,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `grpc://127.0.0.1:PORT`, as the router's `--worker-urls` takes it.
    pub fn url(&self) -> String {
        format!("grpc://{}", self.addr)
    }

    /// The knobs and the record of what the engine saw.
    pub fn state(&self) -> &Arc<GrpcState> {
        &self.state
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> GrpcStats {
        self.state.stats()
    }
}

impl Drop for GrpcMock {
    fn drop(&mut self) {
        self.state.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
