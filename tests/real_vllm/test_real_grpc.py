"""The router as vLLM's OpenAI front end of a gRPC engine (`--worker-urls grpc://...`): it
tokenizes, sends token ids, detokenizes the engine's token ids, and must answer as vLLM's own
HTTP server on the same model would. The judge is that server: the same request, greedy
(`temperature: 0`) or seeded, goes to vLLM's HTTP server (REAL_VLLM_URLS, first entry) and
through the front end to the gRPC engine (REAL_VLLM_GRPC_URL); through the official `openai`
client, the text, finish_reason and usage of every choice must be equal, streamed (deltas
concatenated) and not; then, stricter, the whole answer field by field as vLLM writes it
(raw HTTP; a stream read as `canonical_events` reads it). Besides: /v1/models lists the
engine's model (and vLLM's entry for it), a client that leaves makes the engine drop the
request within seconds (seen by the engine: GetLoads, GetServerInfo, its log), and a bad
request gets vLLM's 400 (or 404) with an OpenAI-style JSON error, then vLLM's own error
fields; without a tokenizer path the front end fetches the engine's and answers the same.

Environment: see `grpc_env.py`. `REAL_VLLM_GRPC_FRONTEND=smg` puts smg (PyPI `smg`) in the
router's place, which is how these tests were checked before the router could speak gRPC,
and stays useful to tell a wrong expectation from a router bug (smg 1.13 passes the chat
cases, the statuses of all bad requests but one, the aborts; it fails every completion, as
it tokenizes prompts without BOS, and vLLM's own response and error fields);
`REAL_VLLM_GRPC_FRONTEND=http://127.0.0.1:PORT` judges vLLM's HTTP server by itself, which
passes every comparison."""

from __future__ import annotations

import json
import time

import openai
import pytest

from grpc_env import EXTERNAL, FRONTEND, GRPC_LOG, GRPC_URL, TOKENIZER, grpc_python, start_frontend
from helpers import (Conn, GrpcProbe, Router, build_request, canonical_events, get,
                     normalise_value, post, wait_for)

SEED = 1234
# How long the engine may keep running a request after its client left (the request would
# run for ~16 s more: 8000 tokens at ~500 tokens/s).
ABORT_BOUND_S = 5.0

# ------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def probe():
    py = grpc_python()
    if not py:
        pytest.skip("no Python with grpcio + smg-grpc-proto: set REAL_VLLM_GRPC_PYTHON or VLLM_ROOT")
    p = GrpcProbe(GRPC_URL, py)
    try:
        p.info()
    except Exception as e:  # noqa: BLE001
        p.close()
        pytest.fail(f"the gRPC engine at {GRPC_URL} does not answer GetModelInfo: {e}")
    yield p
    p.close()


@pytest.fixture(scope="module")
def front():
    f = start_frontend()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def front_model(front) -> str:
    r = get(front.url, "/v1/models", timeout=30)
    assert r.status == 200, r.body
    return r.json()["data"][0]["id"]


@pytest.fixture(scope="module")
def clients(a, front, front_model):
    """(vLLM's HTTP server, the front end) as openai clients, the front end warmed up."""
    mk = lambda url: openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    ref, fe = mk(a.url), mk(front.url)
    for stream in (False, True):
        list_or_obj = fe.completions.create(model=front_model, prompt="warm up", max_tokens=8,
                                            temperature=0, stream=stream)
        if stream:
            list(list_or_obj)
        list_or_obj = fe.chat.completions.create(
            model=front_model, messages=[{"role": "user", "content": "warm up"}], max_tokens=8,
            temperature=0, stream=stream)
        if stream:
            list(list_or_obj)
    return ref, fe


# ------------------------------------------------------------------------------------------
# The corpus

WORDS = ("the quick brown fox jumps over lazy dog hello world router request response token "
         "stream server model").split()
# ~1,500 tokens with the tiny model's tokenizer (one token per word; 1,501 with BOS)
LONG_PROMPT = " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(1500))
# over the 8,192-token context (9,001 tokens)
TOO_LONG_PROMPT = " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(9000))
UNICODE = ("Grüße aus Köln, naïve café — 日本語のテキストと中文：你好，世界！ 한국어 "
           "Emoji: 🚀🎉👍🏽 and ZWJ 👩‍💻, flags 🇩🇪🇯🇵.")

CHAT_TURNS = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is a router?"},
    {"role": "assistant", "content": "A thing that sends requests to servers."},
    {"role": "user", "content": "And a load balancer? Answer in one line."},
]

# name -> (API, request fields without model/stream). `stop` "FROM_REFERENCE": a stop string
# taken from the middle of the reference's answer to the same request without it, so that it
# is hit (the tiny random model's text cannot be foreseen).
CASES = {
    "ascii": ("completions", {"prompt": "The quick brown fox jumps over the lazy dog.", "max_tokens": 16}),
    "unicode": ("completions", {"prompt": UNICODE, "max_tokens": 32}),
    "long-prompt": ("completions", {"prompt": LONG_PROMPT, "max_tokens": 16}),
    "long-output": ("completions", {"prompt": "hello", "max_tokens": 200, "ignore_eos": True}),
    "max-tokens-1": ("completions", {"prompt": "hello world", "max_tokens": 1}),
    "stop-string": ("completions", {"prompt": "The quick brown fox", "max_tokens": 48,
                                    "stop": "FROM_REFERENCE"}),
    "n2": ("completions", {"prompt": "hello world", "max_tokens": 16, "n": 2, "temperature": 0.8}),
    "chat": ("chat", {"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 16}),
    "chat-multiturn": ("chat", {"messages": CHAT_TURNS, "max_tokens": 24}),
    "chat-unicode": ("chat", {"messages": [{"role": "user", "content": UNICODE}], "max_tokens": 32}),
    "chat-long": ("chat", {"messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 16}),
    "chat-stop-string": ("chat", {"messages": CHAT_TURNS, "max_tokens": 48, "stop": "FROM_REFERENCE"}),
    "chat-n2": ("chat", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16, "n": 2,
                         "temperature": 0.8}),
}


def call(client, api: str, model: str, fields: dict, stream: bool):
    kw = {"temperature": 0, "seed": SEED, **fields, "model": model}
    extra = {}
    for k in ("ignore_eos", "add_special_tokens"):  # vLLM's own fields: sent in the body
        if k in kw:
            extra[k] = kw.pop(k)
    if stream:
        kw.update(stream=True, stream_options={"include_usage": True})
    create = client.completions.create if api == "completions" else client.chat.completions.create
    return create(**kw, extra_body=extra or None)


def summary(api: str, resp, stream: bool) -> dict:
    """What must be equal: per choice the text, finish_reason (and, for chat, the role); the
    usage; for a stream also that usage came once, last, in a chunk without choices."""
    texts, finish, roles, usage = {}, {}, {}, None
    usage_chunks = []
    if not stream:
        for ch in resp.choices:
            texts[ch.index] = ch.text if api == "completions" else ch.message.content
            finish[ch.index] = ch.finish_reason
            if api == "chat":
                roles[ch.index] = ch.message.role
        usage = resp.usage.model_dump() if resp.usage else None
    else:
        chunks = list(resp)
        for i, c in enumerate(chunks):
            for ch in c.choices:
                piece = ch.text if api == "completions" else ch.delta.content
                texts[ch.index] = texts.get(ch.index, "") + (piece or "")
                if ch.finish_reason is not None:
                    finish[ch.index] = ch.finish_reason
                if api == "chat" and ch.delta.role:
                    roles.setdefault(ch.index, ch.delta.role)
            if c.usage is not None:
                usage_chunks.append((i == len(chunks) - 1, len(c.choices)))
                usage = c.usage.model_dump()
    if usage is not None:
        usage = {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    out = {"texts": texts, "finish_reason": finish, "usage": usage}
    if api == "chat":
        out["roles"] = roles
    if stream:
        out["usage_chunks (last?, choices)"] = usage_chunks
    return out


def pick_stop(text: str) -> str:
    """Three characters from the middle of `text`, printable ASCII where there are such."""
    mid = len(text) // 2
    for i in list(range(mid, len(text) - 3)) + list(range(0, mid)):
        s = text[i:i + 3]
        if len(s) == 3 and all(32 < ord(c) < 127 for c in s):
            return s
    return text[mid:mid + 2]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("case", list(CASES))
def test_answer_equals_vllm_http(a, model, front_model, clients, case, stream):
    ref, fe = clients
    api, fields = CASES[case]
    fields = dict(fields)
    if fields.get("stop") == "FROM_REFERENCE":
        probe_fields = {k: v for k, v in fields.items() if k != "stop"}
        full = summary(api, call(ref, api, model, probe_fields, False), False)["texts"][0]
        fields["stop"] = pick_stop(full)
    want = summary(api, call(ref, api, model, fields, stream), stream)
    got = summary(api, call(fe, api, front_model, fields, stream), stream)
    if got != want and api == "completions":
        # A likely cause, named: vLLM's completions tokenize with add_special_tokens (the
        # tiny model's tokenizer puts BOS first); a front end that does not gets vLLM's
        # answer to add_special_tokens: false instead (smg 1.13 does that).
        bare = summary(api, call(ref, api, model, {**fields, "add_special_tokens": False}, stream), stream)
        assert got != bare, (f"{FRONTEND} tokenizes the prompt without special tokens (no BOS): "
                             f"it answers as vLLM does to add_special_tokens: false")
    assert got == want, f"{FRONTEND} (gRPC) vs vLLM HTTP, request fields {json.dumps(fields)[:300]}"
    if fields.get("stop"):
        assert set(want["finish_reason"].values()) == {"stop"}, "the stop string was not hit"


# The whole answer: every field vLLM writes, with the values it writes (`id`, `created` and
# the value of `system_fingerprint` aside; a stream compared as `canonical_events` reads it: what the events say, not how vLLM
# happened to cut the tokens into events). Stricter than the test above, which holds the
# front end to what a client reads most; this one says which fields it gets wrong.
WHOLE = ["ascii", "unicode", "max-tokens-1", "n2", "chat", "chat-multiturn", "chat-n2"]


def raw_answer(url: str, api: str, model: str, fields: dict, stream: bool, as_name: str):
    """The answer, `model` (the name the target serves) written as `as_name` (the reference's)."""
    body = {"temperature": 0, "seed": SEED, **fields, "model": model}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    r = post(url, "/v1/completions" if api == "completions" else "/v1/chat/completions", body, timeout=120)
    assert r.status == 200, r.body

    def named(v):
        return fingerprint_blind(json.loads(json.dumps(v).replace(json.dumps(model), json.dumps(as_name))))

    if not stream:
        return normalise_value(named(r.json()))
    events, done = [], False
    for e in [e for e in r.body.split(b"\n\n") if e.strip()]:
        assert e.startswith(b"data: "), e[:100]
        if e == b"data: [DONE]":
            done = True
        else:
            assert not done, "an event after [DONE]"
            events.append(named(json.loads(e[6:])))
    return {**canonical_events(events), "done": done}


def fingerprint_blind(v):
    """`system_fingerprint` kept as a field, its value as "FP" (vLLM writes a hash of its whole
    engine config there, `vllm-0.32.0-<hash8>`, which differs between two configs of one model
    and which no gRPC call tells a front end)."""
    if isinstance(v, dict):
        return {k: ("FP" if k == "system_fingerprint" and x is not None else fingerprint_blind(x))
                for k, x in v.items()}
    if isinstance(v, list):
        return [fingerprint_blind(x) for x in v]
    return v


def differences(got, want, path="") -> list[str]:
    """Where two JSON values differ, one line per field (a stream's event shapes parsed back)."""
    if isinstance(got, str) and isinstance(want, str) and got[:1] in "{[" and want[:1] in "{[":
        try:
            got, want = json.loads(got), json.loads(want)
        except ValueError:
            pass
    if isinstance(got, dict) and isinstance(want, dict):
        out = [f"{path}.{k}: missing (vLLM: {json.dumps(want[k])[:80]})" for k in want if k not in got]
        out += [f"{path}.{k}: not in vLLM's ({json.dumps(got[k])[:80]})" for k in got if k not in want]
        for k in want:
            if k in got:
                out += differences(got[k], want[k], f"{path}.{k}")
        return out
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in differences(g, w, f"{path}[{i}]")]
    if got != want:
        return [f"{path}: {json.dumps(got)[:100]} (vLLM: {json.dumps(want)[:100]})"]
    return []


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("case", WHOLE)
def test_whole_answer_as_vllms(a, model, front, front_model, clients, case, stream):
    api, fields = CASES[case]
    want = raw_answer(a.url, api, model, fields, stream, model)
    got = raw_answer(front.url, api, front_model, fields, stream, model)
    diff = differences(got, want)
    assert not diff, f"{FRONTEND}'s answer differs from vLLM's:\n" + "\n".join(diff)


def test_same_model_name_as_http(model, front_model):
    """The gRPC engine is started with the HTTP servers' --served-model-name (run.sh does),
    so a client asks both by the same name."""
    assert front_model == model


# ------------------------------------------------------------------------------------------
# /v1/models


def test_models_lists_the_engines_model(front, probe):
    if EXTERNAL:
        pytest.skip("the front end is an external server, not in front of the gRPC engine")
    r = get(front.url, "/v1/models")
    assert r.status == 200, r.body
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [probe.info()["served_model_name"]]
    assert all(m["object"] == "model" for m in body["data"])


def test_models_entry_as_vllm_writes_it(a, front, model, front_model):
    """vLLM's entry field for field (`created` and the permission's id and created aside)."""
    if front_model != model:
        pytest.skip(f"the gRPC engine serves {front_model!r}, the HTTP server {model!r}")

    def entry(url):
        m = get(url, "/v1/models").json()["data"][0]
        m.pop("created", None)
        for p in m.get("permission") or []:
            p.pop("id", None)
            p.pop("created", None)
        return m

    assert entry(front.url) == entry(a.url)


# ------------------------------------------------------------------------------------------
# Bad requests: vLLM's status and error object

# name -> (path, body with MODEL where the model goes, exact: whether the message must be
# vLLM's word for word too: for errors about the request's meaning, where vLLM's message is
# what a client reads; not for malformed JSON and wrong types, where vLLM quotes pydantic)
BAD = {
    "max-tokens-not-int": ("/v1/completions", {"model": "MODEL", "prompt": "hi", "max_tokens": "many"}, False),
    "temperature-not-number": ("/v1/completions", {"model": "MODEL", "prompt": "hi", "temperature": "hot"}, False),
    "chat-messages-missing": ("/v1/chat/completions", {"model": "MODEL", "max_tokens": 3}, False),
    "invalid-json": ("/v1/completions", b'{"model": "MODEL", "prompt":', False),
    "max-tokens-negative": ("/v1/completions", {"model": "MODEL", "prompt": "hi", "max_tokens": -1}, True),
    "max-tokens-over-context": ("/v1/completions", {"model": "MODEL", "prompt": "hi", "max_tokens": 9000}, True),
    "prompt-too-long": ("/v1/completions", {"model": "MODEL", "prompt": TOO_LONG_PROMPT, "max_tokens": 4}, True),
    "chat-prompt-too-long": ("/v1/chat/completions", {
        "model": "MODEL", "messages": [{"role": "user", "content": TOO_LONG_PROMPT}], "max_tokens": 4}, True),
    "model-not-string": ("/v1/completions", {"model": 123, "prompt": "hi", "max_tokens": 3}, False),
    "chat-messages-not-list": ("/v1/chat/completions", {"model": "MODEL", "messages": "hello", "max_tokens": 3}, False),
    "stop-not-string": ("/v1/completions", {"model": "MODEL", "prompt": "hi", "max_tokens": 3, "stop": 5}, False),
    "n2-greedy": ("/v1/completions", {"model": "MODEL", "prompt": "hi", "max_tokens": 3, "n": 2,
                                      "temperature": 0}, True),
    "unknown-model": ("/v1/completions", {"model": "no-such-model", "prompt": "hi", "max_tokens": 3}, True),
}


def send_bad(url: str, path: str, body, model: str):
    """Streamed where the body is JSON, so that a front end that wrongly accepts the request
    is left at once (its stream then aborts) rather than generating thousands of tokens."""
    if isinstance(body, bytes):
        raw = body.replace(b"MODEL", model.encode())
    else:
        raw = json.dumps({**{k: (model if v == "MODEL" else v) for k, v in body.items()},
                          "stream": True}).encode()
    c = Conn(url, timeout=60)
    try:
        c.send(build_request("POST", path, "x", raw))
        status, _, _, headers = c.read_head()
        if status == 200:
            return status, None
        n = int(dict((k.lower(), v) for k, v in headers).get("content-length", "-1"))
        while n >= 0 and len(c.buf) < n:
            if not c._fill():
                break
        if n < 0:
            while c._fill():
                pass
        return status, c.buf[:n] if n >= 0 else c.buf
    finally:
        c.close()


def bad_pair(a, model, front, front_model, case):
    path, body, exact = BAD[case]
    ref_status, ref_body = send_bad(a.url, path, body, model)
    assert ref_status in (400, 404), (ref_status, ref_body)
    status, got_body = send_bad(front.url, path, body, front_model)
    assert status == ref_status, f"{FRONTEND} answered {status} ({got_body!r:.300}), vLLM {ref_status}"
    return json.loads(ref_body), json.loads(got_body), got_body, ref_body, exact


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_status_and_openai_error(a, model, front, front_model, case):
    """vLLM's status, and an OpenAI-style error: {"error": {"message": "...", "type": "...",
    "param": ..., "code": ...}}."""
    want, got, _, _, _ = bad_pair(a, model, front, front_model, case)
    assert set(got) == {"error"} and isinstance(got["error"], dict), got
    e = got["error"]
    assert isinstance(e.get("message"), str) and e["message"], got
    assert isinstance(e.get("type"), str) and e["type"], got
    assert "code" in e and "param" in e, got


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_error_as_vllms(a, model, front, front_model, case):
    """vLLM's error object itself: the same fields, the same `type` ("BadRequestError";
    "Bad Request" for what pydantic rejects), `param` and `code` (the status, a number);
    and for errors about the request's meaning (not malformed JSON or a wrong type, where
    vLLM quotes pydantic) the same message, word for word."""
    want, got, got_body, ref_body, exact = bad_pair(a, model, front, front_model, case)
    e, w = got["error"], want["error"]
    assert {k: e.get(k) for k in ("type", "param", "code")} == {k: w.get(k) for k in ("type", "param", "code")}, \
        f"{FRONTEND}: {got_body!r:.400}\nvLLM: {ref_body!r:.400}"
    assert set(e) == set(w), f"fields of the error object: {sorted(e)} vs vLLM's {sorted(w)}"
    if exact:
        msg = e["message"].replace(front_model, "MODEL")
        assert msg == w["message"].replace(model, "MODEL")


# ------------------------------------------------------------------------------------------
# A client that leaves: the engine drops the request

LONG = {"max_tokens": 8000, "ignore_eos": True, "temperature": 0}
ABORT_CASES = {
    "completion-stream": ("/v1/completions", {"prompt": "hello world", "stream": True}),
    "chat-stream": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}], "stream": True}),
    "completion": ("/v1/completions", {"prompt": "hello world"}),
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}]}),
}


def log_size() -> int:
    try:
        with open(GRPC_LOG, "rb") as f:
            return f.seek(0, 2)
    except OSError:
        return -1


def log_since(offset: int) -> str:
    with open(GRPC_LOG, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def engine_logs_requests() -> bool:
    """Whether the engine runs with --enable-log-requests (its start-up line of arguments
    says so): then vLLM logs every abort, however the front end brought it about."""
    try:
        return "enable_log_requests=True" in log_since(0)[:200_000]
    except OSError:
        return False


@pytest.mark.parametrize("case", list(ABORT_CASES))
def test_client_leaving_makes_the_engine_abort(front, front_model, clients, probe, case):
    """Witnesses: the engine's scheduler (GetLoads: nothing running or waiting) and its gRPC
    servicer (GetServerInfo: no Generate call open) go back to idle within ABORT_BOUND_S of
    the client leaving; and, when the engine's log is known and it logs requests
    (--enable-log-requests, as run.sh starts it), the log says so: `Abort requests: [..]`
    (the servicer, on the Abort RPC) or `Aborted request(s)` (vLLM's engine: also when the
    front end only cancels the Generate stream, which aborts the request as well). Without
    --enable-log-requests only the Abort RPC is logged, so the log is read but not required."""
    if EXTERNAL:
        pytest.skip("the front end is an external server, not in front of the gRPC engine")
    path, extra = ABORT_CASES[case]
    idle = lambda: (lambda l: l if l["running"] == 0 and l["waiting"] == 0 and l["active"] == 0 else None)(
        probe.loads())
    wait_for(idle, 60, every=0.2, what="the engine idle before the test")
    before = log_size()
    c = Conn(front.url)
    try:
        c.send(build_request("POST", path, "x", json.dumps({"model": front_model, **LONG, **extra}).encode()))
        if extra.get("stream"):
            status, _, _, _ = c.read_head()
            assert status == 200
            for _ in range(3):
                assert c.read_chunk() is not None  # tokens are flowing
        wait_for(lambda: probe.loads()["running"] >= 1, 20, every=0.05, what="the engine runs the request")
    finally:
        left = time.monotonic()
        c.close()
    loads = wait_for(idle, ABORT_BOUND_S + 15, every=0.05, what="the engine idle after the client left")
    took = time.monotonic() - left
    said = ""
    if before >= 0:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            text = log_since(before)
            said = ", ".join(w for w in ("Abort requests:", "Aborted request") if w in text)
            if said:
                break
            time.sleep(0.1)
    print(f"\n{case}: engine idle {took:.2f} s after the client left ({loads}); its log: {said or '-'}")
    assert took <= ABORT_BOUND_S, f"the engine ran the request {took:.1f} s after its client left"
    if before >= 0 and engine_logs_requests():
        assert said, "the engine's log says nothing of an abort"
    # the front end is fine: the next request is answered
    r = post(front.url, path, {"model": front_model, "max_tokens": 2, "temperature": 0,
                               **{k: v for k, v in extra.items() if k != "stream"}})
    assert r.status == 200, r.body


# ------------------------------------------------------------------------------------------
# Without a tokenizer given: the front end fetches it from the engine (GetTokenizer)


def test_tokenizer_fetched_from_the_engine(a, model, clients):
    if not TOKENIZER or EXTERNAL:
        pytest.skip("the module's front end already runs without a tokenizer path, or is external")
    f = start_frontend(tokenizer=None)
    try:
        fm = get(f.url, "/v1/models").json()["data"][0]["id"]
        mk = openai.OpenAI(base_url=f.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        ref = clients[0]
        differ = []
        for case in ("unicode", "chat-multiturn"):
            api, fields = CASES[case]
            for stream in (False, True):
                want = summary(api, call(ref, api, model, fields, stream), stream)
                got = summary(api, call(mk, api, fm, fields, stream), stream)
                if got != want:
                    differ.append(f"{case} stream={stream}: {got} != vLLM's {want}")
        assert not differ, "\n".join(differ)
    finally:
        f.stop()


# ------------------------------------------------------------------------------------------
# KV-cache events: the engine's own account of its prefix cache steers cache_aware routing.
# run.sh starts the engine with --kv-events-config (ZMQ on an ipc:// socket).


def test_the_engines_kv_events_steer_cache_aware_routing(front, front_model, probe):
    if FRONTEND not in ("", "ringrouter") or EXTERNAL or not TOKENIZER:
        pytest.skip("a ringrouter feature")
    block = int(probe.ask("server")["block_size"])
    worker = f'worker="{GRPC_URL}"'
    watcher = Router([GRPC_URL], "--model-path", TOKENIZER, "--policy", "cache_aware",
                     "--prometheus-port", "0")
    try:
        held = lambda: watcher.metric("ringrouter_kv_cache_blocks", worker)

        def through(f, prompt: str) -> int:
            r = post(f.url, "/v1/completions", {"model": front_model, "prompt": prompt,
                                                 "max_tokens": 1, "temperature": 0})
            assert r.status == 200, r.body
            return r.json()["usage"]["prompt_tokens"]

        # Prompts no earlier test sent: every block is new to the engine, so it reports them.
        tag = f"run {time.time_ns()}: "
        # The watcher is following once the engine's report of a request reaches it (a
        # request stored before it subscribed is not reported to it: send until one is).
        warm = iter(range(1000))

        def following() -> bool:
            through(front, f"{tag}warm up {next(warm)}. " + "the watcher. " * 40)
            time.sleep(0.5)
            return held() is not None

        wait_for(following, 30, what="the watcher follows the engine's KV events (is the engine "
                 "started with --kv-events-config, as run.sh does?)")
        before = held()
        # The module's front end sends a prompt; the watcher never routed it.
        a = tag + "The five boxing wizards jump quickly over the lazy dog. " * 50
        n = through(front, a)
        wait_for(lambda: held() - before >= n // block, 20,
                 what=f"{n // block} blocks of {block} tokens reported stored")
        assert held() - before == n // block, "each whole prompt block once"
        # The same prompt, longer, through the watcher: only the engine's report can say the
        # engine holds its prefix (the watcher's own routing history is empty of it).
        hits = watcher.metric("vllm_router_cache_hits_total") or 0
        through(watcher, a + "And then something else entirely. " * 10)
        assert watcher.metric("vllm_router_cache_hits_total") == hits + 1, watcher.log()[-2000:]
        # The new blocks hang off the prefix's (parent hashes followed, nothing stored twice).
        wait_for(lambda: held() - before > n // block, 20, what="the longer prompt's blocks")
    finally:
        watcher.stop()
