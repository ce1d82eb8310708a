"""Preflight: what must be true on a host before anything is changed on it.

Pure checks over one `HostSnapshot` (vllm_fleet.preflight.parse, gathered in one
round trip) and the host's `Settings`. Each problem is one sentence naming
what is wrong and the remedy; the role raises them all at once, while pyinfra
is still planning, so no host is touched when any host fails.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

from vllm_fleet.settings import Settings

GIB = 1024**3
MIB = 1024**2

# vLLM's CUDA builds need at least this CUDA runtime from the driver.
MIN_DRIVER_CUDA = (12, 1)
# A fresh vLLM + torch venv takes about 9 GB (measured: the real vllm wheel installed with uv, docs/real-vllm.md).
VENV_BYTES = 10 * GIB


@dataclass(frozen=True)
class Ours:
    """What already belongs to this deploy on the host (so a rerun does not fail on it)."""

    pids: Collection[int] = ()
    port: int | None = None
    """The port this deploy's own service is seen listening on (when `ss` cannot name the pid, e.g. no CAP_SYS_PTRACE)."""


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def check(settings: Settings, snap, *, ours: Ours = Ours()) -> list[str]:
    """Every problem preflight finds on one host before planning (empty list: go ahead).

    + settings: the host's validated settings.
    + snap: the host's `hostfacts.Snapshot`.
    + ours: PIDs of this deploy's own service (they may hold the port and GPUs).
    """
    return _os(settings, snap) + _gpus(settings, snap, ours) + _port(settings, snap, ours)


def _os(settings: Settings, snap) -> list[str]:
    out = []
    accepted = settings.supported_os.get(snap.os_id or "", [])
    if snap.os_version not in accepted:
        supported = ", ".join(f"{k} {'/'.join(v)}" for k, v in settings.supported_os.items())
        out.append(f"OS {snap.os_id} {snap.os_version} is not supported (supported: {supported}); "
                   "remedy: use a supported OS, or add it to vllm_supported_os if you have tested it")
    if not snap.systemd_running:
        out.append("systemd is not running on the host (the service is a systemd unit); remedy: boot the host with systemd as PID 1")
    want = settings.python_version
    if snap.python_version is None:
        out.append(f"python3 is not installed; remedy: install python{want} (apt install python{want} python{want}-venv)")
    elif _version_tuple(snap.python_version)[:2] != _version_tuple(want)[:2]:
        out.append(f"python3 is {snap.python_version}, vllm_python_version is {want}; "
                   f"remedy: install python{want} on the host, or set vllm_python_version = \"{'.'.join(map(str, _version_tuple(snap.python_version)[:2]))}\"")
    return out


def _gpus(settings: Settings, snap, ours: Ours) -> list[str]:
    gpu = snap.gpu
    if gpu is None:
        return ["nvidia-smi not found: no NVIDIA driver on the host; remedy: install the NVIDIA datacenter driver (e.g. apt install nvidia-driver-570-server) and reboot"]
    if gpu.driver_error:
        return [f"nvidia-smi cannot talk to the driver ({gpu.driver_error}); remedy: load the driver (reboot after install, or check `dmesg | grep -i nvrm`)"]
    if not gpu.gpus:
        return ["nvidia-smi lists no GPUs; remedy: check the hardware and driver (`nvidia-smi -L`)"]
    out = []
    cuda = _version_tuple(gpu.cuda_version or "0")
    if cuda < MIN_DRIVER_CUDA:
        out.append(f"driver {gpu.driver_version} supports CUDA {gpu.cuda_version}, vLLM needs CUDA "
                   f"{'.'.join(map(str, MIN_DRIVER_CUDA))} or newer; remedy: upgrade the NVIDIA driver (570+ for CUDA 12.8)")
    by_index = {g.index: g for g in gpu.gpus}
    selected = settings.gpus if settings.gpus is not None else sorted(by_index)
    missing = [i for i in selected if i not in by_index]
    if missing:
        out.append(f"vllm_gpus={settings.gpus} names GPU {', '.join(map(str, missing))}, but the host has GPUs "
                   f"{sorted(by_index)}; remedy: pick indices from `nvidia-smi -L`")
        return out
    fits, short = [], []
    for i in selected:
        g = by_index[i]
        if not g.memory_total_mib or g.memory_used_mib is None:
            out.append(f"GPU {i} ({g.name}) reports no memory figures ([N/A]); remedy: check `nvidia-smi -i {i}` (MIG mode, a fallen-off GPU)")
            continue
        foreign = [p for p in gpu.processes if p.gpu_index == i and p.pid not in ours.pids]
        ours_mib = sum(p.used_memory_mib or 0 for p in gpu.processes if p.gpu_index == i and p.pid in ours.pids)
        used_mib = max(0, g.memory_used_mib - ours_mib)
        free_mib = g.memory_total_mib - used_mib
        want_mib = settings.gpu_memory_utilization * g.memory_total_mib
        fits.append(free_mib / g.memory_total_mib)
        if free_mib < want_mib:
            holders = ", ".join(f"pid {p.pid} ({p.name}, {p.used_memory_mib} MiB)" for p in foreign) or "no listed process (check `nvidia-smi`)"
            short.append(f"GPU {i} ({g.name}) has {free_mib / 1024:.2f}/{g.memory_total_mib / 1024:.2f} GiB free, less than "
                         f"vllm_gpu_memory_utilization={settings.gpu_memory_utilization} needs ({want_mib / 1024:.2f} GiB); held by {holders}")
    if short:
        best = math.floor(min(fits) * 100) / 100
        short.append(f"remedy: stop the processes above, choose other GPUs with vllm_gpus, or set vllm_gpu_memory_utilization <= {best:.2f}")
    return out + short


def _port(settings: Settings, snap, ours: Ours) -> list[str]:
    owner = snap.port_owner(settings.port)
    if owner is None or (owner.pid is not None and owner.pid in ours.pids) or (owner.pid is None and ours.port == settings.port):
        return []
    who = f"{owner.process} (pid {owner.pid})" if owner.pid else "an unknown process"
    return [f"port {settings.port} is already taken by {who} on {owner.address}; "
            f"remedy: stop that process, or set vllm_port to a free port for this host"]


NOLOGIN_SHELLS = ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false", "/usr/bin/false")


def check_ownership(settings: Settings, snap, units: Collection[str]) -> tuple[list[str], list[str]]:
    """(problems, notes): units of the service's names and a service user that the toolkit did not create.

    + units: the service's unit names without .service (`HostLayout.units`: the service, its download, watchdog,
      device-node, gate and router units).

    A unit file of one of ``units`` without the toolkit's mark would be replaced
    or shadowed by the deploy; an existing account it did not create would get a nologin shell and run
    vLLM. Each is refused unless its adopt setting (vllm_adopt_existing_unit, vllm_adopt_existing_user)
    takes it over; a note then says so. An account is the toolkit's when its GECOS is the toolkit's
    comment (layout.ACCOUNT_COMMENT), or, as older toolkit versions created it, a system account
    (uid < 1000) with a nologin shell and this deployment's data_dir as its home. A uid-0 account is
    never taken over.
    """
    from vllm_fleet.layout import ACCOUNT_COMMENT

    problems, notes = [], []
    for unit in units:
        foreign = [path for path, ours in snap.unit_files.get(f"{unit}.service", []) if not ours]
        if not foreign:
            continue
        where = ", ".join(foreign)
        if settings.adopt_existing_unit:
            notes.append(f"unit {unit}.service exists ({where}) and was not rendered by vllm-fleet; "
                         "vllm_adopt_existing_unit = True: the deploy takes it over (replaces or shadows it)")
        else:
            problems.append(f"unit {unit}.service already exists ({where}) and was not rendered by vllm-fleet: the deploy "
                            f"would replace or shadow it; remedy: set vllm_service_name to a name of its own "
                            f"(e.g. vllm-{settings.model.rsplit('/', 1)[-1].lower()}), or vllm_adopt_existing_unit = True "
                            "to take that unit over")
    acct = snap.account
    if acct is not None:
        name, _, uid, _, gecos, home, shell = acct
        uid_n = int(uid) if uid.isdigit() else -1
        ours = ACCOUNT_COMMENT in gecos or (0 < uid_n < 1000 and shell in NOLOGIN_SHELLS
                                            and home.rstrip("/") == settings.data_dir.rstrip("/"))
        what = f"uid {uid}, home {home or '-'}, shell {shell or '-'}"
        if uid_n == 0:
            problems.append(f"user {name} has uid 0 ({what}): vLLM must not run as root; remedy: set vllm_service_user "
                            "to an unprivileged name of its own, e.g. vllm")
        elif not ours and settings.adopt_existing_user:
            notes.append(f"user {name} exists ({what}) and was not created by vllm-fleet; vllm_adopt_existing_user = True: "
                         "the deploy takes it over (nologin shell, its group, vLLM runs as it)")
        elif not ours:
            kind = "a login account" if shell not in NOLOGIN_SHELLS else "a system account" if 0 < uid_n < 1000 else "an account"
            problems.append(f"user {name} already exists as {kind} ({what}) that vllm-fleet did not create: the deploy would "
                            "change its shell to nologin and run vLLM as it; remedy: set vllm_service_user to a name of "
                            "its own (e.g. vllm-fleet), or vllm_adopt_existing_user = True to take that account over")
    return problems, notes


def weights_on_host(check: dict | None, identity: str | None, weights_bytes: int) -> int:
    """Bytes of the weights already on the host (verified files + this revision's partials a download continues),
    which the disk check does not ask for again.

    + check: ``Snapshot.weights_check`` (``fetch_weights.py check`` of the recorded state, no hashing)
    + identity: the identity of this run's download (vllm_fleet.weights.source.identity); a record for
      another model, revision or destination counts for nothing
    + weights_bytes: the planner's weights size: returned whole when the download is complete
      (the real files may differ from the estimate; none of them is fetched again)
    """
    if not check or identity is None or check.get("identity") != identity:
        return 0
    if check.get("complete"):
        return weights_bytes
    # still to fetch = total - verified files - bytes already in this revision's partials (they are continued)
    return min(weights_bytes, int(check.get("verified_bytes") or 0) + int(check.get("partial_bytes") or 0))


def check_disk(settings: Settings, snap, weights_bytes: int, present_bytes: int = 0) -> list[str]:
    """Free disk for the venv (base_dir) and the weights (data_dir), per filesystem.

    + present_bytes: weights already verified on the host (`weights_on_host`): not asked for again,
      so a rerun after a 230 GB download does not need another 230 GB free.
    """
    out = []
    headroom = settings.disk_headroom_gib * GIB
    needs = {settings.base_dir: VENV_BYTES, settings.data_dir: max(0, weights_bytes - present_bytes)}
    # Both directories can live on one filesystem: add up what each mount must hold.
    by_mount: dict[str, tuple[int, list[str], int]] = {}
    for path, need in needs.items():
        disk = snap.disks.get(path)
        if disk is None:
            continue
        total, paths, free = by_mount.get(disk.mount, (0, [], disk.free_bytes))
        by_mount[disk.mount] = (total + need, paths + [path], free)
    for mount, (need, paths, free) in by_mount.items():
        if free < need + headroom:
            out.append(f"{mount} has {free / GIB:.1f} GiB free, {', '.join(paths)} need {need / GIB:.1f} GiB "
                       f"+ {settings.disk_headroom_gib} GiB headroom; remedy: free space, point vllm_data_dir/vllm_base_dir "
                       f"at a bigger disk, or lower vllm_disk_headroom_gib")
    return out


def check_stack(settings: Settings, snap) -> list[str]:
    """The driver can run the torch build the venv will get (vllm_torch_backend, or the best for the driver).

    Only when the GPU section itself is healthy (`check` reports a missing or
    broken driver once, not twice).
    """
    from vllm_fleet.pyenv.stack import StackError, resolve_backend

    gpu = snap.gpu
    if gpu is None or gpu.driver_error or not gpu.gpus:
        return []
    try:
        resolve_backend(settings.torch_backend, gpu.cuda_version)
    except StackError as exc:
        return [f"driver {gpu.driver_version}: {exc}"]
    return []
