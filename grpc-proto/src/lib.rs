//! vLLM's gRPC engine API: the messages of service `vllm.grpc.engine.VllmEngine`, as shipped in
//! PyPI `smg-grpc-proto` 0.4.28 (`proto/`, Apache-2.0, vendored unchanged), and the paths of the
//! methods the router calls. The framing and the HTTP/2 transport are the data plane's.

#![allow(clippy::all)]

// prost refers across packages by relative paths (`super::super::super::smg::grpc::common`),
// so the modules nest as the packages do.
mod smg {
    pub mod grpc {
        pub mod common {
            include!(concat!(env!("OUT_DIR"), "/smg.grpc.common.rs"));
        }
    }
}
mod vllm {
    pub mod grpc {
        pub mod engine {
            include!(concat!(env!("OUT_DIR"), "/vllm.grpc.engine.rs"));
        }
    }
}

/// `package smg.grpc.common`: tokenizer bundles, KV events, load records.
pub use smg::grpc::common;
/// `package vllm.grpc.engine`: generation, health, model and server info, loads, abort.
pub use vllm::grpc::engine;

/// The `:path` of each method the router calls.
pub mod path {
    pub const GENERATE: &str = "/vllm.grpc.engine.VllmEngine/Generate";
    pub const ABORT: &str = "/vllm.grpc.engine.VllmEngine/Abort";
    pub const HEALTH_CHECK: &str = "/vllm.grpc.engine.VllmEngine/HealthCheck";
    pub const GET_MODEL_INFO: &str = "/vllm.grpc.engine.VllmEngine/GetModelInfo";
    pub const GET_SERVER_INFO: &str = "/vllm.grpc.engine.VllmEngine/GetServerInfo";
    pub const GET_LOADS: &str = "/vllm.grpc.engine.VllmEngine/GetLoads";
    pub const GET_TOKENIZER: &str = "/vllm.grpc.engine.VllmEngine/GetTokenizer";
    pub const SUBSCRIBE_KV_EVENTS: &str = "/vllm.grpc.engine.VllmEngine/SubscribeKvEvents";
}

pub use prost::Message;
