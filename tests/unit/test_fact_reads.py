"""No fact is read twice in a run (issue 12): deploy.py planned for one fake host, every fact read counted."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.fakerun import REPO, fake_run
from vllm_fleet.planner.plan import make_plan
from vllm_fleet.preflight.parse import Gpu, GpuInfo, Snapshot
from vllm_fleet.pyenv.facts import StackState

TINY = "tests/fixtures/tiny-minimax-m2"
# pyinfra's own facts, read by its stock operations (files.directory/put/file in the pyenv step: the pushed
# wheelhouse, large files streamed from disk) again when they execute; ours (vllm_fleet's, Command, Home) are read once per run.
STOCK = {"Directory", "File", "Sha1File", "Sha256File", "Link", "TmpDir"}


def _snapshot() -> Snapshot:
    gpus = [Gpu(i, f"GPU-{i}", "NVIDIA A800-SXM4-80GB", 81920, 0, "8.0") for i in range(4)]
    return Snapshot(os_id="debian", os_version="12", os_pretty_name=None, systemd_version="252", systemd_running=True,
                    python_version="3.11.2", gpu=GpuInfo("570.124.06", "12.8", gpus), listeners=[], disks={},
                    mem_total_bytes=None, nproc=None)


def _answer(cls, args, kwargs):
    """A bare host: nothing of ours on it yet."""
    name = cls.__name__
    if name == "HostSnapshot":
        return _snapshot()
    if name == "VenvState":
        return StackState()
    if name in ("FileStates",):
        return {p: None for p in kwargs["paths"]}
    if name == "PathStates":
        from vllm_fleet.hostops.facts import MISSING, PathState
        return {p: PathState(MISSING) for p in kwargs["paths"]}
    if name == "SystemAccount":
        from vllm_fleet.hostops.facts import Account
        return Account(None, None)
    if name == "Command":
        return ""
    if name == "Home":
        return "/root"
    if name == "FetchState":
        return {"hub": None, "modelscope": None, "active": ""}
    return None  # pyinfra's stock facts: the path is absent


@pytest.fixture
def no_host_checks(monkeypatch):
    """The fake snapshot has no disks: preflight's disk and stack checks are not what this test is about."""
    from vllm_fleet.preflight import checks

    monkeypatch.setattr(checks, "check", lambda *a, **k: [])
    monkeypatch.setattr(checks, "check_disk", lambda *a, **k: [])
    monkeypatch.setattr(checks, "check_stack", lambda *a, **k: [])


SOURCES = [{"kind": "hf", "repo": "test/tiny-minimax-m2", "endpoint": "http://127.0.0.1:9"}]


@pytest.mark.parametrize("extra", [{}, {"vllm_weights_sources": SOURCES}, {"vllm_wheelhouse": "WHEELHOUSE"}],
                         ids=["mirrored-model-dir", "download", "wheelhouse"])
def test_a_first_deploy_reads_no_fact_twice(no_host_checks, monkeypatch, tmp_path, extra):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("VLLM_FLEET_CACHE", str(tmp_path / "cache"))
    if extra.get("vllm_wheelhouse"):
        house = tmp_path / "wheelhouse"
        house.mkdir()
        for name in ("uv-0.9.0-py3-none-any.whl", "vllm-0.25.0-py3-none-any.whl", "torch-2.13.0-py3-none-any.whl"):
            (house / name).write_bytes(name.encode())
        extra = {"vllm_wheelhouse": str(house), "vllm_torch_backend": "cpu", "vllm_torch_version": "2.13.0"}
    run = fake_run({"vllm_model": TINY, "vllm_port": 8101, "vllm_gpus": [0, 1, 2, 3], **extra}, _answer)
    run.run_file("deploy.py")
    assert run.twice() == [], run.twice()  # while planning
    planned = len(run.reads)
    run.execute()  # pyinfra runs each operation's function again to execute it: our facts are not read again
    again = {name for name, _, _ in run.reads[planned:]}
    assert again <= STOCK, again - STOCK
    assert run.count("HostSnapshot") == 1 and run.count("VenvState") == 1
    # the service step's three managed_files share one read; a download's files are the weights step's one
    service = [kw for n, _, kw in run.reads if n == "FileStates" and "/etc/systemd/system/vllm.service'" in kw]
    assert len(service) == 1 and "vllm-fleet-gate" in service[0] and "vllm.env'" in service[0], run.keys()
    fetch = [kw for n, _, kw in run.reads if n == "FileStates" and "vllm-fetch.service" in kw]
    assert len(fetch) == (1 if "vllm_weights_sources" in extra else 0), run.keys()  # the download's four files: one read
    assert [k for k in run.twice() if k[0] not in STOCK] == []
    # issue 12 item 6: each step declares what it reads (`reads`), deploy.py reads all of it in one round trip;
    # a read the step makes with other arguments than it declared would cost a command of its own
    # (the venv program's own FileStates: read only when VenvState's program digest differs, i.e. on a run that installs it)
    outside = [k for k in run.reads if k not in run.batched and k[0] not in STOCK | {"Home"}
               and k != ("FileStates", (), "[('paths', ['/opt/vllm-fleet/bin/vllm-fleet-venv'])]")]
    assert outside == [], outside
    assert {n for n, _, _ in run.batched} >= {"HostSnapshot", "Command", "SystemAccount", "PathStates", "VenvState",
                                              "NvidiaDevices", "FileStates", "CompanionUnits"}


def test_a_first_deploy_installs_and_starts_the_watchdog_and_its_units(no_host_checks, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("VLLM_FLEET_CACHE", str(tmp_path / "cache"))
    run = fake_run({"vllm_model": TINY, "vllm_port": 8101, "vllm_gpus": [0, 1, 2, 3]}, _answer)
    run.run_file("deploy.py")
    service = [kw for n, _, kw in run.reads if n == "FileStates" and "/etc/systemd/system/vllm.service'" in kw][0]
    for path in ("vllm-watchdog.service", "vllm-devices.service", "vllm.watchdog.json", "bin/vllm-fleet-watchdog"):
        assert path in service, path  # in the same one read as the unit
    assert run.count("NvidiaDevices") == 1 and run.count("CompanionUnits") == 1
    commands = " \n".join(str(c) for c in run.execute())
    assert "systemctl restart -- vllm-watchdog.service" in commands and "systemctl enable -- vllm-watchdog.service" in commands
