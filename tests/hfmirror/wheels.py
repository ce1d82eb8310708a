"""The wheels of the host's fetch venv (huggingface_hub, with modelscope when asked, and their dependencies), for Debian 12's CPython 3.11 x86_64.

    python -m tests.hfmirror.wheels     # download once into the cache; prints the directory

The mirror serves them under /wheels/ for pip --find-links (the hosts have no index).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.e2e.wheelhouse import CACHE, TARGET, _pip
from vllm_fleet.weights.source import HF_HUB_REQUIREMENT, MODELSCOPE_REQUIREMENTS


def build(modelscope: bool = False) -> Path:
    """Download (once) the fetch venv's wheels; return their directory.

    + modelscope: also modelscope + modelscope-hub and their dependencies (a venv for a ModelScope source)
    """
    reqs = [HF_HUB_REQUIREMENT, *(MODELSCOPE_REQUIREMENTS if modelscope else ())]
    out = CACHE / ("fetch-wheels-" + "+".join(r.replace("==", "-") for r in reqs))
    if out.is_dir() and any(out.glob("huggingface_hub-*.whl")):
        return out
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    subprocess.run([*_pip(), *TARGET, "-d", str(tmp), *reqs], check=True)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(build())
