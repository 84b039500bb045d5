//! One HTTP request, start to finish: record it, route it by path, run a generation (fake
//! tokens on the configured schedule, prefix cache lookup and prefill cost, NIXL
//! prefill/decode legs, injected failures), and put the headers every response carries
//! (`x-mock-worker`, `x-request-id`, uvicorn's `server` and `vary`).

use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::Value;
use tokio::time::Instant;

use crate::errors;
use crate::info;
use crate::knobs::Knobs;
use crate::prefix_cache::PrefixHit;
use crate::request::{self, GenerationRequest, PdRole};
use crate::state::{MockState, Received};
use crate::stream::{Api, MockBody, SseStream, StreamPlan};
use crate::validate;
use crate::wire::{self, ChoiceText, Head, Usage};

/// hyper's service function: every request of every connection comes through here.
pub(crate) async fn handle(
    req: Request<Incoming>,
    state: Arc<MockState>,
    connection_id: u64,
) -> Result<Response<MockBody>, Infallible> {
    state.requests.fetch_add(1, Relaxed);
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        // The client went away mid-body: nobody will read the answer.
        Err(_) => Bytes::new(),
    };
    if state.config().record {
        state.record(Received {
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().map(str::to_string),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.clone(),
            connection_id,
        });
    }
    let request_id = parts.headers.get("x-request-id").cloned();
    let mut resp = route(&state, &parts, body).await;
    let headers = resp.headers_mut();
    headers.insert("server", HeaderValue::from_static("uvicorn"));
    headers.insert("vary", HeaderValue::from_static("Origin"));
    headers.insert("x-mock-worker", state.worker_header.clone());
    if state.config().request_id_headers {
        let id = request_id.unwrap_or_else(|| {
            HeaderValue::from_str(&random_hex(32)).expect("hex is a valid header value")
        });
        headers.insert("x-request-id", id);
    }
    Ok(resp)
}

async fn route(state: &Arc<MockState>, parts: &Parts, body: Bytes) -> Response<MockBody> {
    let post = parts.method == Method::POST;
    let get = parts.method == Method::GET;
    match parts.uri.path() {
        "/v1/completions" if post => generation(state, parts, body, Api::Completion).await,
        "/v1/chat/completions" if post => generation(state, parts, body, Api::Chat).await,
        "/v1/responses" if post => simple(state, parts, body, Simple::Responses).await,
        "/v1/embeddings" if post && state.config().embeddings => {
            simple(state, parts, body, Simple::Embeddings).await
        }
        "/generate" if post => simple(state, parts, body, Simple::Generate).await,
        "/tokenize" if post => simple(state, parts, body, Simple::Tokenize).await,
        "/health" if get => info::health(state),
        "/version" if get => info::version(),
        "/v1/models" if get => info::models(state, unix_now()),
        "/load" if get => info::load(state),
        "/metrics" if get => info::metrics(state),
        "/v1/embeddings" if state.config().embeddings => errors::method_not_allowed("POST"),
        "/v1/completions"
        | "/v1/chat/completions"
        | "/v1/responses"
        | "/generate"
        | "/tokenize" => errors::method_not_allowed("POST"),
        "/health" | "/version" | "/v1/models" | "/load" | "/metrics" => {
            errors::method_not_allowed("GET")
        }
        _ => errors::not_found(),
    }
}

/// Sleep until `at` (on the mock's precise clock: tokio's rounds up to the next
/// millisecond, which would also cap a zero-delay mock at ~1 ms per request).
async fn wait_until(at: Instant) {
    crate::clock::sleep_until(at).await;
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random_hex(len: usize) -> String {
    let mut s = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    s.truncate(len);
    s
}

/// Injected failure for this request, if any: a header override or the fail-rate dice.
fn injected_status(state: &MockState, knobs: &Knobs) -> Option<u16> {
    if knobs.status.is_some() {
        return knobs.status;
    }
    let rate = state.fail_rate();
    (rate > 0.0 && fastrand::f64() < rate).then_some(500)
}

/// What every request with a JSON body goes through first: injected failures, content
/// type, JSON, and for completions and chat (`api`) the fields vLLM validates before it
/// looks at the model (see `validate`). `Err` is the response to send instead.
fn admit(
    state: &MockState,
    parts: &Parts,
    body: &[u8],
    knobs: &Knobs,
    api: Option<Api>,
) -> Result<GenerationRequest, Box<Response<MockBody>>> {
    if let Some(status) = injected_status(state, knobs) {
        state.injected_errors.fetch_add(1, Relaxed);
        return Err(Box::new(errors::injected(status)));
    }
    let is_json = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(Box::new(errors::unsupported_media_type()));
    }
    let mut value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return Err(Box::new(errors::invalid_json(&e, body))),
    };
    if let Some(api) = api {
        validate::check_fields(&mut value, api)?;
    }
    match serde_json::from_value(value) {
        Ok(req) => Ok(req),
        Err(e) => Err(Box::new(errors::invalid_json(&e, body))),
    }
}

/// vLLM's 404 for a model it does not serve (an empty or absent name means the served one).
fn check_model(state: &MockState, req: &GenerationRequest) -> Result<(), Box<Response<MockBody>>> {
    match req.model.as_deref() {
        Some(model) if !model.is_empty() && model != state.config().model => Err(Box::new(
            errors::unknown_model(model, &state.config().model),
        )),
        _ => Ok(()),
    }
}

fn top_level_keys(body: &[u8]) -> usize {
    serde_json::from_slice::<serde_json::Map<String, Value>>(body)
        .map(|m| m.len())
        .unwrap_or(0)
}

/// How many tokens to produce and why the generation stops.
fn token_budget(
    limit: Option<u64>,
    natural: Option<usize>,
    default: usize,
) -> (usize, &'static str) {
    let limit = limit.map(|l| (l as usize).max(1));
    let natural = natural.map(|n| n.max(1));
    match (limit, natural) {
        (Some(l), Some(n)) if n < l => (n, "stop"),
        (Some(l), _) => (l, "length"),
        (None, Some(n)) => (n, "stop"),
        (None, None) => (default.max(1), "stop"),
    }
}

/// `/v1/completions` and `/v1/chat/completions`, streamed or not.
async fn generation(
    state: &Arc<MockState>,
    parts: &Parts,
    body: Bytes,
    api: Api,
) -> Response<MockBody> {
    let entered = Instant::now();
    let config = state.config();
    let knobs = Knobs::new(config, &parts.headers);
    let req = match admit(state, parts, &body, &knobs, Some(api)) {
        Ok(req) => req,
        Err(resp) => return *resp,
    };
    let prompts = match api {
        Api::Completion => match request::completion_prompts(req.prompt.as_ref()) {
            Some(p) => p,
            None => return errors::error(
                400,
                "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)",
                "BadRequestError",
                Some("prompt"),
            ),
        },
        Api::Chat => match req.messages.as_ref() {
            Some(Value::Array(messages)) => vec![request::chat_prompt_tokens(messages)],
            _ => return errors::missing_field("messages", top_level_keys(&body)),
        },
    };
    if let Err(resp) = check_model(state, &req) {
        return *resp;
    }
    let limit = match api {
        Api::Completion => req.max_tokens,
        Api::Chat => req.max_completion_tokens.or(req.max_tokens),
    };
    let limits = validate::Limits {
        max_tokens: limit,
        n: req.n,
        temperature: req.temperature,
        top_p: req.top_p,
        logprobs: match api {
            Api::Completion => req.logprobs.as_ref().and_then(Value::as_i64),
            Api::Chat => req.top_logprobs,
        },
    };
    if let Err(resp) = validate::check_limits(&limits, &prompts, config.max_model_len) {
        return *resp;
    }
    // Completions: `n` choices per prompt, one after the other (choice i*n+j is prompt i's
    // j-th); chat streams keep one choice (the mock does not interleave several).
    let n = req.n.unwrap_or(1).max(1) as usize;
    let streamed = req.stream.unwrap_or(false);
    let prompt_tokens: Vec<usize> = match api {
        Api::Completion => prompts
            .iter()
            .flat_map(|&p| std::iter::repeat_n(p, n))
            .collect(),
        Api::Chat => prompts.clone(),
    };
    let chat_choices = if api == Api::Chat && !streamed { n } else { 1 };
    let (tokens, finish) =
        token_budget(limit.map(|l| l.max(1) as u64), knobs.tokens, config.tokens);
    let prefix = state
        .models_prefill()
        .then(|| prompt_prefix(state, api, &req, body.len()));

    let (inflight, before) = state.enter();
    let role = req.pd_role();
    match role {
        PdRole::Prefill => state.prefill_legs.fetch_add(1, Relaxed),
        PdRole::Decode => state.decode_legs.fetch_add(1, Relaxed),
        PdRole::None => 0,
    };
    let queue = config.ttft_per_inflight * before.min(u32::MAX as u64) as u32;
    // A decode leg's KV arrives from its prefill leg: nothing to prefill here.
    let prefill = match prefix {
        Some(hit) if role != PdRole::Decode => {
            prefill_cost(config.prefill_per_kb, hit.uncached_bytes())
        }
        _ => Duration::ZERO,
    };
    let ttft = if role == PdRole::Prefill {
        knobs.prefill_delay
    } else {
        knobs.ttft
    } + queue
        + prefill;
    let start = Instant::now();
    let rid = parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| random_hex(16));
    let id_prefix = match api {
        Api::Completion => "cmpl",
        Api::Chat => "chatcmpl",
    };
    let head = Head {
        id: format!("{id_prefix}-{rid}"),
        created: unix_now(),
        model: req
            .model
            .clone()
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| config.model.clone()),
        fingerprint: state.fingerprint.clone(),
    };
    let total_prompt: usize = prompts.iter().sum();
    state
        .prompt_tokens_total
        .fetch_add(total_prompt as u64, Relaxed);

    if streamed {
        let plan = StreamPlan {
            api,
            head,
            prompt_total: total_prompt,
            prompt_tokens,
            tokens,
            finish,
            include_usage: req.include_usage(),
            continuous_usage: req.continuous_usage(),
            first_token_at: start + ttft,
            itl: knobs.itl,
            hang_after: knobs.hang_after,
            drop_after: knobs.drop_after,
            error_after: knobs.error_after,
            keep_alive: config.sse_keep_alive,
            timing: config.report_timing.then(|| {
                let carried = match &req.kv_transfer_params {
                    Some(Value::Object(kv)) => kv.get("mock_service_us").and_then(Value::as_u64),
                    _ => None,
                };
                (entered, carried.unwrap_or(0))
            }),
        };
        let mut resp = Response::new(MockBody::Sse(Box::new(SseStream::new(plan, inflight))));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        if let Some(hit) = prefix {
            resp.headers_mut()
                .insert("x-mock-prefix-hit", prefix_hit_header(hit));
        }
        return resp;
    }

    // Non-streamed: the whole answer once the last token would have been generated.
    let done_at =
        start + ttft + knobs.itl * (tokens.saturating_sub(1)).min(u32::MAX as usize) as u32;
    wait_until(done_at).await;

    let service_us = config
        .report_timing
        .then(|| entered.elapsed().as_micros() as u64);
    let kv_params = (role == PdRole::Prefill)
        .then(|| prefill_kv_params(state, &head, api, total_prompt, service_us));
    let text: String = (0..tokens).map(wire::token_text).collect();
    let usage = Usage {
        prompt: total_prompt,
        completion: tokens * prompt_tokens.len() * chat_choices,
    };
    let body = match api {
        Api::Completion => {
            let choices: Vec<ChoiceText<'_>> = prompt_tokens
                .iter()
                .map(|_| ChoiceText {
                    text: &text,
                    finish,
                })
                .collect();
            wire::completion(&head, &choices, usage, kv_params.as_deref())
        }
        Api::Chat => wire::chat(
            &head,
            &text,
            finish,
            chat_choices,
            usage,
            kv_params.as_deref(),
        ),
    };
    state
        .generation_tokens_total
        .fetch_add(usage.completion as u64, Relaxed);
    state.count_success(finish, (prompt_tokens.len() * chat_choices) as u64);
    drop(inflight);
    let mut resp = errors::json(StatusCode::OK, body);
    if let Some(format) = parts.headers.get("endpoint-load-metrics-format") {
        if let Some(value) = info::orca_header(state, format.as_bytes(), 0) {
            resp.headers_mut().insert("endpoint-load-metrics", value);
        }
    }
    if let Some(hit) = prefix {
        resp.headers_mut()
            .insert("x-mock-prefix-hit", prefix_hit_header(hit));
    }
    resp
}

/// Run a generation request's routing text through the prefix cache.
fn prompt_prefix(
    state: &MockState,
    api: Api,
    req: &GenerationRequest,
    body_len: usize,
) -> PrefixHit {
    let mut blocks = state.prompt_blocks(body_len);
    let mut sink = |piece: &[u8]| blocks.feed(piece);
    match api {
        Api::Completion => request::completion_routing_text(req.prompt.as_ref(), &mut sink),
        Api::Chat => {
            if let Some(Value::Array(messages)) = req.messages.as_ref() {
                request::chat_routing_text(messages, &mut sink)
            }
        }
    }
    state.prefix_lookup(&blocks)
}

/// The time to prefill `bytes` of uncached prompt at `per_kb` per KiB.
fn prefill_cost(per_kb: Duration, bytes: usize) -> Duration {
    let nanos = per_kb.as_nanos() * bytes as u128 / 1024;
    Duration::from_nanos(nanos.min(u64::MAX as u128) as u64)
}

/// `x-mock-prefix-hit: <cached bytes>/<prompt bytes>`.
fn prefix_hit_header(hit: PrefixHit) -> HeaderValue {
    HeaderValue::from_str(&format!("{}/{}", hit.cached_bytes, hit.prompt_bytes))
        .expect("digits are a valid header value")
}

/// What a NIXL prefill worker (vLLM 0.32 `NixlConnector`, pull mode) returns in
/// `kv_transfer_params`, with this mock's address standing in for the side channel.
fn prefill_kv_params(
    state: &MockState,
    head: &Head,
    api: Api,
    prompt_tokens: usize,
    service_us: Option<u64>,
) -> Vec<u8> {
    let blocks = prompt_tokens.div_ceil(16).max(1) as u64;
    let first = state.next_block_id.fetch_add(blocks, Relaxed);
    let block_ids: Vec<String> = (first..first + blocks).map(|b| b.to_string()).collect();
    // vLLM's internal request id: the external id, the prompt index for completions, and a
    // random suffix.
    let request_id = match api {
        Api::Completion => format!("{}-0-{}", head.id, random_hex(8)),
        Api::Chat => format!("{}-{}", head.id, random_hex(8)),
    };
    let addr = state.local_addr();
    let mut buf = Vec::with_capacity(384);
    buf.extend_from_slice(
        b"{\"do_remote_prefill\":true,\"do_remote_decode\":false,\"remote_block_ids\":[[",
    );
    buf.extend_from_slice(block_ids.join(",").as_bytes());
    buf.extend_from_slice(b"]],\"remote_engine_id\":");
    wire::push_str(&mut buf, &format!("{}-engine", state.config().name));
    buf.extend_from_slice(b",\"remote_request_id\":");
    wire::push_str(&mut buf, &request_id);
    buf.extend_from_slice(b",\"remote_host\":");
    wire::push_str(&mut buf, &addr.ip().to_string());
    buf.extend_from_slice(
        format!(
            ",\"remote_port\":{},\"tp_size\":1,\"dcp_size\":1,\"pp_size\":1,\
             \"remote_num_tokens\":{prompt_tokens},\"remote_blocks_expiry_time\":null,\
             \"transfer_mode\":\"pull\"",
            addr.port()
        )
        .as_bytes(),
    );
    if let Some(us) = service_us {
        buf.extend_from_slice(format!(",\"mock_service_us\":{us}").as_bytes());
    }
    buf.push(b'}');
    buf
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Simple {
    Responses,
    Embeddings,
    Generate,
    Tokenize,
}

/// The minimal endpoints: `/v1/responses`, `/v1/embeddings`, `/generate`, `/tokenize`.
/// They honour the injected failures and the TTFT/ITL schedule, not streaming.
async fn simple(
    state: &Arc<MockState>,
    parts: &Parts,
    body: Bytes,
    kind: Simple,
) -> Response<MockBody> {
    let config = state.config();
    let knobs = Knobs::new(config, &parts.headers);
    let req = match admit(state, parts, &body, &knobs, None) {
        Ok(req) => req,
        Err(resp) => return *resp,
    };
    if let Err(resp) = check_model(state, &req) {
        return *resp;
    }
    let model = req
        .model
        .clone()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| config.model.clone());
    if kind == Simple::Tokenize {
        let count = match (req.prompt.as_ref(), req.messages.as_ref()) {
            (_, Some(Value::Array(m))) => request::chat_prompt_tokens(m),
            (p, _) => request::completion_prompts(p)
                .map(|v| v.iter().sum())
                .unwrap_or(1),
        };
        return info::tokenize(state, count);
    }
    let (inflight, before) = state.enter();
    let queue = config.ttft_per_inflight * before.min(u32::MAX as u64) as u32;
    let created = unix_now();
    match kind {
        Simple::Embeddings => {
            let inputs = request::embedding_inputs(req.input.as_ref());
            if inputs.is_empty() {
                return errors::missing_field("input", top_level_keys(&body));
            }
            wait_until(Instant::now() + knobs.ttft + queue).await;
            let prompt: usize = inputs
                .iter()
                .map(|s| 1 + s.split_whitespace().count())
                .sum();
            state.prompt_tokens_total.fetch_add(prompt as u64, Relaxed);
            drop(inflight);
            let id = format!("embd-{}", random_hex(16));
            errors::json(
                StatusCode::OK,
                wire::embeddings(&id, created, &model, &inputs, 8, prompt),
            )
        }
        Simple::Responses | Simple::Generate => {
            let (limit, prompt) = if kind == Simple::Responses {
                (
                    req.max_output_tokens,
                    request::responses_prompt_tokens(req.input.as_ref()),
                )
            } else {
                (
                    req.max_tokens.map(|m| m.max(1) as u64),
                    request::completion_prompts(req.prompt.as_ref())
                        .map(|v| v.iter().sum())
                        .unwrap_or(1),
                )
            };
            let (tokens, finish) = token_budget(limit, knobs.tokens, config.tokens);
            let wait = knobs.ttft
                + queue
                + knobs.itl * (tokens.saturating_sub(1)).min(u32::MAX as usize) as u32;
            wait_until(Instant::now() + wait).await;
            state.prompt_tokens_total.fetch_add(prompt as u64, Relaxed);
            state
                .generation_tokens_total
                .fetch_add(tokens as u64, Relaxed);
            state.count_success(finish, 1);
            drop(inflight);
            let text: String = (0..tokens).map(wire::token_text).collect();
            let body = if kind == Simple::Responses {
                wire::responses(
                    &format!("resp_{}", random_hex(16)),
                    &format!("msg_{}", random_hex(16)),
                    created,
                    &model,
                    &text,
                    limit.map(|l| l as usize),
                    Usage {
                        prompt,
                        completion: tokens,
                    },
                )
            } else {
                // vLLM's old demo server (`vllm.entrypoints.api_server`): prompt + output.
                let mut buf = b"{\"text\":[".to_vec();
                wire::push_str(
                    &mut buf,
                    &(request::prompt_text(req.prompt.as_ref()) + &text),
                );
                buf.extend_from_slice(b"]}");
                buf
            };
            errors::json(StatusCode::OK, body)
        }
        Simple::Tokenize => unreachable!("answered above"),
    }
}
