"""Helpers for end-to-end tests: run the real pyinfra CLI against the test hosts.

The hosts are the containers of tests/hosts.py, described by inventory/ci.py.
pyinfra 3.10 writes its progress (and command output) to stderr:

    --> Connecting to hosts...
        [@docker/fleet-a] Connected
    --> Starting operation: files.directory (path=/tmp/x)
        [@docker/fleet-a] Success          # commands ran: a change
        [fleet-c]         No changes
    --> Results:
        Operation   Hosts   Success   Error   No Change
        ...
        Grand total 3       1         -       2

(see pyinfra/api/operations.py, which logs "Success"/"No changes" per host and
operation, and pyinfra_cli/prints.py:print_results, which prints the table).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INVENTORY = REPO / "inventory" / "ci.py"
PYINFRA = Path(sys.executable).parent / "pyinfra"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CONNECTED = re.compile(r"^\s+\[(?P<host>[^\]]+)\]\s+Connected\s*$")
_STATUS = re.compile(r"^\s+\[(?P<host>[^\]]+)\]\s+(?P<status>Success|No changes)(?: on retry \d+)?\s*$")
_TOTAL = re.compile(r"^\s+Grand total\s+(?P<hosts>\S+)\s+(?P<success>\S+)\s+(?P<error>\S+)\s+(?P<no_change>\S+)\s*$")


class PyinfraFailed(AssertionError):
    """The pyinfra CLI exited non-zero where success was expected."""


@dataclass(frozen=True)
class Result:
    """What a pyinfra run printed and returned; `output` is stdout followed by stderr."""

    returncode: int
    stdout: str
    stderr: str
    output: str


def run_pyinfra(args: list[str], *, env: dict[str, str] | None = None, check: bool = True, timeout: float = 600,
                yes: bool = True) -> Result:
    """Run `pyinfra -y inventory/ci.py ARGS` from the repo root with this venv's pyinfra.

    + yes: pass -y (no prompt). Without it, pyinfra prints the detected changes
      first, which is what a user sees with `--dry`.
    """
    proc = subprocess.run(
        [str(PYINFRA), *(["-y"] if yes else []), str(INVENTORY.relative_to(REPO)), *args],
        stdin=subprocess.DEVNULL,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    result = Result(proc.returncode, proc.stdout, proc.stderr, proc.stdout + proc.stderr)
    if check and result.returncode != 0:
        raise PyinfraFailed(f"pyinfra {' '.join(args)} exited {result.returncode}:\n{result.output[-6000:]}")
    return result


def changed_ops(result: Result) -> dict[str, int]:
    """Operations that changed something, per host (as pyinfra names it: "@docker/fleet-a", "fleet-c").

    Counted from the per-host "Success"/"No changes" lines and checked against the
    results table's "Grand total" row, so a change in pyinfra's output format
    fails loudly instead of reading as "no changes". Every connected host is a key.
    """
    lines = _ANSI.sub("", result.output).splitlines()
    counts: dict[str, int] = {}
    unchanged = 0
    for line in lines:
        if match := _CONNECTED.match(line):
            counts.setdefault(match["host"], 0)
        elif match := _STATUS.match(line):
            host = match["host"]
            if match["status"] == "Success":
                counts[host] = counts.get(host, 0) + 1
            else:
                counts.setdefault(host, 0)
                unchanged += 1
    totals = [match for line in lines if (match := _TOTAL.match(line))]
    if len(totals) != 1:
        raise ValueError(f"no single pyinfra results summary in the output:\n{result.output[-3000:]}")

    def number(cell: str) -> int:
        return 0 if cell == "-" else int(cell)

    total = totals[0]
    if number(total["success"]) != sum(counts.values()) or number(total["no_change"]) != unchanged:
        raise ValueError(
            f"per-host status lines ({counts}, {unchanged} unchanged) disagree with the results table "
            f"(success {total['success']}, no change {total['no_change']})"
        )
    return counts


def host_output(result: Result, host: str) -> list[str]:
    """The lines a host's commands printed (pyinfra prefixes them with "[HOST] " at column 0)."""
    prefix = re.compile(rf"^\[{re.escape(host)}\]\s+(?P<text>.*)$")
    return [match["text"] for line in _ANSI.sub("", result.output).splitlines() if (match := prefix.match(line))]


def container_name(host: str) -> str:
    """The container behind an inventory host name ("@docker/fleet-a" -> "fleet-a")."""
    return host.removeprefix("@docker/")


def host_exec(host: str, cmd: str | list[str], *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command as root in a test host with `docker exec` (a shell string runs under sh -c)."""
    argv = ["sh", "-c", cmd] if isinstance(cmd, str) else cmd
    return subprocess.run(
        ["docker", "exec", container_name(host), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
