"""The `vllm-fleet` command: work that needs no host (plan, render, doctor) and fleet views.

Each subcommand lives in its own module exposing `add_parser(subparsers)` and
`run(args) -> int`. A FleetError anywhere becomes one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vllm_fleet import __version__
from vllm_fleet.errors import FleetError

# Subcommand modules, in the order `--help` lists them.
COMMANDS = ["vllm_fleet.plan_cli", "vllm_fleet.doctor_cli", "vllm_fleet.render_cli", "vllm_fleet.status_cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-fleet",
        description="Plan, render and diagnose vLLM deployments. The deploy itself is "
        "`pyinfra inventory/prod.py deploy.py` (add --dry to preview).",
    )
    parser.add_argument("--version", action="version", version=f"vllm-fleet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FleetError as exc:
        print(f"vllm-fleet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
