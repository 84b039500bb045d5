"""A client that leaves makes vLLM stop generating: the router shuts its connection to vLLM
at once, vLLM notices the disconnect and aborts the request. vLLM is the witness: its
`vllm:num_requests_running` returns to 0 within a second and its log says
`Request <id> aborted.` (the servers run with `--enable-log-requests`)."""

from __future__ import annotations

import json
import re
import time
import uuid

import pytest

from helpers import Conn, Router, build_request, metrics, wait_for

LONG = {"max_tokens": 8000, "ignore_eos": True, "temperature": 0}

CASES = {
    "completion-stream": ("/v1/completions", {"prompt": "hello world", "stream": True}, "cmpl-{rid}-0"),
    "chat-stream": ("/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "hello"}], "stream": True}, "chatcmpl-{rid}"),
    "completion": ("/v1/completions", {"prompt": "hello world"}, "cmpl-{rid}-0"),
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}]}, "chatcmpl-{rid}"),
}


@pytest.fixture(scope="module")
def router(a):
    r = Router([a.url], "--policy", "round_robin", "--load-scrape-interval-ms", "0")
    yield r
    r.stop()


def running(s) -> float:
    return metrics(s.url).get("vllm:num_requests_running", 0)


@pytest.mark.parametrize("case", list(CASES))
def test_client_leaving_makes_vllm_abort(a, logs, router, model, case, idle):
    path, extra, vllm_id = CASES[case]
    rid = f"abort-{uuid.uuid4().hex[:10]}"
    vllm_id = vllm_id.format(rid=rid)
    before = a.log_size()
    body = json.dumps({"model": model, **LONG, **extra}).encode()
    c = Conn(router.url)
    try:
        c.send(build_request("POST", path, "x", body, {"X-Request-Id": rid}))
        if extra.get("stream"):
            status, _, _, _ = c.read_head()
            assert status == 200
            for _ in range(3):
                assert c.read_chunk() is not None  # tokens are flowing
        # vLLM runs it (a non-streamed answer comes only at the end: 8000 tokens, many seconds)
        wait_for(lambda: f"Added request {vllm_id}" in a.log_since(before), 20,
                 what=f"vLLM starts {vllm_id}")
        wait_for(lambda: running(a) >= 1, 10, what="vLLM counts it running")
    finally:
        left = time.monotonic()
        c.close()
    wait_for(lambda: running(a) == 0, 5, every=0.02, what="num_requests_running back to 0")
    took = time.monotonic() - left
    assert took < 1.0, f"vLLM stopped {took:.2f} s after the client left"
    log = wait_for(lambda: (lambda t: t if re.search(rf"Request {re.escape(vllm_id)} aborted", t) else None)(
        a.log_since(before)), 5, what=f"vLLM logs aborting {vllm_id}")
    assert f"Aborted request(s) {vllm_id}" in log
    # and the router is fine: the next request on a new connection is answered
    c = Conn(router.url)
    try:
        c.send(build_request("GET", "/v1/models", "x"))
        assert c.read_head()[0] == 200
    finally:
        c.close()
