"""The official `openai` Python client against ringrouter in front of mock vLLM workers:
completions and chat, streamed and not. The client is the judge of the wire format."""

import os
import subprocess
import time
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
PROFILE = os.environ.get("RINGROUTER_PROFILE", "debug")
BIN = ROOT / "target" / PROFILE


def _start(cmd, ready_prefix, count=1):
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = []
    deadline = time.time() + 30
    while len(lines) < count:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"{cmd[0]} exited before it was ready")
        if line.startswith(ready_prefix):
            lines.append(line.strip())
        if time.time() > deadline:
            raise RuntimeError(f"{cmd[0]} not ready in time")
    return p, lines


@pytest.fixture(scope="module")
def router_url():
    mocks, lines = _start(
        [str(BIN / "mock-vllm"), "--port", "0", "--workers", "2", "--model", "mock-model", "--itl-ms", "1"],
        "mock-vllm ",
        count=2,
    )
    urls = [l.split()[-1] for l in lines]
    router, lines = _start(
        [str(BIN / "ringrouter"), "--port", "0", "--no-pin-cores", "--shards", "2", "--worker-urls", *urls],
        "ringrouter listening on ",
    )
    yield lines[0].split()[-1]
    router.kill()
    mocks.kill()
    router.wait()
    mocks.wait()


@pytest.fixture
def client(router_url):
    return openai.OpenAI(base_url=router_url + "/v1", api_key="unused", max_retries=0)


def test_completion(client):
    r = client.completions.create(model="mock-model", prompt="Hello", max_tokens=5)
    assert r.object == "text_completion"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert r.choices[0].text


def test_completion_stream(client):
    chunks = list(client.completions.create(model="mock-model", prompt="Hello", max_tokens=7, stream=True))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) == 7
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat(client):
    r = client.chat.completions.create(
        model="mock-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.usage.completion_tokens == 4


def test_chat_stream_with_usage(client):
    chunks = list(
        client.chat.completions.create(
            model="mock-model",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 6


def test_router_errors_reach_the_client_as_openai_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert e.value.status_code == 404


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["mock-model"]
