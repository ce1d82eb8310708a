"""Preflight checks over a host snapshot: one sentence per problem, with its remedy."""

from __future__ import annotations

import pytest

from vllm_fleet.preflight.parse import DiskSpace, Gpu, GpuInfo, GpuProcess, Listener, Snapshot
from vllm_fleet.preflight.checks import GIB, Ours, check, check_disk, weights_on_host
from vllm_fleet.settings import load_settings

A800 = "NVIDIA A800-SXM4-80GB"


def _gpu(i: int, used: int = 4) -> Gpu:
    return Gpu(index=i, uuid=f"GPU-{i}", name=A800, memory_total_mib=81920, memory_used_mib=used, compute_capability="8.0")


def snapshot(**over) -> Snapshot:
    base = dict(
        os_id="ubuntu", os_version="22.04", os_pretty_name="Ubuntu 22.04", systemd_version="249",
        systemd_running=True, python_version="3.12.3",
        gpu=GpuInfo(driver_version="570.124.06", cuda_version="12.8", gpus=[_gpu(i) for i in range(4)]),
        listeners=[Listener("tcp", "0.0.0.0", 22, 900, "sshd")],
        disks={"/opt/vllm-fleet": DiskSpace("/opt/vllm-fleet", "/", 500 * GIB, 400 * GIB),
               "/var/lib/vllm-fleet": DiskSpace("/var/lib/vllm-fleet", "/", 500 * GIB, 400 * GIB)},
        mem_total_bytes=1024 * GIB, nproc=128,
    )
    base.update(over)
    return Snapshot(**base)


S = load_settings({})


def test_a_good_host_has_no_problems():
    assert check(S, snapshot()) == []


@pytest.mark.parametrize("over,words", [
    ({"os_id": "centos", "os_version": "7"}, "OS centos 7 is not supported"),
    ({"systemd_running": False}, "systemd is not running"),
    ({"python_version": "3.10.12"}, 'vllm_python_version = "3.10"'),
    ({"python_version": None}, "python3 is not installed"),
    ({"gpu": None}, "nvidia-smi not found"),
    ({"gpu": GpuInfo(None, None, driver_error="NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver")},
     "cannot talk to the driver"),
    ({"gpu": GpuInfo("470.82", "11.4", gpus=[_gpu(0)])}, "upgrade the NVIDIA driver"),
    ({"listeners": [Listener("tcp", "0.0.0.0", 8100, 4242, "python3")]}, "port 8100 is already taken by python3 (pid 4242)"),
])
def test_each_problem_is_named_with_its_remedy(over, words):
    problems = check(S, snapshot(**over))
    assert len(problems) == 1, problems
    assert words in problems[0] and "remedy" in problems[0]


def test_missing_gpu_index():
    problems = check(load_settings({"vllm_gpus": [1, 3, 4, 5]}), snapshot())
    assert problems == ["vllm_gpus=[1, 3, 4, 5] names GPU 4, 5, but the host has GPUs [0, 1, 2, 3]; remedy: pick indices from `nvidia-smi -L`"]


def test_gpu_memory_held_names_the_holder_and_the_utilization_that_fits():
    """The seed: 37.95/79.25 GiB free with utilization 0.9 -> vLLM refused to start."""
    gpus = [_gpu(0), _gpu(1, used=81920 - 38861), _gpu(2), _gpu(3)]
    procs = [GpuProcess(gpu_index=1, gpu_uuid="GPU-1", pid=4242, name="python3", used_memory_mib=43000)]
    snap = snapshot(gpu=GpuInfo("570.124.06", "12.8", gpus=gpus, processes=procs))
    problems = check(S, snap)
    assert problems[0].startswith("GPU 1 (NVIDIA A800-SXM4-80GB) has 37.95/80.00 GiB free, less than vllm_gpu_memory_utilization=0.9")
    assert "pid 4242 (python3, 43000 MiB)" in problems[0]
    assert problems[1].endswith("vllm_gpu_memory_utilization <= 0.47")
    # the same host passes when the process is our own service (a rerun)
    assert check(S, snap, ours=Ours(pids={4242})) == []
    # or with a utilization that fits
    assert check(load_settings({"vllm_gpu_memory_utilization": 0.47}), snap) == []


def test_our_own_service_on_the_port_is_fine():
    snap = snapshot(listeners=[Listener("tcp", "127.0.0.1", 8100, 77, "vllm")])
    assert check(S, snap, ours=Ours(pids={77})) == []
    assert check(S, snap) != []


def test_disk_adds_up_needs_on_one_filesystem():
    snap = snapshot()
    assert check_disk(S, snap, weights_bytes=230 * GIB) == []
    problems = check_disk(S, snap, weights_bytes=380 * GIB)
    assert len(problems) == 1 and "/ has 400.0 GiB free" in problems[0] and "need 390.0 GiB" in problems[0]


def test_disk_per_filesystem():
    snap = snapshot(disks={"/opt/vllm-fleet": DiskSpace("/opt/vllm-fleet", "/", 50 * GIB, 40 * GIB),
                           "/var/lib/vllm-fleet": DiskSpace("/var/lib/vllm-fleet", "/data", 4000 * GIB, 3000 * GIB)})
    assert check_disk(S, snap, weights_bytes=230 * GIB) == []
    assert "/ has 5.0 GiB free" in check_disk(S, snapshot(disks={
        "/opt/vllm-fleet": DiskSpace("/opt/vllm-fleet", "/", 50 * GIB, 5 * GIB),
        "/var/lib/vllm-fleet": DiskSpace("/var/lib/vllm-fleet", "/data", 4000 * GIB, 3000 * GIB)}), 230 * GIB)[0]


def _disk_settings():
    return load_settings({"vllm_disk_headroom_gib": 20})


def _small_data_disk(free_gib: float) -> Snapshot:
    return snapshot(disks={"/opt/vllm-fleet": DiskSpace("/opt/vllm-fleet", "/", 500 * GIB, 400 * GIB),
                           "/var/lib/vllm-fleet": DiskSpace("/var/lib/vllm-fleet", "/data", 500 * GIB, int(free_gib * GIB))})


WEIGHTS = 230 * GIB  # MiniMax-M2


def test_disk_check_asks_the_full_weights_when_nothing_is_on_the_host():
    problems = check_disk(_disk_settings(), _small_data_disk(100), WEIGHTS)
    assert len(problems) == 1 and "/data has 100.0 GiB free, /var/lib/vllm-fleet need 230.0 GiB + 20 GiB headroom" in problems[0]


def test_a_rerun_after_a_complete_download_does_not_ask_for_the_weights_again():
    present = weights_on_host({"complete": True, "identity": "abc", "verified_bytes": 229 * GIB}, "abc", WEIGHTS)
    assert present == WEIGHTS
    assert check_disk(_disk_settings(), _small_data_disk(25), WEIGHTS, present_bytes=present) == []


def test_a_partial_download_asks_only_for_what_is_missing():
    present = weights_on_host({"complete": False, "identity": "abc", "verified_bytes": 200 * GIB}, "abc", WEIGHTS)
    assert present == 200 * GIB
    assert check_disk(_disk_settings(), _small_data_disk(55), WEIGHTS, present_bytes=present) == []
    problems = check_disk(_disk_settings(), _small_data_disk(45), WEIGHTS, present_bytes=present)
    assert len(problems) == 1 and "need 30.0 GiB + 20 GiB headroom" in problems[0]


@pytest.mark.parametrize("check,identity", [
    (None, "abc"),                                                        # nothing recorded (fresh host)
    ({"complete": True, "identity": "old", "verified_bytes": WEIGHTS}, "abc"),  # another model / revision / dest
    ({"complete": True, "identity": "abc", "verified_bytes": WEIGHTS}, None),   # no download planned
])
def test_a_record_for_something_else_counts_for_nothing(check, identity):
    assert weights_on_host(check, identity, WEIGHTS) == 0
