"""`vllm-fleet plan` imports only what its subcommand needs (no pyinfra, no other subcommand)."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import contextlib, io, json, sys
from vllm_fleet.cli.main import main
with contextlib.redirect_stdout(io.StringIO()):
    code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("pyinfra", "paramiko", "vllm_fleet"))}))
"""


def _loaded(*argv: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_plan_loads_no_pyinfra_and_no_other_subcommand():
    out = _loaded("plan", "--gpus", "4xA800-80G", "--model", "minimax-m2", "--json")
    assert out["code"] == 0
    modules = set(out["modules"])
    assert not {m for m in modules if m.startswith(("pyinfra", "paramiko"))}, modules
    assert {"vllm_fleet.cli.doctor", "vllm_fleet.cli.render", "vllm_fleet.cli.status"}.isdisjoint(modules)
    assert "vllm_fleet.cli.plan" in modules


def test_top_level_help_still_lists_every_subcommand():
    proc = subprocess.run([sys.executable, "-m", "vllm_fleet.cli.main", "--help"], capture_output=True, text=True,
                          timeout=60, check=True)
    for name in ("plan", "doctor", "render", "status"):
        assert f"    {name} " in proc.stdout
