//! The gRPC mock engine over a real HTTP/2 connection (h2's client on 127.0.0.1): Generate's
//! message sequence streamed and not, stop ids and max_tokens, refusals as gRPC statuses,
//! mid-stream failures, a client reset noticed, Abort, HealthCheck and GetTokenizer.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use grpc_proto::common::{GetTokenizerChunk, GetTokenizerRequest};
use grpc_proto::engine::generate_complete::MatchedStop;
use grpc_proto::engine::generate_request::Input;
use grpc_proto::engine::generate_response::Response as Reply;
use grpc_proto::engine::{
    AbortRequest, AbortResponse, GenerateRequest, GenerateResponse, HealthCheckRequest,
    HealthCheckResponse, SamplingParams, TokenizedInput,
};
use grpc_proto::{path, Message};
use h2::client::SendRequest;
use mock_vllm::grpc::{expected_ids, Failure, GrpcConfig, GrpcMock};

/// A call's messages and its status (code, message).
struct Answer {
    messages: Vec<Bytes>,
    status: (u32, String),
}

async fn connect(m: &GrpcMock) -> SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(m.addr()).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

fn frame<M: Message>(m: &M) -> Bytes {
    let mut b = BytesMut::new();
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&(m.encoded_len() as u32).to_be_bytes());
    m.encode(&mut b).unwrap();
    b.freeze()
}

fn status_of(h: &http::HeaderMap) -> Option<(u32, String)> {
    let code = h.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let msg = h
        .get("grpc-message")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    Some((code, msg))
}

async fn call<M: Message>(send: &SendRequest<Bytes>, path: &str, msg: &M) -> Answer {
    let mut send = send.clone().ready().await.unwrap();
    let req = http::Request::post(format!("http://mock{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut body) = send.send_request(req, false).unwrap();
    body.send_data(frame(msg), true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    if let Some(status) = status_of(resp.headers()) {
        return Answer {
            messages: vec![],
            status,
        };
    }
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    while let Some(d) = body.data().await {
        let d = d.unwrap();
        let _ = body.flow_control().release_capacity(d.len());
        buf.extend_from_slice(&d);
    }
    let status = status_of(&body.trailers().await.unwrap().unwrap()).unwrap();
    let mut messages = Vec::new();
    while buf.len() >= 5 {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        buf.advance(5);
        messages.push(buf.split_to(len).freeze());
    }
    Answer { messages, status }
}

fn generate(ids: Vec<u32>, stream: bool, sp: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        request_id: "r1".into(),
        input: Some(Input::Tokenized(TokenizedInput {
            original_text: String::new(),
            input_ids: ids,
        })),
        sampling_params: Some(sp),
        stream,
        ..Default::default()
    }
}

fn replies(a: &Answer) -> Vec<Reply> {
    a.messages
        .iter()
        .map(|m| {
            GenerateResponse::decode(m.clone())
                .unwrap()
                .response
                .unwrap()
        })
        .collect()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn streamed_generate_is_chunks_then_a_complete_repeating_the_last_delta() {
    let m = GrpcMock::spawn(GrpcConfig::default()).unwrap();
    rt().block_on(async {
        let send = connect(&m).await;
        let sp = SamplingParams {
            max_tokens: Some(3),
            ..Default::default()
        };
        let a = call(&send, path::GENERATE, &generate(vec![1, 2], true, sp)).await;
        assert_eq!(a.status.0, 0);
        let r = replies(&a);
        let want = expected_ids(2, 0, 3);
        assert_eq!(r.len(), 4);
        for (k, id) in want.iter().enumerate() {
            let Reply::Chunk(c) = &r[k] else { panic!() };
            assert_eq!((c.token_ids.clone(), c.prompt_tokens), (vec![*id], 2));
        }
        let Reply::Complete(c) = &r[3] else { panic!() };
        assert_eq!(c.output_ids, vec![want[2]]);
        assert_eq!(c.finish_reason, "length");

        // Not streamed, n = 2, no max_tokens: all ids and EOS in one complete per choice.
        let sp = SamplingParams {
            n: 2,
            ..Default::default()
        };
        let a = call(&send, path::GENERATE, &generate(vec![1], false, sp)).await;
        let r = replies(&a);
        assert_eq!(r.len(), 2);
        for (i, r) in r.iter().enumerate() {
            let Reply::Complete(c) = r else { panic!() };
            let mut want = expected_ids(1, i, 16);
            want.push(2);
            assert_eq!((c.index, &c.output_ids), (i as u32, &want));
            assert_eq!(c.finish_reason, "stop");
            assert_eq!(c.matched_stop, None);
        }

        // A stop id ends the choice there and is reported.
        let stop = expected_ids(1, 0, 3)[2];
        let sp = SamplingParams {
            stop_token_ids: vec![stop],
            ..Default::default()
        };
        let r = replies(&call(&send, path::GENERATE, &generate(vec![1], false, sp)).await);
        let Reply::Complete(c) = &r[0] else { panic!() };
        assert_eq!(c.output_ids, expected_ids(1, 0, 3));
        assert_eq!(c.matched_stop, Some(MatchedStop::MatchedTokenId(stop)));
    });
    assert_eq!(m.stats().generate_ok, 3);
}

#[test]
fn refusals_and_failures_are_grpc_statuses() {
    let m = GrpcMock::spawn(GrpcConfig::default()).unwrap();
    rt().block_on(async {
        let send = connect(&m).await;
        let sp = SamplingParams::default;
        let a = call(&send, path::GENERATE, &generate(vec![1, 4096], false, sp())).await;
        assert_eq!(a.status, (3, "Token id 4096 is out of vocabulary".into()));

        m.state().set_failure(Some(Failure::Status {
            code: 14,
            message: "busy".into(),
        }));
        let a = call(&send, path::GENERATE, &generate(vec![1], true, sp())).await;
        assert_eq!(a.status, (14, "busy".into()));

        m.state().set_failure(Some(Failure::StatusAfter {
            after: 2,
            code: 13,
            message: "died".into(),
        }));
        let a = call(&send, path::GENERATE, &generate(vec![1], true, sp())).await;
        assert_eq!(a.status, (13, "died".into()));
        assert_eq!(a.messages.len(), 2);
    });
}

#[test]
fn a_reset_stream_is_counted_and_abort_recorded() {
    let m = GrpcMock::spawn(GrpcConfig {
        inter_token_delay: Duration::from_millis(20),
        ..Default::default()
    })
    .unwrap();
    rt().block_on(async {
        let send = connect(&m).await;
        let mut s = send.clone().ready().await.unwrap();
        let req = http::Request::post(format!("http://mock{}", path::GENERATE))
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        let (resp, mut body) = s.send_request(req, false).unwrap();
        let g = generate(vec![1], true, SamplingParams::default());
        body.send_data(frame(&g), true).unwrap();
        let mut resp = resp.await.unwrap().into_body();
        resp.data().await.unwrap().unwrap();
        drop(resp);
        drop(body);
        let a = call(
            &send,
            path::ABORT,
            &AbortRequest {
                request_ids: vec!["r1".into()],
            },
        )
        .await;
        assert_eq!(a.status.0, 0);
        AbortResponse::decode(a.messages[0].clone()).unwrap();
    });
    for _ in 0..100 {
        if m.stats().cancelled == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(m.stats().cancelled, 1);
    assert_eq!(m.stats().aborted, vec!["r1".to_string()]);
    assert_eq!(m.stats().running, 0);
}

#[test]
fn health_and_tokenizer_bundle() {
    let dir = std::env::temp_dir().join(format!("grpc-mock-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    let m = GrpcMock::spawn(GrpcConfig {
        tokenizer_dir: Some(dir.clone()),
        ..Default::default()
    })
    .unwrap();
    rt().block_on(async {
        let send = connect(&m).await;
        let a = call(&send, path::HEALTH_CHECK, &HealthCheckRequest {}).await;
        assert!(
            HealthCheckResponse::decode(a.messages[0].clone())
                .unwrap()
                .healthy
        );
        m.state().set_healthy(false);
        let a = call(&send, path::HEALTH_CHECK, &HealthCheckRequest {}).await;
        assert!(
            !HealthCheckResponse::decode(a.messages[0].clone())
                .unwrap()
                .healthy
        );

        let a = call(&send, path::GET_TOKENIZER, &GetTokenizerRequest {}).await;
        assert_eq!(a.status.0, 0);
        let chunk = GetTokenizerChunk::decode(a.messages[0].clone()).unwrap();
        assert_eq!(chunk.sha256.len(), 64);
        assert!(chunk.data.starts_with(b"PK"));
    });
    let _ = std::fs::remove_dir_all(dir);
}
