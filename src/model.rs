//! The model the router serves as the OpenAI front end of gRPC workers: its tokenizer, chat
//! template and facts (served name, context length, default sampling parameters), loaded
//! once at start. The tokenizer comes from `--tokenizer-path` or `--model-path`, else from
//! a worker (`GetTokenizer`); the facts from a worker's `GetModelInfo`. Anything that
//! cannot be loaded fails the start with a message naming it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use frontend::openai::{DefaultSampling, ModelContext};
use frontend::{ChatTemplate, Tokenizer};
use grpc_proto::engine::GetModelInfoResponse;
use sha2::{Digest, Sha256};

use crate::control::engine;

/// What the flags say about the model.
#[derive(Clone, Debug, Default)]
pub struct ModelArgs {
    pub model_path: Option<PathBuf>,
    pub tokenizer_path: Option<PathBuf>,
    /// A template file, or the template itself (as vLLM's `--chat-template`).
    pub chat_template: Option<String>,
}

/// The model as loaded.
pub struct Loaded {
    pub ctx: ModelContext,
    /// The model's path on the engines.
    pub root: String,
    /// The engines' KV block size in tokens (vLLM's default, 16, when they do not say).
    pub block_tokens: usize,
    /// The engines' vLLM version, if they said.
    pub version: Option<String>,
}

/// vLLM's default KV block size.
const DEFAULT_BLOCK_TOKENS: usize = 16;

/// How long one call of the start-up sequence may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The model context for `grpc_urls` and the model's path on the engines, waiting up to
/// `wait` for one of them to answer. `None` when there are no gRPC workers.
pub fn load(
    args: &ModelArgs,
    grpc_urls: &[String],
    wait: Duration,
) -> Result<Option<Loaded>, String> {
    if grpc_urls.is_empty() {
        return Ok(None);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime to load the model: {e}"))?;
    let (url, facts) = rt.block_on(first_model_info(grpc_urls, wait))?;
    let dir = match args.tokenizer_path.as_ref().or(args.model_path.as_ref()) {
        Some(dir) => dir.clone(),
        None => {
            let (zip, sha) = rt
                .block_on(engine::tokenizer_bundle(&url, Duration::from_secs(60)))
                .map_err(|e| format!("cannot fetch the tokenizer from {url}: {e}"))?;
            let dir = unpack_bundle(&zip, &sha)
                .map_err(|e| format!("the tokenizer bundle from {url}: {e}"))?;
            tracing::info!(worker = %url, dir = %dir.display(), "tokenizer fetched from the worker (GetTokenizer)");
            dir
        }
    };
    let served = if facts.served_model_name.is_empty() {
        facts.model_path.clone()
    } else {
        facts.served_model_name.clone()
    };
    let max_len = facts.max_context_length;
    let mut ctx = ModelContext::from_model_dir(&dir, served, max_len).map_err(|e| e.to_string())?;
    if !facts.default_sampling_params_json.is_empty() {
        ctx.defaults = DefaultSampling::from_json(&facts.default_sampling_params_json)
            .map_err(|e| format!("{url}'s default sampling parameters: {e}"))?;
    }
    if let Some(t) = &args.chat_template {
        ctx.chat_template = Some(chat_template(t, &ctx.tokenizer)?);
    }
    tracing::info!(
        model = %ctx.served_model_name,
        max_model_len = max_len,
        tokenizer = %dir.display(),
        chat_template = ctx.chat_template.is_some(),
        "serving gRPC workers as their OpenAI front end"
    );
    let block_tokens = match rt.block_on(engine::server_info(&url, CALL_TIMEOUT)) {
        Ok(info) if info.block_size > 0 => info.block_size as usize,
        Ok(_) => DEFAULT_BLOCK_TOKENS,
        Err(e) => {
            tracing::warn!(worker = %url, error = %e, "no KV block size from GetServerInfo: routing by blocks of {DEFAULT_BLOCK_TOKENS} tokens");
            DEFAULT_BLOCK_TOKENS
        }
    };
    // vLLM's `system_fingerprint` is `vllm-<version>-<hash of its engine config>`; the config
    // is not exposed over gRPC, so the hash here is of what the engine does tell.
    let mut version = None;
    match rt.block_on(engine::version(&url, CALL_TIMEOUT)) {
        Ok(v) if !v.is_empty() => {
            version = Some(v.clone());
            let config = format!(
                "{}|{}|{}|{block_tokens}",
                facts.model_path, max_len, facts.vocab_size
            );
            let h = Sha256::digest(config.as_bytes());
            ctx = ctx.with_system_fingerprint(Some(format!("vllm-{v}-{}", &hex(&h)[..8])));
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(worker = %url, error = %e, "no vLLM version from GetLoads: system_fingerprint will be null")
        }
    }
    Ok(Some(Loaded {
        ctx,
        root: facts.model_path,
        block_tokens,
        version,
    }))
}

/// `--chat-template`: a file if one exists at that path, else the template itself.
fn chat_template(arg: &str, tokenizer: &Tokenizer) -> Result<ChatTemplate, String> {
    let source = if Path::new(arg).is_file() {
        std::fs::read_to_string(arg).map_err(|e| format!("--chat-template {arg}: {e}"))?
    } else if arg.contains("{{") || arg.contains("{%") {
        arg.to_string()
    } else {
        return Err(format!(
            "--chat-template {arg}: no such file, and not a template either"
        ));
    };
    ChatTemplate::new(source, tokenizer).map_err(|e| format!("--chat-template {arg}: {e}"))
}

/// The first worker to answer `GetModelInfo`, trying them in turn until `wait` passes.
async fn first_model_info(
    urls: &[String],
    wait: Duration,
) -> Result<(String, GetModelInfoResponse), String> {
    let start = Instant::now();
    let mut last_log = start;
    loop {
        let mut errors = Vec::new();
        for url in urls {
            match engine::model_info(url, CALL_TIMEOUT).await {
                Ok(info) => return Ok((url.clone(), info)),
                Err(e) => errors.push(format!("{url}: {e}")),
            }
        }
        if start.elapsed() >= wait {
            return Err(format!(
                "no gRPC worker answered GetModelInfo within {} s (--worker-startup-timeout-secs): {}",
                wait.as_secs(),
                errors.join("; ")
            ));
        }
        if last_log.elapsed() >= Duration::from_secs(10) {
            last_log = Instant::now();
            tracing::info!(errors = %errors.join("; "), "waiting for a gRPC worker to answer GetModelInfo");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Unpacks a tokenizer bundle into a directory named by its digest (reused when it is
/// there already). Only plain file names are taken from the archive.
fn unpack_bundle(zip: &[u8], sha256: &str) -> Result<PathBuf, String> {
    let digest = hex(&Sha256::digest(zip));
    if !sha256.is_empty() && !sha256.eq_ignore_ascii_case(&digest) {
        return Err(format!(
            "its SHA-256 is {digest}, the worker announced {sha256}"
        ));
    }
    let dir = std::env::temp_dir().join(format!("ringrouter-tokenizer-{}", &digest[..16]));
    if dir.join("tokenizer.json").is_file() {
        return Ok(dir);
    }
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zip))
        .map_err(|e| format!("not a zip archive: {e}"))?;
    for i in 0..archive.len() {
        let mut f = archive.by_index(i).map_err(|e| e.to_string())?;
        let name = f.name().to_string();
        if f.is_dir() || name.contains('/') || name.contains('\\') || name.starts_with('.') {
            continue;
        }
        let mut out = std::fs::File::create(tmp.join(&name))
            .map_err(|e| format!("{}: {e}", tmp.join(&name).display()))?;
        std::io::copy(&mut f, &mut out).map_err(|e| format!("{name}: {e}"))?;
    }
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another router unpacked the same bundle meanwhile.
        Err(_) if dir.join("tokenizer.json").is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(format!("{}: {e}", dir.display())),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn zip_of(files: &[(&str, &str)]) -> Vec<u8> {
        let mut buf = std::io::Cursor::new(Vec::new());
        {
            let mut z = zip::ZipWriter::new(&mut buf);
            for (name, body) in files {
                z.start_file(*name, zip::write::SimpleFileOptions::default())
                    .unwrap();
                z.write_all(body.as_bytes()).unwrap();
            }
            z.finish().unwrap();
        }
        buf.into_inner()
    }

    #[test]
    fn a_bundle_unpacks_its_plain_files_only() {
        let zip = zip_of(&[
            ("tokenizer.json", "{}"),
            ("../escape.json", "x"),
            ("sub/inner.json", "y"),
        ]);
        let dir = unpack_bundle(&zip, "").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("tokenizer.json")).unwrap(),
            "{}"
        );
        assert!(!dir.join("inner.json").exists());
        assert!(!dir.parent().unwrap().join("escape.json").exists());
        // The same bundle again is the same directory.
        assert_eq!(unpack_bundle(&zip, "").unwrap(), dir);
    }

    #[test]
    fn a_bundle_whose_digest_differs_is_refused() {
        let zip = zip_of(&[("tokenizer.json", "{}")]);
        let e = unpack_bundle(&zip, "00").unwrap_err();
        assert!(e.contains("SHA-256"), "{e}");
    }
}
