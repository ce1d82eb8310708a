"""vllm_fleet.service.render: the unit and env file from Settings + Plan (pure), and `vllm-fleet render`."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vllm_fleet.cli.main import main
from vllm_fleet.planner.plan import make_plan
from vllm_fleet.service.devices import HostDevices
from vllm_fleet.service.render import (PLACEHOLDER, REAP_GRACE_S, TIMEOUT_PRESTART_S, RenderError, render, served_name,
                                       start_timeout_s, systemd_word, uses_append_think)
from vllm_fleet.settings import Settings

REPO = Path(__file__).resolve().parents[3]
TINY = str(REPO / "tests/fixtures/tiny-minimax-m2")
KEY = "sk-unit-test-key-0123456789"
VENV = "/opt/vllm-fleet/venvs/vllm-0.25.0-cu128"


def _render(systemd_version: int | None = 252, show_secrets: bool = True, **kw):
    settings = Settings(model=TINY, api_key=KEY, **kw)
    plan = make_plan(settings.model, "4xA800-80G", settings.plan_options("/var/lib/vllm-fleet/models/tiny-minimax-m2"))
    return settings, plan, render(settings, plan, VENV, systemd_version=systemd_version, show_secrets=show_secrets)


def _unquote_exec(line: str) -> list[str]:
    """systemd's ExecStart= word splitting for what systemd_word produces (double quotes, \\ escapes, $$ and %%)."""
    words, cur, quoted, i, started = [], "", False, 0, False
    while i < len(line):
        c = line[i]
        if quoted and c == "\\":
            cur += line[i + 1]
            i += 2
            continue
        if c == '"':
            quoted, started = not quoted, True
        elif c == " " and not quoted:
            if started or cur:
                words.append(cur)
            cur, started = "", False
        else:
            cur += c
        i += 1
    if started or cur:
        words.append(cur)
    return [w.replace("$$", "$").replace("%%", "%") for w in words]


def _directives(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_exec_start_is_the_plans_argv_with_the_venvs_vllm():
    _, plan, files = _render(cudagraph_piecewise=True)
    d = _directives(files.unit)
    assert _unquote_exec(d["ExecStart"][0]) == [f"{VENV}/bin/vllm", *plan.argv[1:]]
    assert '"{\\"cudagraph_mode\\": \\"PIECEWISE\\"}"' in d["ExecStart"][0]


def test_the_key_is_only_in_the_env_file_and_masked_for_display():
    _, plan, files = _render()
    assert KEY not in files.unit and KEY not in " ".join(plan.argv)
    assert f'VLLM_API_KEY="{KEY}"' in files.env.splitlines()
    assert files.env_path == "/etc/vllm-fleet/vllm.env" and f"EnvironmentFile={files.env_path}" in files.unit
    _, _, shown = _render(show_secrets=False)
    assert KEY not in shown.env
    assert f'VLLM_API_KEY="{PLACEHOLDER.format(setting="vllm_api_key")}"' in shown.env
    assert shown.unit == files.unit


def test_no_secret_line_without_a_secret():
    settings = Settings(model=TINY)
    plan = make_plan(settings.model, "1xA800-80G", settings.plan_options())
    assert "VLLM_API_KEY" not in "".join(l for l in render(settings, plan, VENV).env.splitlines() if not l.startswith("#"))


def test_environment_holds_plan_env_gpus_and_caches_under_data_dir():
    _, plan, files = _render(gpus=[1, 3, 4, 5], data_dir="/srv/vf", extra_env={"SAFETENSORS_FAST_GPU": "1"})
    env = dict(v.strip('"').split("=", 1) for v in _directives(files.unit)["Environment"])
    for k, v in plan.env.items():
        assert env[k] == v
    assert env["CUDA_VISIBLE_DEVICES"] == "1,3,4,5"
    assert env["VLLM_CACHE_ROOT"] == "/srv/vf/cache/vllm" and env["HF_HOME"] == "/srv/vf/cache/huggingface"
    assert env["SAFETENSORS_FAST_GPU"] == "1"
    assert _directives(files.unit)["ReadWritePaths"] == ["/srv/vf/cache"]
    assert _directives(files.unit)["WorkingDirectory"] == ["/srv/vf"]


def test_restart_always_with_backoff_only_where_systemd_has_it_and_no_start_limit():
    # vLLM 0.25's API server exits 0 when its engine dies (measured on an H200): on-failure would leave it down.
    for version in (249, 252, None):
        d = _directives(_render(systemd_version=version)[2].unit)
        assert "RestartSteps" not in d and "RestartMaxDelaySec" not in d
        assert d["Restart"] == ["always"] and d["RestartSec"] == ["10"]
        assert d["StartLimitIntervalSec"] == ["0"] and "StartLimitBurst" not in d  # never dead for good
    d = _directives(_render(systemd_version=255)[2].unit)
    assert d["RestartSteps"] == ["5"] and d["RestartMaxDelaySec"] == ["300"]
    d = _directives(_render(systemd_version=255, restart_sec=20, restart_max_delay_s=120)[2].unit)
    assert d["RestartSec"] == ["20"] and d["RestartMaxDelaySec"] == ["120"]


def test_start_timeout_scales_with_weights_and_timeout_start_sec_bounds_the_prestart():
    assert start_timeout_s(0) == 600
    assert start_timeout_s(230 * 10**9) == 600 + 6 * 215
    _, plan, files = _render()
    # Type=exec: TimeoutStartSec covers ExecStartPre (the GPU reaper) and the exec, so it is the reaper's bound
    # (SIGTERM, the grace, SIGKILL) with room, not vLLM's own start (the gate's wait is start_timeout_s).
    d = _directives(files.unit)
    assert d["Type"] == ["exec"] and d["TimeoutStartSec"] == [str(TIMEOUT_PRESTART_S)]
    assert TIMEOUT_PRESTART_S >= REAP_GRACE_S + 60
    assert f"waits {start_timeout_s(plan.weights_bytes)} s" in files.unit


def test_home_and_every_jit_cache_are_under_the_only_writable_path():
    _, _, files = _render(data_dir="/srv/vf")
    d = _directives(files.unit)
    env = _environment(files.unit)
    writable = d["ReadWritePaths"][0]
    for name in ("HOME", "XDG_CACHE_HOME", "CUDA_CACHE_PATH", "FLASHINFER_WORKSPACE_BASE", "VLLM_CACHE_ROOT",
                 "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "HF_HOME"):
        assert env[name] == writable or env[name].startswith(writable + "/"), name
    assert d["WorkingDirectory"] == ["/srv/vf"] and env["HOME"] == "/srv/vf/cache"


def test_the_syscall_filter_gives_pidfd_getfd_back_after_denying_debug():
    lines = _directives(_render()[2].unit)["SystemCallFilter"]
    assert lines[0] == "@system-service" and "@debug" in lines[1].split() and lines[1].startswith("~")
    assert lines[2:] == ["pidfd_getfd"]  # an allow entry after the deny list adds the call back (systemd.exec)


def test_device_allow_adds_infiniband_and_gdrdrv_only_where_the_host_has_them():
    assert _directives(_render()[2].unit)["DeviceAllow"] == ["char-nvidia* rw"]
    _, plan, _ = _render()
    settings = Settings(model=TINY, api_key=KEY)
    both = render(settings, plan, VENV, devices=HostDevices(infiniband=True, gdrdrv=True))
    assert _directives(both.unit)["DeviceAllow"] == ["char-nvidia* rw", "char-infiniband* rw",
                                                     "/dev/infiniband/rdma_cm rw", "char-gdrdrv rw"]


def test_device_nodes_come_from_a_unit_ordered_before_the_service():
    _, plan, _ = _render()
    settings = Settings(model=TINY, api_key=KEY)
    files = render(settings, plan, VENV, devices=HostDevices(nvidia_modprobe="/usr/sbin/nvidia-modprobe",
                                                              persistenced=True))
    d = _directives(files.unit)
    assert d["After"] == ["network-online.target vllm-devices.service nvidia-persistenced.service"]
    assert d["Wants"] == d["After"]
    units = dict(files.units)
    dev = _directives(units["/etc/systemd/system/vllm-devices.service"])
    assert dev["ExecStart"] == ["-/usr/sbin/nvidia-modprobe -u -c=0"] and dev["Type"] == ["oneshot"]
    assert dev["Before"] == ["vllm.service"] and dev["After"] == ["nvidia-persistenced.service"]
    assert "DevicePolicy" not in dev and "User" not in dev  # root, no device policy: it may load modules, mknod
    plain = render(settings, plan, VENV, devices=HostDevices(nvidia_modprobe=None))
    assert _directives(plain.unit)["After"] == ["network-online.target vllm-devices.service"]
    assert _directives(dict(plain.units)["/etc/systemd/system/vllm-devices.service"])["ExecStart"] == [
        "-/usr/bin/nvidia-modprobe -u -c=0"]


def test_the_gpu_reaper_runs_privileged_before_each_start_unless_switched_off():
    d = _directives(_render()[2].unit)
    assert [l for l in d["ExecStartPre"] if l.startswith("+")] == ["+/usr/bin/python3 /opt/vllm-fleet/bin/vllm-fleet-watchdog reap "
                                 "/etc/vllm-fleet/vllm.watchdog.json"]
    assert not [l for l in _directives(_render(reap_gpu_leftovers=False)[2].unit).get("ExecStartPre", []) if l.startswith("+")]


def test_the_watchdog_unit_follows_its_settings():
    _, _, files = _render(watchdog_interval_s=20, watchdog_deadline_s=15, watchdog_misses=4)
    text = dict(files.units)["/etc/systemd/system/vllm-watchdog.service"]
    d = _directives(text)
    assert d["ExecStart"] == ["/usr/bin/python3 /opt/vllm-fleet/bin/vllm-fleet-watchdog watch "
                              "/etc/vllm-fleet/vllm.watchdog.json"]
    assert d["Restart"] == ["always"] and d["WantedBy"] == ["multi-user.target"]
    assert "Every 20 s a 1-token completion with a 15 s deadline; 4 misses" in text
    assert [p for p, _ in _render(watchdog=False)[2].units] == ["/etc/systemd/system/vllm-devices.service"]


def _exposure(tmp_path: Path, name: str, text: str) -> float:
    unit = tmp_path / name
    unit.write_text(text)
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
                         capture_output=True, text=True, timeout=60).stdout
    found = re.search(r"Overall exposure level for \S+: ([\d.]+)", out)
    assert found, out
    return float(found.group(1))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (systemd >= 250)")
def test_exposure_stays_at_most_2_5_with_every_opening(tmp_path):
    # Offline mode scores the file alone (the e2e test scores the installed unit on the hosts' systemd 252).
    _, plan, _ = _render()
    settings = Settings(model=TINY, api_key=KEY)
    files = render(settings, plan, VENV, devices=HostDevices(infiniband=True, gdrdrv=True, persistenced=True))
    score = _exposure(tmp_path, "vllm.service", files.unit)
    print(f"systemd-analyze security --offline: vllm.service {score}")
    assert score <= 2.5
    watchdog = _exposure(tmp_path, "vllm-watchdog.service", dict(files.units)["/etc/systemd/system/vllm-watchdog.service"])
    print(f"systemd-analyze security --offline: vllm-watchdog.service {watchdog}")
    assert watchdog <= 2.5


def test_hardening_and_process_directives():
    d = _directives(_render()[2].unit)
    for key, value in {"User": "vllm", "Group": "vllm", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "ProtectHome": "yes", "PrivateTmp": "yes", "DevicePolicy": "closed", "KillMode": "mixed",
                       "LimitNOFILE": "1048576", "MemoryDenyWriteExecute": "no", "PrivateDevices": "no",
                       "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK"}.items():
        assert d[key] == [value], key
    assert d["DeviceAllow"] == ["char-nvidia* rw"]
    assert int(d["LimitNOFILE"][0]) >= 65535


def test_every_directive_is_documented():
    doc = (REPO / "docs/service.md").read_text()
    for key in _directives(_render(systemd_version=255)[2].unit):
        assert f"`{key}" in doc, f"{key} is not documented in docs/service.md"


@pytest.mark.parametrize("word,quoted", [
    ("--port", "--port"), ("a b", '"a b"'), ("$HOME", '"$$HOME"'), ("50%", "50%%"), ('{"a": 1}', '"{\\"a\\": 1}"'), ("", '""'),
])
def test_systemd_word_quoting(word, quoted):
    assert systemd_word(word) == quoted


def test_line_breaks_cannot_reach_a_unit():
    with pytest.raises(RenderError):
        systemd_word("a\nExecStartPre=/bin/sh")
    with pytest.raises(RenderError):
        _render(extra_env={"X": "1\nUser=root"})


def test_think_check_follows_the_reasoning_parser():
    settings = Settings(model="minimax-m2")
    plan = make_plan(settings.model, "4xH200", settings.plan_options())
    assert uses_append_think(plan) and served_name(plan) == "minimax-m2"
    _, tiny, _ = _render()
    assert not uses_append_think(tiny) and served_name(tiny) == "tiny-minimax-m2"


def test_render_cli_writes_what_render_returns(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLLM_FLEET_API_KEY", KEY)
    rc = main(["render", "--model", TINY, "--gpus", "4xA800-80G", "--gpu-memory-utilization", "0.5", "--port", "8101",
               "--gpu-indices", "0,1,2,3", "--out", str(tmp_path)])
    assert rc == 0
    settings = Settings(model=TINY, api_key="x" * 16, gpu_memory_utilization=0.5, port=8101, gpus=[0, 1, 2, 3])
    plan = make_plan(TINY, "4xA800-80G", settings.plan_options("/var/lib/vllm-fleet/models/tiny-minimax-m2"))
    want = render(settings, plan, "/opt/vllm-fleet/venvs/vllm-0.25.0-cu130", systemd_version=252, show_secrets=False)
    assert (tmp_path / "vllm.service").read_text() == want.unit
    assert (tmp_path / "vllm.env").read_text() == want.env
    assert KEY not in (tmp_path / "vllm.env").read_text() + capsys.readouterr().out


def test_render_cli_refuses_a_plan_with_errors(tmp_path):
    assert main(["render", "--model", TINY, "--gpus", "1xA800-80G", "--max-model-len", "99999999", "--out", str(tmp_path)]) in (1, 2)
    assert not (tmp_path / "vllm.service").exists()


def test_a_local_model_dir_runs_offline_and_a_repo_id_does_not():
    from vllm_fleet.planner.plan import make_plan
    from vllm_fleet.service.render import service_environment
    from vllm_fleet.settings import load_settings

    s = load_settings({})
    local = make_plan("minimax-m2", "4xH200", s.plan_options("/var/lib/vllm-fleet/models/MiniMaxAI/MiniMax-M2"))
    assert service_environment(s, local)["HF_HUB_OFFLINE"] == "1"
    hub = make_plan("minimax-m2", "4xH200", s.plan_options())
    assert "HF_HUB_OFFLINE" not in service_environment(s, hub)


MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
                 "VLLM_ALLREDUCE_USE_SYMM_MEM": "0"}


def _environment(unit: str) -> dict[str, str]:
    return dict(v.strip('"').split("=", 1) for v in _directives(unit)["Environment"])


@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_default_unit_leaves_nvlink_multicast_and_the_sampler_to_vllm(gpus):
    settings = Settings(model=TINY, api_key=KEY, gpus=list(range(gpus)))
    plan = make_plan(settings.model, f"{gpus}xH200", settings.plan_options("/var/lib/vllm-fleet/models/tiny-minimax-m2"))
    env = _environment(render(settings, plan, VENV).unit)
    assert not set(MULTICAST_OFF) & set(env)
    assert "VLLM_USE_FLASHINFER_SAMPLER" not in env


def test_settings_switch_nvlink_multicast_and_the_flashinfer_sampler_off_in_the_unit():
    _, _, files = _render(nvlink_multicast=False, flashinfer_sampler=False)
    env = _environment(files.unit)
    assert {k: env[k] for k in MULTICAST_OFF} == MULTICAST_OFF
    assert env["VLLM_USE_FLASHINFER_SAMPLER"] == "0"


def test_extra_env_sets_other_variables_and_wins_over_the_plans():
    # vllm_extra_env is the way to set any other variable (or one of the four alone); it comes last.
    _, _, files = _render(flashinfer_sampler=False, extra_env={"VLLM_USE_FLASHINFER_SAMPLER": "1", "NCCL_NVLS_ENABLE": "0"})
    env = _environment(files.unit)
    assert env["VLLM_USE_FLASHINFER_SAMPLER"] == "1" and env["NCCL_NVLS_ENABLE"] == "0"
    assert "TORCH_SYMM_MEM_DISABLE_MULTICAST" not in env


# ------------------------------------------------ a missing or empty secret refuses the start (issue 13, item 4) --


def _exec_start_pre(unit: str) -> list[str]:
    """The ExecStartPre= words as systemd splits them (single quotes here; `$$` is `$`)."""
    (line,) = [l for l in _directives(unit)["ExecStartPre"] if l.startswith("/bin/sh ")]  # the secret check
    import shlex as _shlex

    return [w.replace("$$", "$") for w in _shlex.split(line)]


@pytest.mark.parametrize("env,ok", [
    ({"VLLM_API_KEY": KEY}, True),
    ({"VLLM_API_KEY": ""}, False),  # an emptied env file
    ({}, False),  # a truncated one
])
def test_the_unit_refuses_to_start_without_the_key_the_deploy_sets(env, ok):
    import subprocess

    _, _, files = _render()
    argv = _exec_start_pre(files.unit)
    assert argv[:2] == ["/bin/sh", "-c"] and KEY not in files.unit
    proc = subprocess.run(argv, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True)
    assert (proc.returncode == 0) is ok
    if not ok:
        assert "vllm-fleet: VLLM_API_KEY is missing or empty in the EnvironmentFile" in proc.stderr


def test_every_secret_the_deploy_sets_is_checked_and_none_without_secrets():
    import subprocess

    _, _, files = _render(hf_token="hf_unit_test_token_value")
    argv = _exec_start_pre(files.unit)
    both = {"PATH": "/usr/bin:/bin", "VLLM_API_KEY": KEY, "HF_TOKEN": "hf_unit_test_token_value"}
    assert subprocess.run(argv, env=both).returncode == 0
    assert subprocess.run(argv, env={**both, "HF_TOKEN": ""}, capture_output=True).returncode == 1
    settings = Settings(model=TINY, bind_host="127.0.0.1")
    plan = make_plan(settings.model, "4xA800-80G", settings.plan_options("/var/lib/vllm-fleet/models/tiny-minimax-m2"))
    assert "/bin/sh" not in render(settings, plan, VENV).unit  # no key set: nothing to refuse


def test_a_downloaded_model_unit_asserts_the_verified_marker_of_the_revision_it_serves():
    """Issue 15 item 7: the vLLM unit never starts on incomplete or unverified weights, at boot included."""
    from vllm_fleet.weights import source as wplan

    sources = [{"kind": "hf", "repo": "MiniMaxAI/MiniMax-M2", "revision": "a" * 40}]
    settings = Settings(model=TINY, api_key=KEY, weights_sources=sources)
    fetch = wplan.fetch_plan(settings)
    plan = make_plan(settings.model, "4xA800-80G", settings.plan_options(fetch.serve_path))
    unit = render(settings, plan, VENV, systemd_version=252).unit
    assert _directives(unit)["AssertPathExists"] == [fetch.marker]
    assert fetch.marker == fetch.config["marker"]  # the path the fetch program writes once every file is verified
    assert fetch.serve_path in _directives(unit)["ExecStart"][0]
    # a mirrored local model dir, or a directory served in place: nothing to assert
    assert "AssertPathExists" not in _directives(_render()[2].unit)
    local = Settings(model=TINY, api_key=KEY, weights_sources=[{"kind": "local", "path": "/models/m2"}])
    plan = make_plan(local.model, "4xA800-80G", local.plan_options("/models/m2"))
    assert "AssertPathExists" not in _directives(render(local, plan, VENV).unit)
