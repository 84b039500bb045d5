//! Owns what is sent: the target address, prompt text, and the pre-built request bytes.
//!
//! Every request is one of a few variants built up front (head + JSON body, Content-Length
//! fixed). A 16-hex-digit nonce sits at a known offset in each prompt and is overwritten per
//! request, so no two prompts are equal yet sending costs one memcpy. In shared-prefix mode
//! a prompt is its group's shared text (80%) followed by the nonce and unique filler (20%), so
//! exactly the shared 80% is common to the group.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::cli::{Config, Endpoint, GroupSelect};

/// Where requests go.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `host:port` as written in the URL, for the Host header.
    pub authority: String,
    /// Path prefix from the URL without a trailing slash ("" for none).
    pub base_path: String,
}

impl Target {
    /// Parses `http://host[:port][/base]` and resolves the host once.
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!("--url {url:?}: only plain http:// URLs are supported (HTTP/1.1 over TCP)")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(format!("--url {url:?}: missing host"));
        }
        let has_port = match authority.rfind(':') {
            Some(i) => !authority[i..].contains(']'),
            None => false,
        };
        let with_port = if has_port {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let lookup = with_port.trim_start_matches('[').replacen("]:", ":", 1);
        let addr = if authority.starts_with('[') {
            // IPv6 literal: parse directly.
            let (host, port) = lookup.rsplit_once(':').unwrap_or((&lookup, "80"));
            let ip: std::net::IpAddr = host
                .parse()
                .map_err(|e| format!("--url {url:?}: bad IPv6 address: {e}"))?;
            let port: u16 = port
                .parse()
                .map_err(|e| format!("--url {url:?}: bad port: {e}"))?;
            SocketAddr::new(ip, port)
        } else {
            with_port
                .to_socket_addrs()
                .map_err(|e| format!("--url {url:?}: cannot resolve: {e}"))?
                .next()
                .ok_or_else(|| format!("--url {url:?}: host has no address"))?
        };
        Ok(Target {
            addr,
            authority: authority.to_string(),
            base_path: path.trim_end_matches('/').to_string(),
        })
    }

    /// A bodyless GET, e.g. for `/v1/models`.
    pub fn get_request(&self, path: &str) -> Vec<u8> {
        format!(
            "GET {}{} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ringrouter-loadgen\r\nAccept: application/json\r\n\r\n",
            self.base_path, path, self.authority
        )
        .into_bytes()
    }
}

/// Width of the per-request nonce in the prompt.
pub const NONCE_LEN: usize = 16;

/// One pre-built request: head and body bytes, with the nonce's offset.
#[derive(Debug, Clone)]
pub struct Variant {
    pub bytes: Vec<u8>,
    pub nonce_at: usize,
}

impl Variant {
    /// Copies this request into `out` with `nonce` written into the prompt.
    pub fn write_into(&self, out: &mut Vec<u8>, nonce: u64) {
        out.clear();
        out.extend_from_slice(&self.bytes);
        write_hex(&mut out[self.nonce_at..self.nonce_at + NONCE_LEN], nonce);
    }
}

fn write_hex(dst: &mut [u8], mut v: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for slot in dst.iter_mut().rev() {
        *slot = HEX[(v & 0xf) as usize];
        v >>= 4;
    }
}

/// All request variants of a run and how to choose among them.
#[derive(Debug)]
pub struct RequestSet {
    variants: Vec<Variant>,
    groups: usize,
    per_group: usize,
    select: GroupSelect,
    round_robin: AtomicUsize,
}

/// Most variants built up front when there are many prefix groups.
const MAX_VARIANTS: usize = 256;
/// Variants per group (or in total, without prefix groups).
const VARIANTS_PER_GROUP: usize = 4;

impl RequestSet {
    pub fn build(cfg: &Config, target: &Target, model: &str) -> RequestSet {
        let groups = cfg.prefix_groups.max(1);
        let per_group = if cfg.prefix_groups == 0 {
            VARIANTS_PER_GROUP * 2
        } else {
            (MAX_VARIANTS / groups).clamp(1, VARIANTS_PER_GROUP)
        };
        let shared_len = if cfg.prefix_groups == 0 {
            0
        } else {
            cfg.prompt_bytes * 4 / 5
        };
        let unique_len = cfg.prompt_bytes.saturating_sub(shared_len);
        let mut variants = Vec::with_capacity(groups * per_group);
        for g in 0..groups {
            let mut shared = text(
                cfg.seed ^ (0x5eed_0000 + g as u64),
                shared_len.saturating_sub(1),
            );
            if shared_len > 0 {
                shared.push(' ');
            }
            for v in 0..per_group {
                let seed = cfg.seed ^ (0xf111_0000_0000 + (g * per_group + v) as u64);
                let filler = text(seed, unique_len.saturating_sub(NONCE_LEN + 1));
                let mut prompt = shared.clone();
                let nonce_in_prompt = prompt.len();
                prompt.push_str(&"0".repeat(NONCE_LEN));
                if !filler.is_empty() {
                    prompt.push(' ');
                    prompt.push_str(&filler);
                }
                variants.push(build_variant(cfg, target, model, &prompt, nonce_in_prompt));
            }
        }
        RequestSet {
            variants,
            groups,
            per_group,
            select: cfg.group_select,
            round_robin: AtomicUsize::new(0),
        }
    }

    /// Picks the variant for the next request.
    pub fn pick(&self, rng: &mut fastrand::Rng) -> &Variant {
        let group = if self.groups == 1 {
            0
        } else {
            match self.select {
                GroupSelect::Random => rng.usize(..self.groups),
                GroupSelect::RoundRobin => {
                    self.round_robin.fetch_add(1, Ordering::Relaxed) % self.groups
                }
            }
        };
        let v = if self.per_group == 1 {
            0
        } else {
            rng.usize(..self.per_group)
        };
        &self.variants[group * self.per_group + v]
    }

    #[cfg(test)]
    pub fn variants(&self) -> &[Variant] {
        &self.variants
    }
}

fn build_variant(
    cfg: &Config,
    target: &Target,
    model: &str,
    prompt: &str,
    nonce_in_prompt: usize,
) -> Variant {
    let model_json = serde_json::to_string(model).expect("string serializes");
    // The prompt holds only [a-z0-9 ], so it needs no JSON escaping.
    let (before_prompt, input_key_close) = match cfg.endpoint {
        Endpoint::Completions => (format!("{{\"model\":{model_json},\"prompt\":\""), "\""),
        Endpoint::Chat => (
            format!("{{\"model\":{model_json},\"messages\":[{{\"role\":\"user\",\"content\":\""),
            "\"}]",
        ),
    };
    let mut body = String::with_capacity(prompt.len() + 256);
    body.push_str(&before_prompt);
    let nonce_in_body = body.len() + nonce_in_prompt;
    body.push_str(prompt);
    body.push_str(input_key_close);
    body.push_str(&format!(",\"max_tokens\":{}", cfg.max_tokens));
    body.push_str(if cfg.stream {
        ",\"stream\":true"
    } else {
        ",\"stream\":false"
    });
    if cfg.stream && cfg.include_usage {
        body.push_str(",\"stream_options\":{\"include_usage\":true}");
    }
    if cfg.ignore_eos {
        body.push_str(",\"ignore_eos\":true");
    }
    body.push_str(&cfg.body_extra);
    body.push('}');

    let mut head = format!(
        "POST {}{} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ringrouter-loadgen\r\nContent-Type: application/json\r\nAccept: {}\r\n",
        target.base_path,
        cfg.endpoint.path(),
        target.authority,
        if cfg.stream { "text/event-stream" } else { "application/json" },
    );
    for (k, v) in &cfg.headers {
        head.push_str(k);
        head.push_str(": ");
        head.push_str(v);
        head.push_str("\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let nonce_at = head.len() + nonce_in_body;
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.as_bytes());
    Variant { bytes, nonce_at }
}

/// Deterministic lowercase "words" of exactly `len` bytes.
fn text(seed: u64, len: usize) -> String {
    const WORDS: &[&str] = &[
        "the", "router", "token", "cache", "prefix", "stream", "model", "fleet", "decode",
        "prefill", "latency", "shard", "core", "ring", "worker", "request", "queue", "batch",
        "kernel", "memory", "socket", "event", "budget", "signal", "vector", "matrix", "layer",
        "head", "block", "page", "tensor", "sample",
    ];
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut s = String::with_capacity(len + 16);
    while s.len() < len {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(WORDS[rng.usize(..WORDS.len())]);
    }
    s.truncate(len);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Args;
    use clap::Parser;

    fn cfg(args: &[&str]) -> Config {
        let mut v = vec!["loadgen"];
        v.extend_from_slice(args);
        Args::try_parse_from(v).unwrap().into_config().unwrap()
    }

    fn target() -> Target {
        Target::parse("http://127.0.0.1:9/base/").unwrap()
    }

    fn split(bytes: &[u8]) -> (String, serde_json::Value) {
        let text = std::str::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.to_string(), serde_json::from_str(body).unwrap())
    }

    #[test]
    fn url_parsing() {
        let t = target();
        assert_eq!(t.addr, "127.0.0.1:9".parse().unwrap());
        assert_eq!(t.authority, "127.0.0.1:9");
        assert_eq!(t.base_path, "/base");
        let t = Target::parse("http://[::1]:8080").unwrap();
        assert_eq!(t.addr, "[::1]:8080".parse().unwrap());
        assert_eq!(t.base_path, "");
        assert!(Target::parse("https://127.0.0.1:1").is_err());
    }

    #[test]
    fn completions_body_and_head() {
        let c = cfg(&[
            "--prompt-bytes",
            "100",
            "--include-usage",
            "--header",
            "X-A:1",
        ]);
        let set = RequestSet::build(&c, &target(), "m\"x");
        let mut out = Vec::new();
        set.variants()[0].write_into(&mut out, 0xabc);
        let (head, body) = split(&out);
        assert!(head.starts_with("POST /base/v1/completions HTTP/1.1\r\n"));
        assert!(head.contains("\r\nX-A: 1"));
        let cl: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(cl, out.len() - head.len() - 4);
        assert_eq!(body["model"], "m\"x");
        assert_eq!(body["max_tokens"], 16);
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        let prompt = body["prompt"].as_str().unwrap();
        assert_eq!(prompt.len(), 100);
        assert!(prompt.starts_with("0000000000000abc "));
    }

    #[test]
    fn chat_body_without_stream() {
        let c = cfg(&["--endpoint", "chat", "--no-stream", "--include-usage"]);
        let set = RequestSet::build(&c, &target(), "m");
        let mut out = Vec::new();
        set.variants()[3].write_into(&mut out, 1);
        let (head, body) = split(&out);
        assert!(head.starts_with("POST /base/v1/chat/completions HTTP/1.1\r\n"));
        assert_eq!(body["stream"], false);
        assert!(body.get("stream_options").is_none());
        let content = body["messages"][0]["content"].as_str().unwrap();
        assert_eq!(content.len(), 2048);
        assert_eq!(body["messages"][0]["role"], "user");
    }

    #[test]
    fn prefix_groups_share_eighty_percent() {
        let c = cfg(&["--prefix-groups", "3", "--prompt-bytes", "1000"]);
        let set = RequestSet::build(&c, &target(), "m");
        let prompts: Vec<String> = set
            .variants()
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let mut out = Vec::new();
                v.write_into(&mut out, i as u64);
                split(&out).1["prompt"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(prompts.len(), 3 * VARIANTS_PER_GROUP);
        for (i, a) in prompts.iter().enumerate() {
            assert_eq!(a.len(), 1000);
            for (j, b) in prompts.iter().enumerate() {
                let common = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
                if i == j {
                    continue;
                }
                if i / VARIANTS_PER_GROUP == j / VARIANTS_PER_GROUP {
                    assert!((800..=815).contains(&common), "{i} {j} share {common}");
                } else {
                    assert!(common < 800, "{i} {j} share {common}");
                }
            }
        }
    }

    #[test]
    fn round_robin_cycles_groups() {
        let c = cfg(&["--prefix-groups", "3", "--group-select", "round-robin"]);
        let set = RequestSet::build(&c, &target(), "m");
        let mut rng = fastrand::Rng::with_seed(1);
        let base = set.variants().as_ptr() as usize;
        let size = std::mem::size_of::<Variant>();
        let groups: Vec<usize> = (0..6)
            .map(|_| (set.pick(&mut rng) as *const Variant as usize - base) / size / 4)
            .collect();
        assert_eq!(groups, vec![0, 1, 2, 0, 1, 2]);
    }
}
