"""The vLLM service: hardened unit + secret env file from the plan, restarted only on change, health-gated.

Operations, in order (names are what pyinfra prints):

Every path comes from vllm_fleet/layout.py (``HostLayout``).

1. the gate program (``{base_dir}/bin/vllm-fleet-gate``, stdlib Python) and its
   config (``/etc/vllm-fleet/<service>.gate.json``, no secret in it), the watchdog + GPU reaper
   (``{base_dir}/bin/vllm-fleet-watchdog``) and its config (``<service>.watchdog.json``);
   the companion units (``<service>-devices.service``, ``<service>-watchdog.service``);
2. the unit (``/etc/systemd/system/<service>.service``) and the env file
   (``/etc/vllm-fleet/<service>.env``, root:root 0600, a secret
   ``vllm_fleet.hostops.operations.ManagedFile``: compared by sha256, never shown, not even with
   --diff), all read in one ``FileStates`` fact;
3. the restart + health gate, only when the unit, env file, venv or weights
   changed in this run, or when a previous run left the host "pending" (live
   files differ from the last known good ones, or the service is not active).
   The gate runs on the host, detached from SSH; this side follows its
   progress, and on failure runs the doctor on the journal it returns and
   fails the host. Hosts are gated one at a time (``_serial``), or vllm_rolling_batch at a time, and a failed
   gate halts the rolling deploy: later hosts are not restarted (`service/rolling.py`: the record lives on the run's State);
4. the unit enabled at boot; the watchdog unit enabled and running (restarted when its files changed).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from pyinfra import host, logger
from pyinfra.api import QuoteString, StringCommand, deploy, operation
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS
from pyinfra.api.exceptions import OperationError
from pyinfra.facts.server import Command
from pyinfra.operations import files, python, systemd

from vllm_fleet.hostops.facts import FileStates, Read, read, read_once
from vllm_fleet.hostops.operations import (ManagedFile, login_home, managed_files, restart_on_change, secret_file,
                                          unit_running)
from vllm_fleet.handoff import Changed, HostState, Venv, WeightsResult, any_changed
from vllm_fleet.service import doctor
from vllm_fleet.service import hostprog as gate_program
from vllm_fleet.service import hostprog_watchdog as watchdog_program
from vllm_fleet.service.devices import HostDevices
from vllm_fleet.service.facts import CompanionUnits, NvidiaDevices
from vllm_fleet.layout import HostLayout
from vllm_fleet.pyenv import stack
from vllm_fleet.service.rolling import RollingHalt
from vllm_fleet.fleet import Route, local_url
from vllm_fleet.router import step as router_step
from vllm_fleet.service.render import REAP_GRACE_S, Rendered, render, served_name, start_timeout_s, uses_append_think
from vllm_fleet.settings import Settings

GATE_SOURCE = Path(gate_program.__file__)
WATCHDOG_SOURCE = Path(watchdog_program.__file__)


def venv_path(settings: Settings, venv: Venv | None, driver_cuda: str | None = None) -> str:
    """The venv the unit runs (python_env's Venv.path; without one, the path python_env would build,
    `stack.default_venv`, for the host driver's CUDA)."""
    return venv.path if venv is not None else stack.default_venv(settings, driver_cuda)


def systemd_version_of(state: HostState) -> int | None:
    v = state.snapshot.systemd_version or ""
    return int(v) if v.isdigit() else None


def service_files(settings: Settings, state: HostState, venv: Venv | None = None,
                  devices: HostDevices | None = None) -> tuple[Rendered, list[ManagedFile], list[ManagedFile],
                                                               list[ManagedFile]]:
    """(rendered, gate files, unit file, secret files): what `apply` installs, built without a host.
    The gate files include the watchdog program and its config; the companion units are `companion_files`."""
    lay = HostLayout.of(settings)
    gpu = state.snapshot.gpu
    rendered = render(settings, state.plan, venv_path(settings, venv, gpu.cuda_version if gpu else None),
                      systemd_version=systemd_version_of(state), devices=devices)
    gate_files = [
        ManagedFile(lay.gate_program, GATE_SOURCE, "root", "root", "755"),
        ManagedFile(lay.gate_config, json.dumps(gate_config(settings, state, rendered), indent=1, sort_keys=True) + "\n",
                    "root", settings.service_user, "640"),
        ManagedFile(lay.watchdog_program, WATCHDOG_SOURCE, "root", "root", "755"),
        ManagedFile(lay.watchdog_config, json.dumps(watchdog_config(settings, state), indent=1, sort_keys=True) + "\n",
                    "root", "root", "644"),
    ]
    unit = [ManagedFile(rendered.unit_path, rendered.unit, "root", "root", "644")]
    return rendered, gate_files, unit, [secret_file(rendered.env_path, rendered.env)]


def gate_config(settings: Settings, state: HostState, rendered: Rendered) -> dict:
    """What the host-side gate needs (no secret: it reads the key from the env file itself)."""
    lay = HostLayout.of(settings)
    return {
        "service": settings.service_name,
        "unit_path": rendered.unit_path,
        "env_path": rendered.env_path,
        "prev_dir": lay.config_dir,
        "state_dir": lay.state_dir,
        "log_file": lay.gate_log,
        "result_file": lay.gate_state,
        "url": gate_url(settings),
        "served_model_name": served_name(state.plan),
        "check_think": uses_append_think(state.plan),
        "timeout_s": settings.health_timeout_s or start_timeout_s(state.plan.weights_bytes),
        "stability_s": settings.gate_stability_s,
        "require_key": settings.api_key is not None,
    }


def companion_files(rendered: Rendered) -> list[ManagedFile]:
    """The device-node unit and the watchdog unit (root:root 0644, no secret)."""
    return [ManagedFile(path, text, "root", "root", "644") for path, text in rendered.units]


def watchdog_config(settings: Settings, state: HostState) -> dict:
    """What the watchdog and the GPU reaper need (no secret: they read the key from the env file themselves)."""
    lay = HostLayout.of(settings)
    url = gate_url(settings)
    return {
        "service": settings.service_name,
        "url": url,
        "served_model_name": served_name(state.plan),
        "env_path": lay.env_file,
        "user": settings.service_user,
        "gate_unit": lay.gate_unit,
        "interval_s": settings.watchdog_interval_s,
        "deadline_s": settings.watchdog_deadline_s,
        "misses": settings.watchdog_misses,
        "start_grace_s": settings.health_timeout_s or start_timeout_s(state.plan.weights_bytes),
        "gpus": list(settings.gpus) if settings.gpus is not None else None,
        "reap_grace_s": REAP_GRACE_S,
    }


def gate_url(settings: Settings) -> str:
    """http://ADDR:PORT the host's programs reach vLLM at (loopback when it binds every address)."""
    return local_url(settings.bind_host, settings.port)


def _pending_read(settings: Settings) -> Read:
    lay, q = HostLayout.of(settings), shlex.quote  # every path and name quoted: this fact runs under --dry too
    prev, env_prev, unit = q(lay.prev(lay.unit_path)), q(lay.prev(lay.env_file)), q(lay.unit_name)
    unit_path, env_path = q(lay.unit_path), q(lay.env_file)
    script = (f"systemctl is-enabled --quiet {unit} 2>/dev/null && echo enabled || echo disabled; "
              f"test -e {unit_path} || {{ echo fresh; exit 0; }}; "
              f"test -e {q(lay.weights_pending)} && {{ echo pending; exit 0; }}; "
              f"cmp -s {unit_path} {prev} && cmp -s {env_path} {env_prev} "
              f"&& systemctl is-active --quiet {unit} && echo clean || echo pending")
    return Read.of(Command, script, _sudo=host.data.get("_sudo", False))


def _pending(settings: Settings) -> tuple[bool, bool]:
    """(pending, enabled), read in one command. Pending: a previous run left the service unproven (live files differ
    from the last good, it is not active, or its restart was held back for incomplete weights). Enabled: the unit
    starts at boot."""
    words = (read(host, _pending_read(settings)) or "").split()
    return words[-1:] == ["pending"], words[:1] == ["enabled"]


def _files_read(settings: Settings) -> Read:
    """One FileStates fact for every file `apply` installs (`service_files`, `companion_files`), by the layout's paths."""
    lay = HostLayout.of(settings)
    return Read.of(FileStates, paths=sorted({lay.gate_program, lay.gate_config, lay.watchdog_program, lay.watchdog_config,
                                             lay.unit_path, lay.env_file, lay.devices_unit_path, lay.watchdog_unit_path}))


def reads(settings: Settings) -> list[Read]:
    """What `apply` reads of the host (deploy.py reads every step's facts in one round trip: `read_many`)."""
    return [Read.of(NvidiaDevices), _files_read(settings), _pending_read(settings),
            Read.of(CompanionUnits, units=[f"{HostLayout.of(settings).watchdog_unit}.service"])]


def _run_gate(state, host, command: str, drain: tuple | None = None) -> None:
    """Execute the host's gate, streaming its progress; on failure print the doctor's diagnosis and fail.

    + drain: (route, the URL the router reaches this replica at, this replica's loopback URL, drain timeout) when
      a router is in front of it: taken out of rotation first (in-flight requests finish), back once it passed
      the gate (or its rollback left the previous version healthy)."""
    halt = RollingHalt.of(state)  # this run's record of failed gates (the hosts before this one, gated serially)
    blocked = halt.blocked()
    if blocked:
        raise OperationError(blocked)
    op_data = state.get_op_data_for_host(host, host.executing_op_hash)
    args = {k: op_data.global_arguments[k] for k in CONNECTOR_ARGUMENT_KEYS if k in op_data.global_arguments}
    drained = drain is not None and router_step.drain(state, host, *drain)
    ok, output = host.run_shell_command(StringCommand(command), print_output=True, **args)
    if drained and (ok or _answers(host, drain[2])):
        router_step.undrain(state, host, drain[0], drain[1])
    if ok:
        return
    halt.record_failure(host.name)
    lines = [line.line for line in output]
    verdict = next((l for l in lines if l.startswith("gate verdict:")), lines[-1] if lines else "gate verdict: none (no output)")
    journal = _between(lines, gate_program.JOURNAL_BEGIN, gate_program.JOURNAL_END)
    found = doctor.diagnose(journal)
    for item in found:
        logger.error(f"{host.print_prefix}diagnosis [{item.severity}] {item.code}: {item.summary}")
        logger.error(f"{host.print_prefix}    evidence: {item.evidence}")
        logger.error(f"{host.print_prefix}    remedy:   {item.remedy}")
    if not found:
        logger.error(f"{host.print_prefix}diagnosis: no known vLLM failure in the journal; last lines above")
    first = f"; diagnosis: {found[0].code}: {found[0].remedy}" if found else ""
    raise OperationError(f"{verdict}{first}")


def _answers(host, url: str) -> bool:
    """/health of the replica's vLLM is 200 (after a failed gate: its rollback left the previous version serving)."""
    ok, output = host.run_shell_command(StringCommand(router_step.http_script("GET", f"{url}/health", 5)), print_output=False)
    return ok and output.stdout.startswith("200")


def _between(lines: list[str], begin: str, end: str) -> str:
    """The text between two marker lines."""
    try:
        start = lines.index(begin) + 1
    except ValueError:
        return ""
    stop = lines.index(end, start) if end in lines[start:] else len(lines)
    return "\n".join(lines[start:stop])


def _changed(*values: Changed | None):
    """An `_if` callable: any of the values changed something (None entries ignored)."""
    return any_changed(*values)


@deploy("vLLM service and health gate")
def apply(settings: Settings, state: HostState, venv: Venv | None, weights: WeightsResult,
          route: Route | None = None) -> None:
    """Install the unit and env file, restart + gate when they, the venv or the weights changed, enable it.

    + venv: what vllm_fleet/pyenv/step.py built (``.path``, ``.changed``), or None to serve the venv python_env
      would build (``stack.default_venv``)
    + weights: what vllm_fleet/weights/step.py placed (``.changed``, ``.ready``, ``.reason``)
    + route: the router in front of this replica (`Topology.route_of`), None without one: a restart is drained there
    """
    lay = HostLayout.of(settings)
    devices = read(host, Read.of(NvidiaDevices))
    rendered, gate_files, service_files_, secrets = service_files(settings, state, venv, devices)
    companions = companion_files(rendered)
    gate_bin, gate_json = lay.gate_program, lay.gate_config
    # One FileStates fact for all of them, handed to each (managed_files refuses a file it was not read for).
    states = read(host, _files_read(settings))
    programs = managed_files(name="Ensure the health-gate and watchdog programs and their configs are current",
                             files=gate_files, states=states)
    units = managed_files(name="Ensure the device-node and watchdog units are current", files=companions, states=states)
    unit = managed_files(name=f"Ensure the unit {Path(rendered.unit_path).name} is current", files=service_files_, states=states)
    env = managed_files(name="Ensure the secrets file is current (content not shown)",
                        files=secrets, states=states)

    pending, enabled = _pending(settings)
    changed = _changed(unit, env, venv.changed if venv is not None else None, weights.changed)
    marker = lay.weights_pending
    if not weights.ready:
        # vllm_weights_wait=False and the download is not complete: never (re)start vLLM on partial weights.
        logger.warning(f"{host.print_prefix}service: {settings.service_name}.service is not (re)started: "
                       f"{weights.reason}; rerun the deploy once the download is complete")
        files.file(name=f"Hold back the restart of {settings.service_name}.service until the weights are complete "
                        f"({marker})", path=marker, present=True, user="root", group="root", mode="644")
    else:
        python.call(
            name=f"Restart {settings.service_name} and pass the health gate (rollback on failure)",
            function=_run_gate,
            command=f"/usr/bin/python3 {shlex.quote(gate_bin)} apply {shlex.quote(gate_json)} && rm -f {shlex.quote(marker)}",
            drain=(route, route.upstream_url(host.name), gate_url(settings), settings.rolling_drain_timeout_s)
            if route is not None else None,
            _if=lambda: pending or changed(),
            # a rolling change: one host at a time, or batches of vllm_rolling_batch hosts
            # (pyinfra's _parallel: each batch finishes before the next starts; a failed gate halts the rest)
            **({"_serial": True} if settings.rolling_batch == 1 else {"_parallel": settings.rolling_batch}),
        )
    unit_enabled(name=f"Ensure {lay.unit_name} starts at boot", service=lay.unit_name, enabled=enabled)
    watchdog = f"{lay.watchdog_unit}.service"
    seen = read(host, Read.of(CompanionUnits, units=[watchdog])) or {}
    if settings.watchdog:
        restart_on_change(watchdog, "its program, config or unit", _changed(programs, units))
        unit_running(name=f"Ensure {watchdog} is enabled and running", unit=watchdog,
                         seen=seen.get(watchdog, ("", "")))
    else:
        unit_stopped(name=f"Ensure {watchdog} is stopped and disabled (vllm_watchdog = False)", unit=watchdog)
        files.file(name=f"Ensure {lay.watchdog_unit_path} is absent (vllm_watchdog = False)", path=lay.watchdog_unit_path,
                   present=False)


@operation()
def unit_enabled(service: str, enabled: bool):
    """Ensure a unit is enabled; ``enabled`` is what the host said before the run (read with the pending check)."""
    if enabled:
        host.noop(f"{service} is enabled")
    else:
        yield StringCommand("systemctl", "enable", "--", QuoteString(service))


def removal(settings: Settings, others: list[str] | tuple[str, ...] = (), login_home: str = "/root"):
    """What uninstall removes and keeps: `HostLayout.uninstall_targets` for this host's purge settings, the
    other services deployed on it and the SSH login user's home (its secret-upload staging directory)."""
    return HostLayout.of(settings).uninstall_targets(purge_venvs=settings.purge_venvs, purge_weights=settings.purge_weights,
                                                     others=others, login_home=login_home)


def _other_services(lay: HostLayout) -> list[str]:
    """Other services deployed on this host (their gate configs in config_dir); no operation of uninstall changes them."""
    out = host.get_fact(Command, f"ls -1 {shlex.quote(lay.config_dir)}/*.gate.json 2>/dev/null; true",
                        _sudo=host.data.get("_sudo", False)) or ""
    return [n for n in lay.deployed_services(out.split()) if n != lay.service]


@deploy("Remove the vLLM service")
def remove(settings: Settings) -> None:
    """Stop and disable the service and the download unit, then remove what the layout says a deploy created
    (`removal`): venvs only with vllm_purge_venvs, weights and caches only with vllm_purge_weights."""
    lay = HostLayout.of(settings)
    others = _other_services(lay)
    if others:
        logger.info(f"{host.print_prefix}uninstall: {', '.join(others)} also deployed here: the shared programs, "
                    f"download worker, uv, wheelhouse and weights state stay")
    for unit in (f"{lay.front_unit}.service", f"{lay.prober_unit}.service", f"{lay.router_unit}.service",
                 f"{lay.watchdog_unit}.service", lay.unit_name, f"{lay.fetch_unit}.service", f"{lay.devices_unit}.service"):
        unit_stopped(name=f"Ensure {unit} is stopped and disabled", unit=unit)
    units = []
    for t in removal(settings, others, login_home()):
        if not t.remove:
            continue
        op = files.file if t.kind == "file" else files.directory
        meta = op(name=f"Ensure {t.path} is absent ({t.why})", path=t.path, present=False)
        if t.path in (lay.unit_path, lay.fetch_unit_path, lay.watchdog_unit_path, lay.devices_unit_path, lay.router_unit_path,
                      lay.prober_unit_path, lay.front_unit_path):
            units.append(meta)
    systemd.daemon_reload(name="Reload systemd after removing the units", _if=_changed(*units))


@operation()
def unit_stopped(unit: str):
    """Stop and disable a unit if the host runs or enables it (one command to read; a no-op when absent)."""
    q = shlex.quote(unit)
    out = read_once(host, Command, f"echo active=$(systemctl is-active {q} 2>/dev/null); "
                                   f"echo enabled=$(systemctl is-enabled {q} 2>/dev/null)",
                    _sudo=host.data.get("_sudo", False)) or ""
    seen = dict(line.partition("=")[::2] for line in out.splitlines())
    running = seen.get("active", "") in ("active", "activating", "reloading", "deactivating")
    enabled = seen.get("enabled", "").startswith(("enabled", "linked", "alias"))
    if running:
        yield StringCommand("systemctl", "stop", "--", QuoteString(unit))
    if enabled:
        yield StringCommand("systemctl", "disable", "--", QuoteString(unit))
    if not running and not enabled:
        host.noop(f"{unit} is stopped and disabled")
