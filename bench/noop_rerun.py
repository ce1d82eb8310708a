"""How much a no-op rerun of deploy.py costs beyond connecting to the hosts.

docs/design.md: "A no-op rerun should cost little more than connecting". This
runs, alternately and N times each, on the CI test hosts (tests/hosts.py up):

  baseline: pyinfra -y inventory/ci.py exec -- true
  rerun:    pyinfra -y inventory/ci.py deploy.py      (already converged: 0 changes)

and prints the median of each and their ratio (machines here are noisy, so
only the ratio measured side by side in one run means anything). It also
counts the commands pyinfra sent per host for the rerun (-vv output), the
round trips the DESIGN asks to keep few.

    python bench/noop_rerun.py [-n 5] [--limit @docker/fleet-a]
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=5, help="runs of each (default 5)")
    ap.add_argument("--limit", default="@docker/fleet-a", help="pyinfra --limit (default @docker/fleet-a)")
    args = ap.parse_args()
    limit = ["--limit", args.limit]
    _run(["deploy.py", *limit])  # converge first
    base, rerun = [], []
    for _ in range(args.n):
        base.append(_run(["exec", *limit, "--", "true"])[0])
        rerun.append(_run(["deploy.py", *limit])[0])
    _, verbose = _run(["deploy.py", *limit, "-vv"])
    commands = len(re.findall(r"(?m)^\s*\[[^\]]+\]\s+>>> ", verbose))
    mb, mr = statistics.median(base), statistics.median(rerun)
    print(f"hosts: {args.limit}; runs: {args.n} each, alternating")
    print(f"baseline `exec -- true`: median {mb:.2f} s  (all: {', '.join(f'{t:.2f}' for t in base)})")
    print(f"no-op deploy.py rerun:   median {mr:.2f} s  (all: {', '.join(f'{t:.2f}' for t in rerun)})")
    print(f"ratio rerun / baseline:  {mr / mb:.2f}x")
    print(f"commands sent by the rerun (-vv '>>>' lines): {commands}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
