"""ringrouter's /metrics read by Prometheus' own Python text-format parser
(`prometheus_client.parser`) after traffic from the official `openai` client: the output
parses, the families have vllm-router's names and types, and the values add up."""

import os
import subprocess
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
PROFILE = os.environ.get("RINGROUTER_PROFILE", "debug")
BIN = ROOT / "target" / PROFILE


def _lines(p, prefixes, deadline):
    """The first stdout line starting with each prefix, in order of arrival."""
    found = {}
    while len(found) < len(prefixes):
        line = p.stdout.readline()
        if not line:
            raise RuntimeError("exited before it was ready")
        for pre in prefixes:
            if line.startswith(pre):
                found[pre] = line.strip()
        if time.time() > deadline:
            raise RuntimeError("not ready in time")
    return found


@pytest.fixture(scope="module")
def fleet():
    deadline = time.time() + 30
    mocks = subprocess.Popen(
        [str(BIN / "mock-vllm"), "--port", "0", "--workers", "2", "--model", "mock-model"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    urls = []
    while len(urls) < 2:
        line = mocks.stdout.readline()
        if not line:
            raise RuntimeError("mock-vllm exited")
        if line.startswith("mock-vllm "):
            urls.append(line.split()[-1])
    router = subprocess.Popen(
        [str(BIN / "ringrouter"), "--port", "0", "--no-pin-cores", "--shards", "2",
         "--policy", "round_robin", "--prometheus-port", "0", "--worker-urls", *urls],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    found = _lines(router, ["ringrouter metrics on ", "ringrouter listening on "], deadline)
    yield {
        "url": found["ringrouter listening on "].split()[-1],
        "metrics": found["ringrouter metrics on "].split()[-1],
        "workers": urls,
    }
    for p in (router, mocks):
        p.kill()
        p.wait()


def scrape(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return r.read().decode()


def families(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams, family, name, **labels):
    for s in fams[family].samples:
        if s.name == name and s.labels == labels:
            return s.value
    raise AssertionError(f"{name}{labels} not in {[ (s.name, s.labels) for s in fams[family].samples ]}")


def test_metrics_parse_with_vllm_routers_names_and_add_up(fleet):
    client = openai.OpenAI(base_url=fleet["url"] + "/v1", api_key="unused", max_retries=0)
    for _ in range(4):
        client.completions.create(model="mock-model", prompt="Hello", max_tokens=3)
    for _ in range(2):
        for _ in client.chat.completions.create(
                model="mock-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                stream=True):
            pass
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="Hello", max_tokens=3)

    deadline = time.time() + 10
    while True:
        fams = families(scrape(fleet["metrics"]))
        counted = sum(s.value for s in fams["ringrouter_shard_requests"].samples)
        if counted >= 7 or time.time() > deadline:
            break
        time.sleep(0.01)

    # The parser strips `_total` from counter family names, as Prometheus does.
    kinds = {
        "vllm_router_requests": "counter",
        "vllm_router_request_duration_seconds": "histogram",
        "vllm_router_request_errors": "counter",
        "vllm_router_retries": "counter",
        "vllm_router_processed_requests": "counter",
        "vllm_router_running_requests": "gauge",
        "vllm_router_active_workers": "gauge",
        "vllm_router_worker_health": "gauge",
        "vllm_router_cb_state": "gauge",
        "vllm_router_cb_outcomes": "counter",
        "vllm_router_generate_duration_seconds": "histogram",
        "vllm_router_cache_hits": "counter",
        "vllm_router_cache_misses": "counter",
        "vllm_router_policy_decisions": "counter",
        "vllm_router_pd_requests": "counter",
        "vllm_router_discovery_updates": "counter",
        "ringrouter_added_seconds": "histogram",
        "ringrouter_time_to_first_token_seconds": "histogram",
    }
    for name, kind in kinds.items():
        assert name in fams, f"{name} missing"
        assert fams[name].type == kind, (name, fams[name].type)

    assert sample(fams, "vllm_router_requests", "vllm_router_requests_total",
                  route="/v1/completions") == 5
    assert sample(fams, "vllm_router_requests", "vllm_router_requests_total",
                  route="/v1/chat/completions") == 2
    assert sample(fams, "vllm_router_request_errors", "vllm_router_request_errors_total",
                  route="/v1/completions", error_type="non_retryable_error") == 1
    processed = [sample(fams, "vllm_router_processed_requests",
                        "vllm_router_processed_requests_total", worker=w) for w in fleet["workers"]]
    assert sum(processed) == 7 and min(processed) >= 3, processed
    assert sample(fams, "vllm_router_active_workers", "vllm_router_active_workers") == 2
    count = sample(fams, "vllm_router_request_duration_seconds",
                   "vllm_router_request_duration_seconds_count", route="/v1/completions")
    inf = sample(fams, "vllm_router_request_duration_seconds",
                 "vllm_router_request_duration_seconds_bucket", route="/v1/completions", le="+Inf")
    assert count == inf == 5
