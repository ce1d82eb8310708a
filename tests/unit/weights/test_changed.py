"""The weights step hands the service step ``changed`` true only when bytes on disk changed: a full re-verify
(vllm_weights_reverify) that finds every file good must not restart vLLM."""

from __future__ import annotations

import json
import os
import time

from tests.unit.weights.test_revisions import SHARD, cfg, mirrors, repos, run  # noqa: F401 - fixtures
from tests.unit.weights.test_watch import Host, plan, st, watch  # noqa: F401 - fixtures
from vllm_fleet.handoff import WeightsResult
from vllm_fleet.weights import hostprog as fw
from vllm_fleet.weights.step import DownloadChange, wait_for_download
from vllm_fleet.weights.watch import START_GRACE_S, Interrupt


def _status(c: dict) -> dict:
    return fw.read_json(os.path.join(c["state_dir"], fw.STATUS), {})


def test_the_program_says_changed_only_when_bytes_on_disk_changed(tmp_path, mirrors):
    ma, _ = mirrors
    c = cfg(tmp_path, ma, "rev-a")
    assert run(c) == 0 and _status(c)["changed"] is True  # first download
    assert run({**c, "verify": "full"}) == 0  # every file hashed again, all good
    assert _status(c)["changed"] is False and _status(c)["changed_files"] == []
    path = os.path.join(c["dest"], SHARD)
    data = bytearray(open(path, "rb").read())
    data[0] ^= 0xFF
    with open(path, "wb") as fh:
        fh.write(data)
    assert run({**c, "verify": "full"}) == 0  # the corrupted shard is fetched again
    assert _status(c)["changed"] is True and _status(c)["changed_files"] == [SHARD]
    os.remove(c["marker"])  # as if an earlier run had begun changing files and was killed
    assert run(c) == 0 and _status(c)["changed"] is True


class _Ran:
    def did_change(self) -> bool:
        return True  # the wait operation always "changes" (pyinfra: it runs a function)


def _waited(plan, status: dict) -> WeightsResult:
    host = Host([(st(**status), "active"), (st("done", **status), "inactive")])
    outcome = DownloadChange()
    outcome.op = _Ran()
    wait_for_download(host, plan, watch(started=time.monotonic() - 2 * START_GRACE_S), Interrupt(), "h1",
                      log=lambda m: None, warn=lambda m: None, poll_s=0.01, outcome=outcome)
    return WeightsResult(outcome)


def test_a_reverify_that_changed_nothing_hands_the_service_step_no_change(plan):
    assert not _waited(plan, {"changed": False}).did_change()  # the service step does not restart vLLM
    assert _waited(plan, {"changed": True}).did_change()
    assert _waited(plan, {}).did_change()  # an older program that does not say: changed


def test_a_wait_that_did_not_run_is_no_change():
    outcome = DownloadChange()
    assert not WeightsResult(outcome).did_change()
