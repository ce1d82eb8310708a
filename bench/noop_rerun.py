"""How much a no-op rerun of deploy.py costs beyond connecting to the hosts.

docs/design.md: "A no-op rerun should cost little more than connecting". This
runs, alternately and N times each, on the CI test hosts (tests/hosts.py up):

  baseline: pyinfra -y inventory/ci.py exec -- true
  rerun:    pyinfra -y inventory/ci.py deploy.py      (already converged: 0 changes)

and prints the median of each and their ratio (machines here are noisy, so
only the ratio measured side by side in one run means anything). It also
counts the commands pyinfra sent per host for the rerun (-vv output), the
round trips the DESIGN asks to keep few.

    python bench/noop_rerun.py [-n 5] [--limit @docker/fleet-a] [--fleet all|none|LIMIT]

The fleet series (every host, default) is timed in the same loop, so its ratio to the one-host rerun
is side by side too.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYINFRA = str(Path(sys.executable).parent / "pyinfra")


def _run(args: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([PYINFRA, "-y", "inventory/ci.py", *args], cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"pyinfra {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return elapsed, proc.stdout + proc.stderr


def _commands(output: str) -> int:
    return len(re.findall(r"(?m)^\s*\[[^\]]+\]\s+>>> ", output))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=5, help="pairs of each (default 5)")
    ap.add_argument("--limit", default="@docker/fleet-a", help="the one host (default @docker/fleet-a)")
    ap.add_argument("--fleet", default="all", help="the fleet run: 'all' (every host of inventory/ci.py, default), "
                    "a pyinfra --limit, or 'none' to skip it")
    args = ap.parse_args()
    one = ["--limit", args.limit]
    fleet = None if args.fleet == "none" else ([] if args.fleet == "all" else ["--limit", args.fleet])
    _run(["deploy.py", *one])  # converge first
    if fleet is not None:
        _run(["deploy.py", *fleet])
    base, rerun, base_n, rerun_n = [], [], [], []
    for _ in range(args.n):  # alternating, so drift in the machine's load hits every series alike
        base.append(_run(["exec", *one, "--", "true"])[0])
        rerun.append(_run(["deploy.py", *one])[0])
        if fleet is not None:
            base_n.append(_run(["exec", *fleet, "--", "true"])[0])
            rerun_n.append(_run(["deploy.py", *fleet])[0])
    commands = _commands(_run(["deploy.py", *one, "-vv"])[1])
    med = statistics.median
    show = lambda xs: ", ".join(f"{t:.2f}" for t in xs)  # noqa: E731
    print(f"one host: {args.limit}; {args.n} runs of each series, alternating")
    print(f"baseline `exec -- true`:  median {med(base):.2f} s  ({show(base)})")
    print(f"no-op deploy.py rerun:    median {med(rerun):.2f} s  ({show(rerun)})")
    print(f"ratio rerun / baseline:   {med(rerun) / med(base):.2f}x   (issue 12: at most 2.0x)")
    print(f"commands sent to the host by the rerun (-vv '>>>' lines): {commands}")
    if fleet is not None:
        hosts = args.fleet if args.fleet != "all" else "every host of inventory/ci.py"
        print(f"fleet: {hosts}")
        print(f"baseline `exec -- true`:  median {med(base_n):.2f} s  ({show(base_n)})")
        print(f"no-op deploy.py rerun:    median {med(rerun_n):.2f} s  ({show(rerun_n)})")
        print(f"ratio fleet rerun / fleet baseline: {med(rerun_n) / med(base_n):.2f}x")
        print(f"ratio fleet rerun / one-host rerun: {med(rerun_n) / med(rerun):.2f}x   (issue 12: at most 1.3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
