"""Render the vLLM unit and its env file from Settings + Plan: pure, the same text the deploy installs.

    files = render(settings, plan, venv_path="/opt/vllm-fleet/venvs/vllm-0.25.0-cu130")
    files.unit          # /etc/systemd/system/<service>.service
    files.env           # /etc/vllm-fleet/<service>.env  (secrets)
    files.units         # the companion units: <service>-devices.service, <service>-watchdog.service
    render(..., show_secrets=False).env   # the same with placeholders, for display

No host, no pyinfra: `vllm-fleet render` and vllm_fleet/service/step.py call this, so
what a user inspects is byte for byte what the host gets (less the secrets).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2

from vllm_fleet.errors import FleetError
from vllm_fleet.layout import HostLayout, venv_bin
from vllm_fleet.planner import options as serve_options
from vllm_fleet.planner.plan import Plan
from vllm_fleet.service.devices import HostDevices
from vllm_fleet.settings import Settings

TEMPLATES = Path(__file__).resolve().parent / "templates"
GiB = 1024**3

# systemd 254 added RestartSteps= / RestartMaxDelaySec= (Debian 12 has 252, Ubuntu 22.04 249).
RESTART_STEPS_MIN_SYSTEMD = 254
# Devices vLLM needs, as /proc/devices group names (fnmatch): nvidia-frontend/nvidia (GPUs, nvidiactl),
# nvidia-uvm (unified memory), nvidia-caps (MIG capabilities), nvidia-nvlink / nvidia-nvswitch (fabric).
DEVICE_ALLOW = ("char-nvidia* rw",)
# Where the host has them: InfiniBand verbs/umad (char groups infiniband_verbs, infiniband_mad) and the RDMA
# connection manager (a misc device, so by path) for NCCL over IB; GDRCopy's gdrdrv for GPUDirect RDMA.
DEVICE_ALLOW_IB = ("char-infiniband* rw", "/dev/infiniband/rdma_cm rw")
DEVICE_ALLOW_GDR = ("char-gdrdrv rw",)
PERSISTENCED = "nvidia-persistenced.service"
# TimeoutStartSec: with Type=exec it covers ExecStartPre (the GPU reaper: SIGTERM, REAP_GRACE_S, SIGKILL, then
# waiting for the memory to be released) and the exec of vLLM, not vLLM's own start (the gate bounds that).
REAP_GRACE_S = 30
TIMEOUT_PRESTART_S = 120
START_BASE_S = 600  # imports, engine init, torch.compile, graph capture (92-145 s measured for a tiny model on H200) x margin
START_S_PER_GIB = 6  # reading weights from a cold disk at about 170 MiB/s
PLACEHOLDER = "<secret: set from {setting}, not shown>"
_SAFE_WORD = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


class RenderError(FleetError):
    """A value that cannot be written into a unit or env file safely."""


@dataclass(frozen=True)
class Rendered:
    """The files of one service: their text and where they go on the host."""

    unit_path: str
    unit: str
    env_path: str
    env: str
    units: tuple[tuple[str, str], ...] = ()  # (path, text) of the companion units (device nodes, watchdog)


def start_timeout_s(weights_bytes: int) -> int:
    """TimeoutStartSec and the health gate's wait: a fixed start cost plus reading the weights."""
    return START_BASE_S + START_S_PER_GIB * math.ceil(weights_bytes / GiB)


def systemd_word(word: str) -> str:
    """One ExecStart= word, quoted for systemd: `$` and `%` escaped, quotes/spaces inside double quotes."""
    if any(c in word for c in "\n\r\x00"):
        raise RenderError(f"argument {word!r} holds a line break or NUL, which a unit file cannot carry")
    word = word.replace("%", "%%").replace("$", "$$")
    if word and _SAFE_WORD.match(word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_assignment(name: str, value: str) -> str:
    """One Environment= value ("NAME=value", quoted, `%` escaped)."""
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
        raise RenderError(f"environment name {name!r} is not a valid variable name")
    if any(c in value for c in "\n\r\x00"):
        raise RenderError(f"environment value of {name} holds a line break or NUL")
    text = f"{name}={value}".replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def env_file_value(name: str, value: str) -> str:
    """A value for an EnvironmentFile line: double-quoted, backslash and quote escaped."""
    if any(c in value for c in "\n\r\x00"):
        raise RenderError(f"{name} holds a line break or NUL, which an EnvironmentFile cannot carry")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def service_environment(settings: Settings, plan: Plan) -> dict[str, str]:
    """The service's non-secret environment: the plan's, GPUs, caches under data_dir, then extra_env."""
    lay = HostLayout.of(settings)
    env = dict(plan.env)
    if settings.cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = settings.cuda_visible_devices
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # indices as nvidia-smi numbers them
    env.update(lay.runtime_env)  # caches under data_dir (layout.RUNTIME_ENV)
    if plan.model_path.startswith("/"):
        # The weights are a directory on the host (the weights role put them there): vLLM needs
        # no hub, and on air-gapped hosts a hub lookup only waits for timeouts (found on the
        # GPU validation host, docs/gpu-validation.md).
        env["HF_HUB_OFFLINE"] = "1"
    env.update(settings.extra_env)
    return env


def secret_checks(settings: Settings) -> list[str]:
    """ExecStartPre= commands that refuse to start vLLM when a secret the deploy sets is missing or empty in the
    EnvironmentFile (a truncated or emptied file must not start an unauthenticated server).

    systemd has loaded the EnvironmentFile into the environment of every Exec command: the shell tests the
    variable (``$$`` is systemd's escape of ``$``), so the value is in no argv; nothing from a setting is in the
    script, only the variable names of the options table's secret rows.
    """
    names = [row.env for row in serve_options.rows(secret=True) if row.env and getattr(settings, row.key) is not None]
    if not names:
        return []
    tests = " && ".join(f'test -n "$${{{name}}}"' for name in names)
    return [f"/bin/sh -c '{tests} || {{ echo \"vllm-fleet: {' or '.join(names)} is missing or empty in the "
            f"EnvironmentFile although the deploy sets it: refusing to start\" >&2; exit 1; }}'"]


def exec_argv(plan: Plan, venv_path: str) -> list[str]:
    """The plan's argv with the venv's vllm as the program."""
    argv = plan.argv
    if argv[:2] != ["vllm", "serve"]:
        raise RenderError(f"the plan's argv starts {argv[:2]}, not ['vllm', 'serve']")
    return [venv_bin(venv_path, "vllm"), *argv[1:]]


@functools.cache
def _jinja() -> jinja2.Environment:
    """One environment per process: jinja2 compiles each template once for every host of a run."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def device_allow(devices: HostDevices) -> list[str]:
    """DeviceAllow= lines: the NVIDIA groups, plus InfiniBand and gdrdrv where the host has them."""
    return [*DEVICE_ALLOW, *(DEVICE_ALLOW_IB if devices.infiniband else ()), *(DEVICE_ALLOW_GDR if devices.gdrdrv else ())]


def reap_command(settings: Settings) -> str | None:
    """The ExecStartPre= of the GPU reaper ('+': root, unsandboxed), or None when vllm_reap_gpu_leftovers is off."""
    if not settings.reap_gpu_leftovers:
        return None
    lay = HostLayout.of(settings)
    return f"+/usr/bin/python3 {lay.watchdog_program} reap {lay.watchdog_config}"


def render(settings: Settings, plan: Plan, venv_path: str, *, systemd_version: int | None = None,
           show_secrets: bool = True, devices: HostDevices | None = None) -> Rendered:
    """The unit and env file of ``settings.service_name`` for ``plan`` served from ``venv_path``, and the
    companion units (the device-node unit; the watchdog unit when ``vllm_watchdog``).

    + systemd_version: the host's systemd (None: assume the oldest supported, 249); gates
      directives newer systemd versions added.
    + show_secrets: False replaces the API key and HF token by a placeholder (for display).
    + devices: the host's NvidiaDevices fact (None: no host asked: nvidia-modprobe at its usual path, no
      nvidia-persistenced, no InfiniBand or gdrdrv).
    """
    lay = HostLayout.of(settings)
    devices = devices or HostDevices()
    unit_name = lay.unit_name
    env_path = lay.env_file
    jinja = _jinja()
    restart_steps = (systemd_version or 0) >= RESTART_STEPS_MIN_SYSTEMD
    after = [f"{lay.devices_unit}.service", *([PERSISTENCED] if devices.persistenced else [])]
    unit = jinja.get_template("vllm.service.j2").render(
        after=after,
        exec_start_pre=reap_command(settings),
        timeout_prestart_s=TIMEOUT_PRESTART_S,
        unit_name=unit_name,
        served_model_name=served_name(plan),
        user=settings.service_user,
        working_directory=lay.home,
        exec_start=" ".join(systemd_word(w) for w in exec_argv(plan, venv_path)),
        environment=[systemd_assignment(k, v) for k, v in service_environment(settings, plan).items()],
        env_file=env_path,
        secret_checks=secret_checks(settings),
        restart_sec=settings.restart_sec,
        restart_steps=5 if restart_steps else 0,
        restart_max_delay_s=max(settings.restart_max_delay_s, settings.restart_sec),
        weights_gib=f"{plan.weights_bytes / GiB:.1f}",
        timeout_start_s=start_timeout_s(plan.weights_bytes),
        timeout_stop_s=90,
        limit_nofile=1048576,
        read_write_paths=[lay.cache_dir],
        device_allow=device_allow(devices),
        weights_marker=weights_marker(settings, plan),
    )
    units = [(lay.devices_unit_path, jinja.get_template("vllm-devices.service.j2").render(
        unit_name=f"{lay.devices_unit}.service", service_unit=unit_name,
        after=[PERSISTENCED] if devices.persistenced else [],
        nvidia_modprobe=devices.nvidia_modprobe or "/usr/bin/nvidia-modprobe"))]
    if settings.watchdog:
        units.append((lay.watchdog_unit_path, jinja.get_template("vllm-watchdog.service.j2").render(
            unit_name=f"{lay.watchdog_unit}.service", service_unit=unit_name, program=lay.watchdog_program,
            config=lay.watchdog_config, interval_s=settings.watchdog_interval_s, deadline_s=settings.watchdog_deadline_s,
            misses=settings.watchdog_misses)))
    secrets = []
    for row in serve_options.rows(secret=True):  # the secret rows of the options table, by their variable
        value = getattr(settings, row.key)
        if value is None or row.env is None:
            continue
        shown = value.get_secret_value() if show_secrets else PLACEHOLDER.format(setting=f"vllm_{row.key}")
        secrets.append((row.env, env_file_value(row.env, shown)))
    env = jinja.get_template("vllm.env.j2").render(env_file=env_path, unit_name=unit_name, user=settings.service_user,
                                                   secrets=secrets)
    return Rendered(lay.unit_path, unit, env_path, env, tuple(units))


def weights_marker(settings: Settings, plan: Plan) -> str | None:
    """The "complete and verified" marker of the revision directory the unit serves, when the deploy downloads the
    weights (``vllm_weights_sources``); the unit asserts it (docs/weights.md). None otherwise."""
    if not settings.weights_sources or settings.weights_sources[0].kind == "local":
        return None
    return HostLayout.of(settings).weights_marker_of(plan.model_path)


def served_name(plan: Plan) -> str:
    """The model id clients send (the plan's --served-model-name)."""
    return plan.served_model_name


def uses_append_think(plan: Plan) -> bool:
    """True when the plan serves with minimax_m2_append_think (the gate then checks <think> in content)."""
    return plan.reasoning_parser == "minimax_m2_append_think"
