"""`vllm-fleet render` writes, byte for byte, what the service step installs for the same settings and host."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_fleet.cli.main import main
from vllm_fleet.planner.plan import make_plan
from vllm_fleet.preflight.parse import Gpu, GpuInfo, Snapshot
from vllm_fleet.handoff import HostState
from vllm_fleet.pyenv import stack
from vllm_fleet.pyenv.facts import StackState
from vllm_fleet.pyenv.step import build_spec
from vllm_fleet.service.render import PLACEHOLDER
from vllm_fleet.service.step import service_files
from vllm_fleet.settings import Settings

REPO = Path(__file__).resolve().parents[3]
TINY = str(REPO / "tests/fixtures/tiny-minimax-m2")
KEY = "sk-render-vs-deploy-0123456789"


def _state(settings: Settings, cuda: str, systemd: str = "252") -> HostState:
    gpus = [Gpu(i, f"GPU-{i}", "NVIDIA A800-SXM4-80GB", 81920, 0, "8.0") for i in range(4)]
    snap = Snapshot(os_id="debian", os_version="12", os_pretty_name=None, systemd_version=systemd, systemd_running=True,
                    python_version="3.11.2", gpu=GpuInfo("570.124.06", cuda, gpus), listeners=[], disks={},
                    mem_total_bytes=None, nproc=None)
    model_path = f"/var/lib/vllm-fleet/models/{Path(TINY).name}"
    return HostState(snap, make_plan(settings.model, "4xA800-80G", settings.plan_options(model_path)))


def _render_cli(tmp_path: Path, *extra: str) -> tuple[bytes, bytes]:
    assert main(["render", "--model", TINY, "--gpus", "4xA800-80G", "--port", "8101", "--gpu-indices", "0,1,2,3",
                 "--systemd-version", "252", *extra, "--out", str(tmp_path)]) == 0
    return (tmp_path / "vllm.service").read_bytes(), (tmp_path / "vllm.env").read_bytes()


@pytest.mark.parametrize("cli,settings_kw,cuda", [
    (["--cuda", "12.8"], {}, "12.8"),  # auto, resolved from the driver's CUDA as the deploy does
    (["--torch-backend", "cu126"], {"torch_backend": "cu126"}, "12.8"),  # an explicit backend
    ([], {}, "13.0"),  # auto without --cuda: the newest backend, what a current driver gets
])
def test_render_cli_is_byte_for_byte_what_the_service_step_installs(tmp_path, monkeypatch, cli, settings_kw, cuda):
    monkeypatch.delenv("VLLM_FLEET_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_FLEET_HF_TOKEN", raising=False)
    unit, env = _render_cli(tmp_path, *cli)
    settings = Settings(model=TINY, port=8101, gpus=[0, 1, 2, 3], **settings_kw)
    state = _state(settings, cuda)
    rendered, _gate, [unit_file], [env_file] = service_files(settings, state, venv=None)
    assert unit == unit_file.data() and env == env_file.data()
    assert (unit_file.path, env_file.path) == ("/etc/systemd/system/vllm.service", "/etc/vllm-fleet/vllm.env")
    # ... and the venv is the one python_env builds on that host (the deploy hands its path to the service step).
    spec = build_spec(settings, state, StackState())
    assert f"ExecStart={spec.path}/bin/vllm serve ".encode() in unit
    assert spec.path == stack.default_venv(settings, cuda)


def test_render_cli_differs_from_the_deploy_only_by_the_masked_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_FLEET_API_KEY", "set")
    unit, env = _render_cli(tmp_path, "--cuda", "12.8")
    settings = Settings(model=TINY, port=8101, gpus=[0, 1, 2, 3], api_key=KEY)
    _, _, [unit_file], [env_file] = service_files(settings, _state(settings, "12.8"), venv=None)
    assert unit == unit_file.data() and env_file.secret
    masked = PLACEHOLDER.format(setting="vllm_api_key")
    assert env.replace(masked.encode(), KEY.encode()) == env_file.data() and KEY.encode() not in env
