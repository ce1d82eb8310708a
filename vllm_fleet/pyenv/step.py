"""The Python stack: uv on the host, and one verified venv per vLLM version + torch backend.

Layout on the host (all root-owned, read-only to the service; paths from vllm_fleet/layout.py):

    {base_dir}/uv                          bootstrap venv holding uv (python3 -m venv + pip)
    {base_dir}/bin/vllm-fleet-venv         the host program (vllm_fleet/pyenv/hostprog.py): builds and verifies venvs
    {base_dir}/wheelhouse                  wheels pushed from vllm_wheelhouse (air-gapped hosts), MANIFEST.json last
    {base_dir}/cache/uv                    uv's cache (same filesystem as the venvs: hard links)
    {base_dir}/venvs/vllm-0.25.0-cu130     one venv per version + backend; older ones kept for rollback
    {base_dir}/venvs/vllm-nightly-cu130    nightly: a link to the newest resolved build (vllm-0.26.1.dev3-cu130)
    {base_dir}/src/vllm-0.25.0-src.REF-cu130  source: the git checkout its venv is installed from (editable)

Everything is planned from one fact (`VenvState`) read in one round trip; a
venv that is complete, intact and built for the same request is left alone,
so a second run changes nothing. A new version builds a new venv beside the
old ones (`keep_venvs` kept). The build runs on the host (`hostprog.py build`):
temporary directory, install, verify, marker, rename.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from io import StringIO
from pathlib import Path

from pyinfra import host, logger
from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import apt, files, server

from vllm_fleet.hostops.abort import abort
from vllm_fleet.hostops.facts import Read, read
from vllm_fleet.hostops.operations import ManagedFile, managed_files
from vllm_fleet.layout import HostLayout
from vllm_fleet.handoff import HostState, Venv
from vllm_fleet.preflight import checks as preflight
from vllm_fleet.pyenv import stack, wheeldigest
from vllm_fleet.errors import FleetError, PreflightError
from vllm_fleet.planner.modelinfo import load_profile
from vllm_fleet.settings import Settings
from vllm_fleet.pyenv.stack import BuildSpec, PackageSource
from vllm_fleet.pyenv.facts import PROGRAM_SOURCE, StackState, VenvState


def build_spec(settings: Settings, state: HostState, facts: StackState) -> BuildSpec:
    """Decide the venv for this host from its settings, driver and the pushed-wheelhouse location (pure)."""
    snap = state.snapshot
    lay = HostLayout.of(settings)
    backend = stack.resolve_backend(settings.torch_backend, snap.gpu.cuda_version if snap.gpu else None)
    if settings.wheelhouse:
        source = PackageSource(no_index=True, find_links=(lay.wheelhouse_dir,))
    else:
        source = PackageSource(index_url=settings.index_url, extra_index_urls=tuple(settings.extra_index_urls),
                               find_links=tuple(settings.find_links), no_index=settings.no_index,
                               torch_index_url=settings.torch_index_url)
    name = stack.settings_venv_name(settings, backend)
    source_dir = lay.source_checkout(name) if settings.channel == "source" else None
    profile = load_profile(settings.model)
    devices = len(settings.gpus) if settings.gpus is not None else len(snap.gpu.gpus) if snap.gpu else None
    return BuildSpec(
        name=name,
        venvs_dir=lay.venvs_dir,
        channel=settings.channel,
        version=settings.version,
        backend=backend,
        python=settings.python_version,
        uv=lay.uv,
        uv_cache=lay.uv_cache,
        install=stack.install_args(settings.channel, settings.version, backend, source,
                                   torch_version=settings.torch_version, source_dir=source_dir,
                                   nightly_index=settings.nightly_index_url),
        torch_version=settings.torch_version,
        offline=bool(settings.wheelhouse),
        no_python_downloads=source.no_index,
        source_url=settings.source_url,
        source_ref=settings.source_ref,
        source_dir=source_dir,
        env={"VLLM_USE_PRECOMPILED": "1"} if settings.channel == "source" else {},
        architecture=profile.architecture,
        min_vllm_version=profile.min_vllm_version,
        expect_devices=devices,
        cuda_visible_devices=settings.cuda_visible_devices,
    )


def reads(settings: Settings) -> list[Read]:
    """What `apply` reads of the host (deploy.py reads every step's facts in one round trip: `read_many`)."""
    return [Read.of(VenvState, paths=json.dumps(HostLayout.of(settings).venv_state_paths(), sort_keys=True))]


def apply(settings: Settings, state: HostState) -> Venv:
    """Read the host's stack in one round trip, check the driver against the backend, plan the operations."""
    facts = read(host, reads(settings)[0])
    problems = preflight.check_stack(settings, state.snapshot)
    if problems:
        abort(PreflightError(host.name, problems))
    try:
        spec = build_spec(settings, state, facts)
    except FleetError as exc:
        abort(PreflightError(host.name, [str(exc)]))
    return _operations(settings, spec, facts)


def local_manifest(directory: str) -> dict[str, dict[str, object]]:
    """The manifest of a wheelhouse on the control machine (digests cached across runs: `pyenv/wheeldigest.py`)."""
    return wheeldigest.local_manifest(directory)


def _push_wheelhouse(settings: Settings, facts: StackState) -> None:
    """Copy the wheels the host lacks (or holds differently), drop extra ones, write the manifest last."""
    assert settings.wheelhouse
    want = local_manifest(settings.wheelhouse)
    have = facts.wheelhouse or {}
    if have == want:
        return
    lay = HostLayout.of(settings)
    dest = lay.wheelhouse_dir
    files.directory(name=f"Ensure {dest} exists (root:root 755)", path=dest, user="root", group="root", mode="755")
    # the puts below skip their parent check (create_remote_dir=False): {dest} is read once, here
    for name, entry in sorted(want.items()):
        if have.get(name) != entry:
            files.put(name=f"Ensure wheel {name} is in {dest}", src=str(Path(settings.wheelhouse) / name),
                      dest=f"{dest}/{name}", user="root", group="root", mode="644", create_remote_dir=False)
    for name in sorted(set(have) - set(want)):
        files.file(name=f"Ensure wheel {name} is no longer in {dest}", path=f"{dest}/{name}", present=False)
    files.put(name=f"Ensure the manifest of {dest} lists {len(want)} wheels", src=StringIO(json.dumps(want, indent=1, sort_keys=True)),
              dest=lay.wheelhouse_manifest, user="root", group="root", mode="644", create_remote_dir=False)


def _show(settings: Settings, spec: BuildSpec, reuse: bool) -> None:
    where = (f"wheelhouse {settings.wheelhouse} (pushed to {HostLayout.of(settings).wheelhouse_dir}, --no-index)"
             if settings.wheelhouse else " ".join(a for a in spec.install if a.startswith(("http", "/", "file:"))) or "PyPI")
    torch = f"torch {spec.torch_version}" if spec.torch_version else "torch as vLLM requires"
    logger.info(f"{host.print_prefix}python env: vllm {spec.version} ({spec.channel}), {torch}, {spec.backend} build, "
                f"Python {spec.python} -> {spec.path} ({'present and intact' if reuse else 'to be built'}) from {where}")
    if not reuse:
        logger.info(f"{host.print_prefix}python env: uv pip install {shlex.join(spec.install)}")


@deploy("Python environment")
def _operations(settings: Settings, spec: BuildSpec, facts: StackState) -> Venv:
    lay = HostLayout.of(settings)
    program = lay.venv_program
    found = stack.reusable(spec, facts.venvs)
    _show(settings, spec, found is not None)

    if settings.wheelhouse:
        _push_wheelhouse(settings, facts)
    if facts.program_sha256 != hashlib.sha256(PROGRAM_SOURCE.read_bytes()).hexdigest():
        # {bin_dir} is the account step's (root:root 755); one FileStates read (pyinfra's files.put reads 2-3 facts,
        # again when it executes)
        managed_files(name=f"Ensure the venv program is installed at {program}",
                      files=[ManagedFile(program, PROGRAM_SOURCE, "root", "root", "755")])
    if facts.uv is None:
        uv_dir = lay.uv_dir
        source = PackageSource(no_index=True, find_links=(lay.wheelhouse_dir,)) if settings.wheelhouse else \
            PackageSource(index_url=settings.index_url, extra_index_urls=tuple(settings.extra_index_urls),
                          find_links=tuple(settings.find_links), no_index=settings.no_index)
        pip = shlex.join([lay.uv_pip, "install", "--disable-pip-version-check", "--quiet",
                          *stack.uv_bootstrap_args(source)])
        server.shell(name=f"Ensure uv is installed in {uv_dir} (bootstrap venv)",
                     commands=[f"rm -rf {shlex.quote(uv_dir)} && python3 -m venv {shlex.quote(uv_dir)} && {pip} && "
                               f"{shlex.quote(lay.uv)} --version"])

    if settings.channel == "source" and facts.git is None and found is None:
        # Only the source channel needs git; the lists are refreshed only when git must be installed,
        # so a converged host never runs apt again.
        apt.packages(name="Ensure git is installed (vllm_channel = \"source\" clones vLLM)", packages=["git"],
                     update=True, no_recommends=True)

    changed: OperationMeta | None = None
    if found is None:
        torch = spec.torch_version or "as vLLM requires"
        changed = server.shell(
            name=f"Ensure vLLM {spec.version} ({spec.channel}) with torch {torch} ({spec.backend}) is installed and verified in {spec.path}",
            commands=[f"python3 {shlex.quote(program)} build {shlex.quote(json.dumps(spec.to_json(), sort_keys=True))}"],
        )
    elif facts.partial:
        for name in facts.partial:
            files.directory(name=f"Ensure the unfinished build {name} is removed", path=lay.venv(name), present=False)

    current = found.name if found is not None else (spec.name if spec.channel != "nightly" else None)
    pruned = stack.to_prune(current, facts.venvs, settings.keep_venvs, building=found is None, in_use=facts.in_use)
    for name in pruned:
        files.directory(name=f"Ensure the old venv {name} is removed (keeping {settings.keep_venvs})",
                        path=lay.venv(name), present=False)
        if "-src." in name:
            files.directory(name=f"Ensure the checkout of the old venv {name} is removed",
                            path=lay.source_checkout(name), present=False)
    prev = stack.previous(current, facts.venvs)  # nightly being built: the newest usable venv before it
    return Venv(path=spec.path, changed=changed, previous_path=None if prev is None or prev.name in pruned else lay.venv(prev.name),
                spec=spec)
