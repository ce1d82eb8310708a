"""Build the vLLM TEST DOUBLE's wheel (distribution `vllm`) for one or more versions.

    python tests/doubles/build_wheelhouse.py --out DIR --versions 0.25.0 0.26.0

writes DIR/vllm-0.25.0-py3-none-any.whl and DIR/vllm-0.26.0-py3-none-any.whl,
so CI hosts can `install vllm==X` from DIR as a local wheelhouse (find-links).
Each build runs in a fresh copy of tests/doubles/vllm-double, so the source
tree gets no build/ or *.egg-info and builds of different versions never mix.
Builds with `uv build` (the uv beside this Python, as ./setup installs it in
.venv, else the one on PATH).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

PROJECT = Path(__file__).resolve().parent / "vllm-double"
DEFAULT_VERSION = "0.25.0"


def find_uv() -> str:
    """The uv of this checkout's venv (./setup pins it in the test extra), else the one on PATH."""
    beside = Path(sys.executable).parent / "uv"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("uv")
    if found:
        return found
    raise RuntimeError(f"uv is neither beside {sys.executable} nor on PATH: run ./setup (it installs uv into .venv)")


def _build_command(src: Path, out: Path) -> list[str]:
    return [find_uv(), "build", "--wheel", "--quiet", "--out-dir", str(out), str(src)]


def build_wheel(version: str, out: Path) -> Path:
    """Build the double's wheel with `version` into `out`; return the wheel's path."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, VLLM_DOUBLE_VERSION=version)
    with tempfile.TemporaryDirectory(prefix="vllm-double-build-") as tmp:
        src = Path(tmp) / "vllm-double"
        shutil.copytree(PROJECT, src, ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__"))
        proc = subprocess.run(_build_command(src, out), env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the vllm double {version} failed:\n{proc.stdout}\n{proc.stderr}")
    wheel = out / f"vllm-{version}-py3-none-any.whl"
    if not wheel.is_file():
        found = sorted(p.name for p in out.iterdir())
        raise RuntimeError(f"build succeeded but {wheel} is missing; {out} holds {found}")
    return wheel


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: build every requested version into --out and print the wheel paths."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--out", required=True, type=Path, help="wheelhouse directory (created if missing)")
    parser.add_argument("--versions", nargs="+", default=[DEFAULT_VERSION], help="vLLM versions to stamp")
    args = parser.parse_args(argv)
    for version in args.versions:
        print(build_wheel(version, args.out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
