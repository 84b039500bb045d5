#!/usr/bin/env python3
"""Soak: steady streamed load through ringrouter while workers are killed and restarted.

Phase 1 (churn): N mock workers, each its own process on a fixed port, behind the router
(release build). loadgen drives a closed loop of streamed completions; every --kill-every
seconds one worker (in turn) is SIGKILLed and started again --down-for seconds later on the
same port. Reported: requests sent, completed intact (16 events and [DONE]), cut mid-stream
(streams in flight on a killed worker: they end with an in-band error event and [DONE]),
failed by kind, and the router's retries (its debug log lines).

Phase 2 (overload): the router with a small admission limit, clients far beyond it; reports
429/408 counts, the slowest refusal, and the router's peak RSS sampled from /proc.

Usage: perf/soak.py [--duration 60] [--workers 3] [--concurrency 32] [--kill-every 4]
                    [--down-for 2] [--overload-secs 15] [--json out.json]
Bounded: everything stops after duration + overload-secs (+ a few seconds of start-up).
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.02)
    return False


class Mock:
    def __init__(self, port, name, extra):
        self.port, self.name, self.extra, self.proc = port, name, extra, None

    def start(self):
        self.proc = subprocess.Popen(
            [f"{BIN}/mock-vllm", "--port", str(self.port), "--name", self.name,
             "--model", "mock-model", *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_port(self.port):
            sys.exit(f"mock {self.name} did not start on {self.port}")

    def kill(self):
        if self.proc:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


class Router:
    def __init__(self, args, log_path):
        self.log = open(log_path, "w")
        env = dict(os.environ, RUST_LOG="info,monoio=warn,shards::proxy=debug")
        self.proc = subprocess.Popen(
            [f"{BIN}/ringrouter", "--port", "0", "--no-pin-cores", *args],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        for line in self.proc.stdout:
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                break
        else:
            sys.exit(f"router did not start; see {log_path}")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
        self.peak_rss_kib = 0
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while not self._stop.is_set():
            try:
                with open(f"/proc/{self.proc.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            self.peak_rss_kib = max(self.peak_rss_kib, int(line.split()[1]))
            except OSError:
                return
            time.sleep(0.05)

    def stop(self):
        self._stop.set()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def loadgen(url, *args):
    out = subprocess.run(
        [f"{BIN}/loadgen", "--url", url, "--model", "mock-model", "--json", "--quiet", *args],
        capture_output=True, text=True)
    if out.returncode not in (0, 1):
        sys.exit(f"loadgen failed: {out.stderr}")
    return json.loads(out.stdout)


def churn(a, work):
    extra = ["--ttft-ms", "20", "--itl-ms", "5"]
    mocks = [Mock(free_port(), f"w{i}", extra) for i in range(a.workers)]
    for m in mocks:
        m.start()
    router = Router(
        ["--worker-urls", *[m.url for m in mocks], "--policy", "round_robin",
         "--health-check-interval-secs", "1", "--health-failure-threshold", "1",
         "--health-success-threshold", "1", "--retry-initial-backoff-ms", "5",
         "--load-scrape-interval-ms", "0"],
        os.path.join(work, "router-churn.log"))
    kills = []
    stop = threading.Event()

    def killer():
        i = 0
        while not stop.wait(a.kill_every):
            m = mocks[i % len(mocks)]
            m.kill()
            kills.append(time.time())
            if stop.wait(a.down_for):
                break
            m.start()
            i += 1

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    rep = loadgen(router.url, "--stream", "--ignore-eos", "--max-tokens", "16",
                  "--expect-events", "16", "--concurrency", str(a.concurrency),
                  "--duration", str(a.duration), "--prompt-bytes", "512")
    stop.set()
    t.join()
    router.stop()
    for m in mocks:
        m.kill()
    log = open(os.path.join(work, "router-churn.log")).read()
    req, streams, errs = rep["requests"], rep["streams"], rep["errors"]["by_kind"]
    return {
        "duration_s": a.duration,
        "workers": a.workers,
        "kills": len(kills),
        "sent": req["total"],
        "completed_intact": streams["checked"] - streams["wrong_event_count"]
        - streams["missing_done"],
        "ok": req["ok"],
        "failed": req["failed"],
        "failed_by_kind": errs,
        "missing_done": streams["missing_done"],
        "wrong_event_count": streams["wrong_event_count"],
        "router_retries": log.count("retrying on another worker"),
        "router_mid_stream_cuts": log.count("mid-response"),
        "req_per_s": rep["requests_per_sec"],
        "router_peak_rss_mib": round(router.peak_rss_kib / 1024, 1),
    }


def overload(a, work):
    mocks = [Mock(free_port(), f"o{i}", ["--ttft-ms", "200", "--itl-ms", "20"])
             for i in range(2)]
    for m in mocks:
        m.start()
    router = Router(
        # round_robin: the memory measured is admission's and the connections', not the
        # cache_aware prefix index filling to its --max-tree-size bound.
        ["--worker-urls", *[m.url for m in mocks], "--policy", "round_robin",
         "--max-concurrent-requests", "64",
         "--queue-size", "64", "--queue-timeout-secs", "2", "--load-scrape-interval-ms", "0",
         "--health-check-interval-secs", "0"],
        os.path.join(work, "router-overload.log"))
    rep = loadgen(router.url, "--stream", "--ignore-eos", "--max-tokens", "16",
                  "--concurrency", str(a.overload_clients), "--duration", str(a.overload_secs),
                  "--prompt-bytes", "2048", "--timeout", "10")
    router.stop()
    for m in mocks:
        m.kill()
    errs = rep["errors"]["by_kind"]
    return {
        "clients": a.overload_clients,
        "limit": 64,
        "queue": 64,
        "sent": rep["requests"]["total"],
        "ok": rep["requests"]["ok"],
        "failed_by_kind": errs,
        "slowest_answer_ms": round(rep["latency_us"]["total"]["max"] / 1000, 1),
        "router_peak_rss_mib": round(router.peak_rss_kib / 1024, 1),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=int, default=60)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--kill-every", type=float, default=4.0)
    p.add_argument("--down-for", type=float, default=2.0)
    p.add_argument("--overload-secs", type=int, default=15)
    p.add_argument("--overload-clients", type=int, default=1000)
    p.add_argument("--json")
    a = p.parse_args()
    if not all(os.path.exists(f"{BIN}/{b}") for b in ("ringrouter", "mock-vllm", "loadgen")):
        subprocess.run(["cargo", "build", "--release", "-p", "ringrouter", "-p", "mock-vllm",
                        "-p", "loadgen"], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory() as work:
        res = {"churn": churn(a, work), "overload": overload(a, work)}
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    c = res["churn"]
    bad = c["missing_done"] + c["failed_by_kind"].get("framing", 0)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
