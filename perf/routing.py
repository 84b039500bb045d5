#!/usr/bin/env python3
"""Routing quality, side by side: ringrouter's policies against vllm-router 0.1.17 on a
workload where routing decides latency.

Workload (the routing issue's): 4 mock vLLM workers that each simulate a prefix cache
(LRU of 64-byte block hashes, too small to hold every group's prefix) and charge TTFT for
the uncached part of a prompt and for every request already in flight on them; 8 prefix
groups of 2 KB prompts (80 % shared within a group, 20 % unique), streamed, 16 tokens.
Good routing keeps a group on a worker (cache hits, short prefill) without piling requests
on one worker (queueing).

Every target gets fresh mocks (cold caches) and the same load. Reported per target:
prefix-cache hit ratio (from the mocks' own vllm:prefix_cache_{hits,queries}_total),
per-worker share and its coefficient of variation, TTFT p50/p99, req/s, router CPU per
request.

    python3 perf/routing.py                 # all targets, 20 s each
    python3 perf/routing.py --duration 5 --targets ringrouter:cache_aware,vllm-router:cache_aware
"""

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as h  # noqa: E402  (the side-by-side harness: process control, installs)

DEFAULT_TARGETS = [
    "ringrouter:round_robin",
    "ringrouter:cache_aware",
    "ringrouter:load_aware",
    "vllm-router:round_robin",
    "vllm-router:cache_aware",
]


def start_mocks(tmp: Path, args):
    port = h.free_port_run(4)
    cmd = [h.BIN / "mock-vllm", "--host", h.HOST, "--port", port, "--workers", 4,
           "--model", h.MODEL, "--threads", 1, "--itl-ms", args.itl_ms,
           "--prefix-cache-blocks", args.cache_blocks, "--prefill-us-per-kb", args.prefill_us_per_kb,
           "--ttft-per-inflight-ms", args.queue_ms]
    logf = tmp / "mocks.log"
    with open(logf, "wb") as f:
        proc = h.PROCS.spawn(cmd, stdout=f, stderr=f)
    urls = [f"http://{h.HOST}:{port + i}" for i in range(4)]
    for u in urls:
        h.wait_ready("mock-vllm", u, proc, logf, timeout=20)
    return proc, urls


def prefix_counters(urls):
    hits = queries = 0.0
    for u in urls:
        text = urllib.request.urlopen(u + "/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            m = re.match(r"vllm:prefix_cache_(hits|queries)_total\{[^}]*\} ([0-9.e+]+)", line)
            if m:
                if m.group(1) == "hits":
                    hits += float(m.group(2))
                else:
                    queries += float(m.group(2))
    return hits, queries


def start_router(tmp: Path, kind: str, policy: str, urls, vllm_exe, extra=()):
    port = h.free_port()
    url = f"http://{h.HOST}:{port}"
    logf = tmp / f"{kind}-{policy}-{len(extra)}.log"
    if kind == "ringrouter":
        cmd = [h.BIN / "ringrouter", "--host", h.HOST, "--port", port, "--shards", 2,
               "--no-pin-cores", "--policy", policy, *extra, "--worker-urls", *urls]
    else:
        cmd = [vllm_exe, "--host", h.HOST, "--port", port, "--worker-urls", *urls,
               "--policy", policy, *extra, "--prometheus-host", h.HOST, "--prometheus-port", h.free_port()]
    with open(logf, "wb") as f:
        proc = h.PROCS.spawn(cmd, stdout=f, stderr=f)
    h.wait_ready(kind, url, proc, logf, timeout=120)
    return proc, url


def measure(args, tmp, target, vllm_exe):
    # kind:policy[:extra flags, space separated, '=' for values], e.g.
    # ringrouter:load_aware:--load-aware-prefix-weight=8
    kind, policy, *rest = target.split(":", 2)
    extra = [p for a in (rest[0].split() if rest else []) for p in a.split("=", 1)]
    mocks, urls = start_mocks(tmp, args)
    router, url = start_router(tmp, kind, policy, urls, vllm_exe, extra)
    try:
        # Warm up the connection pools, not the caches: a tiny unrelated prompt.
        warm = [h.BIN / "loadgen", "--url", url, "--model", h.MODEL, "--requests", 8,
                "--concurrency", 4, "--prompt-bytes", 16, "--max-tokens", 1, "--quiet", "--json"]
        h.run_quiet([str(c) for c in warm], timeout=60)
        hits0, q0 = prefix_counters(urls)
        cpu0 = sum(h.stat_ticks(router.pid))
        cmd = [h.BIN / "loadgen", "--url", url, "--model", h.MODEL, "--stream",
               "--concurrency", args.concurrency, "--duration", args.duration,
               "--prompt-bytes", 2048, "--max-tokens", 16, "--prefix-groups", 8,
               "--group-select", "random", "--quiet", "--json", "--timeout", 30]
        r = h.run_quiet([str(c) for c in cmd], timeout=args.duration + 120)
        cpu1 = sum(h.stat_ticks(router.pid))
        hits1, q1 = prefix_counters(urls)
        rep = json.loads(r.stdout)
    finally:
        h.PROCS.stop(router)
        h.PROCS.stop(mocks)
    ok = rep["requests"]["ok"]
    shares = [rep["workers"].get(f"mock-{i}", 0) for i in range(4)]
    mean = statistics.mean(shares) if shares else 0
    cv = statistics.pstdev(shares) / mean if mean else float("nan")
    ttft = rep["latency_us"]["ttft"]
    return {
        "target": target,
        "requests": ok,
        "errors": rep["errors"]["total"],
        "rps": rep["requests_per_sec"],
        "hit_ratio": (hits1 - hits0) / (q1 - q0) if q1 > q0 else float("nan"),
        "shares": shares,
        "cv": cv,
        "ttft_p50_ms": ttft["p50"] / 1000,
        "ttft_p99_ms": ttft["p99"] / 1000,
        "cpu_us_per_req": (cpu1 - cpu0) * 1e6 / h.CLK_TCK / ok if ok else float("nan"),
    }


def table(rows):
    out = ["| target | req/s | prefix hit ratio | per-worker share | CV | TTFT p50 ms | TTFT p99 ms | router CPU µs/req | errors |",
           "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['target']} | {r['rps']:.0f} | {r['hit_ratio']:.2f} | {'/'.join(map(str, r['shares']))} | "
                   f"{r['cv']:.2f} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | {r['cpu_us_per_req']:.0f} | {r['errors']} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--cache-blocks", type=int, default=96, help="per mock: ~3 groups' prefixes")
    ap.add_argument("--prefill-us-per-kb", type=float, default=4000)
    ap.add_argument("--queue-ms", type=float, default=1.0, help="TTFT per request in flight")
    ap.add_argument("--itl-ms", type=float, default=2.0)
    args = ap.parse_args()
    targets = args.targets.split(",")
    h.ensure_binaries(build=False)
    vllm_exe = h.ensure_vllm_router() if any(t.startswith("vllm-router") for t in targets) else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="ringrouter-routing-") as d:
        tmp = Path(d)
        try:
            for t in targets:
                if t.startswith("vllm-router") and vllm_exe is None:
                    h.log(f"SKIP {t}: vllm-router not installed")
                    continue
                h.log(f"measuring {t} ...")
                rows.append(measure(args, tmp, t, vllm_exe))
                h.log(json.dumps(rows[-1]))
        finally:
            h.PROCS.stop_all()
    md = table(rows)
    print(md)
    res = h.PERF / "results" / time.strftime("routing-%Y%m%d-%H%M%S")
    res.mkdir(parents=True, exist_ok=True)
    (res / "table.md").write_text(
        f"workload: 4 mocks (prefix cache {args.cache_blocks} blocks, prefill {args.prefill_us_per_kb} µs/KB, "
        f"{args.queue_ms} ms per in-flight), 8 prefix groups, 2 KB prompts, stream 16 tokens, "
        f"concurrency {args.concurrency}, {args.duration} s per target\n\n{md}\n")
    (res / "raw.json").write_text(json.dumps(rows, indent=1))
    h.log(f"wrote {res}")


if __name__ == "__main__":
    main()
