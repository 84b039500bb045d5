//! The non-generation endpoints: `/health`, `/version`, `/v1/models`, `/load`, `/metrics`
//! (Prometheus text with vLLM's gauge names and labels), `/tokenize`, and the ORCA
//! `endpoint-load-metrics` header. Load numbers come from the mock's in-flight count, prefix
//! cache counters from the simulated cache.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};

use crate::errors;
use crate::state::MockState;
use crate::stream::MockBody;
use crate::wire::push_str;

pub(crate) const VLLM_VERSION: &str = "0.32.0";

/// 200 with an empty body, or 503 when the mock was set unhealthy.
pub(crate) fn health(state: &MockState) -> Response<MockBody> {
    let mut resp = Response::new(MockBody::empty());
    if !state.healthy() {
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    resp
}

pub(crate) fn version() -> Response<MockBody> {
    errors::json(
        StatusCode::OK,
        format!("{{\"version\":\"{VLLM_VERSION}\"}}").into_bytes(),
    )
}

pub(crate) fn load(state: &MockState) -> Response<MockBody> {
    let n = state.in_flight.load(Relaxed);
    errors::json(
        StatusCode::OK,
        format!("{{\"server_load\":{n}}}").into_bytes(),
    )
}

pub(crate) fn models(state: &MockState, created: u64) -> Response<MockBody> {
    let config = state.config();
    let mut buf = Vec::with_capacity(512);
    buf.extend_from_slice(b"{\"object\":\"list\",\"data\":[{\"id\":");
    push_str(&mut buf, &config.model);
    buf.extend_from_slice(
        format!(",\"object\":\"model\",\"created\":{created},\"owned_by\":\"vllm\",\"root\":")
            .as_bytes(),
    );
    push_str(&mut buf, &config.model);
    buf.extend_from_slice(
        format!(
            ",\"parent\":null,\"max_model_len\":{},\"permission\":[{{\"id\":\"modelperm-{:016x}\",\
             \"object\":\"model_permission\",\"created\":{created},\"allow_create_engine\":false,\
             \"allow_sampling\":true,\"allow_logprobs\":true,\"allow_search_indices\":false,\
             \"allow_view\":true,\"allow_fine_tuning\":false,\"organization\":\"*\",\
             \"group\":null,\"is_blocking\":false}}]}}]}}",
            config.max_model_len,
            fastrand::u64(..)
        )
        .as_bytes(),
    );
    errors::json(StatusCode::OK, buf)
}

/// `/tokenize`: fake token ids, one per estimated prompt token.
pub(crate) fn tokenize(state: &MockState, count: usize) -> Response<MockBody> {
    let mut body = format!(
        "{{\"count\":{count},\"max_model_len\":{},\"tokens\":[",
        state.config().max_model_len
    );
    for i in 0..count {
        if i > 0 {
            body.push(',');
        }
        let _ = write!(body, "{}", if i == 0 { 1 } else { 100 + i });
    }
    body.push_str("],\"token_strs\":null}");
    errors::json(StatusCode::OK, body.into_bytes())
}

/// Python's float repr for the values the mock produces.
fn py_float(x: f64) -> String {
    format!("{x:?}")
}

/// The ORCA `endpoint-load-metrics` header vLLM adds to non-streamed completions when the
/// request carries `endpoint-load-metrics-format: TEXT|JSON`. `exclude` = requests to leave
/// out of the count (the one being answered, already finished in vLLM's engine).
pub(crate) fn orca_header(state: &MockState, format: &[u8], exclude: u64) -> Option<HeaderValue> {
    let (running, waiting) = state.load(exclude);
    let kv = state.kv_cache_usage(running);
    let (waiting, kv) = (py_float(waiting as f64), py_float(kv));
    let value = if format.eq_ignore_ascii_case(b"text") {
        format!("TEXT named_metrics.num_requests_waiting={waiting}, named_metrics.kv_cache_usage_perc={kv}")
    } else if format.eq_ignore_ascii_case(b"json") {
        format!(
            "JSON {{\"named_metrics\": {{\"num_requests_waiting\": {waiting}, \"kv_cache_usage_perc\": {kv}}}}}"
        )
    } else {
        return None;
    };
    HeaderValue::from_str(&value).ok()
}

/// `/metrics`: the gauges and counters a router reads, named and labelled as vLLM does.
pub(crate) fn metrics(state: &MockState) -> Response<MockBody> {
    let model = &state.config().model;
    let (running, waiting) = state.load(0);
    let kv = state.kv_cache_usage(running);
    let labels = format!("engine=\"0\",model_name=\"{model}\"");
    let mut out = String::with_capacity(4096);
    let mut gauge = |name: &str, help: &str, value: f64| {
        let _ = write!(
            out,
            "# HELP vllm:{name} {help}\n# TYPE vllm:{name} gauge\nvllm:{name}{{{labels}}} {}\n",
            py_float(value)
        );
    };
    gauge(
        "num_requests_running",
        "Number of requests in model execution batches.",
        running as f64,
    );
    gauge(
        "num_requests_waiting",
        "Number of requests waiting to be processed.",
        waiting as f64,
    );
    let _ = write!(
        out,
        "# HELP vllm:num_requests_waiting_by_reason Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.\n\
         # TYPE vllm:num_requests_waiting_by_reason gauge\n\
         vllm:num_requests_waiting_by_reason{{{labels},reason=\"capacity\"}} {}\n\
         vllm:num_requests_waiting_by_reason{{{labels},reason=\"deferred\"}} 0.0\n",
        py_float(waiting as f64)
    );
    let mut gauge = |name: &str, help: &str, value: f64| {
        let _ = write!(
            out,
            "# HELP vllm:{name} {help}\n# TYPE vllm:{name} gauge\nvllm:{name}{{{labels}}} {}\n",
            py_float(value)
        );
    };
    gauge(
        "kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        kv,
    );
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = write!(
            out,
            "# HELP vllm:{name}_total {help}\n# TYPE vllm:{name}_total counter\nvllm:{name}_total{{{labels}}} {}\n",
            py_float(value as f64)
        );
    };
    // In tokens of 4 bytes of routing text; 0 while the simulated prefix cache is off.
    counter(
        "prefix_cache_queries",
        "Prefix cache queries, in terms of number of queried tokens.",
        state.prefix_cache_queries(),
    );
    counter(
        "prefix_cache_hits",
        "Prefix cache hits, in terms of number of cached tokens.",
        state.prefix_cache_hits(),
    );
    counter(
        "prompt_tokens",
        "Number of prefill tokens processed.",
        state.prompt_tokens_total.load(Relaxed),
    );
    counter(
        "generation_tokens",
        "Number of generation tokens processed.",
        state.generation_tokens_total.load(Relaxed),
    );
    let _ = writeln!(
        out,
        "# HELP vllm:request_success_total Count of successfully processed requests.\n\
         # TYPE vllm:request_success_total counter"
    );
    for (reason, n) in [
        ("stop", state.success_stop.load(Relaxed)),
        ("length", state.success_length.load(Relaxed)),
        ("abort", state.success_abort.load(Relaxed)),
        ("error", 0),
        ("repetition", 0),
    ] {
        let _ = writeln!(
            out,
            "vllm:request_success_total{{engine=\"0\",finished_reason=\"{reason}\",model_name=\"{model}\"}} {}",
            py_float(n as f64)
        );
    }
    let mut resp = Response::new(MockBody::full(out.into()));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=1.0.0; charset=utf-8"),
    );
    resp
}
