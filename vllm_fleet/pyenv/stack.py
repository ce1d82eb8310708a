"""The host's Python stack, decided without touching a host: torch backend, venv path, install command.

Pure functions over `Settings` and facts. `vllm_fleet/pyenv/step.py` turns the
result into operations; the program that builds a venv on the host is
`vllm_fleet/pyenv/hostprog.py` (stdlib only), which receives a `BuildSpec` as JSON.

- Backend: the newest torch CUDA build the host driver can run
  (`backend_for_cuda`), or the per-host `vllm_torch_backend` override, which
  must not need a newer CUDA than the driver offers (`check_backend`).
- Venv path: `{base_dir}/venvs/vllm-{version}-{backend}`; the source channel
  adds the ref (`vllm-{version}-src.{ref}-{backend}`, installed editable from
  its own checkout `{base_dir}/src/<venv name>`); nightly venvs are named
  after the version the index resolved (`vllm-0.26.0rc1.dev5+g1234-cu130`),
  found only on the host, so a stable link `vllm-nightly-{backend}` points at
  the newest one.
- Install: `uv pip install` arguments for release / nightly / source, with the
  configured index, extra indexes and find-links, or `--no-index` from a
  wheelhouse pushed to the host (air-gapped hosts).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from vllm_fleet.errors import FleetError
from vllm_fleet.layout import HostLayout

#: torch CUDA backends, newest first, with the oldest driver CUDA each runs on.
#: A driver runs any CUDA up to the version `nvidia-smi` reports, so the best
#: backend is the newest whose minimum is not above it.
CUDA_BACKENDS: tuple[tuple[str, tuple[int, int]], ...] = (
    ("cu130", (13, 0)),
    ("cu128", (12, 8)),
    ("cu126", (12, 6)),
)
#: Backends a user may name in vllm_torch_backend besides "auto" (cu129 exists on the PyTorch index).
KNOWN_BACKENDS = ("cpu", "cu126", "cu128", "cu129", "cu130")
#: The driver branch that first supports each CUDA major.minor (for remedies).
DRIVER_FOR_CUDA = {(12, 6): "560", (12, 8): "570", (12, 9): "575", (13, 0): "580"}
NIGHTLY_INDEX = "https://wheels.vllm.ai/nightly"
# Host paths (venvs, uv, the wheelhouse, the program, uv's cache, source checkouts): vllm_fleet/layout.py.
#: The file in a venv that marks it complete and verified (written last, before the rename).
MARKER = ".vllm-fleet.json"


class StackError(FleetError):
    """The Python stack asked for cannot be installed on this host (problem + remedy)."""


def _cuda_tuple(text: str | None) -> tuple[int, int] | None:
    m = re.match(r"^\s*(\d+)\.(\d+)", text or "")
    return (int(m[1]), int(m[2])) if m else None


def backend_cuda(backend: str) -> tuple[int, int] | None:
    """The driver CUDA a backend needs (`cu128` -> (12, 8)); None for `cpu`."""
    m = re.fullmatch(r"cu(\d+)(\d)", backend)
    if backend == "cpu" or not m:
        return None
    return int(m[1]), int(m[2])


def backend_for_cuda(cuda: str | None) -> str:
    """The best torch backend for a driver that supports CUDA `cuda` (as `nvidia-smi` prints it).

    13.0 -> cu130, 12.8 and 12.9 -> cu128, 12.6 and 12.7 -> cu126; older raises
    `StackError` naming the driver to install.
    """
    have = _cuda_tuple(cuda)
    if have is None:
        raise StackError(f"the driver reports no CUDA version ({cuda!r}); remedy: check `nvidia-smi --version`, "
                         "or set vllm_torch_backend explicitly (e.g. cu128)")
    for backend, need in CUDA_BACKENDS:
        if have >= need:
            return backend
    oldest, need = CUDA_BACKENDS[-1]
    raise StackError(f"the driver supports CUDA {cuda}, older than any torch build vLLM uses (oldest: {oldest}, CUDA "
                     f"{need[0]}.{need[1]}); remedy: upgrade the NVIDIA driver to {DRIVER_FOR_CUDA[need]}+ "
                     f"({DRIVER_FOR_CUDA[(13, 0)]}+ for cu130, which vLLM's default wheels are built for)")


def resolve_backend(requested: str, driver_cuda: str | None) -> str:
    """`requested` if explicit (checked against the driver), else the best backend for the driver."""
    if requested == "auto":
        return backend_for_cuda(driver_cuda)
    problem = check_backend(requested, driver_cuda)
    if problem:
        raise StackError(problem)
    return requested


def check_backend(backend: str, driver_cuda: str | None) -> str | None:
    """A problem sentence when the driver is too old for `backend`, else None."""
    need = backend_cuda(backend)
    if need is None:
        return None
    have = _cuda_tuple(driver_cuda)
    if have is not None and have >= need:
        return None
    driver = DRIVER_FOR_CUDA.get(need, "a newer")
    try:
        best = f"set vllm_torch_backend = \"{backend_for_cuda(driver_cuda)}\" (or \"auto\")"
    except StackError:
        best = "no torch CUDA build runs on this driver"
    return (f"vllm_torch_backend={backend} needs a driver with CUDA {need[0]}.{need[1]}, the driver supports CUDA "
            f"{driver_cuda}; remedy: upgrade the NVIDIA driver to {driver}+, or {best}")


def _safe(text: str) -> str:
    """A ref or version as a path component: letters, digits and ._+- only."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)[:64]


def venv_name(channel: str, version: str, backend: str, ref: str | None = None) -> str:
    """The venv directory name (a release/source venv is named before it exists; nightly: see module doc)."""
    if channel == "source":
        return f"vllm-{_safe(version)}-src.{_safe(ref or 'HEAD')}-{backend}"
    if channel == "nightly":
        return f"vllm-nightly-{backend}"
    return f"vllm-{_safe(version)}-{backend}"


def resolved_name(version: str, backend: str) -> str:
    """The directory a nightly build is renamed to once its version is known."""
    return f"vllm-{_safe(version)}-{backend}"


@dataclass(frozen=True)
class PackageSource:
    """Where packages come from on the host.

    + index_url: the main index (None: PyPI); ignored with no_index.
    + extra_index_urls / find_links: as uv takes them (find_links may be host paths or URLs).
    + no_index: install only from find_links (a pushed wheelhouse, a mirror directory).
    + torch_index_url: an explicit index for the torch builds (a mirror of download.pytorch.org/whl/cuXXX);
      None lets uv pick the PyTorch index for the backend (--torch-backend), which needs that index reachable.
    """

    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    no_index: bool = False
    torch_index_url: str | None = None

    def args(self) -> list[str]:
        """The uv/pip options selecting these sources (the same for `pip install` and `uv pip install`)."""
        out: list[str] = []
        if self.no_index:
            out.append("--no-index")
        elif self.index_url:
            out += ["--index-url", self.index_url]
        if not self.no_index:
            for url in self.extra_index_urls:
                out += ["--extra-index-url", url]
        for link in self.find_links:
            out += ["--find-links", link]
        return out


@dataclass(frozen=True)
class BuildSpec:
    """Everything the host program needs to build and verify one venv (sent as JSON; no secrets).

    `hostprog.py build` creates `{venvs_dir}/.tmp-{name}`, installs into it,
    verifies it, writes the marker and renames it to `{venvs_dir}/{name}`
    (nightly: to the resolved name, then points `name`, a link, at it).
    """

    name: str
    venvs_dir: str
    channel: str
    version: str
    backend: str
    python: str
    uv: str
    uv_cache: str
    install: list[str]
    torch_version: str | None = None
    offline: bool = False
    no_python_downloads: bool = False
    source_url: str | None = None
    source_ref: str | None = None
    source_dir: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    architecture: str | None = None
    min_vllm_version: str | None = None
    expect_devices: int | None = None
    cuda_visible_devices: str | None = None

    @property
    def path(self) -> str:
        """The venv's path on the host (nightly: the link to the newest resolved build)."""
        return f"{self.venvs_dir}/{self.name}"

    def key(self) -> dict[str, object]:
        """What a built venv must match to be reused: what was asked for, not where it came from."""
        return {"channel": self.channel, "version": self.version, "backend": self.backend, "python": self.python,
                "torch_version": self.torch_version, "source_url": self.source_url, "source_ref": self.source_ref}

    def to_json(self) -> dict[str, object]:
        """The spec as plain data, for the host program."""
        return asdict(self)


def install_args(channel: str, version: str, backend: str, source: PackageSource, *,
                 torch_version: str | None = None, source_dir: str | None = None,
                 nightly_index: str = NIGHTLY_INDEX) -> list[str]:
    """The arguments after `uv pip install --python VENV/bin/python`, for one channel.

    - release: `vllm==VERSION`
    - nightly: `--prerelease allow --extra-index-url NIGHTLY vllm>=X.Y.Z.dev0` (`nightly_floor`: the
      pre-releases of VERSION's release count, as the verify step and `reusable` count them)
    - source: `--editable SOURCE_DIR` (the checkout; VLLM_USE_PRECOMPILED=1 comes in the env)

    torch: pinned when `torch_version` is set (else whatever vLLM requires);
    its build comes from `--torch-backend BACKEND` when indexes are reachable,
    from `torch_index_url` when one is set, and from the wheelhouse's own
    wheels (whose local tag, e.g. +cpu, the verify step checks) when offline.
    """
    out = source.args()
    if source.torch_index_url and not source.no_index:
        # Extra indexes come before the main index in uv's first-match strategy: torch comes from here.
        out += ["--extra-index-url", source.torch_index_url]
    elif not source.no_index:
        out += ["--torch-backend", backend]
    if channel == "nightly":
        out += ["--prerelease", "allow"]
        if not source.no_index:
            out += ["--extra-index-url", nightly_index]
        out.append(f"vllm>={nightly_floor(version)}")
    elif channel == "source":
        if not source_dir:
            raise StackError("the source channel needs a checkout directory")
        out += ["--editable", source_dir]
    else:
        out.append(f"vllm=={version}")
    if torch_version:
        out.append(f"torch=={torch_version}")
    return out


def nightly_floor(version: str) -> str:
    """The lowest version a nightly request for `version` accepts: its release numbers' first dev build.

    PEP 440 orders 0.26.1.dev3 before 0.26.1, so `vllm>=0.26.1` would refuse the
    nightly 0.26.1.dev3 that `reusable` and the host's verify step accept
    (they compare release numbers only): "0.26.1" -> "0.26.1.dev0".
    """
    release = ".".join(str(n) for n in _vtuple(version))
    if not release:
        raise StackError(f"vllm_version {version!r} has no release numbers; remedy: set it to a version such as 0.26.0")
    return f"{release}.dev0"


def settings_venv_name(settings, backend: str) -> str:
    """The venv name python_env builds for these settings and backend."""
    return venv_name(settings.channel, settings.version, backend, settings.source_ref)


#: The backend assumed when vllm_torch_backend is "auto" and no driver is known (`vllm-fleet render`
#: without --cuda): the newest, what a current driver gets.
ASSUMED_BACKEND = CUDA_BACKENDS[0][0]


def default_venv(settings, driver_cuda: str | None = None) -> str:
    """The venv path python_env builds for these settings: `HostLayout.venv(vllm-{version}-{backend})`,
    the backend resolved as the deploy does (`resolve_backend`); with no driver known, vllm_torch_backend
    when it is not "auto", else ASSUMED_BACKEND."""
    if driver_cuda is None:
        backend = ASSUMED_BACKEND if settings.torch_backend == "auto" else settings.torch_backend
    else:
        backend = resolve_backend(settings.torch_backend, driver_cuda)
    return HostLayout.of(settings).venv(settings_venv_name(settings, backend))


def uv_bootstrap_args(source: PackageSource, uv_version: str | None = None) -> list[str]:
    """`pip install` arguments that put uv into the bootstrap venv from the configured sources."""
    return [*source.args(), f"uv=={uv_version}" if uv_version else "uv"]


@dataclass(frozen=True)
class HostVenv:
    """One venv as the host reports it (`hostprog.py state`).

    + complete: its marker exists (the build finished and was verified).
    + intact: every file its installed distributions record is there with its recorded size.
    + key: the BuildSpec.key() it was built for; built_at: when (seconds since the epoch).
    + target: for a link (nightly), the venv it points at.
    """

    name: str
    complete: bool = False
    intact: bool = False
    problem: str | None = None
    key: dict[str, object] | None = None
    version: str | None = None
    built_at: float = 0.0
    target: str | None = None

    @property
    def usable(self) -> bool:
        return self.complete and self.intact


def _vtuple(version: str) -> tuple[int, ...]:
    """The release numbers of a version: "0.26.1rc1.dev5+gabc" -> (0, 26, 1)."""
    m = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(x) for x in m.group(0).split(".")) if m else ()


def reusable(spec: BuildSpec, venvs: Sequence[HostVenv]) -> HostVenv | None:
    """The existing venv that already satisfies `spec`, or None (then it must be built).

    release/source: the venv named `spec.name`, complete, intact, built for this key.
    nightly: the venv the `vllm-nightly-BACKEND` link points at, if usable and
    at least the requested minimum version (a rerun does not chase newer nightlies).
    """
    by_name = {v.name: v for v in venvs}
    if spec.channel == "nightly":
        link = by_name.get(spec.name)
        found = by_name.get(link.target) if link and link.target else None
        if found and found.usable and found.version and _vtuple(found.version) >= _vtuple(spec.version):
            return found
        return None
    found = by_name.get(spec.name)
    if found and found.usable and found.key == spec.key():
        return found
    return None


def previous(current: str | None, venvs: Sequence[HostVenv]) -> HostVenv | None:
    """The newest usable venv other than `current` (what the service rolls back to)."""
    others = [v for v in venvs if v.usable and v.target is None and v.name != current]
    return max(others, key=lambda v: v.built_at, default=None)


def to_prune(current: str | None, venvs: Sequence[HostVenv], keep: int, *, building: bool = False,
             in_use: Sequence[str] = ()) -> list[str]:
    """Names of venvs beyond the `keep` newest, counting the one the service will use.

    + current: the venv name the service will use (built already or about to be); never pruned.
    + building: a venv is being built whose name is not known yet (nightly): it takes a slot.
    + in_use: the venvs the live unit and the gate's last known good unit run (``StackState.in_use``): never
      pruned, whatever `keep` says (the rollback target must stay), and they take their slots.

    Links (nightly) are never pruned, nor what they point at. Damaged venvs
    that are not current are pruned first: they cannot serve as a rollback
    target. A directory without a marker was not made by vllm-fleet (a build
    is renamed into place only after its marker is written): it is left alone.
    """
    links = {v.name for v in venvs if v.target is not None}
    reserved = ({current} if current else set()) | {v.target for v in venvs if v.target}
    reserved |= set(in_use) & {v.name for v in venvs}  # a unit may name a venv that is gone: it takes no slot
    slots = len(reserved - links) + (1 if building and current is None else 0)
    real = [v for v in venvs if v.target is None and v.name not in reserved]
    broken = [v.name for v in real if v.complete and not v.intact]
    good = sorted((v for v in real if v.usable), key=lambda v: v.built_at, reverse=True)
    return broken + [v.name for v in good[max(0, keep - slots):]]
