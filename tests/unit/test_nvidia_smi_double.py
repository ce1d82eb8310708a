"""The nvidia-smi test double reproduces real nvidia-smi output byte for byte.

Compared with the verbatim captures of a real 2x H200 machine in
tests/fixtures/nvidia-smi/ (see tests/fixtures/README.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
DOUBLE = TESTS / "doubles" / "nvidia-smi"
REAL = TESTS / "fixtures" / "nvidia-smi"
QUERY_GPUS = "--query-gpu=index,uuid,name,memory.total,memory.used,compute_cap,driver_version"
QUERY_APPS = "--query-compute-apps=gpu_uuid,pid,process_name,used_memory"
CSV = "--format=csv,noheader,nounits"
UUIDS = ["GPU-67fbe9c8-5eba-d7ab-c33d-266640000ac1", "GPU-cb324ab7-1247-2160-0466-9d60936bcc7e"]


def h200(used: list[int], processes: list[dict]) -> dict:
    """The captured machine as a hardware JSON."""
    return {
        "driver_version": "580.159.04",
        "cuda_version": "13.0",
        "gpus": [
            {"name": "NVIDIA H200", "uuid": uuid, "memory_total_mib": 143771, "memory_used_mib": mib, "compute_cap": "9.0"}
            for uuid, mib in zip(UUIDS, used, strict=True)
        ],
        "processes": processes,
    }


def run_double(tmp_path: Path, hardware: dict, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the double against a hardware file."""
    path = tmp_path / "hardware.json"
    path.write_text(json.dumps(hardware))
    return subprocess.run(
        [sys.executable, str(DOUBLE), *args],
        env={**os.environ, "VLLM_FLEET_TEST_HARDWARE": str(path)},
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize(("fixture", "used"), [("h200x2-query-gpu-idle.txt", [0, 0]), ("h200x2-query-gpu-busy.txt", [8719, 2575])])
def test_gpu_query_matches_the_real_capture(tmp_path: Path, fixture: str, used: list[int]) -> None:
    proc = run_double(tmp_path, h200(used, []), QUERY_GPUS, CSV)
    assert proc.stdout == (REAL / fixture).read_text()


def test_version_matches_the_real_capture(tmp_path: Path) -> None:
    proc = run_double(tmp_path, h200([0, 0], []), "--version")
    assert proc.stdout == (REAL / "h200x2-version.txt").read_text()


def test_idle_process_query_matches_the_real_capture(tmp_path: Path) -> None:
    proc = run_double(tmp_path, h200([0, 0], []), QUERY_APPS, CSV)
    assert proc.stdout == (REAL / "h200x2-compute-apps-idle.txt").read_text() == ""


def test_busy_process_query_matches_the_real_capture(tmp_path: Path) -> None:
    # The captured pids (576, 577) are not alive here; use live ones and compare the rest.
    live = os.getpid()
    processes = [
        {"gpu_index": 0, "pid": live, "name": "python3", "used_memory_mib": 8710},
        {"gpu_index": 1, "pid": live, "name": "python3", "used_memory_mib": 2566},
    ]
    proc = run_double(tmp_path, h200([8719, 2575], processes), QUERY_APPS, CSV)
    real = (REAL / "h200x2-compute-apps-busy.txt").read_text()
    assert proc.stdout == real.replace(", 576, ", f", {live}, ").replace(", 577, ", f", {live}, ")


def test_dead_processes_are_not_listed(tmp_path: Path) -> None:
    # pid_max on Linux is at most 2**22, so this pid cannot exist.
    processes = [{"gpu_index": 0, "pid": 2**22 + 1, "name": "python3", "used_memory_mib": 1}]
    assert run_double(tmp_path, h200([1, 0], processes), QUERY_APPS, CSV).stdout == ""


def test_other_invocations_exit_6_naming_the_double(tmp_path: Path) -> None:
    proc = run_double(tmp_path, h200([0, 0], []), "-q")
    assert proc.returncode == 6
    assert "TEST DOUBLE" in proc.stderr and proc.stdout == ""
