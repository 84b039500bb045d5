"""tools/mock-vllm answers as real vLLM does, so that the fast tests (which run against the
mock) stay honest: the same request sent to both gives the same status, the same framing and
content type, the same JSON skeleton (keys in order, kinds of values; text, ids, numbers and
the model's own token counts abstracted), the same SSE event shapes, and for errors the same
message, type, param and code. The mock runs as vLLM is run here: model `tiny`, max_model_len 8192,
max_num_seqs 4, no x-request-id response header (vLLM's default)."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers import BIN, canonical_events, http

MSGS = [{"role": "user", "content": "hi"}]
C, CH = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def mock(servers):
    exe = BIN / "mock-vllm"
    if not exe.exists():
        pytest.skip(f"no mock-vllm binary at {exe} (cargo build --bins)")
    p = subprocess.Popen([str(exe), "--port", "0", "--model", "tiny", "--max-model-len", "8192",
                          "--max-num-seqs", "4", "--no-request-id-headers"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    assert "listening on " in line, line
    yield line.split()[-1]
    p.kill()
    p.wait(10)


def skeleton(v):
    """Keys (in order), nesting, nulls and booleans kept; strings S, numbers N."""
    if isinstance(v, dict):
        return {k: skeleton(x) for k, x in v.items()}
    if isinstance(v, list):
        return [skeleton(x) for x in v]
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, float)):
        return "N"
    return "S"


def keyed(v):
    """JSON compared with key order: dicts as lists of pairs."""
    if isinstance(v, dict):
        return [(k, keyed(x)) for k, x in v.items()]
    if isinstance(v, list):
        return [keyed(x) for x in v]
    return v


def stream_shapes(body: bytes):
    events, tail = [], []
    for raw in [e for e in body.split(b"\n\n") if e]:
        assert raw.startswith(b"data: "), raw[:80]
        payload = raw[len(b"data: "):]
        if payload == b"[DONE]":
            tail.append("[DONE]")
        else:
            events.append(json.loads(payload))
    # (canonical_events keeps the events other than plain token events: how many tokens
    # the real model writes before it stops is its own business)
    shapes = canonical_events(events)["shapes"]
    return [keyed(skeleton(json.loads(s))) for s in shapes], tail


# Headers whose values must agree (the others only by presence).
SAME_VALUE = ("content-type", "transfer-encoding", "allow", "endpoint-load-metrics-format")
# The mock's own (x-mock-worker), and those that differ by nature.
IGNORED = {"date", "x-mock-worker", "endpoint-load-metrics"}


def compare(real, mock, what: str):
    assert mock.status == real.status, f"{what}: status {mock.status} != vLLM's {real.status}: {real.body[:300]!r}"
    rh = {n for n in real.header_names() if n not in IGNORED}
    mh = {n for n in mock.header_names() if n not in IGNORED}
    assert mh == rh, f"{what}: headers {sorted(mh)} != vLLM's {sorted(rh)}"
    for h in SAME_VALUE:
        assert mock.header(h) == real.header(h), f"{what}: {h}"
    ctype = real.header("content-type") or ""
    if ctype.startswith("text/event-stream"):
        assert stream_shapes(mock.body) == stream_shapes(real.body), \
            f"{what}: events\nmock: {mock.body[:1500]!r}\nreal: {real.body[:1500]!r}"
    elif ctype.startswith("application/json"):
        r, m = json.loads(real.body), json.loads(mock.body)
        assert keyed(skeleton(m)) == keyed(skeleton(r)), f"{what}: body\nmock: {m}\nreal: {r}"
        if isinstance(r, dict) and isinstance(r.get("error"), dict):
            for k in ("type", "param", "code", "message"):
                assert m["error"][k] == r["error"][k], f"{what}: error {k}: {m['error']} vs vLLM's {r['error']}"
    else:
        assert mock.body == real.body, f"{what}: body {mock.body[:200]!r} != {real.body[:200]!r}"


def cases(model="tiny"):
    long_prompt = "hello " * 9000
    j = {"endpoint-load-metrics-format": "JSON"}
    t = {"endpoint-load-metrics-format": "TEXT"}
    return {
        # answers
        "completion": ("POST", C, {"model": model, "prompt": "hello world", "max_tokens": 3}, None),
        "completion-no-model": ("POST", C, {"prompt": "hello world", "max_tokens": 3}, None),
        "completion-prompt-list": ("POST", C, {"model": model, "prompt": ["a b", "c"], "max_tokens": 2}, None),
        "completion-n2": ("POST", C, {"model": model, "prompt": "hi", "max_tokens": 2, "n": 2}, None),
        "completion-stream": ("POST", C, {"model": model, "prompt": "hello", "max_tokens": 3, "stream": True},
                              None),
        "completion-stream-usage": ("POST", C, {"model": model, "prompt": "hello", "max_tokens": 3,
                                                "stream": True, "stream_options": {"include_usage": True}}, None),
        "completion-stream-continuous-usage": (
            "POST", C, {"model": model, "prompt": "hello", "max_tokens": 3, "stream": True,
                        "stream_options": {"include_usage": True, "continuous_usage_stats": True}}, None),
        "completion-load-metrics-text": ("POST", C, {"model": model, "prompt": "hi", "max_tokens": 1}, t),
        "completion-load-metrics-json": ("POST", C, {"model": model, "prompt": "hi", "max_tokens": 1}, j),
        "completion-stream-load-metrics": ("POST", C, {"model": model, "prompt": "hi", "max_tokens": 1,
                                                       "stream": True}, t),
        "completion-stream-as-string": ("POST", C, {"model": model, "prompt": "hello", "max_tokens": 3,
                                                    "stream": "yes"}, None),
        "completion-lax-numbers": ("POST", C, {"model": model, "prompt": "hello", "max_tokens": "3",
                                               "temperature": "0"}, None),
        "chat": ("POST", CH, {"model": model, "messages": MSGS, "max_tokens": 3}, None),
        "chat-n2": ("POST", CH, {"model": model, "messages": MSGS, "max_tokens": 3, "n": 2}, None),
        "chat-stream": ("POST", CH, {"model": model, "messages": MSGS, "max_tokens": 3, "stream": True}, None),
        "chat-stream-usage": ("POST", CH, {"model": model, "messages": MSGS, "max_tokens": 3, "stream": True,
                                           "stream_options": {"include_usage": True}}, None),
        "chat-load-metrics-text": ("POST", CH, {"model": model, "messages": MSGS, "max_tokens": 1}, t),
        # vLLM's errors
        "unknown-model": ("POST", C, {"model": "no-such-model", "prompt": "x", "max_tokens": 1}, None),
        "unknown-model-chat-stream": ("POST", CH, {"model": "no-such-model", "messages": MSGS, "stream": True},
                                      None),
        "max-tokens-negative": ("POST", C, {"model": model, "prompt": "x", "max_tokens": -1}, None),
        "max-tokens-over-context": ("POST", C, {"model": model, "prompt": "x", "max_tokens": 100000}, None),
        "temperature-negative-stream": ("POST", CH, {"model": model, "messages": MSGS, "temperature": -1,
                                                     "stream": True}, None),
        "top-p-zero": ("POST", C, {"model": model, "prompt": "x", "top_p": 0}, None),
        "n-zero": ("POST", C, {"model": model, "prompt": "x", "n": 0}, None),
        "logprobs-too-many": ("POST", C, {"model": model, "prompt": "x", "logprobs": 50}, None),
        "stream-options-without-stream": ("POST", C, {"model": model, "prompt": "x",
                                                      "stream_options": {"include_usage": True}}, None),
        "prompt-too-long": ("POST", C, {"model": model, "prompt": long_prompt, "max_tokens": 1}, None),
        "missing-prompt": ("POST", C, {"model": model}, None),
        "missing-messages": ("POST", CH, {"model": model}, None),
        "wrong-type": ("POST", C, {"model": model, "prompt": "x", "max_tokens": "many"}, None),
        "stream-not-a-boolean": ("POST", C, {"model": model, "prompt": "x", "stream": "maybe"}, None),
        "two-type-errors": ("POST", CH, {"model": model, "max_tokens": "many", "n": "a"}, None),
        "unknown-model-no-prompt": ("POST", C, {"model": "no-such-model"}, None),
        "stream-options-before-types": ("POST", C, {"model": model, "prompt": "x", "max_tokens": "many",
                                                    "stream_options": {"include_usage": True}}, None),
        "invalid-json": ("POST", C, b'{"model":', None),
        "invalid-json-missing-value": ("POST", C, b'{"model":"tiny", "prompt":}', None),
        "invalid-json-missing-comma": ("POST", C, b'{"model":"tiny" "prompt":1}', None),
        "invalid-json-missing-colon": ("POST", C, b'{"model" "tiny"}', None),
        "invalid-json-bare-key": ("POST", C, b'{model:1}', None),
        "invalid-json-extra-data": ("POST", C, b'{"model":"tiny"} x', None),
        "invalid-json-unterminated-string": ("POST", C, b'{"model":"ti', None),
        "invalid-json-trailing-comma": ("POST", C, b'{"prompt":"x","max_tokens":1,}', None),
        "invalid-json-open-list": ("POST", C, b'[1,2', None),
        "empty-body": ("POST", C, b'', None),
        "n-greedy": ("POST", C, {"model": model, "prompt": "x", "n": 2, "temperature": 0}, None),
        "wrong-content-type": ("POST", C, json.dumps({"model": model, "prompt": "x"}).encode(),
                               {"Content-Type": "text/plain"}),
        "get-on-post-route": ("GET", C, None, None),
        "unknown-path": ("GET", "/no/such/path", None, None),
        "embeddings-on-a-generative-model": ("POST", "/v1/embeddings", {"model": model, "input": "x"}, None),
        "sglang-get-load": ("GET", "/get_load", None, None),
        "sglang-health-generate": ("GET", "/health_generate", None, None),
        # information
        "health": ("GET", "/health", None, None),
        "version": ("GET", "/version", None, None),
        "models": ("GET", "/v1/models", None, None),
        "tokenize": ("POST", "/tokenize", {"model": model, "prompt": "hello world"}, None),
    }


@pytest.mark.parametrize("case", list(cases()))
def test_mock_answers_as_vllm_does(a, mock, case):
    method, path, body, headers = cases()[case]
    real = http(a.url, method, path, body, headers)
    fake = http(mock, method, path, body, headers)
    compare(real, fake, case)


def test_mock_metrics_names_and_labels_are_vllms(a, mock):
    """The gauges a router reads, with vLLM's names, labels and types."""
    def samples(url):
        text = http(url, "GET", "/metrics").body.decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                out.setdefault("types", {})[name] = kind
            elif line and not line.startswith("#"):
                key = line.rsplit(" ", 1)[0]
                out.setdefault("keys", set()).add(key)
        return out
    real, fake = samples(a.url), samples(mock)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries", "vllm:prefix_cache_hits"):
        assert fake["types"].get(name) == real["types"].get(name), name
        rk = sorted(k for k in real["keys"] if k.split("{")[0] in (name, name + "_total"))
        fk = sorted(k for k in fake["keys"] if k.split("{")[0] in (name, name + "_total"))
        assert fk == rk, f"{name}: mock {fk} vs vLLM {rk}"
