"""Monitoring: what Prometheus needs to watch a fleet (docs/monitoring.md).

Built now: the alert rules, as files in ``rules/`` (checked with promtool in
tests/unit/monitoring/test_rules.py). Not built yet: the deploy of Prometheus on a
monitoring host, its scrape configuration, node and GPU exporters, a dashboard.
"""

from __future__ import annotations

from pathlib import Path

RULES_DIR = Path(__file__).resolve().parent / "rules"


def rule_files() -> list:
    """The alert rule files a Prometheus loads (rule_files:), sorted."""
    return sorted(RULES_DIR.glob("*.rules.yml"))
