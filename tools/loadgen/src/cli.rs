//! Owns the command line: flag names, defaults, and turning them into a checked [`Config`].

use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Which OpenAI-compatible endpoint requests go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Endpoint {
    /// `/v1/completions` with a `prompt`.
    Completions,
    /// `/v1/chat/completions` with `messages`.
    Chat,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Completions => "completions",
            Endpoint::Chat => "chat",
        }
    }
}

/// How a request picks its shared-prefix group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GroupSelect {
    Random,
    RoundRobin,
}

/// Load generator for OpenAI-compatible LLM servers: measures TTFT, first byte, inter-event
/// gaps and total latency over HTTP/1.1 keep-alive connections.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version)]
pub struct Args {
    /// Target base URL (plain HTTP/1.1), e.g. http://127.0.0.1:8000
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,

    /// Endpoint to call.
    #[arg(long, value_enum, default_value_t = Endpoint::Completions)]
    pub endpoint: Endpoint,

    /// Ask for a streamed (SSE) response (the default).
    #[arg(long, overrides_with = "no_stream")]
    pub stream: bool,

    /// Ask for a single JSON response instead of a stream.
    #[arg(long, overrides_with = "stream")]
    pub no_stream: bool,

    /// Model name to send; when absent, the first id from GET /v1/models.
    #[arg(long)]
    pub model: Option<String>,

    /// Prompt length in bytes.
    #[arg(long, default_value_t = 2048)]
    pub prompt_bytes: usize,

    /// `max_tokens` to ask for.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: u32,

    /// Send `stream_options: {"include_usage": true}` (streamed requests only).
    #[arg(long)]
    pub include_usage: bool,

    /// Send `ignore_eos: true` (vLLM extension) so every request yields max_tokens tokens.
    #[arg(long)]
    pub ignore_eos: bool,

    /// Fields added to every request body, as a JSON object (e.g. vLLM's
    /// `{"kv_transfer_params": {...}}` to send prefill legs straight to a worker).
    #[arg(long, value_name = "JSON")]
    pub body_extra: Option<String>,

    /// Shared-prefix mode: G groups; each prompt is 80% its group's text + 20% unique text.
    #[arg(long, default_value_t = 0)]
    pub prefix_groups: usize,

    /// How each request picks its prefix group.
    #[arg(long, value_enum, default_value_t = GroupSelect::Random)]
    pub group_select: GroupSelect,

    /// Extra request header `Name: value` (repeatable).
    #[arg(long = "header", value_name = "K:V")]
    pub headers: Vec<String>,

    /// Closed loop: this many keep-alive connections, each sending back to back.
    #[arg(long, conflicts_with = "rate")]
    pub concurrency: Option<usize>,

    /// Open loop: this many requests per second, latency measured from the scheduled send time.
    #[arg(long)]
    pub rate: Option<f64>,

    /// Open loop: Poisson arrivals (exponential gaps) instead of a fixed interval.
    #[arg(long, requires = "rate")]
    pub poisson: bool,

    /// Open loop: most connections to open; requests queue when all are busy.
    #[arg(long, default_value_t = 256)]
    pub max_connections: usize,

    /// Stop after this many measured requests.
    #[arg(long)]
    pub requests: Option<u64>,

    /// Stop sending after this many seconds of measurement (default 10 when --requests is absent).
    #[arg(long)]
    pub duration: Option<f64>,

    /// Seconds of load before measurement starts; those requests are not counted.
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,

    /// Per-request timeout in seconds (connect + exchange).
    #[arg(long, default_value_t = 60.0)]
    pub timeout: f64,

    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,

    /// Check that every stream carries exactly N content events.
    #[arg(long, value_name = "N")]
    pub expect_events: Option<u64>,

    /// Response header naming the worker that served a request (counted per value).
    #[arg(long, default_value = "x-mock-worker")]
    pub worker_header: String,

    /// Seed for prompt text, group choice and Poisson arrivals.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Print one JSON object with all figures (latencies in microseconds) to stdout.
    #[arg(long)]
    pub json: bool,

    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,

    /// Exit with status 1 if any request failed or any stream failed an integrity check.
    #[arg(long)]
    pub fail_on_error: bool,
}

/// Closed or open loop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    Closed {
        concurrency: usize,
    },
    Open {
        rate: f64,
        poisson: bool,
        max_connections: usize,
    },
}

/// A checked run configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub url: String,
    pub endpoint: Endpoint,
    pub stream: bool,
    pub model: Option<String>,
    pub prompt_bytes: usize,
    pub max_tokens: u32,
    pub include_usage: bool,
    pub ignore_eos: bool,
    /// `,"k":v` for each field of `--body-extra` (empty without it).
    pub body_extra: String,
    pub prefix_groups: usize,
    pub group_select: GroupSelect,
    /// (name, value) pairs, already trimmed.
    pub headers: Vec<(String, String)>,
    pub load: Load,
    pub requests: Option<u64>,
    pub duration: Option<Duration>,
    pub warmup: Duration,
    pub timeout: Duration,
    pub threads: usize,
    pub expect_events: Option<u64>,
    pub worker_header: String,
    pub seed: u64,
    pub json: bool,
    pub quiet: bool,
    pub fail_on_error: bool,
}

/// The fields of `--body-extra` as body text: `,"k":v` each. Fields loadgen writes itself
/// are refused (a body with a key twice means different things to different parsers).
fn body_extra(text: &str) -> Result<String, String> {
    const OWN: [&str; 7] = [
        "model",
        "prompt",
        "messages",
        "max_tokens",
        "stream",
        "stream_options",
        "ignore_eos",
    ];
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("--body-extra: not JSON: {e}"))?;
    let serde_json::Value::Object(fields) = v else {
        return Err("--body-extra: expected a JSON object".into());
    };
    let mut out = String::new();
    for (k, v) in &fields {
        if OWN.contains(&k.as_str()) {
            return Err(format!("--body-extra: {k:?} is set by loadgen's own flags"));
        }
        out.push(',');
        out.push_str(&serde_json::to_string(k).expect("string serializes"));
        out.push(':');
        out.push_str(&v.to_string());
    }
    Ok(out)
}

fn seconds(flag: &str, v: f64) -> Result<Duration, String> {
    if !v.is_finite() || v < 0.0 {
        return Err(format!(
            "--{flag} must be a non-negative number of seconds, got {v}"
        ));
    }
    Ok(Duration::from_secs_f64(v))
}

impl Args {
    pub fn into_config(self) -> Result<Config, String> {
        let load = match (self.concurrency, self.rate) {
            (_, Some(rate)) => {
                if !rate.is_finite() || rate <= 0.0 {
                    return Err(format!("--rate must be > 0, got {rate}"));
                }
                if self.max_connections == 0 {
                    return Err("--max-connections must be at least 1".into());
                }
                Load::Open {
                    rate,
                    poisson: self.poisson,
                    max_connections: self.max_connections,
                }
            }
            (Some(0), None) => return Err("--concurrency must be at least 1".into()),
            (c, None) => Load::Closed {
                concurrency: c.unwrap_or(1),
            },
        };
        if self.threads == 0 {
            return Err("--threads must be at least 1".into());
        }
        if self.requests == Some(0) {
            return Err("--requests must be at least 1".into());
        }
        let duration = match (self.duration, self.requests) {
            (Some(d), _) => {
                let d = seconds("duration", d)?;
                if d.is_zero() {
                    return Err("--duration must be > 0".into());
                }
                Some(d)
            }
            (None, Some(_)) => None,
            (None, None) => Some(Duration::from_secs(10)),
        };
        let timeout = seconds("timeout", self.timeout)?;
        if timeout.is_zero() {
            return Err("--timeout must be > 0".into());
        }
        let mut headers = Vec::with_capacity(self.headers.len());
        for h in &self.headers {
            let (k, v) = h
                .split_once(':')
                .ok_or_else(|| format!("--header {h:?}: expected NAME:VALUE"))?;
            let (k, v) = (k.trim(), v.trim());
            if k.is_empty() || !k.bytes().all(is_token_byte) {
                return Err(format!("--header {h:?}: bad header name {k:?}"));
            }
            if v.bytes().any(|b| b == b'\r' || b == b'\n') {
                return Err(format!("--header {h:?}: value contains a line break"));
            }
            headers.push((k.to_string(), v.to_string()));
        }
        let body_extra = match &self.body_extra {
            None => String::new(),
            Some(text) => body_extra(text)?,
        };
        if self.worker_header.is_empty() || !self.worker_header.bytes().all(is_token_byte) {
            return Err(format!(
                "--worker-header: bad header name {:?}",
                self.worker_header
            ));
        }
        Ok(Config {
            url: self.url,
            endpoint: self.endpoint,
            stream: !self.no_stream,
            model: self.model,
            prompt_bytes: self.prompt_bytes,
            max_tokens: self.max_tokens,
            include_usage: self.include_usage,
            ignore_eos: self.ignore_eos,
            body_extra,
            prefix_groups: self.prefix_groups,
            group_select: self.group_select,
            headers,
            load,
            requests: self.requests,
            duration,
            warmup: seconds("warmup", self.warmup)?,
            timeout,
            threads: self.threads,
            expect_events: self.expect_events,
            worker_header: self.worker_header,
            seed: self.seed,
            json: self.json,
            quiet: self.quiet,
            fail_on_error: self.fail_on_error,
        })
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Result<Config, String> {
        let mut v = vec!["loadgen"];
        v.extend_from_slice(args);
        Args::try_parse_from(v)
            .map_err(|e| e.to_string())?
            .into_config()
    }

    #[test]
    fn defaults() {
        let c = config(&[]).unwrap();
        assert!(c.stream);
        assert_eq!(c.load, Load::Closed { concurrency: 1 });
        assert_eq!(c.duration, Some(Duration::from_secs(10)));
        assert_eq!(c.prompt_bytes, 2048);
        assert_eq!(c.max_tokens, 16);
        assert_eq!(c.endpoint, Endpoint::Completions);
    }

    #[test]
    fn stream_flags_last_one_wins() {
        assert!(!config(&["--no-stream"]).unwrap().stream);
        assert!(config(&["--no-stream", "--stream"]).unwrap().stream);
    }

    #[test]
    fn open_loop_and_bounds() {
        let c = config(&["--rate", "100", "--poisson", "--requests", "5"]).unwrap();
        assert_eq!(
            c.load,
            Load::Open {
                rate: 100.0,
                poisson: true,
                max_connections: 256
            }
        );
        assert_eq!(c.duration, None);
        assert!(config(&["--rate", "1", "--concurrency", "2"]).is_err());
        assert!(config(&["--poisson"]).is_err());
        assert!(config(&["--rate", "0"]).is_err());
    }

    #[test]
    fn headers_are_checked() {
        let c = config(&["--header", "X-A: b:c", "--header", "y:z"]).unwrap();
        assert_eq!(
            c.headers,
            vec![("X-A".into(), "b:c".into()), ("y".into(), "z".into())]
        );
        assert!(config(&["--header", "novalue"]).is_err());
        let c = config(&[
            "--body-extra",
            r#"{"kv_transfer_params":{"do_remote_decode":true}}"#,
        ]);
        assert_eq!(
            c.unwrap().body_extra,
            r#","kv_transfer_params":{"do_remote_decode":true}"#
        );
        assert!(config(&["--body-extra", "[1]"]).is_err());
        assert!(config(&["--body-extra", r#"{"stream":true}"#]).is_err());
        assert!(config(&["--header", "bad name: v"]).is_err());
    }
}
