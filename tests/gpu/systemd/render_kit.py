#!/usr/bin/env python3
"""Control-machine side of the systemd mode: what a deploy installs on the GPU host, rendered by the toolkit.

    .venv/bin/python tests/gpu/systemd/render_kit.py render OUTDIR [NAME=VALUE ...]  # before the device calls
    .venv/bin/python tests/gpu/systemd/render_kit.py compare RESULTS_DIR  # after: vLLM's KV lines vs the plan

``render`` builds Settings for the GPU validation host (1x H200 as nvidia-smi reports it there, systemd 252,
the tiny MiniMax-M2 model of tests/gpu/make_tiny_model.py at the layout's model path, the launcher venv at the
path python_env would build) and calls the service step's own ``service_files`` and ``companion_files``
(vllm_fleet/service/step.py), so every byte is what ``vllm-fleet deploy`` would write: the unit, the env
file (with a fresh random API key, root:root 0600 on the host), the gate program and its config, the watchdog
program and its config, the device-node and watchdog units. OUTDIR gets ``files/NNN`` (the contents),
``manifest.json`` (path, owner, group, mode of each), ``plan.json`` (the planner's KV prediction) and
``dirs.json`` (the directories the account step creates). The GPU machine installs them with
tests/gpu/systemd/selfheal.py. The plan needs only the model's config.json: the fixture
tests/fixtures/tiny-minimax-m2 is make_tiny_model.py's output without the weights.

The watchdog is rendered with short periods (vllm_watchdog_interval_s 5, deadline 5, misses 2) so that a hung
engine is restarted within the device call; every other setting is the default, except what the GPU test
machine needs (NVLink multicast off, no FlashInfer in the kit; tests/gpu/smoke.py's MACHINE_SETTINGS).
Each NAME=VALUE after OUTDIR goes into the settings' extra_env (host data vllm_extra_env), so it reaches the
rendered unit exactly as a deploy would write it (2026-12-08: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True).

``compare`` reads RESULTS_DIR/journal-cold.txt (the journal of the cold start under the unit) and prints the
planner's prediction next to vLLM's own KV lines (tests/gpu/smoke.py's parse_log and compare_kv).
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from tests.gpu.smoke import MACHINE_SETTINGS, REASONING_PARSER, SERVED_NAME, TOOL_ARGS, compare_kv, parse_log  # noqa: E402
from vllm_fleet.handoff import HostState  # noqa: E402
from vllm_fleet.layout import HostLayout  # noqa: E402
from vllm_fleet.planner.hardware import GiB, Hardware  # noqa: E402
from vllm_fleet.planner.plan import make_plan  # noqa: E402
from vllm_fleet.preflight.parse import Gpu, GpuInfo, Snapshot  # noqa: E402
from vllm_fleet.service.step import companion_files, service_files  # noqa: E402
from vllm_fleet.settings import Settings  # noqa: E402

TINY = REPO / "tests/fixtures/tiny-minimax-m2"
# The lent H200 machine as nvidia-smi reports it (docs/gpu-validation.md, tests/gpu/results/machine.txt).
H200 = {"name": "NVIDIA H200", "memory_total_mib": 143771, "compute_cap": "9.0"}
DRIVER, CUDA = "580.159.04", "13.0"
WATCHDOG = {"watchdog_interval_s": 5, "watchdog_deadline_s": 5, "watchdog_misses": 2}


def settings(api_key: str, extra_env: dict[str, str] | None = None) -> Settings:
    return Settings(model=str(TINY), served_model_name=SERVED_NAME, gpus=[0], tensor_parallel_size=1,
                    gpu_memory_utilization=0.5, reasoning_parser=REASONING_PARSER, extra_args=TOOL_ARGS,
                    api_key=api_key, extra_env=extra_env or {}, **WATCHDOG, **MACHINE_SETTINGS)


def host_state(s: Settings) -> HostState:
    gpu = Gpu(0, "GPU-0", H200["name"], H200["memory_total_mib"], 0, H200["compute_cap"])
    snap = Snapshot(os_id="ubuntu", os_version="24.04", os_pretty_name=None, systemd_version="252", systemd_running=True,
                    python_version="3.12.3", gpu=GpuInfo(DRIVER, CUDA, [gpu]), listeners=[], disks={},
                    mem_total_bytes=None, nproc=None)
    model_path = HostLayout.of(s).model(TINY.name)
    return HostState(snap, make_plan(s.model, Hardware.from_facts([H200]), s.plan_options(model_path)))


def cmd_render(out: Path, extra_env: dict[str, str]) -> int:
    key = secrets.token_hex(16)
    s = settings(key, extra_env)
    state = host_state(s)
    rendered, gate_files, unit, secret = service_files(s, state, venv=None)
    files = [*gate_files, *unit, *secret, *companion_files(rendered)]
    (out / "files").mkdir(parents=True, exist_ok=True)
    manifest = []
    for i, f in enumerate(files):
        name = f"{i:03d}"
        target = out / "files" / name
        target.write_bytes(f.data())
        target.chmod(0o600)
        manifest.append({"src": name, "path": f.path, "owner": f.user, "group": f.group, "mode": f.mode,
                         "secret": bool(getattr(f, "secret", False))})
    lay = HostLayout.of(s)
    plan = state.plan
    mem = plan.memory_per_gpu
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (out / "dirs.json").write_text(json.dumps(
        {"account_dirs": lay.account_dirs, "user": s.service_user, "home": lay.home, "model_dir": plan.model_path,
         "venv": rendered.unit.split("ExecStart=", 1)[1].split("/bin/vllm", 1)[0], "unit": lay.unit_name,
         "watchdog_unit": f"{lay.watchdog_unit}.service", "devices_unit": f"{lay.devices_unit}.service",
         "gate_program": lay.gate_program, "gate_config": lay.gate_config, "watchdog_program": lay.watchdog_program,
         "watchdog_config": lay.watchdog_config, "unit_path": lay.unit_path, "env_path": lay.env_file,
         "cache_dir": lay.cache_dir, "gate_unit": lay.gate_unit, "port": s.port}, indent=1) + "\n")
    (out / "plan.json").write_text(json.dumps({
        "gpu": H200, "gpu_memory_utilization": 0.5, "requested_gib": mem.requested / GiB,
        "weights_gib": mem.weights / GiB, "overhead_gib": mem.overhead.total / GiB,
        "available_kv_predicted_gib": mem.available_for_kv / GiB, "kv_tokens_predicted": plan.kv_capacity_tokens,
        "kv_bytes_per_token_per_gpu": plan.kv_cache_bytes_per_token_per_gpu, "argv": plan.argv,
        "settings": {**WATCHDOG, **MACHINE_SETTINGS, "restart_sec": s.restart_sec, "gate_stability_s": s.gate_stability_s,
                     "extra_env": dict(s.extra_env)},
    }, indent=1) + "\n")
    for f in files:
        print(f"{f.mode} {f.user}:{f.group} {f.path}{' (secret)' if getattr(f, 'secret', False) else ''}")
    print(f"plan: available KV {mem.available_for_kv / GiB:.2f} GiB, {plan.kv_capacity_tokens:,} tokens")
    return 0


def cmd_compare(results: Path) -> int:
    s = settings("unused-for-the-plan")
    plan = host_state(s).plan
    text = (results / "journal-cold.txt").read_text(errors="replace")
    logged = parse_log(text)
    report = {"logged": logged, "kv": compare_kv(plan, logged)}
    print(json.dumps(report, indent=1))
    return 0


def main(argv: list[str]) -> int:
    extra = argv[2:]
    if len(argv) < 2 or argv[0] not in ("render", "compare") or (argv[0] == "compare" and extra) \
            or any("=" not in kv or kv.startswith("=") for kv in extra):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "compare":
        return cmd_compare(Path(argv[1]))
    return cmd_render(Path(argv[1]), dict(kv.split("=", 1) for kv in extra))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
