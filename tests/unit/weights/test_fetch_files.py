"""The download's files as the weights step installs them (one FileStates fact, managed_files), built without a host."""

from __future__ import annotations

import json
from pathlib import PurePosixPath

import pytest
from pyinfra.api.util import get_template

from vllm_fleet.layout import SECRET_MODE
from vllm_fleet.settings import load_settings
from vllm_fleet.weights import source as wplan
from vllm_fleet.weights import step as weights

SOURCES = [{"kind": "hf", "repo": "test/tiny-minimax-m2", "endpoint": "http://127.0.0.1:9"}]


@pytest.mark.parametrize("data", [{}, {"vllm_data_dir": "/srv/vllm", "vllm_service_name": "vllm-b"},
                                  {"vllm_weights_sources": [{**SOURCES[0], "kind": "modelscope"}]}],
                         ids=["default", "other-service", "modelscope"])
def test_the_unit_is_byte_for_byte_what_files_template_rendered(data):
    """Moving the unit from files.template to managed_files must not change a converged host's unit."""
    s = load_settings({"vllm_model": "tests/fixtures/tiny-minimax-m2", "vllm_weights_sources": SOURCES, **data})
    plan = wplan.fetch_plan(s)
    parent = str(PurePosixPath(plan.serve_path).parent)
    old = get_template(str(wplan.UNIT_TEMPLATE)).render(
        unit=plan.unit, model=plan.sources[0].repo or plan.serve_path, dest_dir=plan.serve_path,
        config=plan.config_path, run_as=s.service_user, python=f"{plan.venv}/bin/python", program=plan.program,
        environment=wplan.unit_environment(s, plan), env_file=plan.env_path,
        read_write_paths=[s.data_dir] if parent.startswith(s.data_dir) else [s.data_dir, parent])
    assert wplan.render_fetch_unit(s, plan) == old


def test_fetch_files_paths_owners_and_modes():
    s = load_settings({"vllm_model": "tests/fixtures/tiny-minimax-m2", "vllm_weights_sources": SOURCES})
    plan = wplan.fetch_plan(s)
    program, config, env, unit = weights.fetch_files(s, plan)
    assert (program.path, program.user, program.group, program.mode) == (plan.program, "root", "root", "755")
    assert program.data() == weights.PROGRAM_SRC.read_bytes()
    assert (config.path, config.group, config.mode) == (plan.config_path, s.service_user, "640")
    assert json.loads(config.data()) == plan.config and config.data().endswith(b"\n")
    assert env.secret and (env.path, env.user, env.group, env.mode) == (plan.env_path, "root", "root", SECRET_MODE) == (plan.env_path, "root", "root", "600")
    assert (unit.path, unit.mode) == (plan.unit_path, "644") and unit.data().decode().startswith(f"# {plan.unit}:")
