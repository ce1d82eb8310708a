"""pyinfra facts for GPU hosts: GPUs and their users, listening ports, free disk, one-trip snapshot.

Each fact sends one shell command and hands its output to a pure parser in
:mod:`vllm_fleet.preflight.parse`, which is where the formats are understood and
unit-tested. Preflight should use :class:`HostSnapshot`: one round trip for
everything it checks.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from typing import TypeVar

from pyinfra.api import FactBase
from pyinfra.api.exceptions import FactProcessError
from typing_extensions import override

from vllm_fleet.layout import UNIT_MARK, UNIT_SEARCH_PATH
from vllm_fleet.preflight import parse as hostfacts
from vllm_fleet.preflight.parse import (
    APPS_QUERY,
    GPU_QUERY,
    SECTION_MARK,
    VERSION_QUERY,
    DiskSpace,
    GpuInfo,
    HostFactError,
    Listener,
    Snapshot,
)

T = TypeVar("T")

#: Shell that prints the df line of the nearest existing ancestor of "$p".
_DF_NEAREST = (
    'while [ ! -e "$p" ]; do p=$(dirname "$p"); done; '
    'df -B1 --output=source,fstype,size,avail,target "$p"'
)


def section(name: str, script: str, arg: str | None = None, stderr: str = "2>/dev/null") -> str:
    """Shell that runs ``script`` between the begin/end marks :func:`hostfacts.parse_sections` reads.

    The end mark carries the script's exit status, so one failing section
    never hides the others. ``stderr`` is where the script's errors go
    (``2>&1`` keeps them as the section's text).
    """
    head = f"{SECTION_MARK} begin {name}" + (f" {arg}" if arg is not None else "")
    return (
        f"printf '%s\\n' {shlex.quote(head)}; {{ {script}; }} {stderr}; "
        f'echo "{SECTION_MARK} end {name} rc=$?"'
    )


def gpu_sections() -> list[str]:
    """The sections running the nvidia-smi queries (A), (B) and (C), errors kept."""
    return [
        section("gpu", GPU_QUERY, stderr="2>&1"),
        section("smi-version", VERSION_QUERY, stderr="2>&1"),
        section("gpu-apps", APPS_QUERY, stderr="2>&1"),
    ]


def disk_section(path: str) -> str:
    """The section running df for the nearest existing ancestor of ``path``."""
    return section("df", f"p={shlex.quote(path)}; {_DF_NEAREST}", arg=path)


def weights_section(program: str, config: str) -> str:
    """The section printing ``fetch_weights.py check CONFIG`` (JSON; empty when the program or config is not there yet).

    A second line ``identity=...`` is read from CONFIG itself, so the check of a fetch program
    installed by an older toolkit (whose JSON has no ``identity``) still says what it is about.
    """
    q = shlex.quote
    ident = "import json,sys; print('identity=' + json.load(open(sys.argv[1]))['identity'])"
    return section("weights-check", f"if test -f {q(program)} -a -f {q(config)}; then python3 {q(program)} check {q(config)} "
                                    f"&& python3 -c {q(ident)} {q(config)}; fi")


def ownership_section(units: Sequence[str], user: str | None) -> str:
    """The section listing every file of each unit in systemd's search path, marked ``ours`` when its first
    lines carry the toolkit's mark (layout.UNIT_MARK), and the passwd entry of ``user``.

    Output lines: ``unit NAME.service ours|foreign PATH`` and ``passwd NAME:x:UID:GID:GECOS:HOME:SHELL``.
    """
    q = shlex.quote
    parts = []
    for unit in units:
        parts.append(f"u={q(unit + '.service')}; for d in {' '.join(UNIT_SEARCH_PATH)}; do f=\"$d/$u\"; "
                     f'if [ -e "$f" ] || [ -L "$f" ]; then if head -n 3 "$f" 2>/dev/null | grep -qF {q(UNIT_MARK)}; '
                     f'then echo "unit $u ours $f"; else echo "unit $u foreign $f"; fi; fi; done')
    if user is not None:
        parts.append(f'getent passwd {q(user)} | sed "s/^/passwd /"')
    return section("ownership", "; ".join([*parts, "true"]))


def snapshot_command(paths: Sequence[str], weights: Sequence[str] | None = None,
                     units: Sequence[str] = (), user: str | None = None) -> str:
    """The one shell command behind :class:`HostSnapshot` (POSIX sh, C locale).

    + weights: ``(fetch program, fetch config)`` of a weights download: adds the
      recorded verification state (:func:`weights_section`), read without hashing
    + units, user: the service's unit names and user: adds who owns them (:func:`ownership_section`)
    """
    parts = [
        "export LC_ALL=C",
        section("os-release", "cat /etc/os-release"),
        section("systemd", "systemctl --version"),
        section("systemd-running", "test -d /run/systemd/system"),
        section("python3", "python3 --version"),
        *gpu_sections(),
        section("ss", "ss -Htlnp"),
        section("meminfo", "grep '^MemTotal:' /proc/meminfo"),
        section("nproc", "nproc"),
        *(disk_section(path) for path in paths),
        *([weights_section(*weights)] if weights else []),
        *([ownership_section(units, user)] if units or user is not None else []),
    ]
    return "; ".join(parts)


def _parsed(parse: Callable[[], T]) -> T:
    """Run a parser, turning its format errors into pyinfra's FactProcessError."""
    try:
        return parse()
    except HostFactError as exc:
        raise FactProcessError(str(exc)) from exc


def _sections(output: list[str]) -> dict[str, hostfacts.Section]:
    return {item.name: item for item in hostfacts.parse_sections(output)}


class GpuInventory(FactBase[GpuInfo | None]):
    """
    Returns the NVIDIA driver, the newest CUDA it supports, the GPUs and the
    compute processes holding their memory; None when nvidia-smi is absent.

    When nvidia-smi runs but cannot reach the driver, ``driver_error`` holds
    its message and ``gpus`` is empty.

    .. code:: python

        GpuInfo(
            driver_version="570.86.15",
            cuda_version="12.8",
            gpus=[Gpu(index=0, uuid="GPU-...", name="NVIDIA A800-SXM4-80GB",
                      memory_total_mib=81920, memory_used_mib=0, compute_capability="8.0")],
            processes=[GpuProcess(gpu_index=0, gpu_uuid="GPU-...", pid=4242,
                                  name="python3", used_memory_mib=32768)],
            driver_error=None,
        )

    Example:

    .. code:: python

        gpu = host.get_fact(GpuInventory)
        if gpu and not gpu.driver_error:
            print([g.name for g in gpu.gpus])
    """

    @override
    def requires_command(self, *args, **kwargs) -> str:
        return "nvidia-smi"

    @override
    def command(self) -> str:
        return "; ".join(gpu_sections())

    @override
    def process(self, output: list[str]) -> GpuInfo | None:
        found = _sections(output)
        return _parsed(
            lambda: hostfacts.parse_gpu_sections(found.get("gpu"), found.get("smi-version"), found.get("gpu-apps"))
        )


class ListeningPorts(FactBase[list[Listener]]):
    """
    Returns the listening TCP sockets, with the process that owns each one
    (owners of other users' sockets are only visible with ``_sudo=True``).

    .. code:: python

        [
            Listener(proto="tcp", address="0.0.0.0", port=22, pid=812, process="sshd"),
            Listener(proto="tcp", address="::", port=8100, pid=4242, process="vllm"),
        ]

    Example:

    .. code:: python

        busy = [l for l in host.get_fact(ListeningPorts, _sudo=True) if l.port == 8100]
    """

    default = list

    @override
    def requires_command(self, *args, **kwargs) -> str:
        return "ss"

    @override
    def command(self) -> str:
        return "ss -Htlnp"

    @override
    def process(self, output: list[str]) -> list[Listener]:
        return _parsed(lambda: hostfacts.parse_ss(output))


class FreeDisk(FactBase[DiskSpace]):
    """
    Returns the size and free space of the filesystem that holds ``path``, or
    would hold it: a missing path is measured at its nearest existing ancestor.

    + path: the directory to measure (e.g. where the weights will be stored)

    .. code:: python

        DiskSpace(path="/data/models/MiniMax-M2", mount="/data",
                  total_bytes=3840755982336, free_bytes=1319413953331)

    Example:

    .. code:: python

        disk = host.get_fact(FreeDisk, path="/data/models/MiniMax-M2")
        enough = disk.free_bytes > 240 * 10**9
    """

    @override
    def command(self, path: str) -> str:
        return "export LC_ALL=C; " + disk_section(path)

    @override
    def process(self, output: list[str]) -> DiskSpace:
        found = _sections(output).get("df")
        if found is None or found.rc != 0:
            raise FactProcessError(f"df failed: {found.text if found else 'no output'}")
        return _parsed(lambda: hostfacts.parse_df(found.arg or "", found.lines))


class HostSnapshot(FactBase[Snapshot]):
    """
    Returns everything preflight checks, read in one round trip: OS id and
    version, systemd, python3, the GPU inventory (as :class:`GpuInventory`),
    listening ports (as :class:`ListeningPorts`), free disk for each of
    ``paths`` (as :class:`FreeDisk`), total RAM and CPU count.

    A missing tool or a failing section does not fail the fact: the section
    is named in ``errors`` with its exit status and its fields stay empty.

    + paths: directories whose filesystem to measure (missing ones at their nearest
      existing ancestor); one string is one path, as ``pyinfra @HOST fact`` passes it
    + weights: optional ``(fetch program, fetch config)``: also read the weights'
      recorded verification state (``Snapshot.weights_check``, see docs/weights.md)
    + units, user: optional unit names (without .service) and user name: also read which unit files of
      those names exist and whether the toolkit rendered them, and the user's passwd entry
      (``Snapshot.unit_files``, ``Snapshot.account``)

    .. code:: python

        Snapshot(os_id="debian", os_version="12", os_pretty_name="Debian GNU/Linux 12 (bookworm)",
                 systemd_version="252", systemd_running=True, python_version="3.11.2",
                 gpu=GpuInfo(...), listeners=[Listener(...)], disks={"/data": DiskSpace(...)},
                 mem_total_bytes=540800000000, nproc=128, errors={})

    Example:

    .. code:: python

        snap = host.get_fact(HostSnapshot, paths=["/data/models"], _sudo=True)
        owner = snap.port_owner(8100)
        if owner:
            print(f"port 8100 is held by {owner.process} (pid {owner.pid})")
    """

    @override
    def command(self, paths: str | Sequence[str] = (), weights: Sequence[str] | None = None,
                units: Sequence[str] = (), user: str | None = None) -> str:
        return snapshot_command([paths] if isinstance(paths, str) else list(paths), weights, units, user)

    @override
    def process(self, output: list[str]) -> Snapshot:
        return hostfacts.parse_snapshot(output)
