"""vLLM's nightly and source channels end to end: real pyinfra CLI running deploy.py, real uv, real git, real apt.

- nightly (fleet-b): the vLLM TEST DOUBLE built as the pre-release 0.26.1.dev3
  and served on 127.0.0.1 as the nightly extra index (a PEP 503 simple index,
  like wheels.vllm.ai/nightly), beside a local "PyPI" (every wheel of the
  wheelhouse, vllm 0.25.0 and 0.26.0 included) and a local torch index.
- source (fleet-a): a git repository of the double's source (two tagged
  commits, each stamping its own version in the code), served as a bare
  repository over HTTP on 127.0.0.1 (git's dumb HTTP protocol); the host gets
  git from Debian's mirror with apt, clones vllm_source_url, checks out
  vllm_source_ref and installs it editable.

Each test deploys into its own base/data directories, service name and port
(other e2e tests use the same containers) and removes them afterwards.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.doubles.build_wheelhouse import PROJECT as DOUBLE_SRC, build_wheel
from tests.e2e import wheelhouse as wh
from tests.e2e.harness import host_exec, run_pyinfra
from tests.e2e.test_python_env import assert_no_change, changed_names, marker

pytestmark = pytest.mark.e2e

NIGHTLY = "0.26.1.dev3"


def _isolated(name: str, port: int) -> tuple[str, tuple[str, ...]]:
    base = f"/srv/stack-test-{name}"
    return base, (f"vllm_base_dir={base}", f"vllm_data_dir={base}-data", f"vllm_service_name=vllm-{name}",
                  f"vllm_port={port}", "vllm_disk_headroom_gib=0")


def _deploy(limit: str, data: tuple[str, ...], *more: str):
    args = ["deploy.py", "--limit", limit]
    for d in (*data, *more):
        args += ["--data", d]
    return run_pyinfra(args)


def _cleanup(limit: str, container: str, base: str, data: tuple[str, ...]) -> None:
    args = ["uninstall.py", "--limit", limit]
    for d in data:
        args += ["--data", d]
    run_pyinfra(args, check=False)
    host_exec(container, f"rm -rf {base} {base}-data")


def _python_ops(result, host: str) -> list[str]:
    return [o for o in changed_names(result, host) if o.startswith("Python environment")]


def _venvs(container: str, base: str) -> dict[str, str | None]:
    """Every entry of BASE/venvs: name -> link target (None for a directory)."""
    out = host_exec(container, ["python3", "-c", "import os,json,sys; d=sys.argv[1]; print(json.dumps({n: os.readlink(os.path.join(d,n)) "
                                "if os.path.islink(os.path.join(d,n)) else None for n in os.listdir(d)}))", f"{base}/venvs"])
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _exec_start(container: str, unit: str) -> str:
    return host_exec(container, ["systemctl", "show", "-p", "ExecStart", "--value", unit]).stdout


# ------------------------------------------------------------------------------------------------ nightly --

@pytest.fixture(scope="module")
def indexes(test_hosts, wheelhouse, tmp_path_factory):
    """Local PyPI, torch and nightly indexes on 127.0.0.1; yields their URLs."""
    directory, _ = wheelhouse
    root = tmp_path_factory.mktemp("indexes")
    nightly = build_wheel(NIGHTLY, tmp_path_factory.mktemp("nightly-wheel"))
    assert nightly.name == f"vllm-{NIGHTLY}-py3-none-any.whl"
    wheels = sorted(Path(directory).glob("*.whl"))
    wh.simple_index(root / "simple", wheels)
    wh.simple_index(root / "torch", [w for w in wheels if w.name.startswith("torch-")])
    wh.simple_index(root / "nightly", [nightly])
    with wh.serve(root) as url:
        yield {"simple": f"{url}simple/", "torch": f"{url}torch/", "nightly": f"{url}nightly/"}


def test_nightly_builds_one_venv_from_the_nightly_index_keeps_the_release_and_reruns_quietly(indexes):
    host, container = "@docker/fleet-b", "fleet-b"
    base, data = _isolated("nightly", 18971)
    sources = (*data, "vllm_wheelhouse=null", f"vllm_index_url={indexes['simple']}", f"vllm_torch_index_url={indexes['torch']}",
               f"vllm_nightly_index_url={indexes['nightly']}")
    _cleanup(host, container, base, data)
    try:
        release = _deploy(host, sources)  # the release 0.25.0 from the local "PyPI" first
        assert [o for o in _python_ops(release, host) if "is installed and verified in" in o] == [
            f"Python environment | Ensure vLLM 0.25.0 (release) with torch 2.13.0 (cpu) is installed and verified in "
            f"{base}/venvs/vllm-0.25.0-cpu"], changed_names(release, host)
        assert _venvs(container, base) == {"vllm-0.25.0-cpu": None}
        before = marker(container, f"{base}/venvs/vllm-0.25.0-cpu")["built_at"]

        up = _deploy(host, sources, "vllm_channel=nightly", "vllm_version=0.26.1")
        python_ops = _python_ops(up, host)
        assert python_ops == [f"Python environment | Ensure vLLM 0.26.1 (nightly) with torch 2.13.0 (cpu) is installed and "
                              f"verified in {base}/venvs/vllm-nightly-cpu"], changed_names(up, host)
        # stack.py's nightly naming: the build is named after the version the index resolved, the stable link points at it
        assert _venvs(container, base) == {"vllm-0.25.0-cpu": None, f"vllm-{NIGHTLY}-cpu": None,
                                           "vllm-nightly-cpu": f"vllm-{NIGHTLY}-cpu"}
        built = marker(container, f"{base}/venvs/vllm-{NIGHTLY}-cpu")
        assert built["verify"]["vllm"]["version"] == NIGHTLY and built["verify"]["ok"], built
        install = " ".join(built["install"])
        assert f"--prerelease allow --extra-index-url {indexes['nightly']} vllm>=0.26.1.dev0" in install, install
        version = host_exec(container, [f"{base}/venvs/vllm-nightly-cpu/bin/vllm", "--version"])
        assert version.stdout.strip() == NIGHTLY, version
        assert marker(container, f"{base}/venvs/vllm-0.25.0-cpu")["built_at"] == before, "the release venv was touched"
        assert host_exec(container, [f"{base}/venvs/vllm-0.25.0-cpu/bin/vllm", "--version"]).stdout.strip() == "0.25.0"
        assert f"{base}/venvs/vllm-nightly-cpu/bin/vllm" in _exec_start(container, "vllm-nightly.service")

        assert_no_change(_deploy(host, sources, "vllm_channel=nightly", "vllm_version=0.26.1"), host)
    finally:
        _cleanup(host, container, base, data)


# ------------------------------------------------------------------------------------------------- source --

def _git(*args: str, cwd: Path) -> str:
    proc = subprocess.run(["git", "-c", "user.name=vllm-fleet tests", "-c", "user.email=tests@localhost", *args],
                          cwd=cwd, capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def _stamp(tree: Path, version: str) -> None:
    """Make the double's source report `version` (installed editable, vllm.__version__ comes from the code)."""
    for rel, pattern in (("vllm/__init__.py", 'DEFAULT_VERSION = "'), ("setup.py", 'DEFAULT_VERSION = "')):
        path = tree / rel
        lines = [f'{pattern}{version}"' if line.startswith(pattern) else line for line in path.read_text().splitlines()]
        assert any(line == f'{pattern}{version}"' for line in lines), rel
        path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def vllm_repo(test_hosts, tmp_path_factory):
    """A git repository of the double's source with tags v0.26.1 and v0.27.0, served bare over HTTP; yields (url, {tag: sha})."""
    root = tmp_path_factory.mktemp("git")
    work = root / "work"
    shutil.copytree(DOUBLE_SRC, work, ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__"))
    _git("init", "--quiet", "--initial-branch", "main", cwd=work)
    shas = {}
    for version in ("0.26.1", "0.27.0"):
        _stamp(work, version)
        _git("add", "--all", cwd=work)
        _git("commit", "--quiet", "-m", f"vLLM test double {version}", cwd=work)
        _git("tag", f"v{version}", cwd=work)
        shas[f"v{version}"] = _git("rev-parse", "HEAD", cwd=work)
    served = root / "served"
    served.mkdir()
    _git("clone", "--quiet", "--bare", str(work), str(served / "vllm.git"), cwd=root)
    _git("update-server-info", cwd=served / "vllm.git")  # what git's dumb HTTP protocol reads
    with wh.serve(served) as url:
        yield f"{url}vllm.git", shas


def test_source_installs_git_with_apt_clones_the_ref_editable_and_a_new_ref_builds_one_venv(vllm_repo, wheelhouse):
    host, container = "@docker/fleet-a", "fleet-a"
    url, shas = vllm_repo
    _, links = wheelhouse
    base, data = _isolated("source", 18972)
    sources = (*data, "vllm_wheelhouse=null", "vllm_no_index=true", f'vllm_find_links=["{links}"]',
               "vllm_channel=source", f"vllm_source_url={url}")
    _cleanup(host, container, base, data)
    removed = host_exec(container, "DEBIAN_FRONTEND=noninteractive apt-get remove -y -q git >/dev/null 2>&1; command -v git",
                        timeout=300)
    assert removed.stdout.strip() == "", "git is still on the host"
    v1, v2 = f"{base}/venvs/vllm-0.25.0-src.v0.26.1-cpu", f"{base}/venvs/vllm-0.25.0-src.v0.27.0-cpu"
    try:
        first = _deploy(host, sources, "vllm_source_ref=v0.26.1")
        ops = _python_ops(first, host)
        assert 'Python environment | Ensure git is installed (vllm_channel = "source" clones vLLM)' in ops, ops
        assert [o for o in ops if "is installed and verified in" in o] == [
            f"Python environment | Ensure vLLM 0.25.0 (source) with torch 2.13.0 (cpu) is installed and verified in {v1}"], ops
        dpkg = host_exec(container, ["dpkg-query", "-W", "-f", "${Status}", "git"])
        assert dpkg.stdout == "install ok installed", dpkg

        checkout = f"{base}/src/vllm-0.25.0-src.v0.26.1-cpu"
        built = marker(container, v1)
        assert built["commit"] == shas["v0.26.1"] and built["source_dir"] == checkout, built
        assert built["verify"]["vllm"]["path"] == f"{checkout}/vllm" and built["verify"]["ok"], built
        assert f"--editable {checkout}" in " ".join(built["install"]), built["install"]
        # editable: the code answering is the checkout's (its version is stamped in the source), site-packages has no copy
        assert host_exec(container, [f"{v1}/bin/vllm", "--version"]).stdout.strip() == "0.26.1"
        where = host_exec(container, [f"{v1}/bin/python", "-c", "import vllm; print(vllm.__file__)"], timeout=60)
        assert where.stdout.strip() == f"{checkout}/vllm/__init__.py", where
        assert host_exec(container, f"ls -d {v1}/lib/python3.11/site-packages/vllm").returncode != 0
        assert host_exec(container, ["git", "-C", checkout, "rev-parse", "HEAD"]).stdout.strip() == shas["v0.26.1"]
        assert f"{v1}/bin/vllm" in _exec_start(container, "vllm-source.service")

        assert_no_change(_deploy(host, sources, "vllm_source_ref=v0.26.1"), host)

        before = built["built_at"]
        new_ref = _deploy(host, sources, "vllm_source_ref=v0.27.0")
        assert _python_ops(new_ref, host) == [
            f"Python environment | Ensure vLLM 0.25.0 (source) with torch 2.13.0 (cpu) is installed and verified in {v2}"
        ], changed_names(new_ref, host)
        assert sorted(_venvs(container, base)) == ["vllm-0.25.0-src.v0.26.1-cpu", "vllm-0.25.0-src.v0.27.0-cpu"]
        assert marker(container, v2)["commit"] == shas["v0.27.0"]
        assert host_exec(container, [f"{v2}/bin/vllm", "--version"]).stdout.strip() == "0.27.0"
        # the rollback target keeps its own checkout, untouched
        assert host_exec(container, [f"{v1}/bin/vllm", "--version"]).stdout.strip() == "0.26.1"
        assert marker(container, v1)["built_at"] == before
        assert f"{v2}/bin/vllm" in _exec_start(container, "vllm-source.service")

        assert_no_change(_deploy(host, sources, "vllm_source_ref=v0.27.0"), host)

        # an editable venv without its checkout is damaged: rebuilt (cloned again), not ignored
        assert host_exec(container, ["rm", "-rf", f"{base}/src/vllm-0.25.0-src.v0.27.0-cpu"]).returncode == 0
        repaired = _deploy(host, sources, "vllm_source_ref=v0.27.0")
        assert _python_ops(repaired, host) == [
            f"Python environment | Ensure vLLM 0.25.0 (source) with torch 2.13.0 (cpu) is installed and verified in {v2}"
        ], changed_names(repaired, host)
        assert host_exec(container, [f"{v2}/bin/vllm", "--version"]).stdout.strip() == "0.27.0"
        assert marker(container, v2)["commit"] == shas["v0.27.0"]
    finally:
        _cleanup(host, container, base, data)
