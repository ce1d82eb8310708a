"""The deploy's wait for the download unit (issue 15 item 6): dead or stalled units are noticed within seconds,
restarted (bounded) or reported with their last log lines; Ctrl-C ends the wait at once."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from vllm_fleet.settings import load_settings
from vllm_fleet.weights import source as wplan
from vllm_fleet.weights.step import WeightsDownloadError, wait_for_download
from vllm_fleet.weights.watch import START_GRACE_S, Interrupt, Watch

ID = "abc"


def st(phase="downloading", fetched=0, updated=1.0, **kw):
    return {"identity": ID, "phase": phase, "fetched": fetched, "updated": updated, "line": "x", **kw}


def watch(**kw):
    return Watch(**{"stall_s": 30, "restarts_max": 2, "timeout_s": 3600, "started": 0.0, **kw})


def test_a_unit_that_died_without_finishing_is_restarted_then_the_wait_gives_up():
    w = watch()
    assert w.observe(1, None, "inactive").action == "wait"  # just started: systemd may not show it yet
    v = w.observe(START_GRACE_S + 1, st(), "inactive")
    assert v.action == "restart" and "died without finishing" in v.why and "1 of 2" in v.why
    assert w.observe(START_GRACE_S + 2, st(), "inactive").action == "wait"  # grace after the restart, too
    assert w.observe(2 * START_GRACE_S + 3, st(), "failed").action == "restart"
    v = w.observe(3 * START_GRACE_S + 5, st(), "failed")
    assert v.action == "fail" and "vllm_weights_restarts=2" in v.why


def test_a_program_that_gave_up_fails_the_wait_with_its_error_without_a_restart():
    v = watch().observe(1, st("failed", error="every source failed: x"), "failed")
    assert v == type(v)("fail", "every source failed: x")


def test_no_byte_for_stall_s_while_downloading_is_a_stall():
    w = watch(stall_s=30)
    assert w.observe(0, st(fetched=10, updated=1), "active").action == "wait"
    assert w.observe(20, st(fetched=10, updated=21), "active").action == "wait"
    assert w.observe(29, st(fetched=99, updated=30), "active").action == "wait"  # bytes moved: the clock restarts
    assert w.observe(58, st(fetched=99, updated=59), "active").action == "wait"
    v = w.observe(60, st(fetched=99, updated=61), "active")
    assert v.action == "restart" and "no byte received for 31 s" in v.why and "vllm_weights_stall_s=30" in v.why


def test_hashing_is_not_a_stall_but_a_program_that_stops_writing_its_status_is():
    w = watch(stall_s=30)
    for t in range(0, 100, 10):  # a long re-verify: no bytes, status written every second
        assert w.observe(t, st("verifying", updated=t), "active").action == "wait"
    w = watch(stall_s=30)
    assert w.observe(0, st("verifying", updated=5), "active").action == "wait"
    v = w.observe(31, st("verifying", updated=5), "active")
    assert v.action == "restart" and "stopped writing its progress" in v.why


def test_done_and_timeout():
    assert watch().observe(5, st("done"), "inactive").action == "done"
    assert watch().observe(5, st("done"), "active").action == "wait"  # still cleaning up
    v = watch(timeout_s=100).observe(101, st(), "active")
    assert v.action == "fail" and "vllm_weights_wait_timeout_s=100" in v.why


# --- the wait loop on a scripted host ----------------------------------------------------------------


@pytest.fixture()
def plan():
    s = load_settings({"vllm_model": "minimax-m2", "vllm_weights_sources": [{"kind": "hf", "repo": "a/b"}]}, host="h")
    p = wplan.fetch_plan(s)
    return p.__class__(**{**p.__dict__, "config": {**p.config, "identity": ID}})


class Host:
    """Answers the wait's commands: a scripted status / is-active per poll; records every command."""

    def __init__(self, polls):
        self.polls, self.commands = list(polls), []

    def __call__(self, command: str) -> list[str]:
        self.commands.append(command)
        if command.startswith("cat "):
            status, active = self.polls.pop(0) if len(self.polls) > 1 else self.polls[0]
            return [json.dumps(status), active]
        if command.startswith("journalctl"):
            return ["worker: model-00001 at 12 MiB", "Killed"]
        return []


def test_the_wait_restarts_a_killed_unit_with_its_log_lines_and_attaches_again(plan):
    host = Host([(st(), "active"), (st(), "failed"), (st(), "failed"), (st("done", source="hf:a/b at http://m"), "inactive")])
    warned = []
    w = watch(started=time.monotonic() - 2 * START_GRACE_S)
    line = wait_for_download(host, plan, w, Interrupt(), "h1", log=lambda m: None, warn=warned.append, poll_s=0.01)
    assert line == "x from hf:a/b at http://m"  # the last line names the source that served the files
    assert [c for c in host.commands if c.startswith("systemctl restart")] == [f"systemctl restart -- {plan.unit}.service"]
    assert "died without finishing" in warned[0] and "Killed" in warned[0]


def test_the_wait_stops_with_one_error_naming_the_setting_when_restarts_are_spent(plan):
    host = Host([(st(), "failed")])
    w = watch(restarts_max=0, started=time.monotonic() - 2 * START_GRACE_S)
    with pytest.raises(WeightsDownloadError) as err:
        wait_for_download(host, plan, w, Interrupt(), "h1", log=lambda m: None, warn=lambda m: None, poll_s=0.01)
    text = str(err.value)
    assert text.startswith("h1: the weights download") and "Killed" in text and "vllm_weights_restarts" in text


def test_ctrl_c_ends_the_wait_at_once_and_restores_the_previous_handler(plan):
    host = Host([(st(), "active")])  # downloading forever
    before = signal.getsignal(signal.SIGINT)
    timer = threading.Timer(0.3, signal.raise_signal, (signal.SIGINT,))
    t0 = time.monotonic()
    timer.start()
    with pytest.raises(WeightsDownloadError, match="interrupted .Ctrl-C.; the download goes on"):
        wait_for_download(host, plan, watch(started=time.monotonic()), Interrupt(), "h1", log=lambda m: None,
                          warn=lambda m: None, poll_s=2.0)
    assert time.monotonic() - t0 < 1.5  # not the next poll (2 s), at once
    assert signal.getsignal(signal.SIGINT) is before
    assert not any(c.startswith("systemctl") and "stop" in c for c in host.commands)  # the unit goes on


def test_already_complete_respects_identity_and_reverify_on_the_deploy_that_sets_it(plan):
    check = {"complete": True, "identity": ID}
    assert wplan.already_complete(check, plan, reverify=False)
    assert not wplan.already_complete(check, plan, reverify=True)  # this deploy hashes again, not the next one
    assert not wplan.already_complete({**check, "identity": "another-revision"}, plan, reverify=False)
    assert not wplan.already_complete(None, plan, reverify=False)
