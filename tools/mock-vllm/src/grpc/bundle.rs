//! GetTokenizer's bundle, as vLLM's servicer builds it: the tokenizer directory's plain
//! files in a zip (deflate), streamed in chunks of at most 64 KiB, the SHA-256 of the whole
//! archive (hex) on the last chunk only.

use std::io::Write;
use std::path::Path;

use grpc_proto::common::GetTokenizerChunk;
use sha2::{Digest, Sha256};

const CHUNK_SIZE: usize = 64 * 1024;

/// The zip of `dir`'s plain files (sorted by name) and its SHA-256 in hex.
pub fn zip_dir(dir: &Path) -> Result<(Vec<u8>, String), String> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for name in &names {
            let body = std::fs::read(dir.join(name)).map_err(|e| format!("{name}: {e}"))?;
            z.start_file(name.as_str(), opts)
                .map_err(|e| e.to_string())?;
            z.write_all(&body).map_err(|e| e.to_string())?;
        }
        z.finish().map_err(|e| e.to_string())?;
    }
    let zip = buf.into_inner();
    let sha = Sha256::digest(&zip)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((zip, sha))
}

/// The archive as GetTokenizer's messages.
pub fn chunks(zip: &[u8], sha256: &str) -> Vec<GetTokenizerChunk> {
    let n = zip.len().div_ceil(CHUNK_SIZE);
    zip.chunks(CHUNK_SIZE)
        .enumerate()
        .map(|(i, data)| GetTokenizerChunk {
            data: data.to_vec(),
            sha256: if i + 1 == n {
                sha256.to_string()
            } else {
                String::new()
            },
        })
        .collect()
}
