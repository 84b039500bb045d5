//! Response bodies: a fixed buffer, or a streamed SSE completion driven by its own timers.
//!
//! The SSE body is a state machine polled directly by hyper (no task, no channel): each poll
//! either yields the next event as its own chunk, or arms a timer for the next token's due
//! time. hyper drops the body when the client goes away (it watches the socket for EOF while
//! a response is being written), so `Drop` is where an unfinished stream counts as aborted.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::state::InFlight;
use crate::wire::{self, Head, Usage};

/// Every response body the mock sends.
pub enum MockBody {
    Full(Option<Bytes>),
    Sse(Box<SseStream>),
}

impl MockBody {
    pub(crate) fn full(bytes: Bytes) -> MockBody {
        if bytes.is_empty() {
            MockBody::Full(None)
        } else {
            MockBody::Full(Some(bytes))
        }
    }

    pub(crate) fn empty() -> MockBody {
        MockBody::Full(None)
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            MockBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Sse(stream) => stream.poll_event(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, MockBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            MockBody::Full(None) => SizeHint::with_exact(0),
            MockBody::Sse(_) => SizeHint::default(),
        }
    }
}

/// Which OpenAI API the stream speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Api {
    Completion,
    Chat,
}

/// Everything one streamed response will send, and when.
pub(crate) struct StreamPlan {
    pub api: Api,
    pub head: Head,
    /// Prompt tokens of each choice (completions accept a list of prompts, and `n` choices
    /// of each).
    pub prompt_tokens: Vec<usize>,
    /// Prompt tokens of the request (each prompt once, whatever `n`), for the usage chunk.
    pub prompt_total: usize,
    /// Completion tokens per choice (>= 1).
    pub tokens: usize,
    pub finish: &'static str,
    pub include_usage: bool,
    pub continuous_usage: bool,
    /// Token `i` is due at `first_token_at + i * itl`.
    pub first_token_at: Instant,
    pub itl: Duration,
    pub hang_after: Option<usize>,
    pub drop_after: Option<usize>,
    pub error_after: Option<usize>,
    pub keep_alive: Option<Duration>,
    /// `--report-timing`: when the request arrived, and the prefill time its
    /// `kv_transfer_params` carried (µs); the first token reports their sum.
    pub timing: Option<(Instant, u64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Tokens,
    /// Stop sending; never wake. hyper drops the body when the client leaves.
    Hang,
    /// Yield once so hyper flushes what it has, then fail the body.
    DropSoon,
    Drop,
    /// Everything queued; end the body once `pending` is empty.
    Finished,
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Unfinished,
    Completed,
    Dropped,
}

pub struct SseStream {
    plan: StreamPlan,
    slot: usize,
    pending: VecDeque<Bytes>,
    phase: Phase,
    next_at: Instant,
    last_sent: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    sleep_at: Option<Instant>,
    first: Option<crate::clock::Deadline>,
    outcome: Outcome,
    tokens_sent: usize,
    inflight: InFlight,
}

impl SseStream {
    pub(crate) fn new(plan: StreamPlan, inflight: InFlight) -> SseStream {
        let now = Instant::now();
        SseStream {
            next_at: plan.first_token_at,
            plan,
            slot: 0,
            pending: VecDeque::with_capacity(4),
            phase: Phase::Tokens,
            last_sent: now,
            sleep: None,
            sleep_at: None,
            first: None,
            outcome: Outcome::Unfinished,
            tokens_sent: 0,
            inflight,
        }
    }

    fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(event))));
            }
            match self.phase {
                Phase::Tokens => {}
                Phase::Finished => {
                    self.outcome = Outcome::Completed;
                    self.phase = Phase::Done;
                    return Poll::Ready(None);
                }
                Phase::Done => return Poll::Ready(None),
                Phase::Hang => return Poll::Pending,
                Phase::DropSoon => {
                    self.phase = Phase::Drop;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Phase::Drop => {
                    self.outcome = Outcome::Dropped;
                    self.phase = Phase::Done;
                    return Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "mock-vllm: drop-after reached",
                    ))));
                }
            }
            let slot = self.slot;
            if self.plan.hang_after == Some(slot) {
                self.phase = Phase::Hang;
                continue;
            }
            if self.plan.drop_after == Some(slot) {
                self.phase = Phase::DropSoon;
                continue;
            }
            if self.plan.error_after == Some(slot) {
                self.pending.push_back(wire::stream_error(
                    "mock-vllm injected in-band error",
                    "InternalServerError",
                    500,
                ));
                self.pending.push_back(Bytes::from_static(wire::DONE));
                self.phase = Phase::Finished;
                continue;
            }
            if slot >= self.plan.tokens {
                if self.plan.include_usage {
                    let object = match self.plan.api {
                        Api::Completion => "text_completion",
                        Api::Chat => "chat.completion.chunk",
                    };
                    let usage = Usage {
                        prompt: self.plan.prompt_total,
                        completion: self.plan.tokens * self.plan.prompt_tokens.len(),
                    };
                    self.pending
                        .push_back(wire::usage_chunk(&self.plan.head, object, usage));
                }
                self.pending.push_back(Bytes::from_static(wire::DONE));
                self.phase = Phase::Finished;
                continue;
            }
            // Wait for this token's due time, sending keep-alive comments while idle.
            let due = self.next_at;
            let now = Instant::now();
            if now < due {
                let wake = match self.plan.keep_alive {
                    Some(ka) => due.min(self.last_sent + ka),
                    None => due,
                };
                if now < wake && self.sleep_until(wake, cx).is_pending() {
                    return Poll::Pending;
                }
                let now = Instant::now();
                if now < due {
                    self.last_sent = now;
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                        wire::KEEP_ALIVE,
                    )))));
                }
            }
            self.queue_slot(slot);
            self.slot += 1;
            self.tokens_sent += 1;
            self.next_at = due + self.plan.itl;
            self.last_sent = Instant::now();
        }
    }

    fn sleep_until(&mut self, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
        // The first token on the precise clock (what TTFT measurements subtract); the
        // gaps after it on tokio's.
        if self.tokens_sent == 0 {
            let first = match &mut self.first {
                Some(d) if d.at() == at => d,
                slot => slot.insert(crate::clock::sleep_until(at)),
            };
            return Pin::new(first).poll(cx);
        }
        match &mut self.sleep {
            Some(sleep) => {
                if self.sleep_at != Some(at) {
                    sleep.as_mut().reset(at);
                }
            }
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
        }
        self.sleep_at = Some(at);
        self.sleep.as_mut().expect("armed above").as_mut().poll(cx)
    }

    fn queue_slot(&mut self, i: usize) {
        let first = self.pending.len();
        self.queue_events(i);
        if let (0, Some((entered, carried))) = (i, self.plan.timing) {
            if let Some(event) = self.pending.get_mut(first) {
                let us = entered.elapsed().as_micros() as u64 + carried;
                *event = wire::with_field(event, "mock_timing_us", us);
            }
        }
    }

    fn queue_events(&mut self, i: usize) {
        let plan = &self.plan;
        let last = i + 1 == plan.tokens;
        let finish = last.then_some(plan.finish);
        let fingerprint = last && !plan.include_usage;
        let text = wire::token_text(i);
        let usage_of = |prompt: usize, completion: usize| {
            plan.continuous_usage
                .then_some(Usage { prompt, completion })
        };
        match plan.api {
            Api::Completion => {
                for (index, &prompt) in plan.prompt_tokens.iter().enumerate() {
                    self.pending.push_back(wire::completion_chunk(
                        &plan.head,
                        index,
                        &text,
                        finish,
                        usage_of(prompt, i + 1),
                        fingerprint,
                    ));
                }
            }
            Api::Chat => {
                let prompt = plan.prompt_tokens[0];
                if i == 0 {
                    self.pending
                        .push_back(wire::chat_role_chunk(&plan.head, usage_of(prompt, 0)));
                }
                self.pending.push_back(wire::chat_chunk(
                    &plan.head,
                    &text,
                    finish,
                    usage_of(prompt, i + 1),
                    fingerprint,
                ));
            }
        }
    }
}

impl Drop for SseStream {
    fn drop(&mut self) {
        let state = &self.inflight.state;
        let choices = self.plan.prompt_tokens.len() as u64;
        state
            .generation_tokens_total
            .fetch_add(self.tokens_sent as u64 * choices, Relaxed);
        match self.outcome {
            Outcome::Completed => {
                state.streams_completed.fetch_add(1, Relaxed);
                state.count_success(self.plan.finish, choices);
            }
            Outcome::Dropped => {
                state.streams_dropped.fetch_add(1, Relaxed);
                state.success_abort.fetch_add(choices, Relaxed);
            }
            Outcome::Unfinished => {
                state.streams_aborted.fetch_add(1, Relaxed);
                state.success_abort.fetch_add(choices, Relaxed);
            }
        }
    }
}
