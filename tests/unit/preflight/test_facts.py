"""The pyinfra facts: their commands, and process() on verbatim outputs of those very commands."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pyinfra.api.exceptions import FactProcessError

from vllm_fleet.preflight.facts import FreeDisk, GpuInventory, HostSnapshot, ListeningPorts
from vllm_fleet.preflight.parse import APPS_QUERY, GPU_QUERY, VERSION_QUERY, DiskSpace

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
SMI = FIXTURES / "nvidia-smi"
HOST = FIXTURES / "host"
CAPTURED_PATHS = ["/tmp", "/srv/models/MiniMax-M2", "/"]


def lines(path: Path) -> list[str]:
    """A fixture as the list of lines pyinfra hands to a fact's process()."""
    return path.read_text().splitlines()


def run_here(command: str) -> list[str]:
    """Run a fact's command with sh, as pyinfra does on a host, on this machine."""
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.splitlines()


def test_nvidia_smi_queries_are_the_contract_strings() -> None:
    assert GPU_QUERY == (
        "nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,compute_cap,driver_version"
        " --format=csv,noheader,nounits"
    )
    assert VERSION_QUERY == "nvidia-smi --version"
    assert APPS_QUERY == (
        "nvidia-smi --query-compute-apps=gpu_uuid,pid,process_name,used_memory --format=csv,noheader,nounits"
    )
    command = GpuInventory().command()
    assert all(query in command for query in (GPU_QUERY, VERSION_QUERY, APPS_QUERY))


def test_fixtures_were_captured_with_the_current_commands() -> None:
    assert GpuInventory().command() == (SMI / "gpuinventory-command.sh").read_text().strip()
    assert HostSnapshot().command(CAPTURED_PATHS) == (HOST / "snapshot-command.sh").read_text().strip()
    assert FreeDisk().command("/srv/models/MiniMax-M2") == (HOST / "freedisk-command.sh").read_text().strip()


def test_gpu_inventory_on_real_h200_output() -> None:
    fact = GpuInventory()
    assert fact.requires_command() == "nvidia-smi"
    info = fact.process(lines(SMI / "h200x2-gpuinventory-fact.txt"))
    assert info is not None
    assert (info.driver_version, info.cuda_version, len(info.gpus)) == ("580.159.04", "13.0", 2)
    assert [(p.gpu_index, p.name, p.used_memory_mib) for p in info.processes] == [(1, "python3", 3590)]


def test_gpu_inventory_malformed_output_is_a_fact_process_error() -> None:
    output = ["@@vllm-fleet@@ begin gpu", "0, GPU-x, only three", "@@vllm-fleet@@ end gpu rc=0"]
    with pytest.raises(FactProcessError):
        GpuInventory().process(output)


def test_listening_ports_command_and_real_output() -> None:
    fact = ListeningPorts()
    assert (fact.command(), fact.requires_command(), fact.default()) == ("ss -Htlnp", "ss", [])
    listeners = fact.process(lines(HOST / "debian12-ss-Htlnp.txt"))
    assert {(l.address, l.port) for l in listeners if l.process == "python3"} == {
        ("127.0.0.1", 8100), ("127.0.0.1", 8102), ("*", 8101), ("::", 8104), ("::1", 8105), ("::1", 8103),
    }


def test_free_disk_on_real_h200_output() -> None:
    disk = FreeDisk().process(lines(HOST / "h200x2-freedisk-fact.txt"))
    assert disk == DiskSpace("/srv/models/MiniMax-M2", "/", 270553174016, 137421635584)


def test_free_disk_failure_is_a_fact_process_error() -> None:
    with pytest.raises(FactProcessError):
        FreeDisk().process(["@@vllm-fleet@@ begin df /x", "df: /x: No such file", "@@vllm-fleet@@ end df rc=1"])


def test_free_disk_command_runs_here_for_a_missing_path_with_spaces(tmp_path: Path) -> None:
    wanted = tmp_path / "not yet" / "it's MiniMax-M2"
    disk = FreeDisk().process(run_here(FreeDisk().command(str(wanted))))
    stat = os.statvfs(tmp_path)
    assert disk.path == str(wanted)
    assert disk.total_bytes == stat.f_blocks * stat.f_frsize
    assert Path(disk.mount).is_dir() and str(tmp_path).startswith(disk.mount)


def test_host_snapshot_on_real_h200_output() -> None:
    snap = HostSnapshot().process(lines(HOST / "h200x2-snapshot.txt"))
    assert snap.os_id == "ubuntu" and snap.gpu is not None and len(snap.gpu.gpus) == 2
    assert set(snap.disks) == set(CAPTURED_PATHS)
    assert set(snap.errors) == {"systemd", "ss"}


def test_host_snapshot_command_runs_here_in_one_shell(tmp_path: Path) -> None:
    paths = [str(tmp_path), str(tmp_path / "missing dir")]
    snap = HostSnapshot().process(run_here(HostSnapshot().command(paths)))
    assert snap.nproc == len(os.sched_getaffinity(0))
    assert set(snap.disks) == set(paths)
    release = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
    assert snap.os_id == release["ID"].strip('"')
    assert snap.mem_total_bytes is not None and snap.mem_total_bytes > 0
