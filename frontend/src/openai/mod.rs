//! vLLM's OpenAI API over an engine that speaks token ids (vLLM's gRPC `VllmEngine`): a request
//! body becomes engine requests, the engine's messages become the bytes vLLM's own HTTP server
//! would answer with. Still no networking: the caller moves the bytes and the messages.
//!
//! - `error`: [`OpenAiError`], vLLM's error bodies and in-band stream errors.
//! - `logprobs`: output logprobs in vLLM's completions and chat shapes.
//! - `model`: [`ModelContext`], what rendering needs about the served model.
//! - `request`: [`Generation`], a validated, tokenized request and its `GenerateRequest`s.
//! - `response`: [`Responder`], engine messages to SSE chunks or a JSON body.

mod error;
mod logprobs;
mod model;
mod request;
mod response;

pub use error::OpenAiError;
pub use model::{DefaultSampling, ModelContext};
pub use request::{Endpoint, Generation};
pub use response::Responder;
