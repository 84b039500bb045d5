//! Generate as vLLM's servicer answers it. Streamed: per token step, one `chunk` per live
//! choice carrying the new id, and for a choice that ends, a `complete` whose `output_ids`
//! repeat that last delta. Not streamed: one `complete` per choice with all its ids. Ids
//! are `super::expected_ids` then EOS (unless `ignore_eos`), cut by `stop_token_ids`
//! (finish "stop", `matched_token_id`) and `max_tokens` (finish "length"). Ids outside the
//! vocabulary are refused with INVALID_ARGUMENT. A client reset (RST_STREAM) is noticed
//! between tokens and counted in `cancelled`.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use grpc_proto::engine::generate_complete::MatchedStop;
use grpc_proto::engine::generate_request::Input;
use grpc_proto::engine::generate_response::Response as Reply;
use grpc_proto::engine::{
    GenerateComplete, GenerateRequest, GenerateResponse, GenerateStreamChunk,
};
use h2::server::SendResponse;
use h2::SendStream;

use super::expected_ids;
use super::server::{encode, send_head, send_status, trailers, INVALID_ARGUMENT, OK};
use super::state::{Failure, GrpcState, SeenRequest};

/// One choice's whole answer.
struct Choice {
    ids: Vec<u32>,
    finish_reason: &'static str,
    matched: Option<u32>,
}

/// Decrements the running count when the call ends however it ends.
struct Running<'a>(&'a GrpcState);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Relaxed);
    }
}

/// How a wait between tokens ended.
enum Wait {
    Elapsed,
    /// The client reset the stream (or the server is stopping).
    Gone,
}

pub async fn generate(req: GenerateRequest, mut respond: SendResponse<Bytes>, state: &GrpcState) {
    let cfg = &state.config;
    let sp = req.sampling_params.clone().unwrap_or_default();
    let (input_ids, prompt_len) = match &req.input {
        Some(Input::Tokenized(t)) => (t.input_ids.clone(), t.input_ids.len()),
        Some(Input::Text(t)) => (Vec::new(), t.split_whitespace().count()),
        None => (Vec::new(), 0),
    };
    state.record(|s| {
        s.generate_calls += 1;
        s.requests.push(SeenRequest {
            request_id: req.request_id.clone(),
            input_ids: input_ids.clone(),
            stream: req.stream,
            max_tokens: sp.max_tokens,
            n: sp.n,
            kv_transfer_params_json: req.kv_transfer_params_json.clone(),
            data_parallel_rank: req.data_parallel_rank,
        })
    });
    // A NIXL prefill leg (`do_remote_decode: true`) answers with what the decode side needs.
    let prefill_kv = req
        .kv_transfer_params_json
        .as_deref()
        .filter(|kv| cfg.kv_connector && kv.replace(' ', "").contains("\"do_remote_decode\":true"))
        .map(|_| nixl_prefill_answer(&cfg.name, &req.request_id, prompt_len));
    state.running.fetch_add(1, Relaxed);
    let _running = Running(state);
    if cfg.kv_events && state.failure().is_none() {
        state.kv_store(&input_ids);
    }
    let failure = state.failure();
    if let Some(Failure::Status { code, message }) = &failure {
        send_status(&mut respond, *code, message);
        return;
    }
    if let Some(bad) = input_ids.iter().find(|&&id| id >= cfg.vocab_size) {
        let msg = format!("Token id {bad} is out of vocabulary");
        send_status(&mut respond, INVALID_ARGUMENT, &msg);
        return;
    }
    let n = sp.n.max(1) as usize;
    let choices: Vec<Choice> = (0..n)
        .map(|i| {
            let mut ids = expected_ids(prompt_len, i, cfg.tokens);
            let mut finish_reason = "length";
            let mut matched = None;
            if let Some(k) = ids.iter().position(|id| sp.stop_token_ids.contains(id)) {
                ids.truncate(k + 1);
                finish_reason = "stop";
                matched = Some(ids[k]);
            } else if !sp.ignore_eos {
                ids.push(cfg.eos_token_id);
                finish_reason = "stop";
            }
            if let Some(max) = sp.max_tokens {
                if ids.len() > max as usize {
                    ids.truncate(max as usize);
                    finish_reason = "length";
                    matched = None;
                }
            }
            Choice {
                ids,
                finish_reason,
                matched,
            }
        })
        .collect();
    let Some(mut send) = send_head(&mut respond) else {
        return;
    };
    if let Wait::Gone = wait(&mut send, state, cfg.first_token_delay).await {
        state.record(|s| s.cancelled += 1);
        return;
    }
    let complete = |c: &Choice, index: usize, ids: Vec<u32>| GenerateResponse {
        response: Some(Reply::Complete(GenerateComplete {
            completion_tokens: ids.len() as u32,
            output_ids: ids,
            finish_reason: c.finish_reason.into(),
            prompt_tokens: prompt_len as u32,
            index: index as u32,
            matched_stop: c.matched.map(MatchedStop::MatchedTokenId),
            kv_transfer_params_json: prefill_kv.clone(),
            ..Default::default()
        })),
    };
    if !req.stream {
        for (i, c) in choices.iter().enumerate() {
            let _ = send.send_data(encode(&complete(c, i, c.ids.clone())), false);
        }
        if send.send_trailers(trailers(OK, "")).is_ok() {
            state.record(|s| s.generate_ok += 1);
        }
        return;
    }
    let steps = choices.iter().map(|c| c.ids.len()).max().unwrap_or(0);
    for step in 0..steps {
        // A failure comes when the next token would have.
        if step > 0 {
            if let Wait::Gone = wait(&mut send, state, cfg.inter_token_delay).await {
                state.record(|s| s.cancelled += 1);
                return;
            }
        }
        match &failure {
            Some(Failure::ResetAfter { after }) if *after == step => {
                // A reset drops DATA still queued on the stream: let the connection task
                // write the tokens sent so far first.
                let _ = wait(&mut send, state, Duration::from_millis(20)).await;
                send.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
            Some(Failure::StatusAfter {
                after,
                code,
                message,
            }) if *after == step => {
                let _ = send.send_trailers(trailers(*code, message));
                return;
            }
            Some(Failure::HangAfter { after }) if *after == step => {
                if let Wait::Gone = wait(&mut send, state, Duration::from_secs(3600)).await {
                    state.record(|s| s.cancelled += 1);
                }
                return;
            }
            _ => {}
        }
        for (i, c) in choices.iter().enumerate() {
            let Some(&id) = c.ids.get(step) else {
                continue;
            };
            let chunk = GenerateResponse {
                response: Some(Reply::Chunk(GenerateStreamChunk {
                    token_ids: vec![id],
                    prompt_tokens: prompt_len as u32,
                    completion_tokens: 1,
                    index: i as u32,
                    ..Default::default()
                })),
            };
            let mut ok = send.send_data(encode(&chunk), false).is_ok();
            if step + 1 == c.ids.len() {
                ok &= send
                    .send_data(encode(&complete(c, i, vec![id])), false)
                    .is_ok();
            }
            if !ok {
                state.record(|s| s.cancelled += 1);
                return;
            }
        }
    }
    if send.send_trailers(trailers(OK, "")).is_ok() {
        state.record(|s| s.generate_ok += 1);
    }
}

/// Waits `d`, watching for the client's reset and the server's shutdown.
async fn wait(send: &mut SendStream<Bytes>, state: &GrpcState, d: Duration) -> Wait {
    let mut shutdown = state.shutdown_signal();
    tokio::select! {
        _ = tokio::time::sleep(d) => Wait::Elapsed,
        _ = std::future::poll_fn(|cx| send.poll_reset(cx)) => Wait::Gone,
        _ = shutdown.changed() => Wait::Gone,
    }
}

/// What a NIXL prefill engine returns in `kv_transfer_params_json` (vLLM 0.32
/// `NixlConnector`, pull mode), naming this mock as the engine holding the blocks.
fn nixl_prefill_answer(name: &str, request_id: &str, prompt_tokens: usize) -> String {
    let blocks = prompt_tokens.div_ceil(16).max(1);
    let ids: Vec<String> = (0..blocks).map(|b| b.to_string()).collect();
    format!(
        "{{\"do_remote_prefill\":true,\"do_remote_decode\":false,\"remote_block_ids\":[[{}]],\
         \"remote_engine_id\":\"{name}-engine\",\"remote_request_id\":\"{request_id}\",\
         \"remote_host\":\"127.0.0.1\",\"remote_port\":5600,\"tp_size\":1,\
         \"remote_num_tokens\":{prompt_tokens}}}",
        ids.join(",")
    )
}
