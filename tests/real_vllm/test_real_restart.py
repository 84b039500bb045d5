"""A real vLLM killed under load and started again: the requests that had not started on it
land on the other server (the router retries a refused or reset connection elsewhere before
any byte reached the client), a stream it was writing ends with vLLM's in-band error event
and [DONE], its health checks take it out of routing, and once it is healthy again (two
good checks) requests reach it again. vLLM's logs say which server got
each request (`--enable-log-requests`). Runs last (file name): it restarts a server, which
takes about two minutes."""

from __future__ import annotations

import json
import os
from collections import Counter
import shlex
import subprocess
import threading
import time
import uuid

import pytest

from conftest import settle
from helpers import Conn, Router, build_request, get, post, wait_for

CTL = os.environ.get("REAL_VLLM_CTL", "")
START_ARGS = shlex.split(os.environ.get("REAL_VLLM_START_ARGS", ""))


class Load:
    """`n` clients in a closed loop, short non-streamed completions through the router,
    each request with its own X-Request-Id; records (start, end, status, id)."""

    def __init__(self, url: str, model: str, n: int = 3):
        self.url, self.model = url, model
        self.pause = 0.05  # between one client's requests
        self.stop = threading.Event()
        self.results: list[tuple[float, float, int, str]] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, i: int):
        k = 0
        while not self.stop.is_set():
            rid = f"kr-{i}-{k}-{uuid.uuid4().hex[:6]}"
            k += 1
            t0 = time.monotonic()
            try:
                status = post(self.url, "/v1/completions",
                              {"model": self.model, "prompt": f"restart {k}", "max_tokens": 8,
                               "temperature": 0}, {"X-Request-Id": rid}, timeout=60).status
            except (OSError, ConnectionError):
                status = -1
            with self.lock:
                self.results.append((t0, time.monotonic(), status, rid))
            time.sleep(self.pause)

    def since(self, t: float) -> list[tuple[float, float, int, str]]:
        with self.lock:
            return [r for r in self.results if r[0] >= t]

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(90)


def ctl(port: int, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    # (a start on a busy 2-vCPU host can take minutes)
    env = dict(os.environ, VLLM_PORT_HTTP=str(port), VLLM_READY_TIMEOUT="720")
    return subprocess.run([CTL, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_killed_vllm_is_routed_around_and_rejoins_after_health_checks(two, logs, model):
    if not CTL or not START_ARGS:
        pytest.skip("needs REAL_VLLM_CTL and REAL_VLLM_START_ARGS to restart a server")
    a, b = two
    settle(a, b)
    r = Router([a.url, b.url], "--policy", "round_robin", "--load-scrape-interval-ms", "0",
               "--health-check-interval-secs", "1", "--health-check-timeout-secs", "2")
    load = None
    restarted = False
    try:
        assert all(w["is_healthy"] for w in r.workers().values()), r.workers()
        load = Load(r.url, model)
        # Both serve.
        offsets = [s.log_size() for s in two]
        wait_for(lambda: all(any(s.saw_request(rid, offsets[i]) for *_, rid in load.since(0))
                             for i, s in enumerate(two)), 30, every=0.2, what="both servers serve")

        # A stream on B when it dies (through a router of its own, to be sure it is on B).
        only_b = Router([b.url], "--policy", "round_robin", "--load-scrape-interval-ms", "0",
                        "--health-check-interval-secs", "0")
        stream = Conn(only_b.url, timeout=60)
        stream.send(build_request("POST", "/v1/completions", "x", json.dumps(
            {"model": model, "prompt": "dying", "max_tokens": 8000, "ignore_eos": True,
             "stream": True}).encode()))
        assert stream.read_head()[0] == 200
        assert stream.read_chunk() is not None
        kill_from = time.monotonic()
        out = ctl(b.port, "kill")
        assert out.returncode == 0, out.stdout + out.stderr
        killed_at = time.monotonic()  # (B may answer until the script has killed it)
        # Health checks (every 1 s, 3 failures) take B out of routing.
        wait_for(lambda: not r.workers()[b.url]["is_healthy"], 20, every=0.2,
                 what="the router marks the killed server unhealthy")
        marked_at = time.monotonic()
        time.sleep(2)
        # Every request that started after the kill was answered, by A: those that picked B
        # before the health checks took it out were retried on A.
        after_kill = [x for x in load.since(killed_at + 0.2) if x[1] < time.monotonic()]
        assert after_kill, "no requests after the kill"
        failed = [x for x in after_kill if x[2] != 200]
        assert not failed, f"{len(failed)} of {len(after_kill)} requests failed after the kill: {failed[:5]}"
        a_log = a.log_text()
        missing = [rid for *_, rid in after_kill if f"-{rid}" not in a_log]
        assert not missing, f"not logged by A: {missing[:5]}"
        in_flight_at_kill = [x for x in load.since(kill_from - 60) if x[0] < killed_at and x[1] > kill_from]
        # The stream ends with vLLM's in-band error event and [DONE] rather than a hang or a
        # silently short answer (its bytes so far were relayed as they came).
        chunks = []
        while (c := stream.read_chunk()) is not None:
            chunks.append(c[1])
        stream.close()
        only_b.stop()
        events = [e for e in b"".join(chunks).split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]", events[-3:]
        err = json.loads(events[-2][len(b"data: "):])
        if "choices" in err:
            raise AssertionError(
                f"the stream ended before the kill ({len(events)} events, last {err['choices']}): "
                "this test process was not scheduled while vLLM generated 8000 tokens")
        assert list(err) == ["error"] and list(err["error"]) == ["message", "type", "param", "code"], err
        assert (err["error"]["type"], err["error"]["code"]) == ("BadGatewayError", 502), err
        assert events[-2].startswith(b'data: {"error": {"message": '), "json.dumps spacing, as vLLM's"
        print(f"\nkill: {len(after_kill)} requests after it, all 200 on A; {len(in_flight_at_kill)} in "
              f"flight while the script killed it: statuses {dict(Counter(x[2] for x in in_flight_at_kill))}; "
              f"marked unhealthy "
              f"{marked_at - kill_from:.1f} s after the kill")

        # Start B again (about two minutes here). The load keeps going on A meanwhile,
        # lighter: on a small host a starting vLLM needs the CPU.
        load.pause = 0.5
        started_at = time.monotonic()
        out = ctl(b.port, "start", *START_ARGS)
        restarted = out.returncode == 0
        assert restarted, out.stdout + out.stderr
        up_at = time.monotonic()
        load.pause = 0.05
        # /health answers 200 now: two good checks later, B is routable again ...
        wait_for(lambda: r.workers()[b.url]["is_healthy"], 15, every=0.2,
                 what="the router marks the restarted server healthy")
        rejoined_at = time.monotonic()
        # ... and gets requests again (its log was started afresh).
        wait_for(lambda: [rid for *_, rid in load.since(rejoined_at) if b.saw_request(rid, 0)], 20,
                 every=0.2, what="requests reach the restarted server")
        during = [x for x in load.since(killed_at + 0.2)]
        failed = [x for x in during if x[2] != 200]
        assert not failed, f"{len(failed)} of {len(during)} requests failed: {failed[:5]}"
        print(f"restart: vLLM healthy {up_at - started_at:.0f} s after start; router routes to it "
              f"{rejoined_at - up_at:.1f} s later; {len(during)} requests since the kill, all 200")
    finally:
        if load:
            load.finish()
        r.stop()
        if not restarted and get_status(b.url) != 200:
            # leave the group with two servers
            ctl(b.port, "start", *START_ARGS)


def get_status(url: str) -> int:
    try:
        return get(url, "/health", timeout=5).status
    except OSError:
        return -1
