//! ringrouter's data plane: one monoio shard per core, each accepting on its own
//! SO_REUSEPORT listener and carrying every request it accepted from the first byte of
//! the request head to the last byte of the worker's response, without handing anything
//! to another thread.
//!
//! Layout (one owner per concern):
//! - [`config`]: what the binary tells the data plane (listen address, limits, workers).
//! - [`shard`]: the per-core runtime, the io driver choice, the accept loop.
//! - [`http`]: the server side of HTTP/1.1: request heads, bodies, limits, error answers.
//! - [`body`]: the fields of an OpenAI request body the router looks at.
//! - [`nesting`]: how deep JSON nests, checked before any parser recurses into it.
//! - [`route`]: the worker set and the policies that pick a worker.
//! - [`upstream`]: the client side: keep-alive pools, the upstream request, the response relay.
//! - [`grpc`]: the client side for gRPC workers: HTTP/2 connections, calls, messages.
//! - [`proxy`]: one client connection's life, as named phases.
//! - [`send`]: writes that leave at once rather than when the shard next parks.
//! - [`recv`]: reads that hold no buffer while a connection waits for a request.
//! - [`pd`]: prefill/decode disaggregation: the two legs' request bodies (the exchange
//!   itself is the proxy's, in `proxy/disagg.rs`).
//! - [`retry`], [`breaker`], [`admission`]: which failures are retried and when, which
//!   workers are avoided after failing, how many requests may be in flight.
//! - [`sync`]: what crosses threads (worker-set epochs, the load board, prefix inserts).
//! - [`admin`]: the worker admin API, handed to the control plane.
//! - [`metrics`]: per-shard counters and histograms, summed when Prometheus scrapes.

pub mod admin;
pub mod admission;
pub mod body;
pub mod breaker;
pub mod config;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod nesting;
pub mod pd;
pub mod proxy;
pub mod recv;
pub mod retry;
pub mod route;
pub mod send;
pub mod shard;
pub mod sync;
#[cfg(test)]
mod test_sockets;
pub mod timer;
pub mod upstream;

pub use config::{DataPlaneConfig, IoDriver};
pub use route::{Policy, PolicyConfig, Worker, WorkerSet};
pub use shard::{start, DataPlane, ShardInfo};
