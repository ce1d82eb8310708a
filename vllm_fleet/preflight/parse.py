"""Pure parsers for what preflight reads off a host, and their typed results.

Every function here turns the text a command printed into a frozen dataclass.
Nothing imports pyinfra: ``vllm_fleet.preflight.facts`` wraps these parsers in pyinfra
facts, and unit tests feed them verbatim outputs of the real commands
(``tests/fixtures/``).

The commands they parse:

- ``nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,compute_cap,driver_version --format=csv,noheader,nounits``
- ``nvidia-smi --version``
- ``nvidia-smi --query-compute-apps=gpu_uuid,pid,process_name,used_memory --format=csv,noheader,nounits``
- ``ss -Htlnp``
- ``df -B1 --output=source,fstype,size,avail,target PATH``
- ``cat /etc/os-release``, ``systemctl --version``, ``python3 --version``,
  ``grep ^MemTotal: /proc/meminfo``, ``nproc``

and the sectioned output of the one-round-trip snapshot command
(:func:`parse_sections`, :func:`parse_snapshot`).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import TypeVar

#: The three nvidia-smi queries. They are also the contract with the
#: nvidia-smi test double (tests/doubles/): keep them byte for byte.
GPU_QUERY = (
    "nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,compute_cap,driver_version"
    " --format=csv,noheader,nounits"
)
VERSION_QUERY = "nvidia-smi --version"
APPS_QUERY = (
    "nvidia-smi --query-compute-apps=gpu_uuid,pid,process_name,used_memory --format=csv,noheader,nounits"
)

#: Prefix of the lines that open and close a section of a sectioned command.
SECTION_MARK = "@@vllm-fleet@@"
_BEGIN = re.compile(rf"^{re.escape(SECTION_MARK)} begin (?P<name>\S+)(?: (?P<arg>.*))?$")
_END = re.compile(rf"{re.escape(SECTION_MARK)} end (?P<name>\S+) rc=(?P<rc>\d+)$")

#: Values nvidia-smi prints for a field it cannot read.
_NOT_AVAILABLE = {"[N/A]", "N/A", "[Not Supported]", "[Unknown Error]", "[Insufficient Permissions]"}

#: Exit status of a shell command that was not found.
COMMAND_NOT_FOUND = 127


T = TypeVar("T")


class HostFactError(ValueError):
    """A command printed something its parser does not understand."""


class _Result:
    """Base of the fact results: ``to_json`` lets ``pyinfra INVENTORY fact ...`` print them."""

    def to_json(self) -> dict[str, object]:
        """The result as plain dicts and lists."""
        return asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class Gpu(_Result):
    """One GPU as ``nvidia-smi --query-gpu`` reports it (memory in MiB; None: not reported)."""

    index: int
    uuid: str
    name: str
    memory_total_mib: int | None
    memory_used_mib: int | None
    compute_capability: str | None


@dataclass(frozen=True)
class GpuProcess(_Result):
    """One compute process holding GPU memory (``gpu_index`` is mapped from its GPU's uuid)."""

    gpu_index: int | None
    gpu_uuid: str
    pid: int
    name: str
    used_memory_mib: int | None


@dataclass(frozen=True)
class GpuInfo(_Result):
    """The NVIDIA driver, the newest CUDA it supports, its GPUs and who holds their memory.

    ``driver_error`` holds nvidia-smi's own message when it ran but could not
    answer (no driver loaded, driver/library mismatch, ...); then ``gpus`` is
    empty and ``driver_version`` is None.
    """

    driver_version: str | None
    cuda_version: str | None
    gpus: list[Gpu] = field(default_factory=list)
    processes: list[GpuProcess] = field(default_factory=list)
    driver_error: str | None = None

    def processes_on(self, index: int) -> list[GpuProcess]:
        """The compute processes holding memory on GPU ``index``."""
        return [p for p in self.processes if p.gpu_index == index]


@dataclass(frozen=True)
class Listener(_Result):
    """One listening socket from ``ss -Htlnp`` (``pid``/``process`` None when ss could not see them)."""

    proto: str
    address: str
    port: int
    pid: int | None
    process: str | None


@dataclass(frozen=True)
class DiskSpace(_Result):
    """Space on the filesystem holding ``path`` (or its nearest existing ancestor)."""

    path: str
    mount: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class Snapshot(_Result):
    """Everything preflight needs from one host, read in one round trip.

    ``errors`` maps a section that failed (or printed something unparseable)
    to a one-line reason; the fields it feeds are then None or empty.
    """

    os_id: str | None
    os_version: str | None
    os_pretty_name: str | None
    systemd_version: str | None
    systemd_running: bool
    python_version: str | None
    gpu: GpuInfo | None
    listeners: list[Listener]
    disks: dict[str, DiskSpace]
    mem_total_bytes: int | None
    nproc: int | None
    errors: dict[str, str] = field(default_factory=dict)
    weights_check: dict | None = None
    """``fetch_weights.py check`` of the weights download (complete, identity, verified_bytes, ...); None: not asked or nothing recorded."""
    unit_files: dict[str, list[tuple[str, bool]]] = field(default_factory=dict)
    """``NAME.service`` -> every file of that unit in systemd's search path and whether the toolkit rendered it."""
    account: tuple[str, ...] | None = None
    """The service user's passwd entry (name, x, uid, gid, gecos, home, shell); None: no such user, or not asked."""

    def port_owner(self, port: int) -> Listener | None:
        """The first socket listening on TCP ``port`` on any address, or None if it is free."""
        return next((item for item in self.listeners if item.port == port), None)


@dataclass(frozen=True)
class Section:
    """The output of one section of a sectioned command and its exit status."""

    name: str
    arg: str | None
    rc: int
    lines: list[str]

    @property
    def text(self) -> str:
        """The section's output as one stripped string."""
        return "\n".join(self.lines).strip()


def _optional_int(value: str) -> int | None:
    value = value.strip()
    if value in _NOT_AVAILABLE:
        return None
    return int(value)


def _optional_str(value: str) -> str | None:
    value = value.strip()
    return None if value in _NOT_AVAILABLE else value


def _rows(lines: Iterable[str]) -> list[str]:
    return [line.strip() for line in lines if line.strip()]


def parse_gpu_query(lines: Iterable[str]) -> tuple[list[Gpu], str | None]:
    """Parse query (A); return the GPUs and the driver version they report.

    Fields are separated by ``", "``; only ``name`` could in theory hold a
    comma, so it is taken as everything between the second field and the
    last four.
    """
    gpus: list[Gpu] = []
    driver: str | None = None
    for line in _rows(lines):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 7:
            raise HostFactError(f"nvidia-smi --query-gpu: expected 7 fields, got {line!r}")
        index, uuid, *name, total, used, cap, driver_version = parts
        try:
            gpus.append(
                Gpu(
                    index=int(index),
                    uuid=uuid,
                    name=", ".join(name),
                    memory_total_mib=_optional_int(total),
                    memory_used_mib=_optional_int(used),
                    compute_capability=_optional_str(cap),
                )
            )
        except ValueError as exc:
            raise HostFactError(f"nvidia-smi --query-gpu: bad number in {line!r}") from exc
        driver = driver or _optional_str(driver_version)
    return gpus, driver


def parse_smi_version(lines: Iterable[str]) -> tuple[str | None, str | None]:
    """Parse ``nvidia-smi --version``; return (driver version, CUDA version).

    Its lines look like ``CUDA Version        : 12.8``; the CUDA version is
    the newest CUDA the driver supports.
    """
    values: dict[str, str] = {}
    for line in _rows(lines):
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip().lower()] = value.strip()
    return values.get("driver version"), values.get("cuda version")


def parse_compute_apps(lines: Iterable[str], gpus: Iterable[Gpu] = ()) -> list[GpuProcess]:
    """Parse query (C); map each process's GPU uuid to that GPU's index.

    A line without a comma (e.g. ``No running processes found``) is no process.
    """
    index_of = {gpu.uuid: gpu.index for gpu in gpus}
    processes: list[GpuProcess] = []
    for line in _rows(lines):
        if "," not in line:
            continue
        uuid, pid, rest = (p.strip() for p in line.split(",", 2))
        name, sep, used = rest.rpartition(",")
        if not sep:
            raise HostFactError(f"nvidia-smi --query-compute-apps: expected 4 fields, got {line!r}")
        try:
            processes.append(
                GpuProcess(
                    gpu_index=index_of.get(uuid),
                    gpu_uuid=uuid,
                    pid=int(pid),
                    name=name.strip(),
                    used_memory_mib=_optional_int(used),
                )
            )
        except ValueError as exc:
            raise HostFactError(f"nvidia-smi --query-compute-apps: bad number in {line!r}") from exc
    return processes


def parse_gpu_sections(
    gpu: Section | None, version: Section | None, apps: Section | None
) -> GpuInfo | None:
    """Combine the outputs of queries (A), (B) and (C) into one :class:`GpuInfo`.

    None when nvidia-smi is not installed (query (A) missing or exit 127). A
    non-zero exit of (A) is the driver's error: it is kept as ``driver_error``.
    """
    if gpu is None or gpu.rc == COMMAND_NOT_FOUND:
        return None
    if gpu.rc != 0:
        message = gpu.text or f"nvidia-smi exited with status {gpu.rc}"
        return GpuInfo(driver_version=None, cuda_version=None, driver_error=message)
    gpus, driver = parse_gpu_query(gpu.lines)
    cuda: str | None = None
    if version is not None and version.rc == 0:
        version_driver, cuda = parse_smi_version(version.lines)
        driver = driver or version_driver
    processes = parse_compute_apps(apps.lines, gpus) if apps is not None and apps.rc == 0 else []
    return GpuInfo(driver_version=driver, cuda_version=cuda, gpus=gpus, processes=processes)


_USERS = re.compile(r'\("(?P<name>(?:[^"\\]|\\.)*)",pid=(?P<pid>\d+),fd=\d+\)')


def _split_address(local: str) -> tuple[str, int]:
    """Split ss's ``ADDRESS[%IFACE]:PORT`` into (address, port); brackets are dropped."""
    host, sep, port = local.rpartition(":")
    if not sep:
        raise HostFactError(f"ss: no port in {local!r}")
    host = host.split("%", 1)[0] if not host.startswith("[") else host[: host.index("]") + 1]
    return host.strip("[]"), int(port)


def parse_ss(lines: Iterable[str]) -> list[Listener]:
    """Parse ``ss -Htlnp`` (also ``ss -Htulnp``, whose lines start with a Netid column).

    Addresses come back as ss prints them, without brackets or ``%iface``:
    ``0.0.0.0``, ``127.0.0.1``, ``::``, ``::1``, ``*``.
    """
    listeners: list[Listener] = []
    for line in _rows(lines):
        fields = line.split(None, 6 if line.startswith(("tcp", "udp")) else 5)
        proto = fields.pop(0) if fields[0] in ("tcp", "udp") else "tcp"
        if len(fields) < 4:
            raise HostFactError(f"ss: expected state, queues, local and peer address, got {line!r}")
        address, port = _split_address(fields[3])
        owner = _USERS.search(fields[5]) if len(fields) > 5 else None
        listeners.append(
            Listener(
                proto=proto,
                address=address,
                port=port,
                pid=int(owner["pid"]) if owner else None,
                process=owner["name"] if owner else None,
            )
        )
    return listeners


def parse_df(path: str, lines: Iterable[str]) -> DiskSpace:
    """Parse ``df -B1 --output=source,fstype,size,avail,target`` for ``path`` (header line optional)."""
    rows = [row for row in _rows(lines) if not row.startswith("Filesystem")]
    if len(rows) != 1:
        raise HostFactError(f"df: expected one filesystem line, got {rows!r}")
    fields = rows[0].split(None, 4)
    if len(fields) != 5:
        raise HostFactError(f"df: expected 5 columns, got {rows[0]!r}")
    try:
        return DiskSpace(path=path, mount=fields[4], total_bytes=int(fields[2]), free_bytes=int(fields[3]))
    except ValueError as exc:
        raise HostFactError(f"df: bad number in {rows[0]!r}") from exc


def parse_os_release(lines: Iterable[str]) -> dict[str, str]:
    """Parse ``/etc/os-release`` (shell-quoted ``KEY=value`` lines) into a dict."""
    values: dict[str, str] = {}
    for line in _rows(lines):
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            parts = shlex.split(value)
            values[key] = parts[0] if parts else ""
    return values


def parse_systemd_version(lines: Iterable[str]) -> str | None:
    """The version number from ``systemctl --version`` (``systemd 252 (252.22-1~deb12u1)`` -> ``252``)."""
    for line in _rows(lines):
        match = re.match(r"systemd (\d+)", line)
        if match:
            return match[1]
    return None


def parse_python_version(lines: Iterable[str]) -> str | None:
    """The version from ``python3 --version`` (``Python 3.11.2`` -> ``3.11.2``)."""
    for line in _rows(lines):
        match = re.match(r"Python (\S+)", line)
        if match:
            return match[1]
    return None


def parse_meminfo_total(lines: Iterable[str]) -> int:
    """Total RAM in bytes from the ``MemTotal:`` line of ``/proc/meminfo``."""
    for line in _rows(lines):
        match = re.match(r"MemTotal:\s+(\d+)\s*kB", line)
        if match:
            return int(match[1]) * 1024
    raise HostFactError("/proc/meminfo: no MemTotal line")


def parse_nproc(lines: Iterable[str]) -> int:
    """The number of processing units from ``nproc``."""
    rows = _rows(lines)
    if len(rows) != 1 or not rows[0].isdigit():
        raise HostFactError(f"nproc: expected one number, got {rows!r}")
    return int(rows[0])


def parse_sections(lines: Iterable[str]) -> list[Section]:
    """Split a sectioned command's output into its sections.

    A section is opened by ``@@vllm-fleet@@ begin NAME [ARG]`` and closed by
    ``@@vllm-fleet@@ end NAME rc=N``. The end mark may follow output that did
    not end with a newline on the same line.
    """
    sections: list[Section] = []
    current: tuple[str, str | None, list[str]] | None = None
    for raw in lines:
        line = raw.rstrip("\n")
        begin = _BEGIN.match(line)
        if begin:
            current = (begin["name"], begin["arg"], [])
            continue
        end = _END.search(line)
        if end and current is not None and end["name"] == current[0]:
            head = line[: end.start()]
            if head.strip():
                current[2].append(head)
            sections.append(Section(name=current[0], arg=current[1], rc=int(end["rc"]), lines=current[2]))
            current = None
            continue
        if current is not None:
            current[2].append(line)
    return sections


def _failure(section: Section) -> str:
    """One line saying why a section failed: not installed, or its status and first output line."""
    if section.rc == COMMAND_NOT_FOUND:
        return f"command not found (exit status {COMMAND_NOT_FOUND})"
    first = section.lines[0].strip() if section.lines else ""
    return f"exit status {section.rc}" + (f": {first}" if first else "")


def parse_snapshot(lines: Iterable[str], paths: Iterable[str] = ()) -> Snapshot:
    """Build a :class:`Snapshot` from the snapshot command's sectioned output.

    Sections are named ``os-release``, ``systemd``, ``systemd-running``,
    ``python3``, ``gpu``, ``smi-version``, ``gpu-apps``, ``ss``, ``meminfo``,
    ``nproc`` and ``df`` (one per path, the path as its argument). A failed or
    unparseable section never fails the snapshot: it is recorded in
    ``errors`` and its fields stay empty. ``paths`` lists the paths whose
    ``df`` section must be present.
    """
    by_name: dict[str, Section] = {}
    disk_sections: list[Section] = []
    for section in parse_sections(lines):
        if section.name == "df":
            disk_sections.append(section)
        else:
            by_name[section.name] = section
    errors: dict[str, str] = {}

    def read(name: str, parser: Callable[[list[str]], T], default: T) -> T:
        section = by_name.get(name)
        if section is None:
            errors[name] = "section missing from output"
            return default
        if section.rc != 0:
            errors[name] = _failure(section)
            return default
        try:
            return parser(section.lines)
        except (HostFactError, ValueError) as exc:
            errors[name] = str(exc)
            return default

    os_release: dict[str, str] = read("os-release", parse_os_release, {})
    gpu: GpuInfo | None = None
    try:
        gpu = parse_gpu_sections(by_name.get("gpu"), by_name.get("smi-version"), by_name.get("gpu-apps"))
    except HostFactError as exc:
        errors["gpu"] = str(exc)
    disks: dict[str, DiskSpace] = {}
    for section in disk_sections:
        path = section.arg or ""
        if section.rc != 0:
            errors[f"df {path}"] = _failure(section)
            continue
        try:
            disks[path] = parse_df(path, section.lines)
        except HostFactError as exc:
            errors[f"df {path}"] = str(exc)
    for path in paths:
        if path not in disks and f"df {path}" not in errors:
            errors[f"df {path}"] = "section missing from output"
    running = by_name.get("systemd-running")
    weights_check = None
    if (ws := by_name.get("weights-check")) is not None:
        if ws.rc != 0:
            errors["weights-check"] = _failure(ws)
        elif ws.text:
            try:
                weights_check = json.loads(ws.lines[0])
                for line in ws.lines[1:]:
                    if line.startswith("identity="):
                        weights_check.setdefault("identity", line.partition("=")[2].strip())
            except (ValueError, AttributeError) as exc:
                weights_check = None
                errors["weights-check"] = f"not JSON: {exc}"
    unit_files: dict[str, list[tuple[str, bool]]] = {}
    account: tuple[str, ...] | None = None
    if (own := by_name.get("ownership")) is not None:
        for line in own.lines:
            words = line.split(" ", 3)
            if words[0] == "unit" and len(words) == 4 and words[2] in ("ours", "foreign"):
                unit_files.setdefault(words[1], []).append((words[3], words[2] == "ours"))
            elif words[0] == "passwd" and len(words) > 1:
                fields = tuple(line.partition(" ")[2].split(":"))
                account = (fields + ("",) * 7)[:7]
    return Snapshot(
        unit_files=unit_files,
        account=account,
        os_id=os_release.get("ID"),
        os_version=os_release.get("VERSION_ID"),
        os_pretty_name=os_release.get("PRETTY_NAME"),
        systemd_version=read("systemd", parse_systemd_version, None),
        systemd_running=running is not None and running.rc == 0,
        python_version=read("python3", parse_python_version, None),
        gpu=gpu,
        listeners=read("ss", parse_ss, []),
        disks=disks,
        mem_total_bytes=read("meminfo", parse_meminfo_total, None),
        nproc=read("nproc", parse_nproc, None),
        errors=errors,
        weights_check=weights_check,
    )
