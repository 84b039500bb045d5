//! The server side of HTTP/1.1, written on httparse: request heads and their framing,
//! chunked bodies, and the router's own answers (OpenAI-style JSON errors, local endpoints).

pub mod chunked;
pub mod error;
pub mod request;
pub mod response;

pub use chunked::{ChunkedDecoder, ChunkedError};
pub use error::ApiError;
pub use request::{BodyFraming, HeaderSpan, Method, ParseOutcome, RequestHead};
