"""The vLLM test double's /metrics is in real vLLM 0.25.0's exposition format.

Both texts are parsed with prometheus_client's own text parser (the format Prometheus
scrapes): the verbatim capture of real vLLM 0.25.0 (tests/fixtures/vllm-metrics/) and the
body of the double's /metrics after it answered requests. Every family the toolkit reads
(its alert rules in vllm_fleet/monitoring/rules/, its status) must be in both, with the
same type, the same sample names and the same label names.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.test_vllm_double import KEY, start

ROOT = Path(__file__).resolve().parents[2]
CAPTURE = ROOT / "tests" / "fixtures" / "vllm-metrics" / "vllm-0.25.0-metrics.txt"

# prometheus_client's family names: a counter's family drops `_total` (vllm:prompt_tokens_total is a sample
# of the family vllm:prompt_tokens); a histogram's samples are _bucket, _count and _sum.
READ = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
}


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _shape(family) -> tuple:
    """(type, {sample name: sorted label names}) of one family."""
    samples: dict = {}
    for sample in family.samples:
        samples.setdefault(sample.name, set()).update(sample.labels)
    return family.type, {name: sorted(labels) for name, labels in samples.items()}


@pytest.fixture(scope="module")
def capture() -> dict:
    return _families(CAPTURE.read_text())


@pytest.fixture(scope="module")
def double_text(tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("metrics")
    double = start(tmp, "--served-model-name", "minimax-m2", VLLM_API_KEY=KEY)
    try:
        double.wait_for("Application startup complete.")
        for _ in range(3):
            status, _ = double.request("/v1/chat/completions", body={
                "messages": [{"role": "user", "content": "Say hello in three words."}], "max_tokens": 8})
            assert status == 200
        status, body = double.request("/metrics", key=None)  # not behind the API key, as in vLLM
        assert status == 200
        return body.decode()
    finally:
        double.terminate()


def test_the_capture_is_real_vllm_0_25_0_with_every_family_the_toolkit_reads(capture):
    for name, kind in READ.items():
        assert name in capture, name
        assert capture[name].type == kind, (name, capture[name].type)
    assert capture["vllm:prompt_tokens"].samples[0].value == 63.0  # the three chat requests' prompts


@pytest.mark.parametrize("name", sorted(READ))
def test_the_double_serves_the_family_as_real_vllm_does(capture, double_text, name):
    double = _families(double_text)
    assert name in double, f"the double's /metrics lacks {name}"
    assert _shape(double[name]) == _shape(capture[name])
    assert double[name].documentation == capture[name].documentation


def test_the_doubles_buckets_are_vllms(capture, double_text):
    double = _families(double_text)
    for name in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds"):
        bounds = [[s.labels["le"] for s in fam.samples if s.name.endswith("_bucket")] for fam in (double[name], capture[name])]
        assert bounds[0] == bounds[1], name


def test_the_doubles_counters_count_the_requests_it_answered(double_text):
    double = _families(double_text)
    value = {f"{n}/{s.name}": s.value for n, f in double.items() for s in f.samples}
    assert value["vllm:prompt_tokens/vllm:prompt_tokens_total"] > 0
    assert value["vllm:generation_tokens/vllm:generation_tokens_total"] > 0
    assert value["vllm:time_to_first_token_seconds/vllm:time_to_first_token_seconds_count"] == 3.0
    assert value["vllm:num_requests_running/vllm:num_requests_running"] == 0.0

