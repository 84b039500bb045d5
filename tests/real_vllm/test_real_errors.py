"""vLLM's own errors reach the client unchanged through the router (status, body byte for
byte, headers apart from date / hop-by-hop / the router's x-request-id); the router's own
errors have the same JSON shape as vLLM's."""

from __future__ import annotations

import json
import socket

import pytest

from helpers import Router, comparable_headers, get, http, post

MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def router(servers):
    r = Router([s.url for s in servers], "--policy", "round_robin", "--load-scrape-interval-ms", "0")
    yield r
    r.stop()


def vllm_errors(model):
    C, CH = "/v1/completions", "/v1/chat/completions"
    long_prompt = "hello " * 9000  # > max_model_len (8192) tokens
    return {
        "unknown-model": ("POST", C, {"model": "no-such-model", "prompt": "x", "max_tokens": 1}, None, 404),
        "unknown-model-chat-stream": ("POST", CH, {"model": "no-such-model", "messages": MSGS, "stream": True},
                                      None, 404),
        "max-tokens-negative": ("POST", C, {"model": model, "prompt": "x", "max_tokens": -1}, None, 400),
        "max-tokens-over-context": ("POST", C, {"model": model, "prompt": "x", "max_tokens": 100000}, None, 400),
        "temperature-negative-stream": ("POST", CH, {"model": model, "messages": MSGS, "temperature": -1,
                                                     "stream": True}, None, 400),
        "top-p-zero": ("POST", C, {"model": model, "prompt": "x", "top_p": 0}, None, 400),
        "n-zero": ("POST", C, {"model": model, "prompt": "x", "n": 0}, None, 400),
        "logprobs-too-many": ("POST", C, {"model": model, "prompt": "x", "logprobs": 50}, None, 400),
        "stream-options-without-stream": ("POST", C, {"model": model, "prompt": "x",
                                                      "stream_options": {"include_usage": True}}, None, 400),
        "prompt-too-long": ("POST", C, {"model": model, "prompt": long_prompt, "max_tokens": 1}, None, 400),
        "missing-prompt": ("POST", C, {"model": model}, None, 400),
        "missing-messages": ("POST", CH, {"model": model}, None, 400),
        "wrong-type": ("POST", C, {"model": model, "prompt": "x", "max_tokens": "many"}, None, 400),
        "stream-not-a-boolean": ("POST", C, {"model": model, "prompt": "x", "stream": "maybe"}, None, 400),
        "two-type-errors": ("POST", CH, {"model": model, "max_tokens": "many", "n": "a"}, None, 400),
        "wrong-content-type": ("POST", C, json.dumps({"model": model, "prompt": "x"}).encode(),
                               {"Content-Type": "text/plain"}, 400),
        "get-on-post-route": ("GET", C, None, None, 405),
        "unknown-path": ("GET", "/no/such/path", None, None, 404),
        "embeddings-on-a-generative-model": ("POST", "/v1/embeddings", {"model": model, "input": "x"}, None, 404),
    }


ERROR_CASES = list(vllm_errors("m"))


@pytest.mark.parametrize("case", ERROR_CASES)
def test_vllm_errors_pass_unchanged(a, router, model, case):
    method, path, body, headers, status = vllm_errors(model)[case]
    direct = http(a.url, method, path, body, headers)
    routed = http(router.url, method, path, body, headers)
    assert direct.status == status, direct.body
    assert (routed.status, routed.body) == (direct.status, direct.body)
    assert comparable_headers(routed, ["connection", "x-request-id"]) == \
        comparable_headers(direct, ["connection"])
    if body is not None and path.startswith("/v1/c"):
        # vLLM's OpenAI-shaped error
        err = routed.json()["error"]
        assert list(err) == ["message", "type", "param", "code"] and err["code"] == status


# ------------------------------------------------------------------------------------------
# The router's own errors


def shape(v):
    """Keys in order and the kinds of their values (param may be null or a string)."""
    e = v["error"]
    return list(v), list(e), type(e["message"]), type(e["type"]), type(e["code"])


@pytest.fixture(scope="module")
def vllm_error_shape(a, model):
    d = post(a.url, "/v1/completions", {"model": "no-such-model", "prompt": "x"})
    return shape(d.json())


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def assert_router_error(r, status, vllm_error_shape):
    assert r.status == status, r.body
    assert r.header("content-type") == "application/json"
    v = r.json()
    assert shape(v) == vllm_error_shape, v
    assert v["error"]["code"] == status
    assert v["error"]["param"] is None or isinstance(v["error"]["param"], str)


def test_router_errors_have_vllms_shape(a, router, model, vllm_error_shape):
    # Not JSON: the router answers before any worker sees it.
    assert_router_error(post(router.url, "/v1/completions", b'{"model":'), 400, vllm_error_shape)
    # JSON but not an object.
    assert_router_error(post(router.url, "/v1/completions", b"[1,2]"), 400, vllm_error_shape)
    # vLLM's own answer to those is a 400 of the same shape (its message is pydantic's).
    assert shape(post(a.url, "/v1/completions", b'{"model":').json()) == vllm_error_shape


def test_router_error_when_no_worker_is_healthy(model, vllm_error_shape):
    """With health checks (the default), a worker that never answered is not routed to."""
    r = Router([f"http://127.0.0.1:{closed_port()}"], "--policy", "round_robin",
               "--load-scrape-interval-ms", "0")
    try:
        resp = post(r.url, "/v1/completions", {"model": model, "prompt": "x", "max_tokens": 1})
        assert_router_error(resp, 503, vllm_error_shape)
        assert get(r.url, "/health").status == 503
    finally:
        r.stop()


def test_router_error_when_no_worker_answers(model, vllm_error_shape):
    """Health checks off: the router tries the worker, which refuses: 502."""
    r = Router([f"http://127.0.0.1:{closed_port()}"], "--policy", "round_robin",
               "--load-scrape-interval-ms", "0", "--health-check-interval-secs", "0")
    try:
        resp = post(r.url, "/v1/completions", {"model": model, "prompt": "x", "max_tokens": 1})
        assert_router_error(resp, 502, vllm_error_shape)
        # and through the openai client, an APIStatusError with vLLM's fields
        import openai
        c = openai.OpenAI(base_url=r.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model=model, prompt="x", max_tokens=1)
        assert e.value.status_code == 502
        assert e.value.body["code"] == 502 and isinstance(e.value.body["message"], str)
    finally:
        r.stop()


def test_router_error_without_workers(model, vllm_error_shape):
    r = Router([], "--policy", "round_robin", "--load-scrape-interval-ms", "0")
    try:
        resp = post(r.url, "/v1/completions", {"model": model, "prompt": "x", "max_tokens": 1})
        assert_router_error(resp, 503, vllm_error_shape)
    finally:
        r.stop()


def test_router_error_body_too_large(a, model, vllm_error_shape):
    r = Router([a.url], "--policy", "round_robin", "--load-scrape-interval-ms", "0",
               "--max-payload-size", "100")
    try:
        resp = post(r.url, "/v1/completions", {"model": model, "prompt": "x" * 200})
        assert_router_error(resp, 413, vllm_error_shape)
    finally:
        r.stop()


def test_openai_client_sees_vllms_errors(a, router, model):
    import openai
    c = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert e.value.body == {"message": "The model `no-such-model` does not exist. Valid aliases: "
                            f"{model}.", "type": "NotFoundError", "param": "model", "code": 404}
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=model, messages=MSGS, temperature=-1, stream=True)
    assert e.value.body["param"] == "temperature"
