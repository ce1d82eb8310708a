"""The Python stack's pure parts: backend table, venv names, install commands, pruning, verify checks, settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_fleet.preflight import checks as preflight
from vllm_fleet.pyenv import hostprog as venvctl
from vllm_fleet.errors import SettingsError
from vllm_fleet.preflight.parse import Gpu, GpuInfo, Snapshot
from vllm_fleet.settings import load_settings
from vllm_fleet.pyenv.stack import (
    HostVenv,
    PackageSource,
    StackError,
    backend_for_cuda,
    check_backend,
    install_args,
    nightly_floor,
    previous,
    resolve_backend,
    reusable,
    to_prune,
    venv_name,
)
from vllm_fleet.pyenv.facts import parse_state

# driver CUDA (nvidia-smi "CUDA Version") -> the best torch backend
BACKENDS = [("13.0", "cu130"), ("13.1", "cu130"), ("12.9", "cu128"), ("12.8", "cu128"), ("12.7", "cu126"), ("12.6", "cu126")]


@pytest.mark.parametrize("cuda,backend", BACKENDS)
def test_driver_cuda_maps_to_the_newest_backend_it_runs(cuda, backend):
    assert backend_for_cuda(cuda) == backend


@pytest.mark.parametrize("cuda", ["12.4", "12.2", "11.8"])
def test_a_driver_older_than_any_backend_is_an_error_naming_the_driver_to_install(cuda):
    with pytest.raises(StackError, match=rf"supports CUDA {cuda}, older than any torch build .*oldest: cu126.*upgrade the NVIDIA driver to 560\+"):
        backend_for_cuda(cuda)


def test_no_cuda_version_is_an_error_with_a_remedy():
    with pytest.raises(StackError, match="reports no CUDA version.*set vllm_torch_backend"):
        backend_for_cuda(None)


def test_an_explicit_backend_must_fit_the_driver():
    assert resolve_backend("cu128", "13.0") == "cu128"
    assert resolve_backend("cpu", None) == "cpu"
    assert check_backend("cu126", "12.8") is None
    problem = check_backend("cu130", "12.8")
    assert problem == ('vllm_torch_backend=cu130 needs a driver with CUDA 13.0, the driver supports CUDA 12.8; '
                       'remedy: upgrade the NVIDIA driver to 580+, or set vllm_torch_backend = "cu128" (or "auto")')
    with pytest.raises(StackError, match="cu130 needs a driver with CUDA 13.0"):
        resolve_backend("cu130", "12.8")


@pytest.mark.parametrize("channel,version,backend,ref,name", [
    ("release", "0.25.0", "cu130", None, "vllm-0.25.0-cu130"),
    ("release", "0.25.0", "cpu", None, "vllm-0.25.0-cpu"),
    ("source", "0.25.0", "cu128", "v0.25.1", "vllm-0.25.0-src.v0.25.1-cu128"),
    ("source", "0.25.0", "cu128", "feature/x y", "vllm-0.25.0-src.feature_x_y-cu128"),
    ("nightly", "0.26.0", "cu130", None, "vllm-nightly-cu130"),
])
def test_venv_names(channel, version, backend, ref, name):
    assert venv_name(channel, version, backend, ref) == name


def test_release_install_from_pypi_uses_uvs_torch_backend():
    assert install_args("release", "0.25.0", "cu130", PackageSource()) == ["--torch-backend", "cu130", "vllm==0.25.0"]


def test_release_install_from_a_mirror_with_a_torch_index_and_a_pin():
    src = PackageSource(index_url="https://mirror.example/simple", extra_index_urls=("https://extra.example/simple",),
                        find_links=("/srv/wheels",), torch_index_url="https://mirror.example/whl/cu128")
    assert install_args("release", "0.25.0", "cu128", src, torch_version="2.11.0") == [
        "--index-url", "https://mirror.example/simple", "--extra-index-url", "https://extra.example/simple",
        "--find-links", "/srv/wheels", "--extra-index-url", "https://mirror.example/whl/cu128",
        "vllm==0.25.0", "torch==2.11.0"]


def test_nightly_allows_prereleases_from_the_nightly_index():
    assert install_args("nightly", "0.26.0", "cu130", PackageSource()) == [
        "--torch-backend", "cu130", "--prerelease", "allow", "--extra-index-url", "https://wheels.vllm.ai/nightly", "vllm>=0.26.0.dev0"]


def test_source_is_an_editable_install_of_the_checkout():
    args = install_args("source", "0.25.0", "cu128", PackageSource(), source_dir="/opt/vllm-fleet/src/vllm-v1")
    assert args == ["--torch-backend", "cu128", "--editable", "/opt/vllm-fleet/src/vllm-v1"]
    with pytest.raises(StackError):
        install_args("source", "0.25.0", "cu128", PackageSource())


def test_offline_never_names_an_index_or_the_torch_backend():
    """--torch-backend makes uv fetch torch from download.pytorch.org: wrong on an air-gapped host."""
    src = PackageSource(no_index=True, find_links=("/opt/vllm-fleet/wheelhouse",), index_url="https://x.example/simple",
                        extra_index_urls=("https://y.example",), torch_index_url="https://z.example")
    assert install_args("release", "0.25.0", "cpu", src, torch_version="2.13.0") == [
        "--no-index", "--find-links", "/opt/vllm-fleet/wheelhouse", "vllm==0.25.0", "torch==2.13.0"]
    assert install_args("nightly", "0.26.0", "cpu", src) == [
        "--no-index", "--find-links", "/opt/vllm-fleet/wheelhouse", "--prerelease", "allow", "vllm>=0.26.0.dev0"]


def _v(name, built_at, complete=True, intact=True, **kw):
    return HostVenv(name=name, complete=complete, intact=intact, built_at=built_at, **kw)


def test_prune_keeps_the_current_and_the_newest_others():
    venvs = [_v("vllm-0.23.0-cu130", 1), _v("vllm-0.24.0-cu130", 2), _v("vllm-0.25.0-cu130", 3)]
    assert to_prune("vllm-0.26.0-cu130", venvs, keep=2) == ["vllm-0.24.0-cu130", "vllm-0.23.0-cu130"]
    assert to_prune("vllm-0.26.0-cu130", venvs, keep=3) == ["vllm-0.23.0-cu130"]
    assert to_prune("vllm-0.24.0-cu130", venvs, keep=2) == ["vllm-0.23.0-cu130"]  # rolled back to an older one
    assert to_prune("vllm-0.25.0-cu130", venvs, keep=5) == []


def test_prune_drops_damaged_venvs_first_and_never_touches_unmarked_dirs_or_links():
    venvs = [_v("vllm-0.24.0-cu130", 2, intact=False), _v("vllm-0.25.0", 0, complete=False, intact=False),
             _v("vllm-0.26.0rc1-cu130", 5), HostVenv(name="vllm-nightly-cu130", target="vllm-0.26.0rc1-cu130")]
    assert to_prune("vllm-0.25.0-cu130", venvs, keep=2) == ["vllm-0.24.0-cu130"]
    # a nightly being built takes a slot; the link's current target stays
    assert to_prune(None, [_v("vllm-0.25.0-cu130", 1), *venvs[2:]], keep=2, building=True) == ["vllm-0.25.0-cu130"]


def test_previous_is_the_newest_usable_other_venv():
    venvs = [_v("a", 1), _v("b", 3, intact=False), _v("c", 2), _v("d", 9)]
    assert previous("d", venvs).name == "c"
    assert previous(None, venvs).name == "d"
    assert previous("a", [_v("a", 1)]) is None


def _spec(**kw):
    from vllm_fleet.pyenv.stack import BuildSpec

    base = dict(name="vllm-0.25.0-cpu", venvs_dir="/v", channel="release", version="0.25.0", backend="cpu", python="3.11",
                uv="/u", uv_cache="/c", install=[], torch_version="2.13.0")
    return BuildSpec(**{**base, **kw})


def test_reuse_needs_a_complete_intact_venv_built_for_the_same_request():
    spec = _spec()
    good = _v("vllm-0.25.0-cpu", 1, key=spec.key())
    assert reusable(spec, [good]) == good
    assert reusable(spec, [_v("vllm-0.25.0-cpu", 1, key=spec.key(), intact=False)]) is None
    assert reusable(spec, [_v("vllm-0.25.0-cpu", 1, key=spec.key(), complete=False)]) is None
    assert reusable(spec, [_v("vllm-0.25.0-cpu", 1, key={**spec.key(), "torch_version": "2.12.0"})]) is None
    assert reusable(spec, []) is None


def test_nightly_reuses_the_linked_build_when_new_enough():
    spec = _spec(name="vllm-nightly-cpu", channel="nightly", version="0.26.0")
    link = HostVenv(name="vllm-nightly-cpu", target="vllm-0.26.1rc2.dev3+gabc-cpu")
    built = _v("vllm-0.26.1rc2.dev3+gabc-cpu", 1, version="0.26.1rc2.dev3+gabc")
    assert reusable(spec, [link, built]) == built
    assert reusable(_spec(name="vllm-nightly-cpu", channel="nightly", version="0.27.0"), [link, built]) is None


# -- the host program's verify check (pure) --

def _found(**kw):
    base = {"vllm": {"version": "0.25.0"}, "torch": {"version": "2.11.0+cu130", "cuda": "13.0"},
            "architecture": {"name": "MiniMaxM2ForCausalLM", "supported": True}, "cuda": {"status": "passed"}}
    return {**base, **kw}


EXPECT = {"channel": "release", "version": "0.25.0", "backend": "cu130", "torch_version": "2.11.0",
          "architecture": "MiniMaxM2ForCausalLM", "min_vllm_version": "0.11.1"}


def test_verify_passes_when_everything_matches():
    assert venvctl.check(EXPECT, _found()) == []


@pytest.mark.parametrize("found,words", [
    ({"vllm": {"version": "0.24.0"}}, "vLLM 0.24.0 is installed, vllm_version is 0.25.0"),
    ({"vllm": {"version": None, "error": "ImportError: x"}}, "vLLM does not import: ImportError: x"),
    ({"torch": {"version": "2.10.0+cu130", "cuda": "13.0"}}, "torch 2.10.0+cu130 is installed, vllm_torch_version is 2.11.0"),
    ({"torch": {"version": "2.11.0+cu128", "cuda": "12.8"}}, "is a cu128 build, the torch backend chosen is cu130"),
    ({"torch": {"version": "2.11.0", "cuda": None}}, "is a cpu build"),
    ({"architecture": {"name": "MiniMaxM2ForCausalLM", "supported": False}},
     "MiniMaxM2ForCausalLM is not in vLLM 0.25.0's model registry; remedy: set vllm_version to 0.11.1 or newer"),
    ({"cuda": {"status": "failed", "reason": "torch.cuda.is_available()=False"}}, "CUDA check failed: torch.cuda.is_available()=False"),
])
def test_verify_names_each_mismatch(found, words):
    problems = venvctl.check(EXPECT, _found(**found))
    assert len(problems) == 1 and words in problems[0], problems


def test_verify_skipped_cuda_is_not_a_failure_and_nightly_checks_the_minimum():
    assert venvctl.check({**EXPECT, "backend": "cpu"}, _found(torch={"version": "2.13.0+cpu", "cuda": None},
                                                              cuda={"status": "skipped"}, ) | {}) == [
        "torch 2.13.0+cpu is installed, vllm_torch_version is 2.11.0"]
    nightly = {**EXPECT, "channel": "nightly", "version": "0.26.0"}
    assert venvctl.check(nightly, _found(vllm={"version": "0.26.1rc1.dev5+gabc"})) == []
    assert "older than vllm_version 0.26.0" in venvctl.check(nightly, _found())[0]


@pytest.mark.parametrize("version,floor", [("0.26.1", "0.26.1.dev0"), ("0.26.1rc1", "0.26.1.dev0"),
                                           ("0.26.1.dev3", "0.26.1.dev0"), ("1.0", "1.0.dev0")])
def test_nightly_floor_admits_the_pre_releases_of_the_release_asked_for(version, floor):
    """PEP 440 puts 0.26.1.dev3 below 0.26.1: `vllm>=0.26.1` would refuse the nightly the verify step accepts."""
    from packaging.version import Version

    assert nightly_floor(version) == floor
    assert Version("0.26.1.dev3") >= Version(nightly_floor("0.26.1")) and not Version("0.26.0rc9") >= Version(nightly_floor("0.26.1"))
    assert venvctl.check({**EXPECT, "channel": "nightly", "version": "0.26.1"}, _found(vllm={"version": "0.26.1.dev3"})) == []


def test_verify_of_a_source_venv_requires_vllm_imported_from_its_checkout():
    src = {**EXPECT, "channel": "source", "version": "0.25.0", "source_dir": "/opt/vllm-fleet/src/vllm-0.25.0-src.v1-cu130"}
    ok = _found(vllm={"version": "0.27.0", "path": "/opt/vllm-fleet/src/vllm-0.25.0-src.v1-cu130/vllm"})
    assert venvctl.check(src, ok) == []
    elsewhere = _found(vllm={"version": "0.25.0", "path": "/opt/v/lib/python3.11/site-packages/vllm"})
    problems = venvctl.check(src, elsewhere)
    assert len(problems) == 1 and "not from the checkout /opt/vllm-fleet/src/vllm-0.25.0-src.v1-cu130" in problems[0], problems
    sibling = _found(vllm={"version": "0.25.0", "path": "/opt/vllm-fleet/src/vllm-0.25.0-src.v1-cu130-old/vllm"})
    assert len(venvctl.check(src, sibling)) == 1
    installed = venvctl.check(src, _found(vllm={"version": "0.25.0"}))  # no path: imported from inside the venv
    assert len(installed) == 1 and installed[0].startswith("vLLM is imported from the venv's site-packages, not from the checkout"), installed


def test_verify_program_reports_cuda_as_skipped_with_a_cpu_torch_and_the_doubles_registry(tmp_path):
    """Run the real program with a Python that sees the vLLM double and a fake CPU-only torch module."""
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '2.13.0+cpu'\nclass version:\n    cuda = None\n")
    double = Path(__file__).resolve().parents[2] / "doubles" / "vllm-double"
    expect = {**EXPECT, "backend": "cpu", "torch_version": "2.13.0"}
    proc = subprocess.run([sys.executable, str(Path(venvctl.__file__)), "verify", json.dumps(expect)],
                          env={"PYTHONPATH": f"{tmp_path}:{double}"}, capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout)
    assert out["cuda"]["status"] == "skipped" and "CPU build" in out["cuda"]["reason"] and "test double" in out["cuda"]["reason"]
    assert out["architecture"] == {"name": "MiniMaxM2ForCausalLM", "supported": True}
    assert out["ok"] is True, out
    unsupported = {**expect, "architecture": "FooForCausalLM"}
    proc = subprocess.run([sys.executable, str(Path(venvctl.__file__)), "verify", json.dumps(unsupported)],
                          env={"PYTHONPATH": f"{tmp_path}:{double}"}, capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout)["problems"] == [
        "FooForCausalLM is not in vLLM 0.25.0's model registry; remedy: set vllm_version to 0.11.1 or newer (the model profile minimum)"]


def test_integrity_finds_a_missing_or_resized_recorded_file(tmp_path):
    venv = tmp_path / "v"
    site = venv / "lib" / "python3.11" / "site-packages"
    (site / "pkg-1.0.dist-info").mkdir(parents=True)
    (site / "pkg").mkdir()
    (site / "pkg" / "__init__.py").write_text("x = 1\n")
    (venv / "bin").mkdir()
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / "bin" / "tool").write_text("#!/bin/sh\n")
    (site / "pkg-1.0.dist-info" / "RECORD").write_text(
        "pkg/__init__.py,sha256=x,6\n../../../bin/tool,sha256=y,10\npkg-1.0.dist-info/RECORD,,\n")
    assert venvctl.integrity(str(venv)) is None
    (site / "pkg" / "__init__.py").write_text("x = 12\n")
    assert venvctl.integrity(str(venv)) == "lib/python3.11/site-packages/pkg/__init__.py (from pkg-1.0.dist-info) has 7 bytes, RECORD says 6"
    (site / "pkg" / "__init__.py").write_text("x = 1\n")
    (venv / "bin" / "tool").unlink()
    assert venvctl.integrity(str(venv)) == "bin/tool (from pkg-1.0.dist-info) is missing"
    (venv / "bin" / "python").unlink()
    assert venvctl.integrity(str(venv)) == "bin/python is missing or points nowhere"


def _overlapping_venv(tmp_path):
    """A venv where two distributions install one file (the later wins, the other's RECORD keeps a stale size),
    as nvidia-cutlass-dsl-libs-base and -cu13 do in real vLLM 0.25.0's venv, and one whose RECORD is simply wrong."""
    venv = tmp_path / "v"
    site = venv / "lib" / "python3.11" / "site-packages"
    for dist in ("base-1.0.dist-info", "cu13-1.0.dist-info", "bad-1.0.dist-info"):
        (site / dist).mkdir(parents=True)
    (site / "shared").mkdir()
    (site / "shared" / "lib.py").write_text("cu13 = True\n")  # 12 bytes: cu13's copy won
    (site / "bad.so").write_bytes(b"x" * 40)
    (venv / "bin").mkdir()
    (venv / "bin" / "python").symlink_to(sys.executable)
    (site / "base-1.0.dist-info" / "RECORD").write_text("shared/lib.py,sha256=a,9\n")
    (site / "cu13-1.0.dist-info" / "RECORD").write_text("shared/lib.py,sha256=b,12\n")
    (site / "bad-1.0.dist-info" / "RECORD").write_text("bad.so,sha256=c,30\n")
    return venv, site


def test_integrity_without_manifest_accepts_a_size_any_claimant_recorded(tmp_path):
    venv, site = _overlapping_venv(tmp_path)
    assert venvctl.integrity(str(venv)) == "lib/python3.11/site-packages/bad.so (from bad-1.0.dist-info) has 40 bytes, RECORD says 30"
    (site / "bad.so").write_bytes(b"x" * 30)
    assert venvctl.integrity(str(venv)) is None
    (site / "shared" / "lib.py").write_text("x\n")
    assert venvctl.integrity(str(venv)) == ("lib/python3.11/site-packages/shared/lib.py (from base-1.0.dist-info) has 2 bytes, "
                                            "RECORD says 9 or 12")


def test_integrity_checks_the_build_time_manifest(tmp_path):
    venv, site = _overlapping_venv(tmp_path)
    assert venvctl.write_files_manifest(str(venv)) == 2  # shared/lib.py once, bad.so; sizes as built
    assert (venv / venvctl.FILES).read_text() == ("40\tlib/python3.11/site-packages/bad.so\n"
                                                  "12\tlib/python3.11/site-packages/shared/lib.py\n")
    assert venvctl.integrity(str(venv)) is None  # the stale and the wrong RECORD sizes no longer count
    (site / "shared" / "lib.py").write_text("cu13 = False\n")
    assert venvctl.integrity(str(venv)) == "lib/python3.11/site-packages/shared/lib.py has 13 bytes, 12 when the venv was built"
    (site / "shared" / "lib.py").unlink()
    assert venvctl.integrity(str(venv)) == "lib/python3.11/site-packages/shared/lib.py is missing"


def test_state_reads_venvs_leftovers_and_links(tmp_path):
    venvs = tmp_path / "venvs"
    (venvs / ".tmp-vllm-0.26.0-cpu").mkdir(parents=True)
    (venvs / "vllm-0.25.0").mkdir()
    (venvs / "vllm-nightly-cpu").symlink_to("vllm-0.26.0-cpu")
    state = parse_state(json.dumps(venvctl.state(str(tmp_path))))
    assert state.partial == [".tmp-vllm-0.26.0-cpu"]
    assert {v.name: (v.complete, v.target) for v in state.venvs} == {"vllm-0.25.0": (False, None), "vllm-nightly-cpu": (None or False, "vllm-0.26.0-cpu")}
    assert state.uv is None and state.wheelhouse is None and state.program_sha256 is None


def test_state_counts_a_source_venv_without_its_checkout_as_damaged(tmp_path):
    venv = tmp_path / "venvs" / "vllm-0.25.0-src.v1-cpu"
    site = venv / "lib" / "python3.11" / "site-packages"
    (site / "vllm-0.25.0.dist-info").mkdir(parents=True)
    (site / "vllm-0.25.0.dist-info" / "RECORD").write_text("vllm-0.25.0.dist-info/RECORD,,\n")
    (venv / "bin").mkdir()
    (venv / "bin" / "python").symlink_to(sys.executable)
    checkout = tmp_path / "src" / "vllm-0.25.0-src.v1-cpu"
    (checkout / ".git").mkdir(parents=True)
    (venv / ".vllm-fleet.json").write_text(json.dumps({"key": {"channel": "source"}, "source_dir": str(checkout)}))
    [v] = parse_state(json.dumps(venvctl.state(str(tmp_path)))).venvs
    assert v.usable, v
    (checkout / ".git").rmdir()
    [v] = parse_state(json.dumps(venvctl.state(str(tmp_path)))).venvs
    assert v.complete and not v.intact and v.problem == f"its source checkout {checkout} is missing (the venv is an editable install of it)"


# -- preflight and settings --

def _snap(cuda):
    gpu = GpuInfo(driver_version="570.124.06", cuda_version=cuda,
                  gpus=[Gpu(0, "GPU-1", "NVIDIA A800-SXM4-80GB", 81920, 0, "8.0")])
    return Snapshot(os_id="debian", os_version="12", os_pretty_name=None, systemd_version="252", systemd_running=True,
                    python_version="3.11.2", gpu=gpu, listeners=[], disks={}, mem_total_bytes=None, nproc=None)


def test_preflight_stack_names_driver_backend_and_remedy():
    ok = load_settings({"vllm_python_version": "3.11"})
    assert preflight.check_stack(ok, _snap("12.8")) == []
    old = preflight.check_stack(ok, _snap("12.2"))
    assert len(old) == 1 and old[0].startswith("driver 570.124.06: the driver supports CUDA 12.2") and "remedy: upgrade" in old[0]
    cu130 = preflight.check_stack(load_settings({"vllm_torch_backend": "cu130"}), _snap("12.8"))
    assert len(cu130) == 1 and "cu130 needs a driver with CUDA 13.0" in cu130[0]


@pytest.mark.parametrize("data,key,words", [
    ({"vllm_torch_backend": "cuda12"}, "vllm_torch_backend", "auto (from the driver's CUDA) or one of cpu, cu126"),
    ({"vllm_torch_version": "2.11.0+cu130"}, "vllm_torch_version", "comes from vllm_torch_backend"),
    ({"vllm_index_url": "https://user:secret@mirror.example/simple"}, "vllm_index_url", "/root/.netrc"),
    ({"vllm_extra_index_urls": ["https://u:p@x.example/simple"]}, "vllm_extra_index_urls", "/root/.netrc"),
    ({"vllm_wheelhouse": "/nonexistent/wheels"}, "vllm_wheelhouse", "directory of wheels on the control machine"),
])
def test_bad_stack_settings_are_one_clear_error(data, key, words):
    with pytest.raises(SettingsError) as err:
        load_settings(data, host="gpu-1")
    text = str(err.value)
    assert text.startswith(f"host gpu-1: {key}=") and words in text and "secret" not in text.split("remedy")[0].replace("secret@", "")


def test_state_reads_the_paths_the_layout_sends(tmp_path):
    """The VenvState fact sends HostLayout.venv_state_paths() as JSON; the program reads only those paths."""
    from vllm_fleet.layout import HostLayout
    from vllm_fleet.pyenv.facts import VenvState

    lay = HostLayout("vllm", "vllm", str(tmp_path / "base"), str(tmp_path / "data"))
    (tmp_path / "base" / "venvs" / "vllm-0.25.0-cpu").mkdir(parents=True)
    (tmp_path / "base" / "wheelhouse").mkdir()
    (tmp_path / "base" / "wheelhouse" / "MANIFEST.json").write_text("{}")
    paths = json.dumps(lay.venv_state_paths(), sort_keys=True)
    proc = subprocess.run([sys.executable, str(Path(venvctl.__file__)), "state", paths], capture_output=True, text=True,
                          check=True)
    state = parse_state(proc.stdout.strip())
    assert [v.name for v in state.venvs] == ["vllm-0.25.0-cpu"] and state.wheelhouse == {}
    assert parse_state(proc.stdout.strip()) == parse_state(json.dumps(venvctl.state(str(tmp_path / "base"))))
    assert VenvState().command(paths).endswith(f"state {__import__('shlex').quote(paths)}")


# ------------------------------------------------ the rollback target is never pruned (issue 13, item 3) --


def test_prune_never_removes_the_venvs_of_the_live_and_the_last_good_unit():
    venvs = [_v("vllm-0.23.0-cu130", 1), _v("vllm-0.24.0-cu130", 2), _v("vllm-0.25.0-cu130", 3)]
    # keep 1: without in_use everything but the current goes, the last known good (0.23) included
    assert to_prune("vllm-0.26.0-cu130", venvs, keep=1) == ["vllm-0.25.0-cu130", "vllm-0.24.0-cu130", "vllm-0.23.0-cu130"]
    assert to_prune("vllm-0.26.0-cu130", venvs, keep=1, in_use=["vllm-0.23.0-cu130"]) == [
        "vllm-0.25.0-cu130", "vllm-0.24.0-cu130"]
    # a third build with keep 2: the live unit still runs 0.24 and the last good is 0.23: both stay
    assert to_prune("vllm-0.26.0-cu130", venvs, keep=2, in_use=["vllm-0.24.0-cu130", "vllm-0.23.0-cu130"]) == [
        "vllm-0.25.0-cu130"]
    # a unit naming a venv that is gone takes no slot
    assert to_prune("vllm-0.26.0-cu130", venvs, keep=2, in_use=["vllm-0.20.0-cu130"]) == [
        "vllm-0.24.0-cu130", "vllm-0.23.0-cu130"]


def test_state_names_the_venvs_the_live_and_the_last_good_unit_run(tmp_path):
    """The venv program reads the units the layout sends, as render writes them (ExecStart= with the venv's vllm)."""
    from vllm_fleet.layout import HostLayout
    from vllm_fleet.planner.plan import make_plan
    from vllm_fleet.service.render import render

    base = tmp_path / "base"
    lay = HostLayout("vllm", "vllm", str(base), str(tmp_path / "data"), config_dir=str(tmp_path / "etc"),
                     unit_dir=str(tmp_path / "units"))
    for name in ("vllm-0.23.0-cpu", "vllm-0.24.0-cpu", "vllm-0.25.0-cpu"):
        (base / "venvs" / name).mkdir(parents=True)
    repo = Path(__file__).resolve().parents[3]
    # the settings only render the units (the venv path is given): default dirs, as tmp dirs are refused as toolkit dirs
    settings = load_settings({"vllm_model": str(repo / "tests/fixtures/tiny-minimax-m2"), "vllm_api_key": "sk-unit-test-key-0001"})
    plan = make_plan(settings.model, "4xA800-80G", settings.plan_options(lay.model("tiny-minimax-m2")))
    (tmp_path / "units").mkdir()
    (tmp_path / "etc").mkdir()
    Path(lay.unit_path).write_text(render(settings, plan, lay.venv("vllm-0.25.0-cpu")).unit)
    Path(lay.prev(lay.unit_path)).write_text(render(settings, plan, lay.venv("vllm-0.23.0-cpu")).unit)
    paths = json.dumps(lay.venv_state_paths(), sort_keys=True)
    proc = subprocess.run([sys.executable, str(Path(venvctl.__file__)), "state", paths], capture_output=True, text=True,
                          check=True)
    state = parse_state(proc.stdout.strip())
    assert state.in_use == ["vllm-0.25.0-cpu", "vllm-0.23.0-cpu"]
    Path(lay.prev(lay.unit_path)).unlink()  # first install: no last good yet
    assert venvctl.state(json.loads(paths))["in_use"] == ["vllm-0.25.0-cpu"]
