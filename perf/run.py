#!/usr/bin/env python3
"""Side-by-side performance harness: ringrouter vs vllm-router vs nginx vs no router.

One command starts 4 mock vLLM workers (one `mock-vllm --workers 4` process), every selected
target in front of them, drives each target with the same closed-loop loads (interleaved over
rounds), and writes a markdown table, the raw JSON and an SVG plot to
perf/results/<timestamp>/. See perf/README.md for what is measured and how to read it.

Python 3.11 standard library only. Everything it starts runs on 127.0.0.1 and is stopped on
exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

PERF = Path(__file__).resolve().parent
ROOT = PERF.parent
BIN = ROOT / "target" / "release"
VENV = PERF / ".venv"
VLLM_ROUTER_VERSION = "0.1.17"
MODEL = "mock-model"
ALL_TARGETS = ["direct", "ringrouter", "vllm-router", "nginx"]
# Not in the defaults: another build of ringrouter (--base-bin), run beside this one for a
# before/after of a change in one run.
# l4relay (perf/l4relay.c): a TCP relay with no HTTP in it, the floor of any proxy's cost.
EXTRA_TARGETS = ["ringrouter-base", "l4relay"]
HOST = "127.0.0.1"


def log(msg: str) -> None:
    print(f"[perf {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Processes: every child gets its own process group, dies with us (PR_SET_PDEATHSIG) and is
# killed group-wide on exit.

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


class Procs:
    def __init__(self) -> None:
        self.children: list[subprocess.Popen] = []
        self.lock = threading.Lock()

    def spawn(self, cmd, *, cores=None, stdout=None, stderr=None, env=None, cwd=None):
        def pre():
            _libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
            if cores is not None:
                os.sched_setaffinity(0, cores)  # same as `taskset -c`

        p = subprocess.Popen(
            [str(c) for c in cmd],
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else subprocess.DEVNULL,
            stderr=stderr if stderr is not None else subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=pre,
        )
        with self.lock:
            self.children.append(p)
        return p

    def stop(self, p: subprocess.Popen, grace: float = 3.0) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # The group may still hold children (nginx workers) even when the leader is gone.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(2)
        except subprocess.TimeoutExpired:
            pass
        with self.lock:
            if p in self.children:
                self.children.remove(p)

    def stop_all(self) -> None:
        with self.lock:
            kids = list(reversed(self.children))
        for p in kids:
            self.stop(p)


PROCS = Procs()


# --------------------------------------------------------------------------------------------
# /proc sampling

def process_cpu_ns(pid: int) -> int | None:
    """CPU time (user+system) of the whole process, all threads, living and exited, in ns.

    Same quantity as utime+stime in /proc/<pid>/stat, but read through the process's CPU-time
    clock (clock_getcpuclockid) so it has nanosecond rather than 10 ms resolution.
    """
    clock_id = ((~pid) << 3) | 2  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)
    try:
        return time.clock_gettime_ns(clock_id)
    except OSError:
        return None


def stat_ticks(pid: int) -> tuple[int, int] | None:
    """(utime, stime) from /proc/<pid>/stat, in clock ticks."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)


def cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) ticks of all CPUs from /proc/stat: time the hypervisor gave another
    guest while this one had work, a sign the run was disturbed from outside."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return f[7], sum(f)


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def child_pids(pid: int) -> list[int]:
    out = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                out += [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


CLK_TCK = os.sysconf("SC_CLK_TCK")


class RssSampler(threading.Thread):
    """Samples the summed VmRSS of some pids every `period` seconds; keeps the max."""

    def __init__(self, pids, period: float = 0.2):
        super().__init__(daemon=True)
        self.pids = list(pids)
        self.period = period
        self.max_kb = 0
        self.stop_event = threading.Event()

    def sample(self) -> None:
        if self.pids:
            self.max_kb = max(self.max_kb, sum(rss_kb(p) for p in self.pids))

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.period)

    def finish(self) -> int:
        self.stop_event.set()
        self.join()
        self.sample()
        return self.max_kb


# --------------------------------------------------------------------------------------------
# Helpers

def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def free_port_run(n: int) -> int:
    """First port of n consecutive free ports."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - n)
        if all(port_free(base + i) for i in range(n)):
            return base
    raise RuntimeError(f"no {n} consecutive free ports found")


def tail(path: Path, n: int = 20) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def probe(url: str, timeout: float = 2.0) -> bool:
    """One small non-streamed completion through `url`; True on 200."""
    body = json.dumps({"model": MODEL, "prompt": "ready?", "max_tokens": 1}).encode()
    req = urllib.request.Request(
        url + "/v1/completions", data=body, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_ready(name: str, url: str, proc: subprocess.Popen, logfile: Path, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail(logfile)}")
        if probe(url):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{name} not ready after {timeout:.0f} s:\n{tail(logfile)}")


def run_quiet(cmd, timeout=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------------------------
# Installing what a target needs

def ensure_binaries(build: bool) -> None:
    need = [BIN / n for n in ("ringrouter", "mock-vllm", "loadgen")]
    if build or not all(p.exists() for p in need):
        cmd = ["cargo", "build", "--release", "-p", "ringrouter", "-p", "mock-vllm", "-p", "loadgen"]
        log("building: " + " ".join(cmd))
        subprocess.run(cmd, cwd=ROOT, check=True)


def ensure_vllm_router() -> Path | None:
    exe = VENV / "bin" / "vllm-router"
    py = VENV / "bin" / "python"
    if exe.exists():
        r = run_quiet([py, "-c", "import importlib.metadata as m; print(m.version('vllm-router'))"])
        if r.returncode == 0 and r.stdout.strip() == VLLM_ROUTER_VERSION:
            return exe
    log(f"installing vllm-router=={VLLM_ROUTER_VERSION} into {VENV}")
    try:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", VENV], check=True, timeout=300)
        r = run_quiet(
            [py, "-m", "pip", "install", "-q", f"vllm-router=={VLLM_ROUTER_VERSION}"], timeout=900
        )
        if r.returncode != 0:
            log("SKIP vllm-router: pip install failed:\n" + (r.stderr or r.stdout)[-2000:])
            return None
    except (subprocess.SubprocessError, OSError) as e:
        log(f"SKIP vllm-router: cannot install it: {e}")
        return None
    return exe if exe.exists() else None


def ensure_nginx() -> str | None:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        log("SKIP nginx: not installed and cannot apt-get install it (need root and apt-get)")
        return None
    log("installing nginx with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        r = subprocess.run(["apt-get", "install", "-y", "-q", "nginx"], capture_output=True,
                           text=True, env=env, timeout=900)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=900)
            r = subprocess.run(["apt-get", "install", "-y", "-q", "nginx"], capture_output=True,
                               text=True, env=env, timeout=900)
        if r.returncode != 0:
            log("SKIP nginx: apt-get install failed:\n" + r.stderr[-2000:])
            return None
    except (subprocess.SubprocessError, OSError) as e:
        log(f"SKIP nginx: {e}")
        return None
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


# --------------------------------------------------------------------------------------------
# Targets

class Target:
    name: str
    url: str
    proc: subprocess.Popen | None = None
    logfile: Path | None = None
    note: str = ""

    def pids(self) -> list[int]:
        """The router's processes (empty for `direct`)."""
        return [self.proc.pid] if self.proc else []

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None


class Direct(Target):
    def __init__(self, mock_urls):
        self.name = "direct"
        self.url = mock_urls[0]
        self.note = f"no router: all load to one mock ({mock_urls[0]})"


class RingRouter(Target):
    def __init__(self, tmp: Path, mock_urls, shards: int, cores, name="ringrouter", exe=None):
        self.name = name
        port = free_port()
        self.url = f"http://{HOST}:{port}"
        self.logfile = tmp / f"{name}.log"
        cmd = [exe or BIN / "ringrouter", "--host", HOST, "--port", port, "--worker-urls", *mock_urls,
               "--policy", "round_robin", "--shards", shards, "--no-pin-cores"]
        self.cmdline = " ".join(str(c) for c in cmd)
        with open(self.logfile, "wb") as f:
            self.proc = PROCS.spawn(cmd, cores=cores, stdout=f, stderr=subprocess.STDOUT)
        wait_ready(self.name, self.url, self.proc, self.logfile)
        driver = ""
        for line in self.logfile.read_text(errors="replace").splitlines():
            if "drivers=" in line:
                driver = line[line.index("drivers="):].split(" policy")[0]
        self.note = f"--shards {shards} --no-pin-cores; {driver}".strip("; ")
        if exe:
            self.note += f"; binary {exe}"


class L4Relay(Target):
    """perf/l4relay.c: bytes copied between each client connection and its own upstream one,
    no HTTP. What it costs per request is the kernel's, a floor under every router."""

    def __init__(self, tmp: Path, mock_urls, threads: int, cores):
        self.name = "l4relay"
        exe = tmp / "l4relay"
        r = run_quiet(["gcc", "-O2", "-pthread", "-o", exe, PERF / "l4relay.c"], timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"gcc failed: {r.stderr[-500:]}")
        port = free_port()
        self.url = f"http://{HOST}:{port}"
        self.logfile = tmp / "l4relay.log"
        cmd = [exe, port, threads, *(u.removeprefix("http://") for u in mock_urls)]
        self.cmdline = " ".join(str(c) for c in cmd)
        with open(self.logfile, "wb") as f:
            self.proc = PROCS.spawn(cmd, cores=cores, stdout=f, stderr=subprocess.STDOUT)
        wait_ready(self.name, self.url, self.proc, self.logfile)
        self.note = f"{threads} thread(s), epoll, a TCP relay (no HTTP), round robin per connection"


class VllmRouter(Target):
    def __init__(self, tmp: Path, exe: Path, mock_urls, cores):
        self.name = "vllm-router"
        port, prom = free_port(), free_port()
        self.url = f"http://{HOST}:{port}"
        self.logfile = tmp / "vllm-router.log"
        cmd = [exe, "--host", HOST, "--port", port, "--worker-urls", *mock_urls,
               "--policy", "round_robin", "--prometheus-host", HOST, "--prometheus-port", prom]
        self.cmdline = " ".join(str(c) for c in cmd)
        with open(self.logfile, "wb") as f:
            self.proc = PROCS.spawn(cmd, cores=cores, stdout=f, stderr=subprocess.STDOUT)
        wait_ready(self.name, self.url, self.proc, self.logfile, timeout=120)
        threads = len(list(Path(f"/proc/{self.proc.pid}/task").iterdir()))
        self.note = f"{VLLM_ROUTER_VERSION} (Python launcher + Rust extension, {threads} threads)"


NGINX_CONF = """\
# generated by perf/run.py
worker_processes {workers};
daemon off;
master_process on;
{user}pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 64m;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream mocks {{
{servers}
        keepalive 512;
        keepalive_requests 1000000;
    }}
    server {{
        listen {host}:{port};
        location / {{
            proxy_pass http://mocks;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


class Nginx(Target):
    def __init__(self, tmp: Path, exe: str, mock_urls, workers: int, cores):
        self.name = "nginx"
        port = free_port()
        self.url = f"http://{HOST}:{port}"
        d = tmp / "nginx"
        d.mkdir()
        servers = "\n".join(f"        server {u.removeprefix('http://')};" for u in mock_urls)
        conf = d / "nginx.conf"
        conf.write_text(NGINX_CONF.format(
            workers=workers, tmp=d, servers=servers, host=HOST, port=port,
            user="user root;\n" if os.geteuid() == 0 else ""))
        self.conf_text = conf.read_text()
        self.logfile = d / "nginx-error.log"
        cmd = [exe, "-p", d, "-c", conf, "-e", self.logfile]
        self.cmdline = " ".join(str(c) for c in cmd)
        with open(d / "nginx.out", "wb") as f:
            self.proc = PROCS.spawn(cmd, cores=cores, stdout=f, stderr=subprocess.STDOUT)
        wait_ready(self.name, self.url, self.proc, self.logfile)
        version = run_quiet([exe, "-v"]).stderr.strip().removeprefix("nginx version: ")
        self.note = f"{version}, worker_processes {workers}"

    def pids(self) -> list[int]:
        return [self.proc.pid] + child_pids(self.proc.pid)


# --------------------------------------------------------------------------------------------
# Loads and measurement

def load_name(stream: bool, conc: int) -> str:
    return f"{'stream' if stream else 'no-stream'} c={conc}"


def loadgen_cmd(args, url: str, stream: bool, conc: int, duration: float) -> list:
    cmd = [BIN / "loadgen", "--url", url, "--model", MODEL, "--concurrency", conc,
           "--duration", f"{duration:g}", "--warmup", "0", "--prompt-bytes", args.prompt_bytes,
           "--max-tokens", args.max_tokens, "--timeout", args.request_timeout,
           "--threads", args.loadgen_threads, "--json", "--quiet",
           "--stream" if stream else "--no-stream"]
    if stream:
        cmd += ["--expect-events", args.max_tokens]
        if args.stream_itl_ms >= 0:
            cmd += ["--header", f"x-mock-itl-ms: {args.stream_itl_ms}"]
    return cmd


def run_loadgen(args, cmd, duration: float, cores) -> tuple[dict | None, str]:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = PROCS.spawn(cmd, cores=cores, stdout=out, stderr=err)
        try:
            p.wait(duration + args.request_timeout + 30)
        except subprocess.TimeoutExpired:
            PROCS.stop(p)
            return None, "loadgen did not finish in time (killed)"
        PROCS.stop(p)
        out.seek(0)
        err.seek(0)
        text, etext = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if p.returncode != 0:
        return None, f"loadgen exited {p.returncode}: {etext.strip()[-500:]}"
    try:
        return json.loads(text), ""
    except json.JSONDecodeError:
        return None, f"loadgen printed no JSON: {text[-300:]} {etext[-300:]}"


def measure(args, target: Target, mock_pid: int, stream: bool, conc: int, lg_cores) -> dict:
    rec: dict = {"target": target.name, "load": load_name(stream, conc), "stream": stream,
                 "concurrency": conc, "loadavg_before": os.getloadavg()[0]}
    if not target.alive():
        rec["error"] = f"{target.name} is not running"
        return rec
    if args.warmup > 0:
        wres, werr = run_loadgen(args, loadgen_cmd(args, target.url, stream, conc, args.warmup),
                                 args.warmup, lg_cores)
        rec["warmup"] = ({"requests": wres["requests"], "errors": wres["errors"]}
                         if wres else {"error": werr})
    pids = target.pids()
    sampler = RssSampler(pids)
    cpu0 = {p: process_cpu_ns(p) for p in pids}
    ticks0 = {p: stat_ticks(p) for p in pids}
    mock0 = process_cpu_ns(mock_pid)
    steal0 = cpu_ticks()
    sampler.start()
    t0 = time.monotonic()
    res, err = run_loadgen(args, loadgen_cmd(args, target.url, stream, conc, args.duration),
                           args.duration, lg_cores)
    wall = time.monotonic() - t0
    cpu1 = {p: process_cpu_ns(p) for p in pids}
    ticks1 = {p: stat_ticks(p) for p in pids}
    mock1 = process_cpu_ns(mock_pid)
    steal1 = cpu_ticks()
    if steal0 and steal1 and steal1[1] > steal0[1]:
        rec["steal_share"] = round((steal1[0] - steal0[0]) / (steal1[1] - steal0[1]), 4)
        if rec["steal_share"] > 0.02:
            log(f"WARNING {target.name} {rec['load']}: {rec['steal_share']:.1%} of CPU time "
                "was stolen by the hypervisor during the run")
    rec["rss_kb_max"] = sampler.finish() if pids else None
    rec["wall_s"] = round(wall, 3)
    if res is None:
        rec["error"] = err
        return rec
    lat = res["latency_us"]
    # Streams: time to the first SSE data event. Non-streamed: the first token comes with the
    # whole response, so the time to the end of the response.
    ttft = lat["ttft"] if stream else lat["total"]
    done = res["requests"]["total"]
    rec.update({
        "requests": res["requests"],
        "requests_per_sec": res["requests_per_sec"],
        "duration_s": res["duration_s"],
        "ttft_us": {k: ttft[k] for k in ("min", "mean", "p50", "p90", "p99", "p99_9", "max")},
        "first_byte_us": {k: lat["first_byte"][k] for k in ("p50", "p99")},
        "gap_us": {k: lat["gap"][k] for k in ("p50", "p99")},
        "total_us": {k: lat["total"][k] for k in ("min", "p50", "p99")},
        "errors": res["errors"],
        "streams": res["streams"],
        "workers": res["workers"],
        "connections_opened": res["connections_opened"],
        "events_per_stream": [res["streams"]["events_min"], res["streams"]["events_max"]],
        "stale_connection_retries": res["stale_connection_retries"],
    })
    ok_pids = [p for p in pids if cpu0.get(p) is not None and cpu1.get(p) is not None]
    if pids and done > 0 and ok_pids:
        cpu_ns = sum(cpu1[p] - cpu0[p] for p in ok_pids)
        user = sum((ticks1[p] or (0, 0))[0] - (ticks0[p] or (0, 0))[0] for p in ok_pids)
        system = sum((ticks1[p] or (0, 0))[1] - (ticks0[p] or (0, 0))[1] for p in ok_pids)
        ticks = user + system
        rec["router_cpu_s"] = round(cpu_ns / 1e9, 6)
        rec["router_cpu_us_per_req"] = round(cpu_ns / 1e3 / done, 2)
        rec["router_cpu_stat_ticks"] = ticks
        rec["router_cpu_us_per_req_from_stat"] = round(ticks / CLK_TCK * 1e6 / done, 1)
        # The kernel's part (system time), from the same ticks: what no user-space change cuts.
        rec["router_system_share"] = round(system / ticks, 3) if ticks else None
        if len(ok_pids) != len(pids):
            rec["cpu_note"] = "a router process vanished during the window"
    if mock0 is not None and mock1 is not None and done > 0:
        rec["mock_cpu_us_per_req"] = round((mock1 - mock0) / 1e3 / done, 2)
    # With the header the mock cannot finish a stream sooner than (tokens - 1) x itl. (The event
    # gap is no test: when the client's core is saturated it reads several events at once.)
    floor_us = (args.max_tokens - 1) * args.stream_itl_ms * 1000 * 0.95
    if stream and args.stream_itl_ms > 0 and res["streams"]["checked"] and \
            rec["total_us"]["min"] < floor_us:
        rec["itl_warning"] = (f"fastest stream took {rec['total_us']['min']} µs: the x-mock-itl-ms "
                              "header seems not to have reached the mock")
    rec["loadavg_after"] = os.getloadavg()[0]
    return rec


def problems(rec: dict) -> int:
    if "error" in rec:
        return -1
    s = rec["streams"]
    return rec["errors"]["total"] + s["missing_done"] + s["wrong_event_count"]


# --------------------------------------------------------------------------------------------
# Aggregation, table, plot

def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def aggregate(records: list[dict], targets: list[str], loads: list[tuple[bool, int]]) -> list[dict]:
    by = {}
    for r in records:
        by.setdefault((r["target"], r["load"]), []).append(r)
    direct = {}
    for r in records:
        if r["target"] == "direct" and "error" not in r:
            direct[(r["round"], r["load"])] = r
    rows = []
    for stream, conc in loads:
        ln = load_name(stream, conc)
        for t in targets:
            rs = by.get((t, ln), [])
            if not rs:
                continue  # not run (interrupted)
            good = [r for r in rs if "error" not in r]
            row = {"load": ln, "stream": stream, "concurrency": conc, "target": t,
                   "rounds": len(rs), "rounds_ok": len(good)}
            if good:
                row["requests_per_sec"] = median(r["requests_per_sec"] for r in good)
                for q in ("p50", "p90", "p99", "p99_9"):
                    row[f"ttft_{q}_us"] = median(r["ttft_us"][q] for r in good)
                if t != "direct":
                    for q in ("p50", "p90", "p99"):
                        diffs = [r["ttft_us"][q] - direct[(r["round"], ln)]["ttft_us"][q]
                                 for r in good if (r["round"], ln) in direct]
                        row[f"added_{q}_us"] = median(diffs)
                row["cpu_us_per_req"] = median(r.get("router_cpu_us_per_req") for r in good)
                shares = [r["router_system_share"] for r in good if r.get("router_system_share")]
                row["system_share"] = median(shares) if shares else None
                row["mock_cpu_us_per_req"] = median(r.get("mock_cpu_us_per_req") for r in good)
                rss = [r["rss_kb_max"] for r in good if r.get("rss_kb_max")]
                row["rss_mb_max"] = round(max(rss) / 1024, 1) if rss else None
            row["failed_requests"] = sum(r["errors"]["total"] for r in good)
            row["bad_streams"] = sum(r["streams"]["missing_done"] + r["streams"]["wrong_event_count"]
                                     for r in good)
            row["failed_runs"] = [r["error"] for r in rs if "error" in r]
            rows.append(row)
    return rows


def fmt(v, nd=0, signed=False):
    if v is None:
        return "—"
    if signed:
        return f"{v:+,.{nd}f}"
    return f"{v:,.{nd}f}"


def pct(share) -> str:
    return "—" if share is None else f"{share * 100:.0f}%"


def table_md(rows: list[dict]) -> str:
    head = ("| load | target | req/s | TTFT p50 µs | TTFT p99 µs | added p50 µs | added p99 µs "
            "| router CPU µs/req | of it kernel | router RSS MB | failed / bad streams |\n"
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
    lines = []
    for r in rows:
        if r["rounds_ok"] == 0:
            lines.append(f"| {r['load']} | {r['target']} | failed: {'; '.join(r['failed_runs'])[:120]} "
                         "| | | | | | | | |")
            continue
        fails = f"{r['failed_requests']} / {r['bad_streams']}"
        if r["failed_runs"]:
            fails += f" ({len(r['failed_runs'])} runs failed)"
        lines.append(
            f"| {r['load']} | {r['target']} | {fmt(r['requests_per_sec'])} "
            f"| {fmt(r['ttft_p50_us'])} | {fmt(r['ttft_p99_us'])} "
            f"| {fmt(r.get('added_p50_us'), signed=True)} | {fmt(r.get('added_p99_us'), signed=True)} "
            f"| {fmt(r.get('cpu_us_per_req'), 1)} | {pct(r.get('system_share'))} "
            f"| {fmt(r.get('rss_mb_max'), 1)} | {fails} |")
    return head + "\n".join(lines) + "\n"


COLORS = {"p50": "#4c78a8", "p90": "#f58518", "p99": "#e45756"}


def svg_plot(rows: list[dict], targets: list[str], loads, title: str) -> str:
    """Grid of panels (rows: stream / no-stream, columns: concurrency); in each panel one group
    of p50/p90/p99 TTFT bars per target, linear scale per panel."""
    streams = [s for s in (True, False) if any(l[0] == s for l in loads)]
    concs = sorted({c for _, c in loads})
    pw, ph, ml, mt, gap = 300, 220, 56, 70, 40
    width = ml + len(concs) * (pw + gap)
    height = mt + len(streams) * (ph + gap + 40) - 30
    by = {(r["load"], r["target"]): r for r in rows}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{ml}" y="20" font-size="14" font-weight="bold">{title}</text>']
    lx = ml
    for q, c in COLORS.items():
        out.append(f'<rect x="{lx}" y="32" width="12" height="12" fill="{c}"/>'
                   f'<text x="{lx + 16}" y="42">TTFT {q}</text>')
        lx += 90
    out.append(f'<text x="{lx + 10}" y="42" fill="#555">(non-stream: time to the whole response; '
               'median over rounds)</text>')
    for si, stream in enumerate(streams):
        for ci, conc in enumerate(concs):
            x0 = ml + ci * (pw + gap)
            y0 = mt + si * (ph + gap + 40)
            ln = load_name(stream, conc)
            vals = {t: by.get((ln, t)) for t in targets}
            top = max([v.get(f"ttft_{q}_us") or 0 for v in vals.values() if v for q in ("p50", "p90", "p99")] + [1])
            step = nice_step(top / 4)
            ticks = -(-top // step)
            top = step * ticks
            out.append(f'<text x="{x0 + pw / 2}" y="{y0 - 6}" text-anchor="middle" '
                       f'font-weight="bold">{ln}</text>')
            out.append(f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
            for k in range(int(ticks) + 1):
                v = step * k
                y = y0 + ph - ph * k / ticks
                out.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{y}" y2="{y}" stroke="#eee"/>')
                out.append(f'<text x="{x0 - 4}" y="{y + 4}" text-anchor="end">{fmt_us(v)}</text>')
            gw = pw / max(len(targets), 1)
            bw = gw * 0.8 / 3
            for ti, t in enumerate(targets):
                gx = x0 + ti * gw + gw * 0.1
                v = vals[t]
                for qi, q in enumerate(("p50", "p90", "p99")):
                    val = v.get(f"ttft_{q}_us") if v else None
                    if val is None:
                        continue
                    h = ph * min(val / top, 1.0)
                    out.append(f'<rect x="{gx + qi * bw:.1f}" y="{y0 + ph - h:.1f}" width="{bw - 1:.1f}" '
                               f'height="{h:.1f}" fill="{COLORS[q]}"><title>{t} {ln} {q} '
                               f'{val:,.0f} µs</title></rect>')
                out.append(f'<text x="{x0 + ti * gw + gw / 2:.1f}" y="{y0 + ph + 14}" '
                           f'text-anchor="middle">{t}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def nice_step(v: float) -> float:
    """Smallest of 1, 2, 2.5, 5 x 10^k that is >= v."""
    exp = 10 ** (len(str(int(max(v, 1)))) - 1)
    for m in (1, 2, 2.5, 5, 10):
        if m * exp >= v:
            return m * exp
    return 10 * exp


def fmt_us(v: float) -> str:
    if v >= 1000:
        return f"{v / 1000:g} ms"
    return f"{v:g} µs"


# --------------------------------------------------------------------------------------------
# Main

def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    git = run_quiet(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]).stdout.strip()
    binary = {}
    rr = BIN / "ringrouter"
    if rr.exists():
        import hashlib
        binary = {"path": str(rr), "sha256": hashlib.sha256(rr.read_bytes()).hexdigest()[:16],
                  "mtime": dt.datetime.fromtimestamp(rr.stat().st_mtime).isoformat(timespec="seconds")}
    dirty = run_quiet(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    return {"nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version(), "git_head": git + ("-dirty" if dirty else ""),
            "ringrouter_binary": binary,
            "loadavg_start": os.getloadavg()}


def busy_others() -> list[str]:
    names = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                comm = (d / "comm").read_text().strip()
            except OSError:
                continue
            if comm in ("cargo", "rustc", "cc", "ld", "cc1", "clang", "lld", "ld.lld"):
                names.append(comm)
    return names


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(ALL_TARGETS),
                    help=f"comma-separated subset of {','.join(ALL_TARGETS + EXTRA_TARGETS)} "
                         f"(default: {','.join(ALL_TARGETS)})")
    ap.add_argument("--base-bin", default=None,
                    help="the ringrouter binary of target ringrouter-base (another build, for a "
                         "before/after in one run)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every load x target (default 3)")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per run (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="warmup seconds before each run (default 1)")
    ap.add_argument("--concurrency", default="1,16,64,256", help="closed-loop connections (default 1,16,64,256)")
    ap.add_argument("--modes", default="stream,no-stream", help="stream,no-stream (default both)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 round, concurrency 1 and 16, 2 s each (0.5 s warmup)")
    ap.add_argument("--pin", action="store_true",
                    help="mocks+loadgen on core 0, router on core 1, router --shards 1 / nginx 1 worker")
    ap.add_argument("--shards", type=int, default=None,
                    help="router shards / nginx workers (default: 2, or 1 with --pin)")
    ap.add_argument("--mock-ttft-ms", type=float, default=0.0, help="mock time to first token (default 0)")
    ap.add_argument("--mock-itl-ms", type=float, default=0.0,
                    help="mock inter-token delay, all requests (default 0)")
    ap.add_argument("--stream-itl-ms", type=int, default=1,
                    help="inter-token delay for streamed requests only, sent as the mock's "
                         "x-mock-itl-ms request header (default 1; -1: no header)")
    ap.add_argument("--mock-threads", type=int, default=None,
                    help="mock-vllm tokio threads (default: 2, or 1 with --pin)")
    ap.add_argument("--loadgen-threads", type=int, default=1, help="loadgen tokio threads (default 1)")
    ap.add_argument("--prompt-bytes", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--request-timeout", type=float, default=10.0, help="loadgen per-request timeout, s")
    ap.add_argument("--build", action="store_true", help="cargo build the release binaries first")
    ap.add_argument("--out", default=None, help="results directory (default perf/results/<timestamp>)")
    ap.add_argument("--keep-logs", action="store_true", help="copy the processes' logs into the results")
    ap.add_argument("--replot", metavar="DIR", default=None,
                    help="measure nothing: rewrite DIR/table.md and DIR/ttft.svg from DIR/raw.json")
    a = ap.parse_args(argv)
    if a.quick:
        a.rounds, a.duration, a.warmup, a.concurrency = 1, 2.0, 0.5, "1,16"
    a.targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    bad = [t for t in a.targets if t not in ALL_TARGETS + EXTRA_TARGETS]
    if bad:
        ap.error(f"unknown target(s) {bad}; choose from {ALL_TARGETS + EXTRA_TARGETS}")
    a.concurrency = [int(c) for c in a.concurrency.split(",")]
    a.modes = [m.strip() for m in a.modes.split(",")]
    if any(m not in ("stream", "no-stream") for m in a.modes):
        ap.error("--modes takes stream and/or no-stream")
    if a.shards is None:
        a.shards = 1 if a.pin else 2
    if a.mock_threads is None:
        a.mock_threads = 1 if a.pin else 2
    if a.rounds < 1 or a.duration <= 0 or a.warmup < 0:
        ap.error("--rounds >= 1, --duration > 0, --warmup >= 0")
    return a


def replot(d: Path) -> int:
    raw = json.loads((d / "raw.json").read_text())
    setup, records = raw["setup"], raw["runs"]
    names = list(setup["targets"])
    loads = [(m == "stream", c) for m in setup["modes"] for c in setup["concurrency"]]
    write_outputs(d, raw["machine"], setup, aggregate(records, names, loads), records, names, loads)
    return 0


def write_outputs(outdir: Path, info, setup, rows, records, names, loads) -> str:
    md = render(info, setup, rows)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "table.md").write_text(md)
    (outdir / "raw.json").write_text(json.dumps(
        {"machine": info, "setup": setup, "summary": rows, "runs": records}, indent=1) + "\n")
    title = (f"TTFT per target — {'pinned (router core 1, rest core 0)' if setup['pin'] else 'unpinned'}, "
             f"{setup['rounds']} round(s) x {setup['duration_s']:g} s")
    (outdir / "ttft.svg").write_text(svg_plot(rows, names, loads, title))
    if shutil.which("rsvg-convert"):  # a PNG too, when librsvg2-bin is there
        subprocess.run(["rsvg-convert", outdir / "ttft.svg", "-o", outdir / "ttft.png"],
                       capture_output=True)
    return md


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(Path(args.replot))
    if args.pin and (os.cpu_count() or 1) < 2:
        log("--pin needs at least 2 cores")
        return 2
    router_cores = {1} if args.pin else None
    side_cores = {0} if args.pin else None
    if args.pin:
        os.sched_setaffinity(0, {0})  # the harness itself stays with the mocks and loadgen

    others = busy_others()
    la = os.getloadavg()
    if others or la[0] > 1.0:
        log(f"warning: machine not quiet (loadavg {la[0]:.2f}, running: {sorted(set(others))}); "
            "numbers will be noisy")

    ensure_binaries(args.build)
    vllm_exe = ensure_vllm_router() if "vllm-router" in args.targets else None
    nginx_exe = ensure_nginx() if "nginx" in args.targets else None

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = Path(args.out) if args.out else PERF / "results" / stamp
    tmp = Path(tempfile.mkdtemp(prefix="ringrouter-perf-"))
    records: list[dict] = []
    skipped: dict[str, str] = {}
    targets: dict[str, Target] = {}
    info = machine_info()
    interrupted = False
    loads = [(m == "stream", c) for m in args.modes for c in args.concurrency]

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    t_start = time.monotonic()
    try:
        base = free_port_run(4)
        mock_log = tmp / "mock-vllm.log"
        mock_cmd = [BIN / "mock-vllm", "--host", HOST, "--port", base, "--workers", 4,
                    "--threads", args.mock_threads, "--ttft-ms", args.mock_ttft_ms,
                    "--itl-ms", args.mock_itl_ms, "--tokens", args.max_tokens]
        with open(mock_log, "wb") as f:
            mock = PROCS.spawn(mock_cmd, cores=side_cores, stdout=f, stderr=subprocess.STDOUT)
        mock_urls = [f"http://{HOST}:{base + i}" for i in range(4)]
        for u in mock_urls:
            wait_ready("mock-vllm", u, mock, mock_log, timeout=20)
        log(f"mocks: {' '.join(mock_urls)} (threads {args.mock_threads}, ttft {args.mock_ttft_ms} ms, "
            f"itl {args.mock_itl_ms} ms)")

        for name in args.targets:
            try:
                if name == "direct":
                    targets[name] = Direct(mock_urls)
                elif name == "ringrouter":
                    targets[name] = RingRouter(tmp, mock_urls, args.shards, router_cores)
                elif name == "ringrouter-base":
                    if not args.base_bin:
                        skipped[name] = "no --base-bin given"
                        continue
                    targets[name] = RingRouter(tmp, mock_urls, args.shards, router_cores,
                                               name=name, exe=Path(args.base_bin))
                elif name == "l4relay":
                    targets[name] = L4Relay(tmp, mock_urls, args.shards, router_cores)
                elif name == "vllm-router":
                    if vllm_exe is None:
                        skipped[name] = "could not be installed (see log above)"
                        continue
                    targets[name] = VllmRouter(tmp, vllm_exe, mock_urls, router_cores)
                elif name == "nginx":
                    if nginx_exe is None:
                        skipped[name] = "could not be installed (see log above)"
                        continue
                    targets[name] = Nginx(tmp, nginx_exe, mock_urls, args.shards, router_cores)
                log(f"{name}: {targets[name].url}  {targets[name].note}")
            except (RuntimeError, OSError) as e:
                skipped[name] = f"did not start: {e}"
                log(f"SKIP {name}: {e}")
        for name, why in skipped.items():
            log(f"SKIP {name}: {why}")
        names = [t for t in args.targets if t in targets]
        if not names:
            log("no target to measure")
            return 1
        idle = idle_cpu([targets[n] for n in names])
        for n, v in idle.items():
            log(f"{n}: idle CPU {v:.2f} ms/s")

        total = args.rounds * len(loads) * len(names)
        est = total * (args.duration + args.warmup + 0.4)
        log(f"{total} runs, about {est / 60:.1f} min")
        n = 0
        for rnd in range(args.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]  # rotate who goes first
            for stream, conc in loads:
                for name in order:
                    n += 1
                    rec = measure(args, targets[name], mock.pid, stream, conc, side_cores)
                    rec["round"] = rnd
                    records.append(rec)
                    if "error" in rec:
                        log(f"[{n}/{total}] round {rnd + 1} {rec['load']:<16} {name:<12} FAILED: {rec['error']}")
                    else:
                        bad = problems(rec)
                        log(f"[{n}/{total}] round {rnd + 1} {rec['load']:<16} {name:<12} "
                            f"{rec['requests_per_sec']:>9,.0f} req/s  ttft p50 {rec['ttft_us']['p50']:>7,} "
                            f"p99 {rec['ttft_us']['p99']:>7,} µs  cpu/req "
                            f"{fmt(rec.get('router_cpu_us_per_req'), 1):>6} µs"
                            + (f"  gap p50 {rec['gap_us']['p50']} µs" if stream else "")
                            + (f"  PROBLEMS {bad}" if bad else "")
                            + (f"  WARNING {rec['itl_warning']}" if "itl_warning" in rec else ""))
                    if mock.poll() is not None:
                        raise RuntimeError(f"mock-vllm died:\n{tail(mock_log)}")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; stopping everything")
    finally:
        for t in targets.values():
            if t.proc is not None and t.proc.poll() is not None:
                log(f"note: {t.name} exited with {t.proc.returncode} during the run:\n{tail(t.logfile)}")
        PROCS.stop_all()
        if args.keep_logs and records:
            (outdir / "logs").mkdir(parents=True, exist_ok=True)
            for f in tmp.rglob("*.log"):
                shutil.copy(f, outdir / "logs" / f.name)
        shutil.rmtree(tmp, ignore_errors=True)

    if not records:
        return 130 if interrupted else 1
    names = [t for t in args.targets if t in targets]
    rows = aggregate(records, names, loads)
    info["loadavg_end"] = os.getloadavg()
    info["elapsed_s"] = round(time.monotonic() - t_start, 1)
    setup = {
        "pin": args.pin, "shards": args.shards, "rounds": args.rounds, "duration_s": args.duration,
        "warmup_s": args.warmup, "concurrency": args.concurrency, "modes": args.modes,
        "mock": {"workers": 4, "threads": args.mock_threads, "ttft_ms": args.mock_ttft_ms,
                 "itl_ms": args.mock_itl_ms},
        "prompt_bytes": args.prompt_bytes, "max_tokens": args.max_tokens,
        "loadgen_threads": args.loadgen_threads,
        "cores": {"router": sorted(router_cores) if router_cores else "any",
                  "mocks_loadgen": sorted(side_cores) if side_cores else "any"},
        "stream_itl_ms": args.stream_itl_ms,
        "targets": {n: {"url": t.url, "note": t.note, "cmdline": getattr(t, "cmdline", ""),
                        "idle_cpu_ms_per_s": getattr(t, "idle_cpu_ms_per_s", None)}
                    for n, t in targets.items()},
        "nginx_conf": getattr(targets.get("nginx"), "conf_text", None),
        "skipped": skipped, "interrupted": interrupted,
        "argv": sys.argv,
    }
    md = write_outputs(outdir, info, setup, rows, records, names, loads)
    print(md)
    log(f"wrote {outdir}/table.md, raw.json, ttft.svg")
    return 130 if interrupted else 0


def idle_cpu(targets: list[Target], seconds: float = 3.0) -> dict[str, float]:
    """CPU each router burns with no load, in ms per second (sets `idle_cpu_ms_per_s`)."""
    time.sleep(1.0)
    pids = {t.name: t.pids() for t in targets if t.pids()}
    before = {n: sum(process_cpu_ns(p) or 0 for p in ps) for n, ps in pids.items()}
    time.sleep(seconds)
    out = {}
    for t in targets:
        if t.name in pids:
            after = sum(process_cpu_ns(p) or 0 for p in pids[t.name])
            t.idle_cpu_ms_per_s = round((after - before[t.name]) / 1e6 / seconds, 3)
            out[t.name] = t.idle_cpu_ms_per_s
    return out


def render(info: dict, setup: dict, rows: list[dict]) -> str:
    mock = setup["mock"]
    lines = [
        f"Machine: {info['nproc']} cores, {info['cpu_model']}, kernel {info['kernel']}; "
        f"ringrouter binary built {info.get('ringrouter_binary', {}).get('mtime', '?')} "
        f"(sha256 {info.get('ringrouter_binary', {}).get('sha256', '?')}; git HEAD at run time "
        f"{info['git_head']}); load average at start {info['loadavg_start'][0]:.2f}.",
        "",
        f"Setup: {'--pin (router on core 1, mocks + loadgen on core 0)' if setup['pin'] else 'no pinning'}, "
        f"router shards / nginx workers {setup['shards']}; 4 mocks in one mock-vllm process "
        f"(threads {mock['threads']}, ttft {mock['ttft_ms']:g} ms, itl {mock['itl_ms']:g} ms; "
        f"streamed requests ask for itl {setup['stream_itl_ms']} ms via x-mock-itl-ms); "
        f"prompt {setup['prompt_bytes']} B, max_tokens {setup['max_tokens']}; closed loop; "
        f"{setup['rounds']} round(s) x {setup['duration_s']:g} s (+{setup['warmup_s']:g} s warmup), "
        f"medians over rounds; took {info['elapsed_s'] / 60:.1f} min.",
        "",
    ]
    for n, t in setup["targets"].items():
        idle = t.get("idle_cpu_ms_per_s")
        idle = f"; idle CPU {idle:.2f} ms/s" if idle is not None else ""
        lines.append(f"- `{n}`: {t['note']}{idle}")
    for n, why in setup["skipped"].items():
        lines.append(f"- `{n}`: SKIPPED — {why}")
    if setup["interrupted"]:
        lines.append("- INTERRUPTED: partial results")
    lines.append("")
    return "\n".join(lines) + "\n" + table_md(rows)


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        PROCS.stop_all()
