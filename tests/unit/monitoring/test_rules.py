"""vllm_fleet/monitoring/rules/: the alert rules pass `promtool check rules`, and `promtool test rules`
proves each alert fires on synthetic series (tests/unit/monitoring/vllm-fleet.rules.test.yml) and stays
silent where it must. promtool is Prometheus's own checker (Debian's `prometheus` package, which ./setup
installs); without it these tests fail rather than skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from vllm_fleet.monitoring import RULES_DIR, rule_files

ROOT = Path(__file__).resolve().parents[3]
RULE_FILES = rule_files()
RULES_TEST = Path(__file__).with_name("vllm-fleet.rules.test.yml")
CAPTURE = ROOT / "tests" / "fixtures" / "vllm-metrics" / "vllm-0.25.0-metrics.txt"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: it comes with the distribution's `prometheus` package; "
                    "run ./setup (it installs it), or apt-get install --no-install-recommends prometheus")
    return path


def _alerts(path: Path) -> list:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"] if "alert" in rule]


def test_there_are_rule_files():
    assert [p.name for p in RULE_FILES] == ["vllm-fleet.rules.yml"]


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(promtool, path):
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules_each_alert_fires_on_its_series(promtool):
    result = subprocess.run([promtool, "test", "rules", str(RULES_TEST)], capture_output=True, text=True,
                            timeout=120, cwd=RULES_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_test_a_for_a_severity_a_summary_naming_the_replica_and_a_remedy():
    tested = {case["alertname"] for test in yaml.safe_load(RULES_TEST.read_text())["tests"]
              for case in test["alert_rule_test"] if case["exp_alerts"]}
    for path in RULE_FILES:
        for rule in _alerts(path):
            name = rule["alert"]
            assert name in tested, f"{name}: no promtool test proves it fires"
            assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{name}: no `for:`"
            assert rule["labels"]["severity"] in ("warning", "critical"), name
            assert "{{ $labels.instance }}" in rule["annotations"]["summary"], f"{name}: summary names no replica"
            assert rule["annotations"]["remedy"].strip(), name


@pytest.mark.parametrize("alert", [r["alert"] for p in RULE_FILES for r in _alerts(p)])
def test_a_wrong_expression_fails_the_promtool_test(promtool, tmp_path, alert):
    """The promtool test is a real check: with one alert's expression replaced by one that never fires, it fails."""
    for path in RULE_FILES:
        doc = yaml.safe_load(path.read_text())
        for group in doc["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") == alert:
                    rule["expr"] = "vector(1) == 0"
        (tmp_path / path.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    test = yaml.safe_load(RULES_TEST.read_text())
    test["rule_files"] = [p.name for p in RULE_FILES]
    (tmp_path / RULES_TEST.name).write_text(yaml.safe_dump(test, sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", RULES_TEST.name], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode != 0
    assert alert in result.stdout + result.stderr


def test_every_vllm_metric_the_rules_name_is_one_real_vllm_serves():
    """A rule on a name real vLLM 0.25.0 does not serve would never fire: each `vllm:` name is in the capture."""
    served = {s.name for f in text_string_to_metric_families(CAPTURE.read_text()) for s in f.samples}
    names = {n for p in RULE_FILES for n in re.findall(r"vllm:[a-z_]+", p.read_text())}
    assert names == {"vllm:kv_cache_usage_perc", "vllm:num_requests_waiting"}
    assert names <= served, sorted(names - served)
