"""The rolling deploy's halt: a host whose gate failed halts the restarts of the hosts after it, in this run only."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pyinfra.api.exceptions import OperationError

from vllm_fleet.service import step as service
from vllm_fleet.service.rolling import RollingHalt


class _Run:
    """Stands for pyinfra's State: takes attributes, hands out op data."""

    def get_op_data_for_host(self, host, op_hash):
        return SimpleNamespace(global_arguments={"_sudo": True})


class _Host:
    def __init__(self, name: str, ok: bool):
        self.name, self.ok, self.ran = name, ok, []
        self.print_prefix = f"[{name}] "
        self.executing_op_hash = "h"

    def run_shell_command(self, command, print_output=False, **kw):
        self.ran.append((str(command), kw))
        return self.ok, [SimpleNamespace(line="gate verdict: failed (health)")] if not self.ok else []


def test_no_failure_means_nothing_blocked():
    assert RollingHalt().blocked() is None


def test_a_failure_blocks_the_rest_and_names_the_host():
    halt = RollingHalt()
    halt.record_failure("a")
    halt.record_failure("a")
    halt.record_failure("b")
    assert halt.failed == ["a", "b"]
    assert halt.blocked() == "not restarted: the rolling deploy halted after a, b failed its health gate"


def test_the_record_lives_on_the_run():
    one, two = _Run(), _Run()
    assert RollingHalt.of(one) is RollingHalt.of(one)
    RollingHalt.of(one).record_failure("a")
    assert RollingHalt.of(two).blocked() is None  # another run starts clean


def test_run_gate_halts_the_hosts_after_a_failed_one():
    run = _Run()
    first, second, third = _Host("a", ok=True), _Host("b", ok=False), _Host("c", ok=True)
    service._run_gate(run, first, "gate apply")
    with pytest.raises(OperationError, match="gate verdict: failed"):
        service._run_gate(run, second, "gate apply")
    with pytest.raises(OperationError, match="halted after b failed"):
        service._run_gate(run, third, "gate apply")
    assert first.ran == [("gate apply", {"_sudo": True})] and len(second.ran) == 1 and third.ran == []
    service._run_gate(_Run(), _Host("c", ok=True), "gate apply")  # a new run is not halted
    assert not hasattr(service, "_HALTED")
