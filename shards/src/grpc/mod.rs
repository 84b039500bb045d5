//! gRPC workers (`grpc://host:port`): vLLM engines behind `vllm.grpc.engine.VllmEngine`,
//! for which the router is the OpenAI front end (it tokenizes, the engine generates token
//! ids, the router detokenizes; see `frontend`).
//!
//! - [`codec`]: gRPC's length-prefixed messages.
//! - [`call`]: one RPC on an HTTP/2 connection, under any runtime.
//! - [`channels`]: a shard's connections, one per worker, driven on the shard.
//!
//! The proxy phase that serves a request from a gRPC worker is `proxy/grpc.rs`.

pub mod call;
pub mod channels;
pub mod codec;

pub use call::{unary, Call, GrpcError};
pub use channels::Channels;
