"""Through ringrouter, real vLLM's answers reach the client as vLLM sent them: the same
request sent straight to vLLM and through the router gives the same bytes apart from `id`
and `created` (same head apart from `date`, the hop-by-hop `connection` and the
`x-request-id` the router adds; same SSE events in the same order, same chunk framing, same
text, finish_reason, usage and [DONE]). Temperature 0, so vLLM's answer is deterministic."""

from __future__ import annotations

import uuid

import openai
import pytest

from helpers import (Router, Tap, canonical_events, canonical_stream, comparable_headers, get,
                     normalise, normalise_value, post)


@pytest.fixture(scope="module")
def router(servers):
    r = Router([s.url for s in servers], "--policy", "round_robin", "--load-scrape-interval-ms", "0")
    yield r
    r.stop()


def completion(model, **kw):
    return {"model": model, "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0, **kw}


def chat(model, **kw):
    return {"model": model, "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "What is a router?"}],
            "max_tokens": 12, "temperature": 0, **kw}


CASES = {
    "completion": ("/v1/completions", completion, {}),
    "completion-stream": ("/v1/completions", completion, {"stream": True}),
    "completion-stream-usage": ("/v1/completions", completion,
                                {"stream": True, "stream_options": {"include_usage": True}}),
    "completion-stream-continuous-usage": ("/v1/completions", completion,
                                           {"stream": True, "stream_options": {
                                               "include_usage": True, "continuous_usage_stats": True}}),
    # vLLM reads "stream" leniently (pydantic's lax bool): so must the router
    "completion-stream-as-string": ("/v1/completions", completion, {"stream": "yes"}),
    # several samples: not greedy (vLLM refuses n > 1 at temperature 0), seeded
    "completion-n2": ("/v1/completions", completion, {"n": 2, "temperature": 0.8, "seed": 7}),
    "chat": ("/v1/chat/completions", chat, {}),
    "chat-stream": ("/v1/chat/completions", chat, {"stream": True}),
    "chat-stream-usage": ("/v1/chat/completions", chat,
                          {"stream": True, "stream_options": {"include_usage": True}}),
}


def assert_same_answer(direct, routed, same_id: bool):
    assert routed.status == direct.status
    # Without a client X-Request-Id the ids differ in length (vLLM's own are 16 hex digits,
    # the router's 32, and vLLM names the completion after the one it gets), and so does a
    # non-streamed body's content-length.
    drop = [] if same_id else ["content-length"]
    assert comparable_headers(routed, ["connection", "x-request-id", *drop]) == \
        comparable_headers(direct, ["connection", *drop])
    assert routed.header("content-length") in (None, str(len(routed.body)))
    streamed = bool(direct.chunks)
    if streamed:
        # vLLM cuts a stream into events as its API server keeps up with its engine, so
        # the cut varies from run to run even without a router: compare what the events
        # say, then the bytes when vLLM happened to cut both runs alike.
        assert canonical_stream(routed.body) == canonical_stream(direct.body), \
            f"routed:\n{routed.body.decode(errors='replace')}\ndirect:\n{direct.body.decode(errors='replace')}"
        if [len(c) for c in routed.chunks] != [len(c) for c in direct.chunks]:
            return
    if same_id:
        # vLLM names the completion after the X-Request-Id it got, and the router passes the
        # client's on: only `created` can differ, and its digits line up, so even the
        # chunk framing is the same.
        assert normalise(routed.raw_body) == normalise(direct.raw_body)
    else:
        assert normalise(routed.body) == normalise(direct.body)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("same_id", [True, False], ids=["client-request-id", "router-request-id"])
def test_answer_is_vllms_own(servers, router, model, case, same_id):
    path, make, extra = CASES[case]
    body = make(model, **extra)
    for s in servers:
        headers = {"X-Request-Id": f"eq-{uuid.uuid4().hex[:12]}"} if same_id else {}
        direct = post(s.url, path, body, headers)
        # Round robin over the servers: a few tries put the routed request on each of them,
        # and every answer must equal this server's direct one (the servers run the same
        # model with the same seed, so they agree with each other too).
        routed = post(router.url, path, body, headers)
        assert direct.status == 200, direct.body
        assert_same_answer(direct, routed, same_id)
        rid = routed.header("x-request-id")
        assert rid, "the router gives the client the request id"
        if same_id:
            assert rid == headers["X-Request-Id"]
        if extra.get("stream"):
            events = routed.events()
            assert events[-1] == b"data: [DONE]"
            # (How many events carry the tokens is vLLM's choice: a busy API server puts
            # all 12 in one. That the router streams them as they come is checked byte for
            # byte through the tap below.)
            assert len(events) >= 2


@pytest.mark.parametrize("case", list(CASES))
def test_router_relays_vllms_bytes_unchanged(a, model, case):
    """Router -> tap -> vLLM: the client gets exactly the bytes vLLM sent (body and chunk
    framing, byte for byte; the head apart from hop-by-hop headers and x-request-id)."""
    path, make, extra = CASES[case]
    tap = Tap(a.url)
    r = Router([tap.url], "--policy", "round_robin", "--load-scrape-interval-ms", "0")
    try:
        routed = post(r.url, path, make(model, **extra))
    finally:
        r.stop()
        tap.close()
    # (the router's health checks reach vLLM through the tap too, on their own connections)
    [sent] = tap.responses(f"POST {path}".encode())
    head_end = sent.index(b"\r\n\r\n") + 4
    assert routed.raw_body == sent[head_end:]
    vllm_head = [l for l in sent[:head_end].decode().split("\r\n") if l]
    client_head = [l for l in routed.head.decode().split("\r\n") if l]
    hop = ("connection:", "keep-alive:", "x-request-id:")
    assert [l for l in client_head if not l.lower().startswith(hop)] == \
        [l for l in vllm_head if not l.lower().startswith(hop)]


def test_streams_end_with_usage_and_done(servers, router, model):
    r = post(router.url, "/v1/chat/completions",
             chat(model, stream=True, stream_options={"include_usage": True}))
    events = r.events()
    assert events[-1] == b"data: [DONE]"
    import json
    last = json.loads(events[-2][len(b"data: "):])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 12
    first = json.loads(events[0][len(b"data: "):])
    assert first["choices"][0]["delta"]["role"] == "assistant"


# ------------------------------------------------------------------------------------------
# The official openai client, through the router and straight to vLLM


def clients(servers, router):
    mk = lambda url: openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    return mk(servers[0].url), mk(router.url)


def dump(x):
    return normalise_value(x.model_dump())


def test_openai_client_completion(servers, router, model):
    direct, routed = clients(servers, router)
    kw = dict(model=model, prompt="Hello world", max_tokens=10, temperature=0)
    assert dump(routed.completions.create(**kw)) == dump(direct.completions.create(**kw))


def test_openai_client_completion_stream(servers, router, model):
    direct, routed = clients(servers, router)
    kw = dict(model=model, prompt="Hello world", max_tokens=10, temperature=0, stream=True,
              stream_options={"include_usage": True})
    a = [dump(c) for c in routed.completions.create(**kw)]
    b = [dump(c) for c in direct.completions.create(**kw)]
    # (how vLLM cuts the stream into events varies from run to run, see above)
    assert canonical_events(a) == canonical_events(b)
    assert a[-1]["usage"]["completion_tokens"] == 10


def test_openai_client_chat(servers, router, model):
    direct, routed = clients(servers, router)
    kw = dict(model=model, messages=[{"role": "user", "content": "Hi there"}], max_tokens=10,
              temperature=0)
    a = routed.chat.completions.create(**kw)
    assert dump(a) == dump(direct.chat.completions.create(**kw))
    assert a.choices[0].message.role == "assistant"
    assert a.usage.completion_tokens == 10


def test_openai_client_chat_stream(servers, router, model):
    direct, routed = clients(servers, router)
    kw = dict(model=model, messages=[{"role": "user", "content": "Hi there"}], max_tokens=10,
              temperature=0, stream=True, stream_options={"include_usage": True})
    a = [dump(c) for c in routed.chat.completions.create(**kw)]
    b = [dump(c) for c in direct.chat.completions.create(**kw)]
    assert canonical_events(a) == canonical_events(b)
    assert a[0]["choices"][0]["delta"]["role"] == "assistant"
    assert a[-1]["choices"] == [] and a[-1]["usage"]["completion_tokens"] == 10


def test_openai_client_models(servers, router, model):
    direct, routed = clients(servers, router)
    assert [m.id for m in routed.models.list().data] == [m.id for m in direct.models.list().data] == [model]


# ------------------------------------------------------------------------------------------
# Information endpoints


def test_models_as_vllm_answers(servers, router):
    direct = get(servers[0].url, "/v1/models")
    routed = get(router.url, "/v1/models")
    assert routed.status == direct.status == 200
    assert normalise(routed.body) == normalise(direct.body)
    assert comparable_headers(routed, ["connection", "x-request-id"]) == \
        comparable_headers(direct, ["connection"])


def test_tokenize_passes_through(servers, router, model):
    body = {"model": model, "prompt": "hello world"}
    direct = post(servers[0].url, "/tokenize", body)
    routed = post(router.url, "/tokenize", body)
    assert (routed.status, routed.body) == (direct.status, direct.body) == (200, direct.body)


def test_health_as_vllm_answers(servers, router):
    """Both answer 200 while healthy, which is what load balancers and Kubernetes probes
    read. The bodies differ: vLLM's is empty, the router's is `{"status":"ok"}` (the
    router answers /health itself, about itself and its workers)."""
    direct = get(servers[0].url, "/health")
    routed = get(router.url, "/health")
    assert direct.status == routed.status == 200
    assert direct.body == b""


def test_version_as_vllm_answers(servers, router):
    """vLLM's version, from a worker (as vllm-router 0.1.17 answers it), byte for byte."""
    direct = get(servers[0].url, "/version")
    routed = get(router.url, "/version")
    assert routed.status == direct.status == 200
    assert routed.body == direct.body == b'{"version":"0.32.0"}'
    assert comparable_headers(routed, ["connection", "x-request-id"]) == \
        comparable_headers(direct, ["connection"])


def test_responses_api_passes_through(servers, router, model):
    body = {"model": model, "input": "Hello", "max_output_tokens": 6, "temperature": 0}
    direct = post(servers[0].url, "/v1/responses", body)
    routed = post(router.url, "/v1/responses", body)
    assert routed.status == direct.status == 200
    assert normalise(routed.body) == normalise(direct.body)
