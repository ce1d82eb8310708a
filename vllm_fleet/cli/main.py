"""The `vllm-fleet` command: work that needs no host (plan, render, doctor) and fleet views.

Each subcommand lives in its own module exposing `add_parser(subparsers)` and
`run(args) -> int`; only the module of the subcommand being run is imported
(`vllm-fleet plan` never loads pyinfra), all of them for the top-level --help.
A FleetError anywhere becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vllm_fleet import __version__
from vllm_fleet.errors import FleetError

# Subcommand -> its module, in the order `--help` lists them.
COMMANDS = {"plan": "vllm_fleet.cli.plan", "doctor": "vllm_fleet.cli.doctor", "render": "vllm_fleet.cli.render",
            "status": "vllm_fleet.cli.status"}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with `argv` naming a subcommand, only that subcommand's module is imported."""
    parser = argparse.ArgumentParser(
        prog="vllm-fleet",
        description="Plan, render and diagnose vLLM deployments. The deploy itself is "
        "`pyinfra inventory/prod.py deploy.py` (add --dry to preview).",
    )
    parser.add_argument("--version", action="version", version=f"vllm-fleet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    words = [a for a in (argv or []) if not a.startswith("-")]
    chosen = [words[0]] if words and words[0] in COMMANDS else list(COMMANDS)
    for name in chosen:
        importlib.import_module(COMMANDS[name]).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FleetError as exc:
        print(f"vllm-fleet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
