#!/usr/bin/env python3
"""P/D overhead: the router's share of TTFT in prefill/decode mode, ringrouter vs vllm-router.

Mocks: 2 prefill workers whose NIXL prefill leg takes a fixed --prefill-ms, 2 decode workers
with a fixed --decode-ttft-ms (tools/mock-vllm; its decode legs skip prefill). Each router
in --vllm-pd-disaggregation mode over the same mocks, round_robin, driven by loadgen
(streamed completions, short prompt, 16 tokens) at each concurrency. Baseline: the decode
mocks' own TTFT measured directly at the same concurrency. The router's share is
    TTFT(router) - prefill_ms - TTFT(decode direct)
at p50 and p99, i.e. everything the router adds: two upstream exchanges, the body splices,
reading the prefill answer, and its own scheduling (plus the prefill mock's own turnaround).
A second column subtracts the prefill leg measured directly (the same NIXL prefill request
sent straight to a prefill mock at the same concurrency, its whole exchange) instead of the
configured prefill time: what the router adds over a client that ran both legs itself.

The mocks run with --report-timing: each request's first token carries the mocks' own time
for it (prefill leg and decode leg, measured inside the mocks), so loadgen reports, request
by request, the TTFT less the mocks' work ("past the mocks"): the client, loopback, the
mocks' HTTP stacks and the router. "router's share" is that p50 less the same figure for a
client that sends both legs straight to the mocks (each leg measured the same way). The
mocks' first token and prefill answers come on a precise clock (tools/mock-vllm/src/clock.rs),
so the subtractions above no longer measure tokio's millisecond timer rounding.

ringrouter also measures its own time on its own clock (`ringrouter_added_seconds` on its
/metrics, read after each cell): request read → prefill leg written (to_worker), prefill
answer read → decode leg written (between_legs), decode head read → written to the client
(to_client). Their p50s are reported (Prometheus' histogram_quantile interpolation).

A/B of two builds: --targets ringrouter ringrouter-base --base-bin OTHER/ringrouter.

The floor (--targets ... l4relay): perf/l4relay.c, a TCP relay with no HTTP in it, in front
of the decode mocks, sent the decode leg only. A router in front of P/D workers sends and
reads both legs where a direct client would, and adds exactly two hops to the client's path:
client -> router and router -> client. The relay adds those two hops and nothing else, so its
share (past the mocks, less a direct decode client's) is what any router's share includes on
this machine before doing any work. Its decode leg is held as long as a whole P/D request
(x-mock-ttft-ms: prefill + decode first token), so it runs at the routers' request rate.

Usage: perf/pd.py [--requests 2000] [--concurrency 16 128] [--prefill-ms 50]
                  [--decode-ttft-ms 20] [--targets ringrouter ringrouter-base --base-bin PATH]
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
VLLM_ROUTER = os.path.join(ROOT, "perf", ".venv", "bin", "vllm-router")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=120.0):
    import urllib.request
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return True
        except Exception:
            time.sleep(0.1)
    return False


def mocks(n, port, extra):
    p = subprocess.Popen([f"{BIN}/mock-vllm", "--port", str(port), "--workers", str(n),
                          "--model", "mock-model", "--report-timing", *extra],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    urls = [f"http://127.0.0.1:{port + i}" for i in range(n)]
    for u in urls:
        if not wait_http(u, 10):
            sys.exit(f"mock {u} did not start")
    return p, urls


# The prefill leg as the router sends it (perf/../shards/src/pd/splice.rs): non-streamed,
# one token, NIXL's request for a remote decode.
NIXL_PREFILL = ('{"kv_transfer_params":{"do_remote_decode":true,"do_remote_prefill":false,'
                '"remote_engine_id":null,"remote_block_ids":null,"remote_host":null,'
                '"remote_port":null}}')


def loadgen(url, conc, requests, prefill_leg=False, headers=()):
    """TTFT (streamed 16-token completions) or, with `prefill_leg`, the whole exchange of a
    prefill leg sent straight to a prefill worker."""
    shape = (["--no-stream", "--max-tokens", "1", "--body-extra", NIXL_PREFILL] if prefill_leg
             else ["--stream", "--ignore-eos", "--max-tokens", "16"])
    out = subprocess.run(
        [f"{BIN}/loadgen", "--url", url, "--model", "mock-model", *shape,
         "--prompt-bytes", "256", "--concurrency", str(conc),
         "--requests", str(requests), "--warmup", "1", "--json", "--quiet",
         *(x for h in headers for x in ("--header", h))],
        capture_output=True, text=True)
    r = json.loads(out.stdout)
    t = r["latency_us"]["total" if prefill_leg else "ttft"]
    past = r["latency_us"].get("beyond_mocks", {})
    return {"p50": t["p50"], "p99": t["p99"], "rps": r["requests_per_sec"],
            "past_mocks_p50": past.get("p50"), "past_mocks_p99": past.get("p99"),
            "failed": r["requests"]["failed"], "errors": r["errors"]["by_kind"]}


def histogram_quantile(q, buckets):
    """`buckets`: [(upper bound, cumulative count)] ending with +Inf, as Prometheus does."""
    total = buckets[-1][1]
    if total == 0:
        return float("nan")
    rank = q * total
    lower, below = 0.0, 0
    for bound, cum in buckets:
        if cum >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(cum - below, 1)
        lower, below = bound, cum
    return lower


def added_time(metrics_url):
    """p50 / p99 (µs) of each phase of ringrouter_added_seconds."""
    import urllib.request
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        text = r.read().decode()
    phases = {}
    for line in text.splitlines():
        m = re.match(r'ringrouter_added_seconds_bucket\{phase="(\w+)",le="([^"]+)"\} (\d+)', line)
        if m:
            bound = float("inf") if m.group(2) == "+Inf" else float(m.group(2))
            phases.setdefault(m.group(1), []).append((bound, int(m.group(3))))
    return {ph: {"p50": histogram_quantile(0.5, b) * 1e6, "p99": histogram_quantile(0.99, b) * 1e6,
                 "count": b[-1][1]} for ph, b in phases.items()}


def start_relay(decode):
    exe = "/tmp/l4relay-pd"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", exe,
                    os.path.join(ROOT, "perf", "l4relay.c")], check=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([exe, str(port), "2", *(u.removeprefix("http://") for u in decode)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not wait_http(url, 10):
        proc.kill()
        sys.exit("l4relay did not start")
    return proc, url, None


def start_router(name, prefill, decode, base_bin=None):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["--host", "127.0.0.1", "--port", str(port), "--vllm-pd-disaggregation",
            "--policy", "round_robin"]
    for p in prefill:
        args += ["--prefill", p]
    for d in decode:
        args += ["--decode", d]
    if name in ("ringrouter", "ringrouter-base"):
        mport = free_port()
        metrics = f"http://127.0.0.1:{mport}/metrics"
        exe = base_bin if name == "ringrouter-base" else f"{BIN}/ringrouter"
        cmd = [exe, *args, "--no-pin-cores", "--health-check-interval-secs", "0",
               "--load-scrape-interval-ms", "0", "--prometheus-port", str(mport)]
    else:
        metrics = None
        cmd = [VLLM_ROUTER, *args, "--prometheus-host", "127.0.0.1",
               "--prometheus-port", str(free_port())]
    log = open(f"/tmp/pd-{name}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    if not wait_http(url):
        proc.kill()
        sys.exit(f"{name} did not start; see /tmp/pd-{name}.log")
    return proc, url, metrics


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 128])
    ap.add_argument("--prefill-ms", type=float, default=50)
    ap.add_argument("--decode-ttft-ms", type=float, default=20)
    ap.add_argument("--targets", nargs="+", default=["ringrouter", "vllm-router"],
                    help="ringrouter, vllm-router, ringrouter-base (another build: --base-bin), "
                         "l4relay (the floor: a TCP relay in front of the decode mocks)")
    ap.add_argument("--base-bin", default=None,
                    help="the ringrouter binary of target ringrouter-base, for a before/after")
    a = ap.parse_args()
    base = free_port() + 1000
    pp, prefill = mocks(2, base, ["--prefill-ms", str(a.prefill_ms), "--threads", "2"])
    dp, decode = mocks(2, base + 10, ["--ttft-ms", str(a.decode_ttft_ms), "--itl-ms", "1",
                                       "--threads", "2"])
    rows = []
    try:
        for c in a.concurrency:
            direct = loadgen(decode[0], c, a.requests)
            # What a client doing both legs itself would wait for: the prefill leg's whole
            # exchange (the configured prefill time and the mock's own HTTP turnaround).
            prefill_direct = loadgen(prefill[0], c, a.requests, prefill_leg=True)
            for name in a.targets:
                if name == "vllm-router" and not os.path.exists(VLLM_ROUTER):
                    print("skip vllm-router: run perf/run.py once to install it", file=sys.stderr)
                    continue
                if name == "ringrouter-base" and not a.base_bin:
                    sys.exit("target ringrouter-base needs --base-bin")
                if name == "l4relay":
                    proc, url, metrics = start_relay(decode)
                else:
                    proc, url, metrics = start_router(name, prefill, decode, a.base_bin)
                own = {}
                # The relay's decode leg is held as long as a whole P/D request (prefill
                # and first token), so it runs at the routers' request rate.
                hold = ([f"x-mock-ttft-ms:{int(a.prefill_ms + a.decode_ttft_ms)}"]
                        if name == "l4relay" else [])
                try:
                    r = loadgen(url, c, a.requests, headers=hold)
                    if metrics:
                        own = added_time(metrics)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                prefill_us = a.prefill_ms * 1000
                # What a client running both legs itself pays besides the mocks' own work:
                # each exchange's time less the mock's own (per request, from the mocks'
                # reports), at p50.
                direct_past = (direct["past_mocks_p50"] or 0) + (prefill_direct["past_mocks_p50"] or 0)
                if name == "l4relay":
                    # The decode leg alone through the relay: compared with the decode leg
                    # alone, sent directly.
                    direct_past = direct["past_mocks_p50"] or 0
                rows.append({
                    "past_mocks_p50_us": r["past_mocks_p50"],
                    "past_mocks_p99_us": r["past_mocks_p99"],
                    "direct_past_mocks_p50_us": direct_past,
                    "router_exact_p50_us": (r["past_mocks_p50"] - direct_past
                                            if r["past_mocks_p50"] is not None else float("nan")),
                    "concurrency": c, "target": name,
                    "ttft_p50_us": r["p50"], "ttft_p99_us": r["p99"],
                    "router_p50_us": r["p50"] - prefill_us - direct["p50"],
                    "router_p99_us": r["p99"] - prefill_us - direct["p99"],
                    # the same, less the prefill leg measured directly rather than configured
                    "router_vs_legs_p50_us": r["p50"] - (prefill_us if name == "l4relay" else prefill_direct["p50"]) - direct["p50"],
                    "router_vs_legs_p99_us": r["p99"] - (prefill_us if name == "l4relay" else prefill_direct["p99"]) - direct["p99"],
                    "direct_prefill_p50_us": prefill_direct["p50"],
                    "direct_decode_p50_us": direct["p50"], "req_per_s": r["rps"],
                    "failed": r["failed"], "errors": r["errors"],
                    "own_time_us": own,
                })
    finally:
        pp.kill()
        dp.kill()
    print("| concurrency | target | TTFT p50 / p99 (ms) | past the mocks p50 / p99 (µs) "
          "| router's share p50 (µs) | share over both legs sent directly, p50 / p99 (µs) "
          "| req/s | failed |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['concurrency']} | {r['target']} | {r['ttft_p50_us']/1000:.2f} / "
              f"{r['ttft_p99_us']/1000:.2f} | {r['past_mocks_p50_us'] or 0:,} / "
              f"{r['past_mocks_p99_us'] or 0:,} | {r['router_exact_p50_us']:,.0f} | "
              f"{r['router_vs_legs_p50_us']:,.0f} / "
              f"{r['router_vs_legs_p99_us']:,.0f} | {r['req_per_s']:.0f} | {r['failed']} |")
    if rows:
        direct = {r["concurrency"]: r["direct_past_mocks_p50_us"] for r in rows}
        listed = ", ".join(f"c={c}: {us:,.0f} µs" for c, us in direct.items())
        print("\npast the mocks: each request's TTFT less the mocks' own time for it (they report it);"
              "\nrouter's share: that p50 less a direct client's, both legs sent straight to the mocks "
              f"({listed}).")
    own = [r for r in rows if r["own_time_us"]]
    if own:
        print("\nringrouter's own time, on its clock (p50 / p99, µs):\n")
        print("| concurrency | target | request → prefill leg | prefill answer → decode leg | decode head → client | sum of p50s |")
        print("| ---: | --- | ---: | ---: | ---: | ---: |")
        for r in own:
            o = r["own_time_us"]
            cell = lambda ph: f"{o[ph]['p50']:.1f} / {o[ph]['p99']:.1f}" if ph in o else "-"
            total = sum(o[ph]["p50"] for ph in ("to_worker", "between_legs", "to_client") if ph in o)
            print(f"| {r['concurrency']} | {r['target']} | {cell('to_worker')} | {cell('between_legs')} | "
                  f"{cell('to_client')} | {total:.1f} |")
    os.makedirs(os.path.join(ROOT, "perf", "results"), exist_ok=True)
    out = os.path.join(ROOT, "perf", "results", time.strftime("pd-%Y%m%d-%H%M%S.json"))
    with open(out, "w") as f:
        json.dump(rows, f, indent=2)
    print(f"\n{out}")


if __name__ == "__main__":
    main()
