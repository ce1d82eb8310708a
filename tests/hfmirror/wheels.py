"""The wheels of the host's fetch venv (huggingface_hub and its dependencies), for Debian 12's CPython 3.11 x86_64.

    python -m tests.hfmirror.wheels     # download once into the cache; prints the directory

The mirror serves them under /wheels/ for pip --find-links (the hosts have no index).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.e2e.wheelhouse import CACHE, TARGET, _pip
from vllm_fleet.weights import HF_HUB_REQUIREMENT


def build() -> Path:
    """Download (once) the fetch venv's wheels; return their directory."""
    out = CACHE / f"fetch-wheels-{HF_HUB_REQUIREMENT.replace('==', '-')}"
    if out.is_dir() and any(out.glob("huggingface_hub-*.whl")):
        return out
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    subprocess.run([*_pip(), *TARGET, "-d", str(tmp), HF_HUB_REQUIREMENT], check=True)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(build())
