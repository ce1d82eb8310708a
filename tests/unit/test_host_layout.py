"""vllm_fleet/layout.py: one object owns every path on a host; uninstall's list comes from it."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from vllm_fleet.layout import write_leftovers, CONFIG_DIR, UNIT_DIR, HostLayout
from vllm_fleet.settings import Settings

# Paths that are the same for every service on a host sharing base_dir/data_dir (programs, tools, roots).
SHARED = {"config_dir", "unit_dir", "base_dir", "data_dir", "home", "bin_dir", "gate_program", "venv_program",
          "state_dir", "venvs_dir", "uv_dir", "uv", "tool_cache_dir", "uv_cache", "wheelhouse_dir", "src_dir",
          "fetch_dir", "fetch_program", "fetch_venv", "weights_state_dir", "models_dir", "cache_dir", "vllm_cache",
          "hf_home", "triton_cache", "torchinductor_cache", "modelscope_cache", "modelscope_home", "watchdog_program",
          "runtime_home", "cuda_cache", "router_dir", "router_program", "prober_program", "uv_pip", "wheelhouse_manifest",
          "fetch_python", "upload_dir"}
# Names that are not paths, and the same path under two names on purpose.
NOT_PATHS = {"service", "user", "unit_name", "fetch_unit", "account_dirs", "watchdog_unit", "devices_unit", "gate_unit",
             "router_unit", "prober_unit", "front_unit"}
# home: the service user's home directory and WorkingDirectory is data_dir; runtime_home: the HOME it runs with
# is the writable cache dir.
ALIASES = {"home": "data_dir", "runtime_home": "cache_dir"}
SAMPLE = {"venv": "vllm-0.25.0-cu130", "source_checkout": "vllm-0.25.0-src.v1-cu130", "weights_state": "Org/Name",
          "fetch_config": ("Org/Name", "abc"), "model": "Org/Name", "model_revision": ("Org/Name", "abc"),
          "weights_revision_state": ("Org/Name", "abc"), "weights_verified": ("Org/Name", "abc"), "router_venv": "0.1.17",
          "weights_status": ("Org/Name", "abc"), "upload_dir": "/var/lib/deployer"}
LOGIN_HOME = SAMPLE["upload_dir"]  # the SSH login user's home: its upload_dir is the one path outside our roots


def _paths(lay: HostLayout) -> dict[str, str]:
    """Every path the layout names: its str properties and fields, and its per-name methods on a sample name."""
    out = {}
    for name, value in inspect.getmembers(lay):
        if name.startswith("_") or name in NOT_PATHS:
            continue
        if isinstance(value, str):
            out[name] = value
        elif name in SAMPLE:
            args = SAMPLE[name]
            out[name] = value(*args) if isinstance(args, tuple) else value(args)
        elif name == "prev":  # the gate's last-good copies of this service's unit and env file
            out["prev"], out["prev_env"] = value(lay.unit_path), value(lay.env_file)
    return out


LAY = HostLayout.of(Settings(model="minimax-m2", service_name="vllm-b", service_user="svc",
                             base_dir="/srv/base", data_dir="/srv/data"))


def test_every_path_is_absolute_and_under_its_root():
    roots = (CONFIG_DIR, UNIT_DIR, "/srv/base", "/srv/data", LOGIN_HOME)
    for name, path in _paths(LAY).items():
        assert path.startswith("/") and "//" not in path, (name, path)
        assert any(path == r or path.startswith(r + "/") for r in roots), (name, path)
    assert set(SAMPLE) | {"prev", "unit_path", "env_file", "gate_config", "fetch_env_file"} <= set(_paths(LAY))


def test_no_two_purposes_share_a_path():
    seen: dict[str, str] = {}
    for name, path in sorted(_paths(LAY).items()):
        if name in ALIASES:
            assert path == _paths(LAY)[ALIASES[name]]
            continue
        assert path not in seen, f"{name} and {seen.get(path)} are both {path}"
        seen[path] = name


def test_per_service_paths_carry_the_service_name_and_two_services_share_none():
    other = HostLayout.of(Settings(model="minimax-m2", service_name="vllm-c", base_dir="/srv/base", data_dir="/srv/data"))
    mine, theirs = _paths(LAY), _paths(other)
    for name, path in mine.items():
        if name in SHARED or name in SAMPLE:
            continue
        assert "vllm-b" in path.rsplit("/", 1)[-1], (name, path)
        assert theirs[name] != path, name


def test_the_paths_hosts_already_have_are_unchanged():
    lay = HostLayout.of(Settings(model="minimax-m2"))
    assert (lay.unit_path, lay.env_file, lay.gate_config, lay.gate_program, lay.gate_state, lay.gate_log) == (
        "/etc/systemd/system/vllm.service", "/etc/vllm-fleet/vllm.env", "/etc/vllm-fleet/vllm.gate.json",
        "/opt/vllm-fleet/bin/vllm-fleet-gate", "/opt/vllm-fleet/state/vllm.gate.json", "/opt/vllm-fleet/state/vllm.gate.log")
    assert (lay.fetch_unit_path, lay.fetch_env_file, lay.fetch_program, lay.fetch_venv) == (
        "/etc/systemd/system/vllm-fetch.service", "/etc/vllm-fleet/vllm-fetch.env",
        "/opt/vllm-fleet/fetch/fetch_weights.py", "/opt/vllm-fleet/fetch/venv")
    assert lay.weights_state("Org/Name") == "/var/lib/vllm-fleet/weights-state/Org--Name"  # the flat layout's state
    assert (lay.venv("vllm-0.25.0-cu130"), lay.uv, lay.uv_cache, lay.wheelhouse_dir, lay.source_checkout("x")) == (
        "/opt/vllm-fleet/venvs/vllm-0.25.0-cu130", "/opt/vllm-fleet/uv/bin/uv", "/opt/vllm-fleet/cache/uv",
        "/opt/vllm-fleet/wheelhouse", "/opt/vllm-fleet/src/x")
    assert (lay.model("Org/Name"), lay.hf_home, lay.vllm_cache, lay.weights_pending, lay.prev(lay.env_file)) == (
        "/var/lib/vllm-fleet/models/Org/Name", "/var/lib/vllm-fleet/cache/huggingface", "/var/lib/vllm-fleet/cache/vllm",
        "/opt/vllm-fleet/state/vllm.weights-pending", "/etc/vllm-fleet/vllm.env.prev")
    assert (lay.uv_pip, lay.wheelhouse_manifest, lay.fetch_python, lay.weights_status("Org/Name", "v1"),
            lay.upload_dir("/var/lib/ci")) == (
        "/opt/vllm-fleet/uv/bin/pip", "/opt/vllm-fleet/wheelhouse/MANIFEST.json", "/opt/vllm-fleet/fetch/venv/bin/python",
        "/var/lib/vllm-fleet/weights-state/Org--Name/v1/status.json", "/var/lib/ci/.vllm-fleet-upload")


def test_venv_sub_paths_and_globs_are_the_layouts():
    from vllm_fleet.layout import dist_info_glob, venv_bin

    assert venv_bin("/opt/v/venvs/x/", "vllm") == "/opt/v/venvs/x/bin/vllm"
    assert dist_info_glob("/opt/v/fetch/venv", "huggingface_hub") == \
        "/opt/v/fetch/venv/lib/python3*/site-packages/huggingface_hub-*.dist-info"
    # every part but the wildcards is quoted for the shell
    assert dist_info_glob("/opt/my venv", "x") == "'/opt/my venv/lib/python3'*/site-packages/x-*.dist-info"


def test_the_host_programs_use_the_layouts_file_names():
    """The stdlib-only host programs cannot import the layout: the names they write and read are the layout's."""
    from vllm_fleet import layout
    from vllm_fleet.pyenv import hostprog as venv_program
    from vllm_fleet.weights import hostprog as fetch_program

    assert fetch_program.STATUS == layout.WEIGHTS_STATUS
    assert f'os.path.join(d, "{layout.WHEELHOUSE_MANIFEST}")' in Path(venv_program.__file__).read_text()


def test_uninstall_removes_the_login_users_upload_dir():
    from vllm_fleet.service.step import removal

    targets = {t.path: t for t in removal(Settings(model="minimax-m2"), login_home="/var/lib/ci")}
    assert targets["/var/lib/ci/.vllm-fleet-upload"].remove
    assert targets["/var/lib/ci/.vllm-fleet-upload"].kind == "directory"


def _covered(path: str, targets) -> list:
    """The targets that decide `path`: itself, or a directory above it."""
    return [t for t in targets if path == t.path or (t.kind == "directory" and path.startswith(t.path + "/"))]


@pytest.mark.parametrize("others", [(), ("vllm-c",)])
@pytest.mark.parametrize("purge_venvs,purge_weights", [(False, False), (True, False), (False, True), (True, True)])
def test_uninstall_decides_every_path_the_layout_names(purge_venvs, purge_weights, others):
    targets = LAY.uninstall_targets(purge_venvs=purge_venvs, purge_weights=purge_weights, others=others,
                                    login_home=LOGIN_HOME)
    assert len({t.path for t in targets}) == len(targets)
    for name, path in _paths(LAY).items():
        if name == "unit_dir":
            continue  # /etc/systemd/system is the system's, not ours
        deciding = _covered(path, targets)
        assert deciding, f"uninstall neither removes nor keeps {name} ({path})"
        innermost = max(deciding, key=lambda t: len(t.path))
        assert innermost.remove or innermost.why.startswith("kept:"), (name, innermost)


def test_uninstall_keeps_venvs_weights_and_caches_unless_asked():
    def removed(**kw):
        return {t.path for t in LAY.uninstall_targets(**kw) if t.remove}

    always = {LAY.unit_path, LAY.fetch_unit_path, LAY.env_file, LAY.fetch_env_file, LAY.gate_config, LAY.gate_state,
              LAY.gate_log, LAY.weights_pending, LAY.prev(LAY.unit_path), LAY.prev(LAY.env_file), LAY.fetch_dir,
              LAY.uv_dir, LAY.wheelhouse_dir, LAY.weights_state_dir, LAY.gate_program, LAY.venv_program,
              LAY.watchdog_unit_path, LAY.devices_unit_path, LAY.watchdog_config, LAY.watchdog_program,
              LAY.router_unit_path, LAY.router_config, LAY.router_dir, LAY.prober_unit_path, LAY.prober_config,
              LAY.router_env_file, LAY.front_unit_path, LAY.front_config, LAY.router_rolling_dir,
              LAY.upload_dir("/root")}
    # what an interrupted write of a secrets file leaves (the deploy's staged upload, the gate's copy) goes too
    always |= {p for f in (LAY.env_file, LAY.prev(LAY.env_file), LAY.fetch_env_file, LAY.router_env_file, LAY.front_config)
               for p in write_leftovers(f)}
    assert removed() == always
    assert removed(purge_venvs=True) == always | {LAY.venvs_dir, LAY.src_dir, LAY.uv_cache}
    assert removed(purge_weights=True) == always | {LAY.models_dir, LAY.cache_dir}
    kept = {t.path for t in LAY.uninstall_targets() if not t.remove}
    assert {LAY.base_dir, LAY.data_dir, LAY.config_dir, LAY.bin_dir, LAY.state_dir} <= kept


def test_uninstall_step_removes_the_layouts_list():
    from vllm_fleet.service.step import removal

    s = Settings(model="minimax-m2", purge_weights=True)
    assert removal(s) == HostLayout.of(s).uninstall_targets(purge_weights=True)


def test_uninstall_keeps_the_shared_tooling_while_another_service_is_deployed():
    found = ["/etc/vllm-fleet/vllm-b.gate.json", "/etc/vllm-fleet/vllm-c.gate.json", "/etc/other/x.gate.json"]
    assert LAY.deployed_services(found) == ["vllm-b", "vllm-c"]
    targets = {t.path: t for t in LAY.uninstall_targets(others=["vllm-c"])}
    for path in (LAY.gate_program, LAY.venv_program, LAY.fetch_dir, LAY.uv_dir, LAY.wheelhouse_dir, LAY.weights_state_dir):
        assert not targets[path].remove and targets[path].why == "kept: also used by vllm-c on this host"
    for path in (LAY.unit_path, LAY.fetch_unit_path, LAY.env_file, LAY.fetch_env_file, LAY.gate_config):
        assert targets[path].remove


def test_each_revision_has_its_own_weights_dir_state_and_verified_marker():
    lay = HostLayout.of(Settings(model="minimax-m2"))
    assert lay.model_revision("Org/Name", "a" * 40) == f"/var/lib/vllm-fleet/models/Org/Name/{'a' * 40}"
    assert lay.model_revision("Org/Name", None) == "/var/lib/vllm-fleet/models/Org/Name/main"
    assert lay.model_revision("Org/Name", "refs/pr/1") == "/var/lib/vllm-fleet/models/Org/Name/refs-pr-1"
    assert lay.fetch_config("Org/Name", "v1") == "/var/lib/vllm-fleet/weights-state/Org--Name/v1/fetch.json"
    marker = lay.weights_verified("Org/Name", "v1")
    assert marker == "/var/lib/vllm-fleet/weights-state/Org--Name/v1/verified.json"
    # the service unit finds the marker from the path it serves, through the layout alone
    assert lay.weights_marker_of(lay.model_revision("Org/Name", "v1")) == marker
    assert lay.weights_marker_of(lay.model("tiny-minimax-m2")) is None  # a mirrored model dir
    assert lay.weights_marker_of("/models/m2") is None  # a directory served in place
