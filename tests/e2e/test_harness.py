"""The e2e harness reads real pyinfra output correctly."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from tests.e2e.harness import Result, changed_ops, run_pyinfra

ALL = {"@docker/fleet-a", "@docker/fleet-b", "fleet-c"}


def test_changed_ops_counts_a_change_then_none(test_hosts: list[Any]) -> None:
    path = f"/tmp/vllm-fleet-harness-{uuid.uuid4().hex[:8]}"
    try:
        first = changed_ops(run_pyinfra(["files.directory", f"path={path}"]))
        second = changed_ops(run_pyinfra(["files.directory", f"path={path}"]))
    finally:
        run_pyinfra(["files.directory", f"path={path}", "present=False"])
    assert first == dict.fromkeys(ALL, 1)
    assert second == dict.fromkeys(ALL, 0)


def test_changed_ops_rejects_output_without_results(test_hosts: list[Any]) -> None:
    dry = run_pyinfra(["--dry", "files.directory", "path=/tmp"])
    with pytest.raises(ValueError, match="no single pyinfra results summary"):
        changed_ops(dry)


def test_changed_ops_rejects_a_table_that_disagrees() -> None:
    output = (
        "    [fleet-c]         Connected\n"
        "    [fleet-c]         Success\n"
        "    Operation   Hosts   Success   Error   No Change\n"
        "    Grand total 1       -         -       1\n"
    )
    with pytest.raises(ValueError, match="disagree"):
        changed_ops(Result(0, "", output, output))


def test_run_pyinfra_raises_on_failure(test_hosts: list[Any]) -> None:
    result = run_pyinfra(["--limit", "@docker/fleet-a", "exec", "--", "false"], check=False)
    assert result.returncode != 0
    with pytest.raises(AssertionError, match="exited"):
        run_pyinfra(["--limit", "@docker/fleet-a", "exec", "--", "false"])
