//! `--demo`: four built-in mock vLLM workers on loopback (ephemeral ports), so that the
//! router has something to route to on a fresh machine, and the curl line to try it.

use std::net::SocketAddr;
use std::time::Duration;

use mock_vllm::{MockConfig, MockServer};

pub const WORKERS: usize = 4;
pub const MODEL: &str = "demo-model";

pub struct Demo {
    servers: Vec<MockServer>,
}

impl Demo {
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.url()).collect()
    }
}

pub fn start_workers() -> std::io::Result<Demo> {
    let servers = (0..WORKERS)
        .map(|i| {
            let mut c = MockConfig::named(format!("mock-{i}"));
            c.model = MODEL.to_string();
            c.ttft = Duration::from_millis(20);
            c.itl = Duration::from_millis(10);
            c.record = false;
            c.threads = 1;
            MockServer::spawn(c)
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    for s in &servers {
        tracing::info!(worker = %s.url(), "demo mock vLLM worker started");
    }
    Ok(Demo { servers })
}

pub fn curl_line(router: SocketAddr) -> String {
    format!(
        "try: curl -N http://{router}/v1/completions -H 'content-type: application/json' \
         -d '{{\"model\":\"{MODEL}\",\"prompt\":\"Hello\",\"max_tokens\":16,\"stream\":true}}'"
    )
}
