"""The local wheelhouse the e2e hosts install from: real wheels, built once, cached, served on 127.0.0.1.

    python tests/e2e/wheelhouse.py        # build (or reuse) it; prints its directory

Holds the vLLM TEST DOUBLE as `vllm` 0.25.0 and 0.26.0 (tests/doubles/), uv,
the real torch 2.13.0 CPU wheel for CPython 3.11 and torch's dependencies, vllm-router and its own, for
the test hosts (Debian 12, Python 3.11, x86_64).

Where each wheel comes from is declared: torch's CPU build from
$VLLM_FLEET_TORCH_SOURCE (an index URL, default PyTorch's CPU index
https://download.pytorch.org/whl/cpu, or a directory of wheels), plus whatever
find-links/extra index pip itself is configured with; the rest from PyPI (or
the index pip is configured with). The torch wheel is kept in
`$VLLM_FLEET_CACHE/torch/` once found, so only the first build needs a source.
When no source holds it, the build stops naming the setting to change. It lives in
`$VLLM_FLEET_CACHE/wheelhouse-<key>` (default cache ~/.cache/vllm-fleet; the
key hashes the double's source and the wanted list) with a stable link
`$VLLM_FLEET_CACHE/wheelhouse`, which group_data/ci.py points vllm_wheelhouse at.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.doubles.build_wheelhouse import PROJECT as DOUBLE_SRC, build_wheel, find_uv  # noqa: E402

CACHE = Path(os.environ.get("VLLM_FLEET_CACHE", Path.home() / ".cache" / "vllm-fleet"))
DOUBLE_VERSIONS = ("0.25.0", "0.26.0")
TORCH_VERSION = "2.13.0"
TORCH_REQUIREMENT = f"torch=={TORCH_VERSION}+cpu"
TORCH_SOURCE_ENV = "VLLM_FLEET_TORCH_SOURCE"
TORCH_SOURCE_DEFAULT = "https://download.pytorch.org/whl/cpu"
UV_VERSION = "0.13.9"  # the hosts get the uv the control machine's venv pins (pyproject.toml, ./setup)
ROUTER_VERSION = "0.1.17"  # vllm_fleet/router/settings.py ROUTER_VERSION: the router the e2e router test installs
# torch 2.13.0's Requires-Dist (METADATA), plus uv and vllm-router (with its dependencies); downloaded for the hosts'
# CPython 3.11 on x86_64.
DOWNLOADS = (f"uv=={UV_VERSION}", "filelock", "typing-extensions>=4.10.0", "setuptools>=77.0.3", "sympy>=1.13.3",
             "networkx>=2.5.1", "jinja2", "fsspec>=0.8.5", f"vllm-router=={ROUTER_VERSION}")
TARGET = ["--only-binary", ":all:", "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64",
          "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]
LINK = CACHE / "wheelhouse"


def _key() -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in DOUBLE_SRC.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(DOUBLE_SRC)).encode() + b"\0" + path.read_bytes())
    h.update(repr((DOUBLE_VERSIONS, DOWNLOADS, TARGET, TORCH_REQUIREMENT)).encode())
    return h.hexdigest()[:16]


def _pip() -> list[str]:
    """A pip that can download: a seeded uv venv in the cache (the project venv has no pip)."""
    venv = CACHE / "pip-venv"
    if not (venv / "bin" / "pip").exists():
        subprocess.run([find_uv(), "venv", "--seed", "--quiet", str(venv)], check=True)
    return [str(venv / "bin" / "pip"), "download", "--disable-pip-version-check", "--quiet"]


def torch_wheel() -> Path:
    """The torch CPU wheel for the hosts: from the cache, else fetched from the declared source into it.

    The source is $VLLM_FLEET_TORCH_SOURCE: an index URL (default PyTorch's CPU
    index) or a directory holding the wheel; pip's own configuration (its
    find-links and extra indexes) is consulted as well, as for any download.
    """
    cache = CACHE / "torch"
    pattern = f"torch-{TORCH_VERSION}+cpu-cp311-cp311-manylinux*_x86_64.whl"
    found = sorted(cache.glob(pattern))
    if found:
        return found[-1]
    source = os.environ.get(TORCH_SOURCE_ENV) or TORCH_SOURCE_DEFAULT
    where = ["--find-links", source, "--no-index"] if Path(source).is_dir() else ["--index-url", source]
    tmp = cache.with_name("torch.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    proc = subprocess.run([*_pip(), "--no-deps", "--retries", "1", "--timeout", "30", *TARGET, *where,
                           "--dest", str(tmp), TORCH_REQUIREMENT], capture_output=True, text=True, check=False)
    found = sorted(tmp.glob(pattern))
    if proc.returncode != 0 or not found:
        raise RuntimeError(
            f"no {TORCH_REQUIREMENT} wheel for CPython 3.11 x86_64 at {TORCH_SOURCE_ENV}={source} "
            f"(nor in pip's configured find-links/indexes): set {TORCH_SOURCE_ENV} to an index URL or a "
            f"directory that holds it, or put the wheel in {cache}/\npip said:\n{proc.stderr.strip()[-2000:]}")
    cache.mkdir(parents=True, exist_ok=True)
    for wheel in found:
        wheel.rename(cache / wheel.name)
    shutil.rmtree(tmp, ignore_errors=True)
    return cache / found[-1].name


def build() -> Path:
    """Build the wheelhouse unless the cached one for this key is complete; return its directory."""
    out = CACHE / f"wheelhouse-{_key()}"
    done = out / ".complete"
    if not done.exists():
        torch = torch_wheel()
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for version in DOUBLE_VERSIONS:
            build_wheel(version, tmp)
        try:
            os.link(torch, tmp / torch.name)
        except OSError:
            shutil.copy2(torch, tmp / torch.name)
        subprocess.run([*_pip(), *TARGET, "--dest", str(tmp), *DOWNLOADS], check=True)
        (tmp / ".complete").write_text("")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    if LINK.is_symlink() or LINK.exists():
        if LINK.resolve() != out:
            LINK.unlink()
    if not LINK.exists():
        LINK.symlink_to(out.name)
    return out


def _project(wheel: str) -> str:
    """A wheel's project name, normalized as PEP 503 names index pages ("typing_extensions-4.1-..." -> "typing-extensions")."""
    return re.sub(r"[-_.]+", "-", wheel.split("-", 1)[0]).lower()


def simple_index(dest: Path, wheels: Iterable[Path]) -> Path:
    """A PEP 503 "simple" index of `wheels` under `dest`: `dest/<project>/<wheel>` (hard links where possible).

    Served by `serve()`, each project directory's listing is the project page
    uv and pip read (an HTML page of links to the wheel files), as a mirror of
    PyPI, of download.pytorch.org/whl/cpu or of wheels.vllm.ai/nightly serves it.
    """
    for wheel in wheels:
        project = dest / _project(wheel.name)
        project.mkdir(parents=True, exist_ok=True)
        target = project / wheel.name
        if not target.exists():
            try:
                os.link(wheel, target)
            except OSError:
                shutil.copy2(wheel, target)
    return dest


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


@contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve `directory` over HTTP on 127.0.0.1 (a free port) as a find-links page; yield its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    print(build())
