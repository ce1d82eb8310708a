"""The test hosts themselves: systemd up, the SSH path, and the nvidia-smi test double."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from tests.e2e.harness import REPO, changed_ops, host_exec, host_output, run_pyinfra

HOST_NAMES = ["fleet-a", "fleet-b", "fleet-c"]
QUERY_GPUS = "--query-gpu=index,uuid,name,memory.total,memory.used,compute_cap,driver_version"
QUERY_APPS = "--query-compute-apps=gpu_uuid,pid,process_name,used_memory"
CSV = "--format=csv,noheader,nounits"


def hardware(name: str) -> dict[str, Any]:
    """The emulated hardware a host was given."""
    return json.loads((REPO / "tests" / "hardware" / f"{name}.json").read_text())


def smi(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the host's nvidia-smi with exactly these arguments."""
    return host_exec(name, ["nvidia-smi", *args])


def test_inventory_names_the_hosts(test_hosts: list[Any]) -> None:
    assert sorted(host.name for host in test_hosts) == HOST_NAMES
    assert [host.name for host in test_hosts if host.ssh] == ["fleet-c"]


@pytest.mark.parametrize("name", HOST_NAMES)
def test_systemd_is_running(test_hosts: list[Any], name: str) -> None:
    state = host_exec(name, "systemctl is-system-running; systemctl --failed --plain --no-legend")
    assert state.stdout.splitlines()[0] == "running", state.stdout


@pytest.mark.parametrize("name", ["fleet-a", "fleet-b"])
def test_docker_hosts_run_no_sshd(test_hosts: list[Any], name: str) -> None:
    # --network host shares the ports of the machine: sshd must stay off these hosts.
    enabled = host_exec(name, "systemctl is-enabled ssh.service")
    assert enabled.stdout.strip() == "masked"
    assert host_exec(name, "pgrep -x sshd").returncode == 1


def test_ssh_host_listens_only_on_its_loopback_port(test_hosts: list[Any]) -> None:
    sockets = host_exec("fleet-c", "ss -Hltnp | grep sshd")
    listeners = {line.split()[3] for line in sockets.stdout.splitlines()}
    assert listeners == {"127.0.0.1:2222"}


def test_ssh_host_is_reached_over_ssh_as_deploy(test_hosts: list[Any]) -> None:
    result = run_pyinfra(["--limit", "fleet-c", "--data", "_sudo=false", "exec", "--", "sh", "-c", "'whoami; echo $SSH_CONNECTION'"])
    user, connection = host_output(result, "fleet-c")
    assert user == "deploy"
    assert connection.split()[2:] == ["127.0.0.1", "2222"]


@pytest.mark.parametrize("args", [[], ["--sudo"]], ids=["inventory-sudo", "cli-sudo"])
def test_ssh_host_gives_deploy_passwordless_sudo(test_hosts: list[Any], args: list[str]) -> None:
    result = run_pyinfra(["--limit", "fleet-c", *args, "exec", "--", "whoami"])
    assert host_output(result, "fleet-c") == ["root"]
    assert changed_ops(result) == {"fleet-c": 1}


def test_docker_hosts_are_reached_with_docker_exec(test_hosts: list[Any]) -> None:
    result = run_pyinfra(["--limit", "@docker/*", "exec", "--", "hostname"])
    assert host_output(result, "@docker/fleet-a") == ["fleet-a"]
    assert host_output(result, "@docker/fleet-b") == ["fleet-b"]


@pytest.mark.parametrize("name", HOST_NAMES)
def test_double_answers_the_gpu_query(test_hosts: list[Any], name: str) -> None:
    hw = hardware(name)
    proc = smi(name, QUERY_GPUS, CSV)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(", ") for line in proc.stdout.splitlines()]
    assert len(rows) == len(hw["gpus"])
    for index, (row, gpu) in enumerate(zip(rows, hw["gpus"], strict=True)):
        assert row == [
            str(index),
            gpu["uuid"],
            gpu["name"],
            str(gpu["memory_total_mib"]),
            str(gpu["memory_used_mib"]),
            gpu["compute_cap"],
            hw["driver_version"],
        ]


@pytest.mark.parametrize("name", HOST_NAMES)
def test_double_answers_version(test_hosts: list[Any], name: str) -> None:
    hw = hardware(name)
    driver = hw["driver_version"]
    proc = smi(name, "--version")
    assert proc.stdout == (
        f"NVIDIA-SMI version  : {driver}\n"
        f"NVML version        : {driver.rsplit('.', 1)[0]}\n"
        f"DRIVER version      : {driver}\n"
        f"CUDA Version        : {hw['cuda_version']}\n"
    )


@pytest.mark.parametrize("name", HOST_NAMES)
def test_double_answers_the_process_query(test_hosts: list[Any], name: str) -> None:
    hw = hardware(name)
    proc = smi(name, QUERY_APPS, CSV)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(", ") for line in proc.stdout.splitlines()]
    assert len(rows) == len(hw["processes"])
    for row, holder in zip(rows, hw["processes"], strict=True):
        uuid, pid, process_name, used = row
        assert uuid == hw["gpus"][holder["gpu_index"]]["uuid"]
        assert (process_name, int(used)) == (holder["name"], holder["used_memory_mib"])
        # The reported pid is a live process of that name on the host.
        assert host_exec(name, f"cat /proc/{pid}/comm").stdout.strip() == holder["name"]


def test_gpu_holder_is_the_units_main_process(test_hosts: list[Any]) -> None:
    main_pid = host_exec("fleet-c", "systemctl show --property=MainPID --value gpu-hog").stdout.strip()
    proc = smi("fleet-c", QUERY_APPS, CSV)
    assert proc.stdout.split(", ")[1] == main_pid != "0"


@pytest.mark.parametrize("args", [["-L"], ["--query-gpu=index,name", CSV], [QUERY_GPUS, "--format=csv"]])
def test_double_refuses_other_queries(test_hosts: list[Any], args: list[str]) -> None:
    proc = smi("fleet-a", *args)
    assert proc.returncode == 6
    assert proc.stdout == ""
    assert "TEST DOUBLE" in proc.stderr


def test_up_twice_changes_nothing(test_hosts: list[Any]) -> None:
    ids = host_ids()
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "hosts.py"), "up"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "creating" not in proc.stderr and "refreshed" not in proc.stderr, proc.stderr
    assert host_ids() == ids


def host_ids() -> list[str]:
    """The container ids of the hosts (recreating a host changes its id)."""
    proc = subprocess.run(
        ["docker", "inspect", "--format", "{{.Id}}", *HOST_NAMES], capture_output=True, text=True, check=True
    )
    return proc.stdout.split()
