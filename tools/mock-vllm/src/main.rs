//! `mock-vllm`: run one or more fake vLLM servers from the command line (benchmarks, demos).
//! Flags mirror `MockConfig`; `--workers N` starts N mocks on consecutive ports in one
//! process. Prints `mock-vllm <name> listening on http://HOST:PORT` per listener. With
//! `--grpc`, the listeners serve vLLM's gRPC engine API instead (`mock_vllm::grpc`).

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::Parser;
use mock_vllm::grpc::{GrpcConfig, GrpcState};
use mock_vllm::{serve, MockConfig, MockState};

#[derive(Parser, Debug)]
#[command(
    name = "mock-vllm",
    version,
    about = "A fake vLLM 0.32 OpenAI-compatible server"
)]
struct Args {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port of the first worker (0 = any free port for each worker).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Number of mock workers, on ports port, port+1, ... named NAME-0, NAME-1, ...
    #[arg(long, default_value_t = 1)]
    workers: u16,
    /// Worker name (sent back as `x-mock-worker`).
    #[arg(long, default_value = "mock")]
    name: String,
    /// Served model name.
    #[arg(long, default_value = "mock-model")]
    model: String,
    /// Time to first token, milliseconds (fractions allowed).
    #[arg(long, default_value_t = 0.0)]
    ttft_ms: f64,
    /// Inter-token delay, milliseconds (fractions allowed).
    #[arg(long, default_value_t = 0.0)]
    itl_ms: f64,
    /// Completion tokens when a request has no max_tokens.
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// Fraction of generation requests answered 500.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Streams stop sending after N tokens and hang.
    #[arg(long)]
    hang_after: Option<usize>,
    /// Streams close the connection after N tokens.
    #[arg(long)]
    drop_after: Option<usize>,
    /// Extra TTFT per request already in flight, milliseconds.
    #[arg(long, default_value_t = 0.0)]
    ttft_per_inflight_ms: f64,
    /// Duration of a NIXL prefill leg, milliseconds.
    #[arg(long, default_value_t = 0.0)]
    prefill_ms: f64,
    /// Tokio worker threads for the whole process (1 = current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Record received requests (only useful to library users; off by default).
    #[arg(long)]
    record: bool,
    /// max_model_len reported by /v1/models.
    #[arg(long, default_value_t = 4096)]
    max_model_len: usize,
    /// Requests beyond this many in flight are reported as waiting.
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    /// Send `: keep-alive` SSE comments when a stream is idle this long, milliseconds.
    #[arg(long)]
    sse_keep_alive_ms: Option<f64>,
    /// Report each generation's own time: `mock_service_us` in a NIXL prefill answer's
    /// kv_transfer_params, `mock_timing_us` in a stream's first token (for perf/pd.py).
    #[arg(long)]
    report_timing: bool,
    /// Do not add `x-request-id` to responses (real vLLM's default).
    #[arg(long)]
    no_request_id_headers: bool,
    /// Simulated prefix cache capacity in blocks (LRU; 0 = no cache).
    #[arg(long, default_value_t = 0)]
    prefix_cache_blocks: usize,
    /// Prefix cache block size, bytes of prompt text.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    prefix_block_bytes: u64,
    /// Extra TTFT per KiB of prompt text not in the prefix cache, microseconds.
    #[arg(long, default_value_t = 0.0)]
    prefill_us_per_kb: f64,
    /// Answer /v1/embeddings, as vLLM serving an embedding model (default: 404, as vLLM
    /// serving a generative model).
    #[arg(long)]
    embeddings: bool,
    /// Serve vLLM's gRPC engine API (`vllm.grpc.engine.VllmEngine`) instead of the OpenAI
    /// HTTP API; prints `mock-vllm NAME listening on grpc://HOST:PORT`.
    #[arg(long)]
    grpc: bool,
    /// gRPC mode: the tokenizer directory GetTokenizer zips.
    #[arg(long)]
    tokenizer_dir: Option<std::path::PathBuf>,
    /// gRPC mode: vocabulary size (ids at or above it are refused).
    #[arg(long, default_value_t = 1024)]
    vocab_size: u32,
    /// gRPC mode: the EOS token id.
    #[arg(long, default_value_t = 2)]
    eos_token_id: u32,
    /// gRPC mode: stream KV-cache events (SubscribeKvEvents), each request's prompt blocks
    /// stored as it is admitted.
    #[arg(long)]
    kv_events: bool,
}

fn ms(v: f64) -> Duration {
    Duration::from_secs_f64(v.max(0.0) / 1000.0)
}

impl Args {
    fn grpc_config(&self, name: String) -> GrpcConfig {
        GrpcConfig {
            name,
            served_model_name: self.model.clone(),
            max_context_length: self.max_model_len as u32,
            vocab_size: self.vocab_size,
            eos_token_id: self.eos_token_id,
            tokens: self.tokens,
            first_token_delay: ms(self.ttft_ms),
            inter_token_delay: ms(self.itl_ms),
            max_num_seqs: self.max_num_seqs,
            tokenizer_dir: self.tokenizer_dir.clone(),
            kv_events: self.kv_events,
            ..GrpcConfig::default()
        }
    }

    fn config(&self, name: String) -> MockConfig {
        MockConfig {
            name,
            model: self.model.clone(),
            ttft: ms(self.ttft_ms),
            itl: ms(self.itl_ms),
            tokens: self.tokens,
            fail_rate: self.fail_rate,
            hang_after: self.hang_after,
            drop_after: self.drop_after,
            ttft_per_inflight: ms(self.ttft_per_inflight_ms),
            prefill_delay: ms(self.prefill_ms),
            threads: self.threads,
            record: self.record,
            max_model_len: self.max_model_len,
            max_num_seqs: self.max_num_seqs,
            sse_keep_alive: self.sse_keep_alive_ms.map(ms),
            report_timing: self.report_timing,
            request_id_headers: !self.no_request_id_headers,
            prefix_cache_blocks: self.prefix_cache_blocks,
            prefix_block_bytes: self.prefix_block_bytes as usize,
            prefill_per_kb: Duration::from_secs_f64(self.prefill_us_per_kb.max(0.0) / 1e6),
            embeddings: self.embeddings,
            ..MockConfig::default()
        }
    }
}

fn main() {
    let args = Args::parse();
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .unwrap_or_else(|e| fail(&format!("cannot start the runtime: {e}")));

    runtime.block_on(async {
        let mut servers = Vec::new();
        for i in 0..args.workers.max(1) {
            let name = if args.workers > 1 {
                format!("{}-{i}", args.name)
            } else {
                args.name.clone()
            };
            let port = if args.port == 0 {
                0
            } else {
                args.port
                    .checked_add(i)
                    .unwrap_or_else(|| fail("--port + --workers goes past 65535"))
            };
            let addr = SocketAddr::new(args.host, port);
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .unwrap_or_else(|e| fail(&format!("cannot bind {addr}: {e}")));
            let bound = listener
                .local_addr()
                .expect("bound listener has an address");
            if args.grpc {
                let state = GrpcState::new(args.grpc_config(name.clone()));
                println!("mock-vllm {name} listening on grpc://{bound}");
                let _ = std::io::stdout().flush();
                servers.push(tokio::spawn(async move {
                    mock_vllm::grpc::serve(listener, state).await;
                    Ok(())
                }));
                continue;
            }
            let state = MockState::new(args.config(name.clone()));
            println!("mock-vllm {name} listening on http://{bound}");
            let _ = std::io::stdout().flush();
            servers.push(tokio::spawn(serve(listener, state)));
        }
        for server in servers {
            if let Ok(Err(e)) = server.await {
                fail(&format!("server stopped: {e}"));
            }
        }
    });
}

fn fail(message: &str) -> ! {
    eprintln!("mock-vllm: {message}");
    std::process::exit(1)
}
