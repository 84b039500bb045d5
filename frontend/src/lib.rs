//! vLLM's OpenAI front end, as text: what vLLM's own HTTP server does between the JSON a client
//! sends and the token ids an engine consumes, and back. No networking lives here.
//!
//! - [`tokenizer`]: the model's tokenizer and its special tokens, loaded from a directory.
//! - [`prompt`]: the four shapes of a completions `prompt` and how each becomes token ids.
//! - [`chat`]: rendering a chat template into the prompt text of a chat completion.
//! - `conversation`: the messages a chat template sees, shaped from OpenAI's as vLLM shapes them.
//! - [`detokenize`]: turning a stream of generated ids into text, one token at a time.
//! - [`stop`]: stop strings, found across token boundaries and trimmed as vLLM trims them.
//! - [`sequence`]: one generated sequence's text: decode, stop check, streamed deltas.
//! - [`openai`]: OpenAI request bodies to engine requests, engine messages to vLLM's responses.

pub mod chat;
mod conversation;
pub mod detokenize;
mod error;
pub mod openai;
pub mod prompt;
pub mod sequence;
pub mod stop;
pub mod tokenizer;

pub use chat::{ChatTemplate, ContentFormat};
pub use detokenize::DecodeStream;
pub use error::FrontendError;
pub use prompt::{Prompt, TokenizedPrompt};
pub use sequence::{SequenceText, StopParams};
pub use tokenizer::Tokenizer;
