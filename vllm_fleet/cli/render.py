"""`vllm-fleet render`: write the unit and env file a deploy would install, without a host.

    vllm-fleet render --model minimax-m2 --gpus 4xA800-80G --out /tmp/vllm-files
    vllm-fleet render --model tests/fixtures/tiny-minimax-m2 --gpus 2xH200 --gpu-indices 0,1 --port 8101 --out out/

Writes OUT/<service>.service and OUT/<service>.env (secrets replaced by a
placeholder; a secret line is present when VLLM_FLEET_API_KEY /
VLLM_FLEET_HF_TOKEN are set, as on a deploy). The text is what
vllm_fleet/service/step.py installs for the same settings, byte for byte
(less the secrets), including the venv the unit runs: the deploy's
BASE_DIR/venvs/vllm-VERSION-BACKEND. The deploy resolves BACKEND from
vllm_torch_backend, and for "auto" from the host driver's CUDA; without a
host, give --torch-backend (e.g. cu128) or --cuda (the driver's CUDA as
nvidia-smi prints it, e.g. 12.8); with neither and "auto", the newest backend
(cu130) is assumed and said. --venv overrides the whole path.
Exit codes: 0 written, 1 the plan has errors (nothing written), 2 invalid input.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from vllm_fleet.errors import FleetError
from vllm_fleet.layout import HostLayout
from vllm_fleet.pyenv import stack
from vllm_fleet.planner import options as serve_options
from vllm_fleet.planner.plan import make_plan
from vllm_fleet.service.render import render
from vllm_fleet.settings import load_settings
from vllm_fleet.versions import VLLM_VERSION

# The settings of the service that are no `vllm serve` option: CLI option -> setting (host-data key
# without vllm_). The serve options come from the table (vllm_fleet/planner/options.py).
_OPTIONS = {
    "service_name": str, "service_user": str, "base_dir": str, "data_dir": str, "version": str, "restart_sec": int,
    "torch_backend": str, "channel": str, "source_ref": str,
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `render` subcommand."""
    p = subparsers.add_parser("render", help="write the systemd unit and env file a deploy installs (secrets masked)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="profile name or local model dir")
    p.add_argument("--gpus", required=True, help="GPU spec, e.g. 4xA800-80G")
    p.add_argument("--gpu-indices", help="host GPU indices, e.g. 0,1,2,3 (vllm_gpus; default: all)")
    serve_options.add_arguments(p)  # one option per row of vllm_fleet/planner/options.py
    for name, kind in _OPTIONS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    p.add_argument("--cuda", help="the host driver's CUDA (nvidia-smi), to resolve --torch-backend auto as a deploy does")
    p.add_argument("--venv", help=f"venv on the host (default: the deploy's, BASE_DIR/venvs/vllm-{VLLM_VERSION}-BACKEND)")
    p.add_argument("--systemd-version", type=int, default=252, help="the host's systemd (default 252, Debian 12)")
    p.add_argument("--out", required=True, help="directory to write the files to")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Plan, render, write; print the paths and where they go on a host."""
    data: dict[str, object] = {"vllm_model": args.model}
    given = {**serve_options.given(args), **{name: getattr(args, name) for name in _OPTIONS}}
    data.update({"vllm_" + name: value for name, value in given.items() if value is not None})
    if args.gpu_indices:
        try:
            data["vllm_gpus"] = [int(i) for i in args.gpu_indices.split(",")]
        except ValueError:
            raise FleetError(f"--gpu-indices {args.gpu_indices!r} is not a comma-separated list of numbers") from None
    placeholder = "x" * 16  # masked on output: only its presence matters
    if os.environ.get("VLLM_FLEET_API_KEY"):
        data["vllm_api_key"] = placeholder
    if os.environ.get("VLLM_FLEET_HF_TOKEN"):
        data["vllm_hf_token"] = placeholder
    settings = load_settings(data)
    local = Path(settings.model)
    model_path = HostLayout.of(settings).model(local.resolve().name) if local.is_dir() else None
    plan = make_plan(settings.model, args.gpus, settings.plan_options(model_path))
    if plan.errors:
        for f in plan.errors:
            print(f"plan error {f.code}: {f.message}; remedy: {f.remedy}")
        return 1
    if args.venv:
        venv = args.venv
    else:
        venv = stack.default_venv(settings, args.cuda)
        if args.cuda is None and settings.torch_backend == "auto":
            print(f"venv: {venv} (vllm_torch_backend=auto: backend {stack.ASSUMED_BACKEND} assumed; a deploy picks it "
                  f"from the host driver: pass --cuda or --torch-backend)")
    files = render(settings, plan, venv, systemd_version=args.systemd_version, show_secrets=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for host_path, text in ((files.unit_path, files.unit), (files.env_path, files.env), *files.units):
        target = out / Path(host_path).name
        target.write_text(text)
        print(f"{target}  (on the host: {host_path})")
    return 0
