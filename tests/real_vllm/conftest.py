"""The real-vLLM group runs only when real vLLM servers are up, as told by the script that
started them (`tests/real_vllm/run.sh`, which `./test.sh` and CI call):

- `REAL_VLLM_URLS`: comma-separated base URLs of two servers (one is enough for most tests);
- `REAL_VLLM_LOGS`: their log files, same order (vLLM's own account of what it received
  and aborted; the servers run with `--enable-log-requests`);
- `REAL_VLLM_CTL` and `REAL_VLLM_START_ARGS`: the control script (`tools/real-vllm/real-vllm.sh`)
  and the `start` arguments, for the test that kills and restarts a server;
- `REAL_VLLM_MAX_NUM_SEQS`: the servers' `--max-num-seqs` (the load tests queue requests
  beyond it).

The gRPC tests (`test_real_grpc.py`: the router as vLLM's OpenAI front end of an engine
started with `--grpc`, judged by the first server of `REAL_VLLM_URLS`) run only when
`REAL_VLLM_GRPC_URL` is set too (`grpc://127.0.0.1:PORT`; run.sh's gRPC phase); see that
module for the rest of their environment.

Without `REAL_VLLM_URLS` every test here is skipped, so plain `pytest` works without vLLM."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from helpers import BIN, Conn, VllmServer, build_request, gauge, get, metrics, post

URLS = [u.strip().rstrip("/") for u in os.environ.get("REAL_VLLM_URLS", "").split(",") if u.strip()]
LOGS = [l.strip() for l in os.environ.get("REAL_VLLM_LOGS", "").split(",") if l.strip()]


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    reason = None
    if not URLS:
        reason = "no real vLLM servers: REAL_VLLM_URLS is not set (tests/real_vllm/run.sh starts them)"
    elif not (BIN / "ringrouter").exists():
        reason = f"no ringrouter binary at {BIN / 'ringrouter'} (cargo build --bins)"
    grpc_reason = grpc_skip_reason()
    for item in items:
        path = Path(str(item.fspath))
        if path.parent != here:
            continue
        if path.name == "test_real_grpc.py":
            if grpc_reason:
                item.add_marker(pytest.mark.skip(reason=grpc_reason))
        elif reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def grpc_skip_reason() -> str | None:
    """Why the gRPC tests cannot run here, or None."""
    from grpc_env import FRONTEND, GRPC_URL, smg_exe
    if not GRPC_URL:
        return "no gRPC engine: REAL_VLLM_GRPC_URL is not set (tests/real_vllm/run.sh's gRPC phase)"
    if not URLS:
        return "no HTTP reference: REAL_VLLM_URLS is not set (the gRPC tests judge by vLLM's own HTTP server)"
    if FRONTEND == "ringrouter" and not (BIN / "ringrouter").exists():
        return f"no ringrouter binary at {BIN / 'ringrouter'} (cargo build --bins)"
    if FRONTEND == "smg" and not smg_exe():
        return "REAL_VLLM_GRPC_FRONTEND=smg but no smg: set REAL_VLLM_SMG to its executable"
    if FRONTEND not in ("ringrouter", "smg") and not FRONTEND.startswith("http://"):
        return f"REAL_VLLM_GRPC_FRONTEND={FRONTEND!r}: ringrouter, smg or http://HOST:PORT"
    return None


@pytest.fixture(scope="session")
def servers() -> list[VllmServer]:
    out = []
    for i, u in enumerate(URLS):
        log = Path(LOGS[i]) if i < len(LOGS) else None
        out.append(VllmServer(u, log))
    for s in out:
        r = get(s.url, "/health", timeout=10)
        assert r.status == 200, f"{s.url}/health answered {r.status}"
    for s in out:
        warm_up(s)
    return out


def warm_up(s: VllmServer):
    """A fresh vLLM is slow on its first requests (in CI it once took 9 s to notice a client
    leaving its first stream, where later ones take well under a second): every test times
    a server that has served completions and chat, streamed and not, and aborted a stream."""
    model = get(s.url, "/v1/models", timeout=30).json()["data"][0]["id"]
    for path, body in [
        ("/v1/completions", {"prompt": "warm up", "max_tokens": 32}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "warm up"}],
                                  "max_tokens": 32}),
    ]:
        for stream in (False, True):
            r = post(s.url, path, {"model": model, **body, "stream": stream}, timeout=120)
            assert r.status == 200, f"warm-up {path}: {r.status}"
    c = Conn(s.url)
    try:
        c.send(build_request("POST", "/v1/completions", "x", json.dumps(
            {"model": model, "prompt": "warm up", "max_tokens": 2000, "ignore_eos": True,
             "stream": True}).encode()))
        assert c.read_head()[0] == 200
        for _ in range(3):
            assert c.read_chunk() is not None
    finally:
        c.close()
    settle(s)


@pytest.fixture(scope="session")
def a(servers) -> VllmServer:
    return servers[0]


@pytest.fixture(scope="session")
def two(servers) -> list[VllmServer]:
    if len(servers) < 2:
        pytest.skip("needs two real vLLM servers in REAL_VLLM_URLS")
    return servers[:2]


@pytest.fixture(scope="session")
def model(a) -> str:
    return get(a.url, "/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="session")
def max_num_seqs() -> int:
    return int(os.environ.get("REAL_VLLM_MAX_NUM_SEQS", "0") or 0)


@pytest.fixture
def logs(servers):
    """Skips a test that needs the servers' logs when they are not known."""
    if any(s.log is None or not s.log.exists() for s in servers):
        pytest.skip("needs the servers' log files (REAL_VLLM_LOGS)")
    return servers


def settle(*servers: VllmServer, timeout: float = 60.0):
    """Waits until the servers are idle and their counters have stopped moving (vLLM updates
    its Prometheus metrics as engine outputs arrive, so they lag the engine a little)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        snap = []
        for s in servers:
            m = metrics(s.url)
            snap.append((m.get("vllm:num_requests_running", 0), m.get("vllm:num_requests_waiting", 0),
                         m.get("vllm:generation_tokens_total", 0)))
        idle = all(r == 0 and w == 0 for r, w, _ in snap)
        if idle and snap == last:
            return
        last = snap
        time.sleep(0.3)
    raise AssertionError(f"servers not idle within {timeout} s: {last}")


@pytest.fixture
def idle(servers):
    settle(*servers)
    yield
    settle(*servers)


__all__ = ["settle", "gauge"]
