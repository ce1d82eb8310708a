"""The vLLM service end to end: unit + secrets, restart only on change, health gate, rollback, crash, leaks, rolling.

Real pyinfra CLI against the systemd container hosts; the serving engine is
the vLLM TEST DOUBLE (installed by the python-env role from the CI
wheelhouse), with faults injected through /etc/vllm-fleet-test/engine-fault.
Tests run in file order and share the hosts' state.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.harness import REPO, changed_ops, host_exec, host_output, run_pyinfra

pytestmark = pytest.mark.e2e

KEY = "sk-e2e-" + secrets.token_hex(12)
ENV = {"VLLM_FLEET_API_KEY": KEY}
HOSTS = {"@docker/fleet-a": ("fleet-a", 8101), "@docker/fleet-b": ("fleet-b", 8102), "fleet-c": ("fleet-c", 8103)}
FAULT = "/etc/vllm-fleet-test/engine-fault"
PROPS = "MainPID,NRestarts,ActiveEnterTimestampMonotonic,ActiveState"


def _props(container: str) -> dict[str, str]:
    out = host_exec(container, ["systemctl", "show", "vllm.service", "-p", PROPS]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _status(port: int, path: str, key: str | None = None) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _set_fault(containers, name: str | None) -> None:
    for c in containers:
        cmd = f"echo {name} > {FAULT}" if name else f"rm -f {FAULT}"
        assert host_exec(c, cmd).returncode == 0


def _unit(container: str) -> str:
    return host_exec(container, ["cat", "/etc/systemd/system/vllm.service"]).stdout


def _verdicts(result, host: str) -> list[str]:
    return [l for l in host_output(result, host) if "gate verdict:" in l]


@pytest.fixture(scope="module")
def first(test_hosts):
    """Uninstall, then the first deploy of every host."""
    _set_fault([c for c, _ in HOSTS.values()], None)
    run_pyinfra(["uninstall.py"], env=ENV)
    for c, _ in HOSTS.values():
        assert host_exec(c, ["test", "-e", "/etc/systemd/system/vllm.service"]).returncode != 0
    started = time.monotonic()
    result = run_pyinfra(["deploy.py"], env=ENV)
    print(f"first deploy of 3 hosts: {time.monotonic() - started:.1f} s")
    return result


def test_first_deploy_is_gated_healthy_and_hardened(first):
    for host, (container, port) in HOSTS.items():
        assert any("PASSED" in v for v in _verdicts(first, host)), (host, first.output[-3000:])
        assert _status(port, "/health") == 200
        assert _status(port, "/v1/models") == 401
        assert _status(port, "/v1/models", KEY) == 200
        assert _props(container)["ActiveState"] == "active"
        stat = host_exec(container, ["stat", "-c", "%U:%G %a", "/etc/vllm-fleet/vllm.env"]).stdout.strip()
        assert stat == "root:root 600"  # systemd reads it as root: the service still has its key (the 200 above)
        gate_files = host_exec(container, ["sh", "-c", "stat -c '%a' /opt/vllm-fleet/state/vllm.gate.log "
                                                       "/opt/vllm-fleet/state/vllm.gate.json"]).stdout.split()
        assert gate_files == ["600", "600"], gate_files
        leftovers = host_exec(container, ["sh", "-c", "ls -a /etc/vllm-fleet /etc/systemd/system | grep -c vllm-fleet-new; true"])
        assert leftovers.stdout.strip() == "0", leftovers.stdout  # every staged upload was renamed into place
        verify = host_exec(container, ["systemd-analyze", "verify", "vllm.service"])
        assert verify.returncode == 0 and "vllm.service" not in verify.stderr, verify.stderr
        security = host_exec(container, ["systemd-analyze", "security", "vllm.service", "--no-pager"]).stdout
        score = float(re.search(r"Overall exposure level for vllm.service: ([\d.]+)", security).group(1))
        print(f"{container}: systemd-analyze security {score}")
        assert score <= 4.0
        assert host_exec(container, ["systemctl", "is-enabled", "vllm.service"]).stdout.strip() == "enabled"


def test_a_second_run_changes_and_restarts_nothing(first):
    before = {c: _props(c) for c, _ in HOSTS.values()}
    started = time.monotonic()
    again = run_pyinfra(["deploy.py"], env=ENV)
    print(f"no-op rerun of 3 hosts: {time.monotonic() - started:.1f} s")
    assert changed_ops(again) == {h: 0 for h in HOSTS}, again.output[-3000:]
    assert "gate verdict" not in again.output
    assert {c: _props(c) for c, _ in HOSTS.values()} == before


def test_render_cli_writes_the_installed_files(first, tmp_path):
    unit = _unit("fleet-a")
    venv = re.search(r"^ExecStart=(\S+)/bin/vllm ", unit, re.M).group(1)
    subprocess.run([sys.executable, "-m", "vllm_fleet.cli.main", "render", "--model", "tests/fixtures/tiny-minimax-m2",
                    "--gpus", "4xA800-80G", "--gpu-indices", "0,1,2,3", "--port", "8101", "--gpu-memory-utilization", "0.5",
                    "--restart-sec", "2", "--venv", venv, "--out", str(tmp_path)],
                   cwd=REPO, check=True, env={"VLLM_FLEET_API_KEY": KEY, "PATH": "/usr/bin:/bin"})
    assert (tmp_path / "vllm.service").read_text() == unit
    env_lines = host_exec("fleet-a", ["cat", "/etc/vllm-fleet/vllm.env"]).stdout.splitlines()
    shown = (tmp_path / "vllm.env").read_text().splitlines()
    assert [l.split("=")[0] for l in shown] == [l.split("=")[0] for l in env_lines]
    assert KEY not in (tmp_path / "vllm.env").read_text()


def test_a_config_change_restarts_once_and_passes_its_gate(first):
    before = _props("fleet-b")
    result = run_pyinfra(["deploy.py", "--limit", "@docker/fleet-b", "--data", "vllm_max_num_seqs=32"], env=ENV)
    assert len(_verdicts(result, "@docker/fleet-b")) == 1 and "PASSED" in _verdicts(result, "@docker/fleet-b")[0]
    after = _props("fleet-b")
    assert after["MainPID"] != before["MainPID"] and after["NRestarts"] == before["NRestarts"]
    assert "--max-num-seqs 32" in _unit("fleet-b")
    cmdline = host_exec("fleet-b", ["cat", f"/proc/{after['MainPID']}/cmdline"]).stdout.replace("\0", " ")
    assert "--max-num-seqs 32" in cmdline
    run_pyinfra(["deploy.py", "--limit", "@docker/fleet-b"], env=ENV)  # back to the group's settings


def test_a_failing_gate_rolls_back_diagnoses_and_halts_the_rolling_deploy(first):
    """All hosts run --enforce-eager; the next version drops it and every engine crashes (illegal memory access).
    The first host gated rolls back to the eager unit; the hosts after it are not restarted."""
    base = run_pyinfra(["deploy.py", "--data", "vllm_enforce_eager=True"], env=ENV)
    assert all(any("PASSED" in v for v in _verdicts(base, h)) for h in HOSTS)
    containers = [c for c, _ in HOSTS.values()]
    pids = {c: _props(c)["MainPID"] for c in containers}
    _set_fault(containers, "illegal_memory")
    try:
        failed = run_pyinfra(["deploy.py"], env=ENV, check=False)
    finally:
        _set_fault(containers, None)
    assert failed.returncode != 0
    gated = [h for h in HOSTS if _verdicts(failed, h)]
    assert len(gated) == 1, failed.output[-4000:]
    culprit = gated[0]
    container, port = HOSTS[culprit]
    assert "rolled back: the previous version is running and healthy" in _verdicts(failed, culprit)[0]
    assert "diagnosis [error]" in failed.output and "PIECEWISE" in failed.output
    assert "an illegal memory access was encountered" in failed.output  # the journal excerpt
    assert _status(port, "/health") == 200 and "--enforce-eager" in _unit(container)
    for host, (other, other_port) in HOSTS.items():
        if host != culprit:
            assert f"rolling deploy halted after {culprit} failed its health gate" in failed.output
            assert _props(other)["MainPID"] == pids[other], f"{other} was restarted after {culprit} failed"
            assert _status(other_port, "/health") == 200
    # Fixed (no fault): the next run gates the rolled-back host and the halted ones (pending) too.
    fixed = run_pyinfra(["deploy.py"], env=ENV)
    for host, (c, _) in HOSTS.items():
        assert any("PASSED" in v for v in _verdicts(fixed, host)), host
        assert "--enforce-eager" not in _unit(c)


def test_an_engine_crash_is_restarted_by_systemd(first):
    c, port = HOSTS["@docker/fleet-a"]
    _set_fault([c], "crash_after_start")
    try:
        assert host_exec(c, ["systemctl", "restart", "vllm.service"]).returncode == 0
        for _ in range(40):
            if _status(port, "/health") == 200:
                break
            time.sleep(0.25)
        before = _props(c)
    finally:
        _set_fault([c], None)  # the restarted engine starts clean
    for _ in range(120):
        now = _props(c)
        if int(now["NRestarts"]) > int(before["NRestarts"]) and _status(port, "/health") == 200:
            break
        time.sleep(0.25)
    assert int(now["NRestarts"]) == int(before["NRestarts"]) + 1 and now["MainPID"] != before["MainPID"], now
    assert _status(port, "/health") == 200
    journal = host_exec(c, ["journalctl", "-u", "vllm.service", "-n", "60", "--no-pager"]).stdout
    assert "EngineDeadError" in journal and "Scheduled restart job" in journal


def test_fleet_status_shows_every_host(first):
    proc = subprocess.run([sys.executable, "-m", "vllm_fleet.cli.main", "status", "inventory/ci.py", "--json"],
                          cwd=REPO, capture_output=True, text=True,
                          # Nothing on PATH (no activated venv); the toolkit's own variables pass (where the
                          # wheelhouse group_data/ci.py names lives: VLLM_FLEET_CACHE under .ci/run).
                          env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()),
                               **{k: v for k, v in os.environ.items() if k.startswith("VLLM_FLEET_")}})
    rows = {r["host"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert set(rows) == set(HOSTS), proc.stdout + proc.stderr
    gpus = {"@docker/fleet-a": 4, "@docker/fleet-b": 2, "fleet-c": 4}
    for host, row in rows.items():
        assert row.get("unit") == "active/running" and row.get("health") == 200, row
        assert row["model"] == "tiny-minimax-m2" and row["version"] == "0.25.0"
        assert isinstance(row["restarts"], int) and row["uptime_s"] >= 0
        assert len(row["gpus"]) == gpus[host] and row["last_gate"]["ok"] is True
    assert rows["fleet-c"]["gpus"][1]["used_mib"] == 32768
    assert proc.returncode == 0
    table = subprocess.run([sys.executable, "-m", "vllm_fleet.cli.main", "status", "inventory/ci.py"], cwd=REPO,
                           capture_output=True, text=True).stdout
    assert all(h in table for h in HOSTS) and "restarts" in table


def test_the_key_never_leaks(first, tmp_path):
    other = "sk-e2e-" + secrets.token_hex(12)  # a key change: --dry/--diff must plan the env file without showing it
    outputs = {
        "-vvv": run_pyinfra(["-vvv", "deploy.py"], env=ENV).output,
        "--debug": run_pyinfra(["--debug", "deploy.py"], env=ENV).output,
        "--dry --diff (key change)": run_pyinfra(["--dry", "--diff", "-vvv", "deploy.py"], env={"VLLM_FLEET_API_KEY": other}, yes=False).output,
    }
    assert "Ensure the secrets file is current" in outputs["--dry --diff (key change)"]
    for name, text in outputs.items():
        for key in (KEY, other):
            assert key not in text, f"the API key is in the pyinfra output of {name}"
    subprocess.run([sys.executable, "-m", "vllm_fleet.cli.main", "render", "--model", "tests/fixtures/tiny-minimax-m2",
                    "--gpus", "2xH200", "--out", str(tmp_path)], cwd=REPO, check=True, env={"VLLM_FLEET_API_KEY": KEY, "PATH": "/usr/bin:/bin"})
    assert all(KEY not in p.read_text() for p in tmp_path.iterdir())
    for container, _ in HOSTS.values():
        assert KEY in host_exec(container, ["cat", "/etc/vllm-fleet/vllm.env"]).stdout  # the scan can see it where it is
        places = {
            "ps argv": ["ps", "-eo", "args"],
            "journal": ["journalctl", "--no-pager", "-o", "cat"],
            "unit": ["cat", "/etc/systemd/system/vllm.service"],
            "gate config/log/verdict": ["sh", "-c", "cat /etc/vllm-fleet/vllm.gate.json /opt/vllm-fleet/state/*"],
            "systemctl show": ["systemctl", "show", "vllm.service"],
        }
        for name, cmd in places.items():
            out = host_exec(container, cmd).stdout
            assert out and KEY not in out, f"{container}: the API key is in {name}"


def test_uninstall_removes_the_service_and_keeps_venvs_and_weights(first):
    c, port = HOSTS["@docker/fleet-b"]
    venv = re.search(r"^ExecStart=(\S+)/bin/vllm ", _unit(c), re.M).group(1)
    removed = run_pyinfra(["uninstall.py", "--limit", "@docker/fleet-b"], env=ENV)
    assert changed_ops(removed)["@docker/fleet-b"] > 0
    assert _status(port, "/health") == 0
    for path in ("/etc/systemd/system/vllm.service", "/etc/vllm-fleet/vllm.env", "/etc/vllm-fleet/vllm.env.prev"):
        assert host_exec(c, ["test", "-e", path]).returncode != 0, path
    assert host_exec(c, ["test", "-x", f"{venv}/bin/vllm"]).returncode == 0
    assert host_exec(c, ["test", "-d", "/var/lib/vllm-fleet/models/tiny-minimax-m2"]).returncode == 0
    assert changed_ops(run_pyinfra(["uninstall.py", "--limit", "@docker/fleet-b"], env=ENV))["@docker/fleet-b"] == 0
    back = run_pyinfra(["deploy.py", "--limit", "@docker/fleet-b"], env=ENV)
    assert any("PASSED" in v for v in _verdicts(back, "@docker/fleet-b"))
