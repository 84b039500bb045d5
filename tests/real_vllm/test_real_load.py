"""The control plane and the data plane read real vLLM's load: the `/metrics` gauges
(`vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`) and,
for non-streamed requests, the `endpoint-load-metrics` response header that vLLM 0.32 sends
only when the request carried `endpoint-load-metrics-format` (load-using policies ask for it).

How a test sees what the router did: vLLM is the witness. The servers run with
`--enable-log-requests`, so each one logs the X-Request-Id of every request it received
(the router gives the client that id back), logs `Created ORCA header ...` whenever it
answers with a load report, and logs its access lines (`GET /metrics`). A server is made
busy by sending it more long requests than its `--max-num-seqs` straight, past the router:
the rest queue (`vllm:num_requests_waiting` > 0), which only its load reports can tell the
router."""

from __future__ import annotations

import re
import threading
import time
import uuid

import pytest

from conftest import settle
from helpers import Flood, Router, metrics, post, wait_for


def completion(model, **kw):
    return {"model": model, "prompt": f"load {uuid.uuid4().hex[:8]}", "max_tokens": 1,
            "temperature": 0, **kw}


def served_by(servers, rid: str, offsets) -> list[int]:
    """Which servers logged receiving request `rid` since `offsets`."""
    return [i for i, s in enumerate(servers) if s.saw_request(rid, offsets[i])]


def orca_lines(s, since: int) -> list[str]:
    return re.findall(r"Created ORCA header (.*)", s.log_since(since))


def test_vllm_sends_its_load_report_only_when_asked_and_only_unstreamed(a, logs, model):
    asked = {"endpoint-load-metrics-format": "TEXT"}
    r = post(a.url, "/v1/completions", completion(model), asked)
    assert re.fullmatch(r"TEXT named_metrics\.num_requests_waiting=[0-9.]+, "
                        r"named_metrics\.kv_cache_usage_perc=[0-9.]+",
                        r.header("endpoint-load-metrics") or ""), r.headers
    r = post(a.url, "/v1/completions", completion(model), {"endpoint-load-metrics-format": "JSON"})
    assert (r.header("endpoint-load-metrics") or "").startswith('JSON {"named_metrics": {')
    assert post(a.url, "/v1/completions", completion(model)).header("endpoint-load-metrics") is None
    r = post(a.url, "/v1/completions", completion(model, stream=True), asked)
    assert r.status == 200 and r.header("endpoint-load-metrics") is None
    r = post(a.url, "/v1/chat/completions",
             {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}, asked)
    assert r.header("endpoint-load-metrics") is not None


@pytest.mark.parametrize("policy,asks", [("power_of_two", True), ("load_aware", True),
                                         ("cache_aware", True), ("round_robin", False)])
def test_router_asks_for_the_load_report_under_load_using_policies(a, logs, model, policy, asks):
    r = Router([a.url], "--policy", policy, "--load-scrape-interval-ms", "0")
    try:
        before = a.log_size()
        resp = post(r.url, "/v1/completions", completion(model))
        assert resp.status == 200
        # the router asked (vLLM built a report) but the client did not: it gets no header
        assert resp.header("endpoint-load-metrics") is None
        wait_for(lambda: a.saw_request(resp.header("x-request-id"), before), 10, what="request logged")
        time.sleep(0.2)
        assert len(orca_lines(a, before)) == (1 if asks else 0), a.log_since(before)[-2000:]
        # a client that asks gets vLLM's report, whatever the policy
        resp = post(r.url, "/v1/completions", completion(model), {"endpoint-load-metrics-format": "TEXT"})
        assert resp.header("endpoint-load-metrics", ).startswith("TEXT named_metrics.")
        # streamed: vLLM never reports in-band, asked or not
        before = a.log_size()
        resp = post(r.url, "/v1/completions", completion(model, stream=True))
        assert resp.status == 200 and resp.header("endpoint-load-metrics") is None
        time.sleep(0.2)
        assert orca_lines(a, before) == []
    finally:
        r.stop()


def flood_size(max_num_seqs: int, rounds: int = 8) -> int:
    if max_num_seqs <= 0 or max_num_seqs > 8:
        pytest.skip("needs servers started with a small --max-num-seqs (REAL_VLLM_MAX_NUM_SEQS <= 8) "
                    "so that a few requests queue")
    # max_num_seqs running and the rest waiting, 4000 tokens each: many seconds of queue even
    # on a fast host (the tests close the flood when they are done with it).
    return rounds * max_num_seqs


def reported(router: Router, s) -> dict:
    return router.loads()[s.url]["reported"]


class Sampler:
    """Reads the router's /get_loads every 50 ms in the background: what the router
    believed, and when (a starved test process may miss a short window otherwise)."""

    def __init__(self, router: Router):
        self.router, self.samples, self.stop = router, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.router.loads()))
            except (OSError, ConnectionError, ValueError):
                pass
            time.sleep(0.05)

    def close(self):
        self.stop.set()
        self.thread.join(10)


def test_router_reads_vllms_gauges_from_metrics(two, model, max_num_seqs, idle):
    """The control plane scrapes each server's /metrics (`vllm:num_requests_running`,
    `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`, labelled engine and
    model_name): the router's `/get_loads` shows what vLLM says, idle and loaded, and
    power_of_two sends new requests away from the server whose queue the router reads (the
    requests in it were sent to A directly, so the router's own counts cannot see them)."""
    a, b = two
    n = flood_size(max_num_seqs)
    m = metrics(a.url)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        key = f'{name}{{engine="0",model_name="{model}"}}'
        assert key in m, f"{key} not in /metrics"
    r = Router([a.url, b.url], "--policy", "power_of_two", "--load-scrape-interval-ms", "200")
    flood = sampler = None
    try:
        idle_view = {"num_requests_running": 0, "num_requests_waiting": 0, "kv_cache_usage_perc": 0.0}
        wait_for(lambda: reported(r, a) == idle_view and reported(r, b) == idle_view, 10,
                 every=0.1, what="the router reads both servers idle")
        sampler = Sampler(r)
        # One request of n sequences: A full and the rest queued the moment vLLM reads it (a
        # vLLM API server busy generating on a small host reads each new connection seconds
        # after the last, so n requests would trickle in).
        flood = Flood(a.url, model, 1, tag="gauge", choices=n)
        offsets = [s.log_size() for s in two]
        rids = []
        deadline = time.monotonic() + 60
        while len(rids) < 5 and time.monotonic() < deadline:
            # Only while the router reads a queue on A (of requests that take seconds each, so
            # it cannot drain before this request is routed): power_of_two compares (in
            # flight, waiting), and neither server has anything in flight from the router.
            view = r.loads()
            if (view[a.url]["reported"]["num_requests_waiting"] or 0) < 2:
                time.sleep(0.05)
                continue
            resp = post(r.url, "/v1/completions", completion(model))
            assert resp.status == 200
            rids.append(resp.header("x-request-id"))
        flood.close()
        flood = None
        # The queue gone (vLLM aborts what the flood's clients left), the router reads it.
        wait_for(lambda: reported(r, a) == idle_view, 30, every=0.1,
                 what="the router reads A idle again")
        sampler.close()
        loaded = [v for _, v in sampler.samples if (v[a.url]["reported"]["num_requests_waiting"] or 0) > 0]
        assert loaded, "the router never read A's queue"
        full = [v[a.url]["reported"] for v in loaded
                if v[a.url]["reported"]["num_requests_running"] == max_num_seqs]
        assert full, f"the router never read A running {max_num_seqs}: {loaded[:3]}"
        assert all(0 < x["kv_cache_usage_perc"] <= 1 for x in full), full[:3]
        assert all(v[b.url]["reported"]["num_requests_waiting"] == 0 for v in loaded)
        # (Without the scrape a tie is broken at random: 3 requests all on B by chance has
        # odds 1/8.)
        assert len(rids) >= 3, f"the router read a queue on A only {len(rids)} times: inconclusive"
        wait_for(lambda: all(served_by(two, rid, offsets) for rid in rids), 20, what="requests logged")
        placed = [served_by(two, rid, offsets) for rid in rids]
        assert all(p == [1] for p in placed), f"expected all on B (index 1): {placed}"
    finally:
        if flood:
            flood.close()
        if sampler:
            sampler.close()
        r.stop()


def test_router_reads_the_in_band_load_report(two, logs, model, max_num_seqs, idle):
    """Scraping off: only vLLM's endpoint-load-metrics header can tell the router. A fills
    its running slots (F1: one request sent directly, with `n` = A's slots); a burst of
    requests goes through the router, about half to A, where they queue behind F1; more
    sequences (F2, one direct request) queue behind them. While A runs the router's requests
    (2,000 tokens each, so that F2 is read meanwhile however late a busy vLLM reads its
    sockets), F2 is waiting, and A's answers say so: the router's /get_loads shows it,
    and every later request goes to B."""
    a, b = two
    n = flood_size(max_num_seqs, rounds=4)
    r = Router([s.url for s in two], "--policy", "power_of_two", "--load-scrape-interval-ms", "0")
    f1 = f2 = None
    try:
        for s in two:
            assert reported(r, s) == {"num_requests_running": None, "num_requests_waiting": None,
                                      "kv_cache_usage_perc": None}, "no scrape, nothing reported yet"
        offsets = [s.log_size() for s in two]
        # as long as the context allows (8192): F1 must outlast the burst's arrival and F2's
        f1 = Flood(a.url, model, 1, max_tokens=8000, tag="inband-f1", choices=max_num_seqs)
        # A is idle: once its engine has F1's sequences it runs them all. (Read from vLLM's
        # log, not its /metrics, which a vLLM this busy answers only after many seconds.)
        added = re.compile(r"Added request \d+_cmpl-inband-f1-")
        wait_for(lambda: len(added.findall(a.log_since(offsets[0]))) >= max_num_seqs, 60,
                 every=0.05, what="F1's sequences added on A")
        burst, results = [f"burst-{uuid.uuid4().hex[:8]}-{i}" for i in range(6)], {}

        def send(rid):
            body = completion(model, max_tokens=2000, ignore_eos=True)
            results[rid] = post(r.url, "/v1/completions", body, {"X-Request-Id": rid},
                                timeout=180)

        threads = [threading.Thread(target=send, args=(rid,)) for rid in burst]
        for t in threads:
            t.start()
        # F2 as soon as A has the burst's share queued (power_of_two alternates a burst
        # between two idle servers, so A gets about half), well before F1 ends
        # (vLLM may read it only once F1 is done: tens of seconds on a small host)
        wait_for(lambda: any(a.saw_request(rid, offsets[0]) for rid in burst), 90, every=0.02,
                 what="the burst reaches A")
        time.sleep(0.2)
        f2 = Flood(a.url, model, 1, tag="inband-f2", choices=n)
        for t in threads:
            t.join(180)
        assert all(results[rid].status == 200 for rid in burst)
        on_a = [rid for rid in burst if served_by(two, rid, offsets) == [0]]
        if not on_a:
            pytest.skip("the router sent the whole burst to B (odds 1/64): nothing to learn")
        # The client did not ask: the router's report is kept from it.
        assert all(results[rid].header("endpoint-load-metrics") is None for rid in burst)
        reports = orca_lines(a, offsets[0])
        assert len(reports) == len(on_a), reports
        waiting = max(float(re.search(r"num_requests_waiting=([0-9.]+)", x).group(1)) for x in reports)
        assert waiting > 0, f"A's reports show nothing waiting: {reports}"
        view = reported(r, a)
        assert (view["num_requests_waiting"] or 0) > 0, view
        assert view["kv_cache_usage_perc"] is not None and view["num_requests_running"] is None, view
        assert reported(r, b)["num_requests_waiting"] == 0
        offsets = [s.log_size() for s in two]
        rids = []
        for _ in range(8):
            # (a pause: the router counts a request in flight until just after its last byte
            # reached the client, and power_of_two compares in-flight counts first)
            time.sleep(0.2)
            resp = post(r.url, "/v1/completions", completion(model))
            assert resp.status == 200
            rids.append(resp.header("x-request-id"))
        wait_for(lambda: all(served_by(two, rid, offsets) for rid in rids), 20, what="requests logged")
        placed = [served_by(two, rid, offsets) for rid in rids]
        assert all(p == [1] for p in placed), f"expected all on B: {placed}"
    finally:
        for f in (f1, f2):
            if f:
                f.close()
        r.stop()
