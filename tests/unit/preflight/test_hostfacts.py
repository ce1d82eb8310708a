"""The pure host-fact parsers against verbatim real outputs (tests/fixtures/, see its README)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

from vllm_fleet.preflight import parse as hostfacts
from vllm_fleet.preflight.parse import (
    DiskSpace,
    Gpu,
    GpuProcess,
    HostFactError,
    Listener,
    Section,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
SMI = FIXTURES / "nvidia-smi"
HOST = FIXTURES / "host"
DOUBLE = Path(__file__).resolve().parents[2] / "doubles" / "nvidia-smi"

H200_0 = "GPU-67fbe9c8-5eba-d7ab-c33d-266640000ac1"
H200_1 = "GPU-cb324ab7-1247-2160-0466-9d60936bcc7e"


def lines(path: Path) -> list[str]:
    """A fixture as the list of lines pyinfra hands to a fact's process()."""
    return path.read_text().splitlines()


def ok(name: str, path: Path) -> Section:
    """A successful section holding a fixture's output."""
    return Section(name=name, arg=None, rc=0, lines=lines(path))


# --- nvidia-smi (A), (B), (C) on the real H200 machine ---------------------------------


def test_query_gpu_real_h200_busy() -> None:
    gpus, driver = hostfacts.parse_gpu_query(lines(SMI / "h200x2-query-gpu-busy.txt"))
    assert driver == "580.159.04"
    assert gpus == [
        Gpu(0, H200_0, "NVIDIA H200", 143771, 8719, "9.0"),
        Gpu(1, H200_1, "NVIDIA H200", 143771, 2575, "9.0"),
    ]


def test_query_gpu_real_h200_idle_reports_zero_used() -> None:
    gpus, _ = hostfacts.parse_gpu_query(lines(SMI / "h200x2-query-gpu-idle.txt"))
    assert [g.memory_used_mib for g in gpus] == [0, 0]


def test_version_real_h200_gives_driver_and_max_cuda() -> None:
    assert hostfacts.parse_smi_version(lines(SMI / "h200x2-version.txt")) == ("580.159.04", "13.0")


def test_compute_apps_real_h200_maps_uuid_to_index() -> None:
    gpus, _ = hostfacts.parse_gpu_query(lines(SMI / "h200x2-query-gpu-busy.txt"))
    processes = hostfacts.parse_compute_apps(lines(SMI / "h200x2-compute-apps-busy.txt"), gpus)
    assert processes == [
        GpuProcess(0, H200_0, 576, "python3", 8710),
        GpuProcess(1, H200_1, 577, "python3", 2566),
    ]


def test_compute_apps_real_idle_output_is_empty() -> None:
    assert (SMI / "h200x2-compute-apps-idle.txt").read_bytes() == b""
    assert hostfacts.parse_compute_apps([], []) == []


def test_gpu_sections_combine_real_outputs() -> None:
    info = hostfacts.parse_gpu_sections(
        ok("gpu", SMI / "h200x2-query-gpu-busy.txt"),
        ok("smi-version", SMI / "h200x2-version.txt"),
        ok("gpu-apps", SMI / "h200x2-compute-apps-busy.txt"),
    )
    assert info is not None
    assert (info.driver_version, info.cuda_version, info.driver_error) == ("580.159.04", "13.0", None)
    assert [p.pid for p in info.processes_on(1)] == [577]


def test_gpu_sections_absent_nvidia_smi_is_none() -> None:
    missing = Section("gpu", None, hostfacts.COMMAND_NOT_FOUND, ["sh: 1: nvidia-smi: not found"])
    assert hostfacts.parse_gpu_sections(missing, None, None) is None
    assert hostfacts.parse_gpu_sections(None, None, None) is None


@pytest.mark.parametrize(
    ("fixture", "rc", "message"),
    [
        ("synthetic-driver-error.txt", 9, "NVIDIA-SMI has failed because it couldn't communicate"),
        ("h200x2-query-gpu-bad-field.txt", 2, 'Field "no_such_field" is not a valid field to query.'),
        ("h200x2-query-gpu-bad-index.txt", 6, "No devices were found"),
    ],
)
def test_gpu_sections_failing_nvidia_smi_is_a_driver_error(fixture: str, rc: int, message: str) -> None:
    info = hostfacts.parse_gpu_sections(Section("gpu", None, rc, lines(SMI / fixture)), None, None)
    assert info is not None and info.gpus == [] and info.driver_version is None
    assert info.driver_error is not None and info.driver_error.startswith(message)


def test_query_gpu_not_available_fields_become_none() -> None:
    gpus, driver = hostfacts.parse_gpu_query(lines(SMI / "synthetic-a800x4-query-gpu.txt"))
    assert driver == "570.124.06"
    assert (gpus[2].memory_used_mib, gpus[2].compute_capability) == (None, None)
    assert gpus[3].memory_total_mib is None
    assert gpus[1] == Gpu(1, "GPU-00000000-0000-0000-0000-00000001a800", "NVIDIA A800-SXM4-80GB", 81920, 32768, "8.0")
    apps = hostfacts.parse_compute_apps(lines(SMI / "synthetic-a800x4-compute-apps.txt"), gpus)
    assert [(p.gpu_index, p.pid, p.name, p.used_memory_mib) for p in apps] == [
        (1, 4242, "/usr/bin/python3", 32758),
        (2, 4243, "[Not Found]", None),
    ]


def test_process_of_unknown_gpu_has_no_index() -> None:
    apps = hostfacts.parse_compute_apps(["GPU-elsewhere, 7, python3, 100"], [])
    assert apps == [GpuProcess(None, "GPU-elsewhere", 7, "python3", 100)]


@pytest.mark.parametrize(
    "bad",
    ["0, GPU-x, NVIDIA H200, 143771", "zero, GPU-x, NVIDIA H200, 143771, 0, 9.0, 580.159.04"],
)
def test_query_gpu_rejects_malformed_lines(bad: str) -> None:
    with pytest.raises(HostFactError):
        hostfacts.parse_gpu_query([bad])


# --- the nvidia-smi test double speaks the same format as the real tool -------------------


def load_double() -> ModuleType:
    """Import tests/doubles/nvidia-smi (a script without .py) as a module."""
    loader = importlib.machinery.SourceFileLoader("nvidia_smi_double", str(DOUBLE))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.mark.skipif(not DOUBLE.exists(), reason="the nvidia-smi test double is not in this tree")
def test_double_output_parses_like_real_output() -> None:
    double = load_double()
    hardware = {
        "driver_version": "570.124.06",
        "cuda_version": "12.8",
        "gpus": [
            {"uuid": f"GPU-a800-{i}", "name": "NVIDIA A800-SXM4-80GB", "memory_total_mib": 81920,
             "memory_used_mib": 32768 if i == 1 else 0, "compute_cap": "8.0"}
            for i in range(4)
        ],
        "processes": [{"gpu_index": 1, "pid": os.getpid(), "name": "python3", "used_memory_mib": 32758}],
    }
    info = hostfacts.parse_gpu_sections(
        Section("gpu", None, 0, double.query_gpus(hardware).splitlines()),
        Section("smi-version", None, 0, double.version(hardware).splitlines()),
        Section("gpu-apps", None, 0, double.query_apps(hardware).splitlines()),
    )
    assert info is not None
    assert (info.driver_version, info.cuda_version) == ("570.124.06", "12.8")
    assert [(g.index, g.memory_used_mib, g.compute_capability) for g in info.gpus] == [
        (0, 0, "8.0"), (1, 32768, "8.0"), (2, 0, "8.0"), (3, 0, "8.0"),
    ]
    assert [(p.gpu_index, p.pid, p.used_memory_mib) for p in info.processes] == [(1, os.getpid(), 32758)]
    # Same layout as the real tool: ", " between fields, (B)'s label padded to 20 columns.
    real_version = (SMI / "h200x2-version.txt").read_text().splitlines()
    double_version = double.version({"driver_version": "580.159.04", "cuda_version": "13.0"}).splitlines()
    assert double_version == real_version
    real_gpu = (SMI / "h200x2-query-gpu-idle.txt").read_text().splitlines()[0]
    double_gpu = double.query_gpus({
        "driver_version": "580.159.04",
        "gpus": [{"uuid": H200_0, "name": "NVIDIA H200", "memory_total_mib": 143771,
                  "memory_used_mib": 0, "compute_cap": "9.0"}],
    }).splitlines()[0]
    assert double_gpu == real_gpu


# --- ss --------------------------------------------------------------------------------


def test_ss_real_every_address_form() -> None:
    listeners = hostfacts.parse_ss(lines(HOST / "debian12-ss-Htlnp.txt"))
    assert listeners == [
        Listener("tcp", "0.0.0.0", 2024, None, None),
        Listener("tcp", "127.0.0.1", 8100, 23300, "python3"),
        Listener("tcp", "127.0.0.1", 8102, 23304, "python3"),
        Listener("tcp", "*", 8101, 23302, "python3"),
        Listener("tcp", "::", 8104, 23304, "python3"),
        Listener("tcp", "::1", 8105, 23304, "python3"),
        Listener("tcp", "::1", 8103, 23304, "python3"),
    ]


def test_ss_real_with_netid_column() -> None:
    listeners = hostfacts.parse_ss(lines(HOST / "debian12-ss-Htulnp.txt"))
    assert [(l.proto, l.port, l.process) for l in listeners] == [
        ("tcp", 2024, None), ("tcp", 2222, "sshd"), ("tcp", 8100, "python3"),
    ]


def test_ss_several_owners_takes_the_first() -> None:
    line = 'LISTEN 0 511 0.0.0.0:80 0.0.0.0:* users:(("nginx",pid=1201,fd=6),("nginx",pid=1200,fd=6))'
    assert hostfacts.parse_ss([line]) == [Listener("tcp", "0.0.0.0", 80, 1201, "nginx")]


def test_ss_rejects_a_line_without_addresses() -> None:
    with pytest.raises(HostFactError):
        hostfacts.parse_ss(["LISTEN 0 128"])


# --- df, os-release, versions, meminfo, nproc --------------------------------------------


def test_df_real() -> None:
    disk = hostfacts.parse_df("/tmp", lines(HOST / "h200x2-df-tmp.txt"))
    assert disk == DiskSpace("/tmp", "/", 270553174016, 137421742080)


def test_df_mount_point_with_spaces() -> None:
    disk = hostfacts.parse_df("/x", ["/dev/sdb1 ext4 1000 400 /mnt/my disk"])
    assert disk.mount == "/mnt/my disk" and disk.free_bytes == 400


@pytest.mark.parametrize("bad", [[], ["/dev/sda1 ext4 lots 1 /"], ["/dev/sda1 ext4 1 /"]])
def test_df_rejects_malformed(bad: list[str]) -> None:
    with pytest.raises(HostFactError):
        hostfacts.parse_df("/", bad)


def test_os_release_real_ubuntu() -> None:
    values = hostfacts.parse_os_release(lines(HOST / "h200x2-os-release.txt"))
    assert (values["ID"], values["VERSION_ID"], values["PRETTY_NAME"]) == ("ubuntu", "24.04", "Ubuntu 24.04.3 LTS")


def test_versions_and_counts() -> None:
    assert hostfacts.parse_python_version(lines(HOST / "h200x2-python3-version.txt")) == "3.12.3"
    assert hostfacts.parse_systemd_version(["systemd 252 (252.38-1~deb12u1)", "+PAM +AUDIT"]) == "252"
    assert hostfacts.parse_meminfo_total(["MemTotal:       263998500 kB"]) == 263998500 * 1024
    assert hostfacts.parse_nproc(["32"]) == 32
    with pytest.raises(HostFactError):
        hostfacts.parse_nproc(["32", "extra"])
    with pytest.raises(HostFactError):
        hostfacts.parse_meminfo_total(["MemFree: 1 kB"])


# --- sections and the snapshot --------------------------------------------------------------


def test_sections_end_mark_after_output_without_newline() -> None:
    found = hostfacts.parse_sections([
        "@@vllm-fleet@@ begin nproc",
        "16@@vllm-fleet@@ end nproc rc=0",
        "@@vllm-fleet@@ begin df /my dir",
        "@@vllm-fleet@@ end df rc=1",
    ])
    assert found == [Section("nproc", None, 0, ["16"]), Section("df", "/my dir", 1, [])]


def test_snapshot_real_h200() -> None:
    snap = hostfacts.parse_snapshot(lines(HOST / "h200x2-snapshot.txt"), ["/tmp", "/srv/models/MiniMax-M2", "/"])
    assert (snap.os_id, snap.os_version, snap.python_version) == ("ubuntu", "24.04", "3.12.3")
    assert snap.systemd_version is None and snap.systemd_running is False
    assert snap.errors == {
        "systemd": "command not found (exit status 127)",
        "ss": "command not found (exit status 127)",
    }
    assert snap.gpu is not None and snap.gpu.cuda_version == "13.0"
    assert [(g.index, g.memory_used_mib) for g in snap.gpu.gpus] == [(0, 4), (1, 3599)]
    assert [(p.gpu_index, p.pid, p.used_memory_mib) for p in snap.gpu.processes] == [(1, 567, 3590)]
    assert snap.listeners == [] and snap.port_owner(8100) is None
    assert snap.disks["/srv/models/MiniMax-M2"] == DiskSpace("/srv/models/MiniMax-M2", "/", 270553174016, 137421647872)
    assert (snap.mem_total_bytes, snap.nproc) == (263998500 * 1024, 32)


def test_snapshot_real_debian_without_gpu() -> None:
    snap = hostfacts.parse_snapshot(lines(HOST / "debian12-nogpu-snapshot.txt"))
    assert (snap.os_id, snap.os_version, snap.systemd_version) == ("debian", "12", "252")
    assert snap.gpu is None and snap.errors == {}
    owner = snap.port_owner(2222)
    assert owner is not None and owner.process == "sshd"
    assert snap.port_owner(8100) is None


def test_snapshot_failing_and_missing_sections_are_recorded_not_raised() -> None:
    real = lines(HOST / "debian12-nogpu-snapshot.txt")
    broken = [line.replace("end nproc rc=0", "end nproc rc=1") for line in real if not line.startswith("MemTotal")]
    snap = hostfacts.parse_snapshot(broken, ["/tmp", "/not/measured"])
    assert snap.nproc is None and snap.errors["nproc"].startswith("exit status 1")
    assert snap.mem_total_bytes is None and snap.errors["meminfo"] == "/proc/meminfo: no MemTotal line"
    assert snap.errors["df /not/measured"] == "section missing from output"
    assert snap.os_id == "debian"


def test_snapshot_driver_error_is_a_state() -> None:
    text = [
        "@@vllm-fleet@@ begin gpu",
        *lines(SMI / "synthetic-driver-error.txt"),
        "@@vllm-fleet@@ end gpu rc=9",
    ]
    snap = hostfacts.parse_snapshot(text)
    assert snap.gpu is not None and snap.gpu.driver_error is not None
    assert "gpu" not in snap.errors
