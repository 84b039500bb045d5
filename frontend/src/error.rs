//! The one error type of the front end: each variant says which input was at fault, so a
//! router can fail at start naming the file, or answer a request with a 400 naming the field.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("cannot load tokenizer from {path}: {reason}")]
    TokenizerLoad { path: PathBuf, reason: String },
    #[error("tokenizer failed: {0}")]
    Tokenize(String),
    #[error("no chat template: {0}")]
    NoChatTemplate(String),
    #[error("chat template error: {0}")]
    ChatTemplate(String),
    #[error("invalid prompt: {0}")]
    InvalidPrompt(String),
    #[error("invalid chat message: {0}")]
    InvalidMessage(String),
}
