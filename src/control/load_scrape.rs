//! Scrapes vLLM's load gauges from each worker's `/metrics` on an interval:
//! `vllm:num_requests_waiting` and `vllm:num_requests_running` (summed over engines, i.e.
//! data-parallel ranks) and `vllm:kv_cache_usage_perc` (the fullest engine). A worker that
//! is one data-parallel rank (`http://h:p@N`) gets its own engine's gauges (`engine="N"`)
//! from its server's page.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use shards::sync::{Directory, LoadBoard};

/// vLLM's load as read from one `/metrics` page.
#[derive(Debug, Default, PartialEq)]
pub struct LoadGauges {
    pub waiting: Option<f64>,
    pub running: Option<f64>,
    pub kv_usage: Option<f64>,
}

/// Reads the gauges from Prometheus text.
#[cfg(test)]
pub fn parse_metrics(text: &str) -> LoadGauges {
    parse_metrics_of(text, None)
}

/// Reads the gauges from Prometheus text, of engine `engine` only if given.
pub fn parse_metrics_of(text: &str, engine: Option<u32>) -> LoadGauges {
    let label = engine.map(|e| format!("engine=\"{e}\""));
    let mut g = LoadGauges::default();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => (&line[..i], &line[i..]),
            None => continue,
        };
        if let Some(label) = &label {
            let labels = rest.split_once('}').map_or("", |(l, _)| l);
            if !labels
                .trim_start_matches('{')
                .split(',')
                .any(|l| l.trim() == label)
            {
                continue;
            }
        }
        let value = rest
            .rsplit(' ')
            .find(|t| !t.is_empty())
            .and_then(|v| v.parse::<f64>().ok());
        let Some(v) = value else { continue };
        match name {
            "vllm:num_requests_waiting" => *g.waiting.get_or_insert(0.0) += v,
            "vllm:num_requests_running" => *g.running.get_or_insert(0.0) += v,
            "vllm:kv_cache_usage_perc" => {
                let k = g.kv_usage.get_or_insert(0.0);
                *k = k.max(v);
            }
            _ => {}
        }
    }
    g
}

/// How long one scrape may take. Longer than the interval: a vLLM busy generating answers
/// `/metrics` late (seconds on a loaded host), and that is exactly when its load matters;
/// a scrape that gave up after one interval would never learn it.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(directory: Arc<Directory>, board: Arc<LoadBoard>, every: Duration) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Each worker is scraped on its own: a slow one is not scraped twice at once and does
    // not hold up the others.
    let mut busy: HashSet<String> = HashSet::new();
    let mut scrapes = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                for w in directory.current().iter() {
                    // (a data-parallel rank is its own routing target: keyed by its URL@rank)
                    if !busy.insert(w.url.clone()) {
                        continue;
                    }
                    let (key, url, slot, rank) =
                        (w.url.clone(), w.host_url().to_string(), w.slot, w.dp_rank);
                    let (client, board) = (client.clone(), board.clone());
                    scrapes.spawn(async move {
                        if let Some(g) =
                            scrape(&client, &url, rank, every.max(SCRAPE_TIMEOUT)).await
                        {
                            record(&board, slot, &g);
                        }
                        key
                    });
                }
            }
            Some(done) = scrapes.join_next() => {
                if let Ok(url) = done {
                    busy.remove(&url);
                }
            }
        }
    }
}

/// One worker's gauges, or `None` when it did not answer them in time.
async fn scrape(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    url: &str,
    rank: Option<u32>,
    timeout: Duration,
) -> Option<LoadGauges> {
    if url.starts_with("grpc://") {
        return super::engine::loads(url, rank, timeout).await;
    }
    let uri = format!("{url}/metrics").parse::<hyper::Uri>().ok()?;
    let fetch = async {
        let resp = client.get(uri).await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some(parse_metrics_of(&String::from_utf8_lossy(&body), rank))
    };
    tokio::time::timeout(timeout, fetch).await.ok().flatten()
}

fn record(board: &LoadBoard, slot: usize, g: &LoadGauges) {
    if let Some(w) = g.waiting {
        board.set_waiting(slot, w as u32);
    }
    if let Some(r) = g.running {
        board.set_running(slot, r as u32);
    }
    if let Some(k) = g.kv_usage {
        board.set_kv_usage(slot, k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_engines_and_takes_the_fullest_cache() {
        let text = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
vllm:num_requests_waiting{engine="1",model_name="m"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 9.0
"#;
        assert_eq!(
            parse_metrics(text),
            LoadGauges {
                waiting: Some(8.0),
                running: Some(5.0),
                kv_usage: Some(0.5)
            }
        );
        assert_eq!(parse_metrics("garbage\n"), LoadGauges::default());
        assert_eq!(
            parse_metrics_of(text, Some(1)),
            LoadGauges {
                waiting: Some(1.0),
                running: Some(2.0),
                kv_usage: Some(0.5)
            }
        );
        assert_eq!(parse_metrics_of(text, Some(2)), LoadGauges::default());
    }
}
