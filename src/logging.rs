//! Logging: `--log-level` (or `RUST_LOG`), key=value text or JSON lines (`--log-json`), on
//! stderr and, with `--log-dir`, in `<DIR>/ringrouter.log` too.
//!
//! The file is written directly (no background writer thread), one `write` per line, as
//! stderr is: nothing is logged per request at `info` (only the access log, when asked
//! for, writes a line per request), and a line written just before the process exits is
//! never lost.

use std::fs::{File, OpenOptions};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// The log file's name inside `--log-dir`.
pub const FILE_NAME: &str = "ringrouter.log";

type Boxed = Box<dyn Layer<Registry> + Send + Sync>;

/// Installs the global subscriber. `Err` is a message for the operator, naming the flag.
/// `access_log`: the access log (target `ringrouter::access`) shows whatever the level.
pub fn init(level: &str, access_log: bool, dir: Option<&Path>, json: bool) -> Result<(), String> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},monoio=warn")));
    let filter = if access_log {
        filter.add_directive("ringrouter::access=info".parse().expect("a directive"))
    } else {
        filter
    };
    let mut layers: Vec<Boxed> = vec![output(
        json,
        std::io::stderr().is_terminal(),
        std::io::stderr,
    )];
    if let Some(dir) = dir {
        let file = Arc::new(open(dir)?);
        layers.push(output(json, false, file));
    }
    tracing_subscriber::registry()
        .with(layers)
        .with(filter)
        .try_init()
        .map_err(|e| format!("cannot install the logger: {e}"))
}

/// One output: text (ANSI colours only on a terminal) or flattened JSON objects, one a line.
fn output<W>(json: bool, ansi: bool, writer: W) -> Boxed
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer().with_writer(writer);
    if json {
        layer
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .boxed()
    } else {
        layer.with_ansi(ansi).boxed()
    }
}

/// Creates `dir` if missing and opens its log file for appending.
fn open(dir: &Path) -> Result<File, String> {
    let shown = dir.display();
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("--log-dir {shown}: cannot create the directory: {e}"))?;
    let path: PathBuf = dir.join(FILE_NAME);
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("--log-dir {shown}: cannot open {}: {e}", path.display()))
}
