"""The vLLM service: hardened unit + secret env file from the plan, restarted only on change, health-gated.

Operations, in order (names are what pyinfra prints):

1. the gate program (``{base_dir}/bin/vllm-fleet-gate``, stdlib Python) and its
   config (``/etc/vllm-fleet/<service>.gate.json``, no secret in it);
2. the unit (``/etc/systemd/system/<service>.service``) and the env file
   (``/etc/vllm-fleet/<service>.env``, root:<user> 0640, a secret
   ``vllm_fleet.hostops.operations.ManagedFile``: compared by sha256, never shown, not even with
   --diff), all read in one ``FileStates`` fact;
3. the restart + health gate, only when the unit, env file, venv or weights
   changed in this run, or when a previous run left the host "pending" (live
   files differ from the last known good ones, or the service is not active).
   The gate runs on the host, detached from SSH; this side follows its
   progress, and on failure runs the doctor on the journal it returns and
   fails the host. Hosts are gated one at a time (``_serial``) and a failed
   gate halts the rolling deploy: later hosts are not restarted;
4. the unit enabled at boot.
"""

from __future__ import annotations

import json
from pathlib import Path

from pyinfra import host, logger
from pyinfra.api import StringCommand, deploy, operation
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS
from pyinfra.api.exceptions import OperationError
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.server import Command
from pyinfra.operations import files, python, systemd

from vllm_fleet.hostops.operations import ManagedFile, managed_files
from vllm_fleet.preflight.step import HostState
from vllm_fleet.service import doctor
from vllm_fleet.service import hostprog as gate_program
from vllm_fleet.service.render import CONFIG_DIR, Rendered, render, served_name, start_timeout_s, uses_append_think
from vllm_fleet.settings import Settings

GATE_SOURCE = Path(gate_program.__file__)
_HALTED: list[str] = []  # hosts whose gate failed in this run: later hosts are not restarted


def venv_path(settings: Settings, venv) -> str:
    """The venv the unit runs (python_env's Venv.path; without one, the version's default path)."""
    return venv.path if venv is not None else f"{settings.base_dir}/venvs/vllm-{settings.version}"


def gate_config(settings: Settings, state: HostState, rendered: Rendered) -> dict:
    """What the host-side gate needs (no secret: it reads the key from the env file itself)."""
    bind = settings.bind_host
    addr = "127.0.0.1" if bind == "0.0.0.0" else "[::1]" if bind == "::" else f"[{bind}]" if ":" in bind else bind
    return {
        "service": settings.service_name,
        "unit_path": rendered.unit_path,
        "env_path": rendered.env_path,
        "prev_dir": CONFIG_DIR,
        "state_dir": f"{settings.base_dir}/state",
        "url": f"http://{addr}:{settings.port}",
        "served_model_name": served_name(state.plan),
        "check_think": uses_append_think(state.plan),
        "timeout_s": settings.health_timeout_s or start_timeout_s(state.plan.weights_bytes),
        "require_key": settings.api_key is not None,
    }


def _weights_marker(settings: Settings) -> str:
    """Left by a run that did not restart the service because the weights were incomplete; the next gate clears it."""
    return f"{settings.base_dir}/state/{settings.service_name}.weights-pending"


def _pending(settings: Settings, rendered: Rendered) -> tuple[bool, bool]:
    """(pending, enabled), read in one command. Pending: a previous run left the service unproven (live files differ
    from the last good, it is not active, or its restart was held back for incomplete weights). Enabled: the unit
    starts at boot."""
    prev = f"{CONFIG_DIR}/{Path(rendered.unit_path).name}.prev"
    env_prev = f"{rendered.env_path}.prev"
    unit = f"{settings.service_name}.service"
    script = (f"systemctl is-enabled --quiet {unit} 2>/dev/null && echo enabled || echo disabled; "
              f"test -e {rendered.unit_path} || {{ echo fresh; exit 0; }}; "
              f"test -e {_weights_marker(settings)} && {{ echo pending; exit 0; }}; "
              f"cmp -s {rendered.unit_path} {prev} && cmp -s {rendered.env_path} {env_prev} "
              f"&& systemctl is-active --quiet {unit} && echo clean || echo pending")
    words = (host.get_fact(Command, script, _sudo=host.data.get("_sudo", False)) or "").split()
    return words[-1:] == ["pending"], words[:1] == ["enabled"]


def _run_gate(state, host, command: str) -> None:
    """Execute the host's gate, streaming its progress; on failure print the doctor's diagnosis and fail."""
    if _HALTED:
        raise OperationError(f"not restarted: the rolling deploy halted after {', '.join(_HALTED)} failed its health gate")
    op_data = state.get_op_data_for_host(host, host.executing_op_hash)
    args = {k: op_data.global_arguments[k] for k in CONNECTOR_ARGUMENT_KEYS if k in op_data.global_arguments}
    ok, output = host.run_shell_command(StringCommand(command), print_output=True, **args)
    if ok:
        return
    _HALTED.append(host.name)
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


def _between(lines: list[str], begin: str, end: str) -> str:
    """The text between two marker lines."""
    try:
        start = lines.index(begin) + 1
    except ValueError:
        return ""
    stop = lines.index(end, start) if end in lines[start:] else len(lines)
    return "\n".join(lines[start:stop])


def _changed(*metas: OperationMeta | None):
    """An `_if` callable: any of the operations changed something (None entries ignored)."""
    real = [m for m in metas if m is not None]
    return lambda: any(m.did_change() for m in real)


@deploy("vLLM service and health gate")
def apply(settings: Settings, state: HostState, venv, weights_changed: OperationMeta | None) -> None:
    """Install the unit and env file, restart + gate when they, the venv or the weights changed, enable it.

    + venv: vllm_fleet.pyenv.step.Venv (``.path``, ``.changed``), or None to serve ``{base_dir}/venvs/vllm-{version}``
    + weights_changed: the weights role's sync operation (or None)
    """
    systemd_version = int(state.snapshot.systemd_version) if (state.snapshot.systemd_version or "").isdigit() else None
    rendered = render(settings, state.plan, venv_path(settings, venv), systemd_version=systemd_version)
    user, base = settings.service_user, settings.base_dir
    gate_bin = f"{base}/bin/vllm-fleet-gate"
    gate_json = f"{CONFIG_DIR}/{settings.service_name}.gate.json"

    gate_files = [
        ManagedFile(gate_bin, GATE_SOURCE, "root", "root", "755"),
        ManagedFile(gate_json, json.dumps(gate_config(settings, state, rendered), indent=1, sort_keys=True) + "\n",
                    "root", user, "640"),
    ]
    service_files = [ManagedFile(rendered.unit_path, rendered.unit, "root", "root", "644")]
    secrets = [ManagedFile(rendered.env_path, rendered.env, "root", user, "640", secret=True)]
    every = [f.path for f in gate_files + service_files + secrets]  # one FileStates fact for all three
    managed_files(name="Ensure the health-gate program and its config are current",
                  files=gate_files, read_with=every)
    unit = managed_files(name=f"Ensure the unit {Path(rendered.unit_path).name} is current", files=service_files, read_with=every)
    env = managed_files(name="Ensure the secrets file is current (content not shown)",
                        files=secrets, read_with=every)

    pending, enabled = _pending(settings, rendered)
    changed = _changed(unit, env, getattr(venv, "changed", None), weights_changed)
    marker = _weights_marker(settings)
    if not getattr(weights_changed, "ready", True):
        # vllm_weights_wait=False and the download is not complete: never (re)start vLLM on partial weights.
        logger.warning(f"{host.print_prefix}service: {settings.service_name}.service is not (re)started: "
                       f"{weights_changed.reason}; rerun the deploy once the download is complete")
        files.file(name=f"Hold back the restart of {settings.service_name}.service until the weights are complete "
                        f"({marker})", path=marker, present=True, user="root", group="root", mode="644")
    else:
        python.call(
            name=f"Restart {settings.service_name} and pass the health gate (rollback on failure)",
            function=_run_gate,
            command=f"/usr/bin/python3 {gate_bin} apply {gate_json} && rm -f {marker}",
            _if=lambda: pending or changed(),
            _serial=True,
        )
    unit_enabled(name=f"Ensure {settings.service_name}.service starts at boot",
                 service=f"{settings.service_name}.service", enabled=enabled)


@operation()
def unit_enabled(service: str, enabled: bool):
    """Ensure a unit is enabled; ``enabled`` is what the host said before the run (read with the pending check)."""
    if enabled:
        host.noop(f"{service} is enabled")
    else:
        yield StringCommand("systemctl", "enable", service)


@deploy("Remove the vLLM service")
def remove(settings: Settings) -> None:
    """Stop and disable the service, delete its unit, env files and gate; venvs/weights only when purge_* is set."""
    name = settings.service_name
    unit_path = f"/etc/systemd/system/{name}.service"
    systemd.service(name=f"Ensure {name}.service is stopped and disabled", service=f"{name}.service",
                    running=False, enabled=False)
    paths = [unit_path, f"{CONFIG_DIR}/{name}.service.prev", f"{CONFIG_DIR}/{name}.env", f"{CONFIG_DIR}/{name}.env.prev",
             f"{CONFIG_DIR}/{name}.gate.json", f"{settings.base_dir}/state/{name}.gate.log",
             f"{settings.base_dir}/state/{name}.gate.json"]
    removed = [files.file(name=f"Ensure {path} is absent", path=path, present=False) for path in paths]
    systemd.daemon_reload(name="Reload systemd after removing the unit", _if=_changed(*removed))
    if settings.purge_venvs:
        files.directory(name=f"Ensure the venvs under {settings.base_dir}/venvs are absent (vllm_purge_venvs)",
                        path=f"{settings.base_dir}/venvs", present=False)
    if settings.purge_weights:
        for sub in ("models", "cache"):
            files.directory(name=f"Ensure {settings.data_dir}/{sub} is absent (vllm_purge_weights)",
                            path=f"{settings.data_dir}/{sub}", present=False)
