"""The Python stack (vllm_fleet/pyenv/step.py) end to end: real pyinfra, real uv venvs, real torch CPU wheel, vLLM double.

Hosts install from the local wheelhouse (tests/e2e/wheelhouse.py): pushed to
the host and installed with --no-index (group_data/ci.py; fleet-c gets it over
SSH), or, in the upgrade test, served on 127.0.0.1 as find-links.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.e2e.harness import changed_ops, host_exec, run_pyinfra

pytestmark = pytest.mark.e2e

VENVS = "/opt/vllm-fleet/venvs"
OLD, NEW = f"{VENVS}/vllm-0.25.0-cpu", f"{VENVS}/vllm-0.26.0-cpu"
BUILD = re.compile(r"Ensure vLLM (\S+) \(release\) with torch 2\.13\.0 \(cpu\) is installed and verified in (\S+)")
_OP = re.compile(r"^--> Starting operation: (?P<name>.*?)\s*$")
_OK = re.compile(r"^\s+\[(?P<host>[^\]]+)\]\s+Success")


def changed_names(result, host: str) -> list[str]:
    """Names of the operations that changed `host` (each "Starting operation" line, then its per-host status)."""
    names, current = [], None
    for line in re.sub(r"\x1b\[[0-9;]*m", "", result.output).splitlines():
        if m := _OP.match(line):
            current = m["name"]
        elif (m := _OK.match(line)) and m["host"] == host and current:
            names.append(current)
    return names


def marker(container: str, venv: str) -> dict:
    proc = host_exec(container, ["cat", f"{venv}/.vllm-fleet.json"])
    assert proc.returncode == 0, f"{container}: {venv} has no marker: {proc.stderr}"
    return json.loads(proc.stdout)


def assert_no_change(result, host: str) -> None:
    """A converged host: pyinfra's table says 0 changes (and, if not, which operations changed)."""
    assert changed_ops(result) == {host: 0}, changed_names(result, host) or result.output[-3000:]


def deploy(limit: str, *data: str, check: bool = True, yes: bool = True, extra: tuple[str, ...] = ()):
    args = ["deploy.py", "--limit", limit, *extra]
    for d in data:
        args += ["--data", d]
    return run_pyinfra(args, check=check, yes=yes)


def test_first_install_over_ssh_from_a_pushed_wheelhouse_then_no_change(test_hosts, wheelhouse):
    """fleet-c (SSH, sudo) from scratch: wheelhouse pushed, uv bootstrapped, venv built and verified; rerun: 0 changes."""
    wheels = len(list(wheelhouse[0].glob("*.whl")))  # the double's, uv, torch and its deps, vllm-router and its deps
    host_exec("fleet-c", f"rm -rf {VENVS}/vllm-* /opt/vllm-fleet/uv /opt/vllm-fleet/wheelhouse /opt/vllm-fleet/bin/vllm-fleet-venv")
    first = deploy("fleet-c")
    ops = changed_names(first, "fleet-c")
    assert any("Ensure uv is installed in /opt/vllm-fleet/uv" in o for o in ops), ops
    assert wheels > 13 and any(o.endswith(f"Ensure the manifest of /opt/vllm-fleet/wheelhouse lists {wheels} wheels")
                               for o in ops), ops
    builds = [m.groups() for o in ops if (m := BUILD.search(o))]
    assert builds == [("0.25.0", OLD)], ops
    found = marker("fleet-c", OLD)["verify"]
    assert found["vllm"] == {"version": "0.25.0", "test_double": True}
    assert found["torch"] == {"version": "2.13.0+cpu", "cuda": None}
    assert found["cuda"]["status"] == "skipped" and "CPU build" in found["cuda"]["reason"]
    assert found["architecture"] == {"name": "MiniMaxM2ForCausalLM", "supported": True}
    version = host_exec("fleet-c", [f"{OLD}/bin/vllm", "--version"])
    assert version.stdout.strip() == "0.25.0", version
    torch = host_exec("fleet-c", [f"{OLD}/bin/python", "-c", "import torch; print(torch.__version__, torch.ones(2).sum().item())"])
    assert torch.stdout.split() == ["2.13.0+cpu", "2.0"], torch
    stat = host_exec("fleet-c", ["stat", "-c", "%U:%G %a", OLD])
    assert stat.stdout.strip() == "root:root 755"

    assert_no_change(deploy("fleet-c"), "fleet-c")


def test_upgrade_from_find_links_builds_one_new_venv_keeps_the_old_and_prunes_beyond_keep(test_hosts, wheelhouse):
    """0.25.0 -> 0.26.0 of the double on fleet-b, from find-links over HTTP with --no-index."""
    _, url = wheelhouse
    host_exec("fleet-b", f"rm -rf {NEW}")
    deploy("@docker/fleet-b")  # converge on 0.25.0 from the pushed wheelhouse
    assert marker("fleet-b", OLD)["verify"]["ok"]
    before = marker("fleet-b", OLD)["built_at"]
    links = ("vllm_wheelhouse=null", "vllm_no_index=true", f'vllm_find_links=["{url}"]')

    up = deploy("@docker/fleet-b", "vllm_version=0.26.0", *links)
    ops = changed_names(up, "@docker/fleet-b")
    python_ops = [o for o in ops if o.startswith("Python environment")]
    assert len(python_ops) == 1 and BUILD.search(python_ops[0]).groups() == ("0.26.0", NEW), ops
    assert marker("fleet-b", NEW)["verify"]["vllm"]["version"] == "0.26.0"
    assert f"--find-links {url}" in " ".join(marker("fleet-b", NEW)["install"])
    assert marker("fleet-b", OLD)["built_at"] == before, "the old venv was touched"
    assert_no_change(deploy("@docker/fleet-b", "vllm_version=0.26.0", *links), "@docker/fleet-b")

    back = deploy("@docker/fleet-b")  # back to 0.25.0: its venv is still there, nothing is built
    assert not [o for o in changed_names(back, "@docker/fleet-b") if o.startswith("Python environment")], back.output
    pruned = deploy("@docker/fleet-b", "vllm_keep_venvs=1")
    assert changed_names(pruned, "@docker/fleet-b") == [
        "Python environment | Ensure the old venv vllm-0.26.0-cpu is removed (keeping 1)"], pruned.output
    assert host_exec("fleet-b", ["test", "-e", NEW]).returncode != 0
    assert_no_change(deploy("@docker/fleet-b", "vllm_keep_venvs=1"), "@docker/fleet-b")


@pytest.mark.parametrize("damage", ["bin/vllm", "lib/python3.11/site-packages/torch/version.py"])
def test_a_damaged_venv_is_rebuilt_not_ignored(test_hosts, damage):
    deploy("@docker/fleet-b")
    assert host_exec("fleet-b", ["rm", f"{OLD}/{damage}"]).returncode == 0
    result = deploy("@docker/fleet-b")
    builds = [m.groups() for o in changed_names(result, "@docker/fleet-b") if (m := BUILD.search(o))]
    assert builds == [("0.25.0", OLD)], result.output
    assert host_exec("fleet-b", ["test", "-f", f"{OLD}/{damage}"]).returncode == 0
    assert host_exec("fleet-b", [f"{OLD}/bin/vllm", "--version"]).stdout.strip() == "0.25.0"
    assert_no_change(deploy("@docker/fleet-b"), "@docker/fleet-b")


def test_a_killed_build_never_counts_and_its_leftover_is_removed(test_hosts):
    deploy("@docker/fleet-b")
    leftover = f"{VENVS}/.tmp-vllm-0.26.0-cpu"
    host_exec("fleet-b", f"mkdir -p {leftover}/bin && touch {leftover}/bin/vllm")
    result = deploy("@docker/fleet-b")
    assert changed_names(result, "@docker/fleet-b") == [
        "Python environment | Ensure the unfinished build .tmp-vllm-0.26.0-cpu is removed"], result.output
    assert host_exec("fleet-b", ["test", "-e", leftover]).returncode != 0


def test_dry_shows_what_would_be_installed_where_and_changes_nothing(test_hosts):
    host_exec("fleet-a", f"rm -rf {NEW}")
    result = deploy("@docker/fleet-a", "vllm_version=0.26.0", yes=False, extra=("--dry",))
    assert re.search(r"\[@docker/fleet-a\] +python env: vllm 0\.26\.0 \(release\), torch 2\.13\.0, cpu build, Python 3\.11 -> "
                     rf"{NEW} \(to be built\) from wheelhouse \S+ \(pushed to /opt/vllm-fleet/wheelhouse, --no-index\)", result.output)
    assert "uv pip install --no-index --find-links /opt/vllm-fleet/wheelhouse vllm==0.26.0 torch==2.13.0" in result.output
    assert f"Ensure vLLM 0.26.0 (release) with torch 2.13.0 (cpu) is installed and verified in {NEW}" in result.output
    assert "Starting operation" not in result.output
    assert host_exec("fleet-a", ["test", "-e", NEW]).returncode != 0


def _preflight_fails(limit: str, *data: str) -> str:
    probe = "/srv/vllm-fleet-stack-probe"
    result = deploy(limit, f"vllm_base_dir={probe}", *data, check=False)
    assert result.returncode != 0, result.output
    assert "preflight found" in result.output and "nothing was changed" in result.output, result.output
    assert "Traceback" not in result.output
    assert "Starting operation" not in result.output
    assert host_exec(limit.removeprefix("@docker/"), ["test", "-e", probe]).returncode != 0
    return result.output


def test_preflight_refuses_a_backend_newer_than_the_driver(test_hosts):
    out = _preflight_fails("@docker/fleet-a", "vllm_torch_backend=cu130")
    assert ("driver 570.124.06: vllm_torch_backend=cu130 needs a driver with CUDA 13.0, the driver supports CUDA 12.8; "
            'remedy: upgrade the NVIDIA driver to 580+, or set vllm_torch_backend = "cu128"') in out


def test_preflight_refuses_a_driver_too_old_for_any_torch_build(test_hosts):
    hw = "/etc/vllm-fleet-test/hardware.json"
    saved = host_exec("fleet-b", ["cat", hw]).stdout
    old = json.loads(saved) | {"driver_version": "535.183.01", "cuda_version": "12.2"}
    try:
        assert host_exec("fleet-b", f"cat > {hw} <<'EOF'\n{json.dumps(old)}\nEOF").returncode == 0
        out = _preflight_fails("@docker/fleet-b", "vllm_torch_backend=auto")
        assert "driver 535.183.01: the driver supports CUDA 12.2, older than any torch build vLLM uses (oldest: cu126, CUDA 12.6); " \
               "remedy: upgrade the NVIDIA driver to 560+" in out
    finally:
        host_exec("fleet-b", f"cat > {hw} <<'EOF'\n{saved}EOF")
    assert json.loads(host_exec("fleet-b", ["cat", hw]).stdout) == json.loads(saved)


def test_preflight_refuses_a_disk_without_room_for_the_venv(test_hosts):
    out = _preflight_fails("@docker/fleet-b", "vllm_disk_headroom_gib=99999")
    assert re.search(r"/srv/vllm-fleet-stack-probe(, \S+)? need [\d.]+ GiB \+ 99999 GiB headroom; remedy: free space", out), out
