"""`vllm-fleet doctor LOGFILE`: diagnose a vLLM log or journal excerpt.

Exit codes: 0 the log shows a healthy start (warnings may be printed), 3 a
failure was diagnosed, 1 no known failure was found (the last error lines are
printed), 2 the input could not be read.
"""

from __future__ import annotations

import argparse
import json
import sys

from vllm_fleet.service.doctor import Report, examine
from vllm_fleet.errors import FleetError
from vllm_fleet.preflight.parse import HostFactError, parse_compute_apps


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `doctor` subcommand."""
    parser = subparsers.add_parser(
        "doctor",
        help="diagnose a vLLM log: the failure, its cause, the setting to change",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("logfile", help="vLLM log or `journalctl -u vllm` excerpt; - reads stdin")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--gpu-apps",
        metavar="FILE",
        help="output of `nvidia-smi --query-compute-apps=gpu_uuid,pid,process_name,used_memory "
        "--format=csv,noheader,nounits`, to name who holds GPU memory",
    )
    parser.set_defaults(func=run)


def _read(path: str) -> str:
    """The text of ``path`` (``-``: stdin), undecodable bytes replaced."""
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError as exc:
        raise FleetError(f"cannot read {path}: {exc.strerror}") from exc


def _print_text(report: Report) -> None:
    """Human-readable report on stdout."""
    if report.status == "healthy" and not report.diagnoses:
        print("healthy: vLLM started and no known failure is in the log.")
        return
    for number, item in enumerate(report.diagnoses, start=1):
        print(f"{number}. [{item.severity}] {item.code} (line {item.line})")
        print(f"   {item.summary}")
        print(f"   evidence: {item.evidence}")
        print(f"   remedy:   {item.remedy}")
        for key, value in item.settings.items():
            print(f"   setting:  {key} = {value!r}")
    if report.status == "healthy":
        print("healthy start (warnings only).")
    elif report.status == "unknown":
        print("no known failure found. Last error lines:")
        for line in report.error_lines or ["(no error lines in the log)"]:
            print(f"  {line}")


def run(args: argparse.Namespace) -> int:
    """Diagnose ``args.logfile``; print the report; return the exit code."""
    processes = []
    if args.gpu_apps:
        try:
            processes = parse_compute_apps(_read(args.gpu_apps).splitlines())
        except HostFactError as exc:
            raise FleetError(str(exc)) from exc
    report = examine(_read(args.logfile), gpu_processes=processes)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        _print_text(report)
    return report.exit_code
