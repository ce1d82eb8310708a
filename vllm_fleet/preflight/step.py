"""Preflight: read the host in one round trip, plan on its real GPUs, stop everything if anything is wrong.

Adds no operation. It runs while pyinfra plans, so a problem on any host ends
the run before any host is changed.
"""

from __future__ import annotations

import shlex

from pyinfra import host, logger
from pyinfra.facts.server import Command

from vllm_fleet.layout import HostLayout
from vllm_fleet.hostops.abort import abort
from vllm_fleet.hostops.facts import Read, cgroup_peers_script, read
from vllm_fleet.preflight import checks as preflight
from vllm_fleet.errors import FleetError, PreflightError
from vllm_fleet.preflight.facts import HostSnapshot
from vllm_fleet.planner.hardware import Hardware
from vllm_fleet.preflight.parse import Snapshot
from vllm_fleet.planner.plan import Plan, make_plan
from vllm_fleet.settings import Settings
from vllm_fleet.handoff import HostState, ModelSource
from vllm_fleet.weights.source import FetchPlan


def reads(settings: Settings, model: ModelSource) -> list[Read]:
    """What `run` reads of the host (deploy.py reads every step's facts in one round trip: `read_many`)."""
    return [_snapshot_read(settings, model), _ours_read(settings)]


def _snapshot_read(settings: Settings, model: ModelSource) -> Read:
    fetch = model.fetch
    lay = HostLayout.of(settings)
    return Read.of(HostSnapshot, paths=[lay.base_dir, lay.data_dir],
                   weights=(fetch.program, fetch.config_path) if fetch is not None and fetch.downloads else None,
                   units=lay.units, user=settings.service_user)


def run(settings: Settings, model: ModelSource) -> HostState:
    """Gather the host's snapshot, plan on its selected GPUs, check both; return them.

    + model: vllm_fleet/weights/step.py `source` (its serve path is what `vllm serve` is given on
      the host, "" for the profile's repo id; its fetch plan says which weights to verify).
    """
    fetch = model.fetch
    model_path = model.serve_path or None
    lay = HostLayout.of(settings)
    snap = read(host, _snapshot_read(settings, model))
    problems = preflight.check(settings, snap, ours=_ours(settings))
    owned, notes = preflight.check_ownership(settings, snap, lay.units)
    problems += owned
    plan = None
    if not problems:
        try:
            plan = _plan(settings, snap, model_path)
        except FleetError as exc:
            problems.append(f"cannot plan: {exc}")
    if plan is not None:
        problems += [f"plan {f.code}: {f.message}; remedy: {f.remedy}" for f in plan.errors]
        present = _weights_present(settings, snap, fetch, plan.weights_bytes)
        problems += preflight.check_disk(settings, snap, weights_bytes=plan.weights_bytes, present_bytes=present)
    if problems:
        abort(PreflightError(host.name, problems))
    for note in notes:
        logger.warning(f"{host.print_prefix}preflight: {note}")
    _show(settings, plan)
    return HostState(snap, plan)


def _weights_present(settings: Settings, snap: Snapshot, fetch: FetchPlan | None, weights_bytes: int) -> int:
    """Weights bytes already on the host (verified files + partials, read in the snapshot's round trip); logged when not zero."""
    if fetch is None:
        return 0
    if not fetch.downloads:
        return weights_bytes  # a directory already on the host, served in place: nothing to store
    present = preflight.weights_on_host(snap.weights_check, fetch.config["identity"], weights_bytes)
    if present:
        chk = snap.weights_check or {}
        state = ("complete and verified" if chk.get("complete") else
                 f"partly present ({int(chk.get('verified_bytes') or 0) / 1024**3:.2f} GiB verified, "
                 f"{int(chk.get('partial_bytes') or 0) / 1024**3:.2f} GiB in partial files the download continues)")
        logger.info(f"{host.print_prefix}preflight: the weights in {fetch.serve_path} are {state} on the host; "
                    f"the disk check asks {max(0, weights_bytes - present) / 1024**3:.2f} GiB for them "
                    f"(not the planned {weights_bytes / 1024**3:.2f} GiB)")
    return present


def _ours_read(settings: Settings) -> Read:
    q = shlex.quote  # every value from a setting is quoted: this runs under --dry too
    unit, user, port = HostLayout.of(settings).unit_name, settings.service_user, int(settings.port)
    return Read.of(Command, (
        f"pid=$(systemctl show -p MainPID --value {q(unit)} 2>/dev/null); "
        f'if [ -n "$pid" ] && [ "$pid" != 0 ]; then {cgroup_peers_script("$pid")}; '  # the unit's processes
        f'u=$(id -u {q(user)}); '
        f'ss -Htlne "sport = :{port}" | grep -q " uid:$u " && echo port; fi; true'
    ))


def _ours(settings: Settings) -> preflight.Ours:
    """What this deploy's own service holds (its PIDs; its port, known from the socket's uid): a rerun must not fail on it."""
    port = int(settings.port)
    out = read(host, _ours_read(settings)) or ""
    words = out.split()
    return preflight.Ours(pids=[int(w) for w in words if w.isdigit()], port=port if "port" in words else None)


def _show(settings: Settings, plan: Plan) -> None:
    """The host's plan in a few lines (the full table: `vllm-fleet plan`)."""
    lay, mem = plan.layout, plan.memory_per_gpu
    gib = 1024**3
    gpus = settings.cuda_visible_devices or "all"
    logger.info(
        f"{host.print_prefix}plan: {plan.model} on GPUs {gpus}, TP={lay.tensor_parallel_size} PP={lay.pipeline_parallel_size} "
        f"DP={lay.data_parallel_size} EP={'on' if lay.expert_parallel else 'off'}; max-model-len {plan.max_model_len} "
        f"(fits {plan.max_model_len_that_fits}); per GPU: weights {mem.weights / gib:.2f} GiB, KV {mem.available_for_kv / gib:.2f} GiB"
    )
    logger.info(f"{host.print_prefix}plan: {' '.join(plan.argv)}")
    for f in plan.warnings:
        logger.warning(f"{host.print_prefix}plan warning {f.code}: {f.message} (remedy: {f.remedy})")


def _plan(settings: Settings, snap: Snapshot, model_path: str | None) -> Plan:
    gpus = {g.index: g for g in snap.gpu.gpus}
    selected = settings.gpus if settings.gpus is not None else sorted(gpus)
    hardware = Hardware.from_facts([
        {"name": gpus[i].name, "memory_total_mib": gpus[i].memory_total_mib, "compute_cap": gpus[i].compute_capability}
        for i in selected
    ])
    return make_plan(settings.model, hardware, settings.plan_options(model_path))
