"""Names and words a setting puts into a unit file, an argv or a systemctl command (issue 14, items 1 and 3):
refused by the settings, with the host, the key, the value and a remedy, before any fact is read.

- vllm_extra_env: a name that is no POSIX variable name (the render could not write it: it raised a
  RenderError naming no host or setting), or one the toolkit sets itself;
- vllm_served_model_name: a word vLLM's parser would read as an option (``--api-key``);
- vllm_service_name, vllm_service_user: a leading ``-`` (systemctl and useradd read an option) and a
  backslash (systemd C-unescapes ExecStart words).
"""

from __future__ import annotations

import pytest

from vllm_fleet.errors import SettingsError
from vllm_fleet.layout import RUNTIME_ENV, HostLayout
from vllm_fleet.planner.plan import make_plan
from vllm_fleet.service.render import render
from vllm_fleet.settings import load_settings

TINY = "tests/fixtures/tiny-minimax-m2"


def _problem(data: dict, key: str) -> str:
    with pytest.raises(SettingsError) as info:
        load_settings(data, host="gpu-1")
    assert len(info.value.problems) == 1, str(info.value)
    text = str(info.value)
    assert text.startswith(f"host gpu-1: {key}=") and "remedy:" in text, text
    return text


# -- B1: vllm_extra_env ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["A=B", "1X", "A-B", "A.B", "", "Ä", "$X", "-X"])
def test_an_environment_name_that_is_no_posix_variable_name_is_refused(name):
    text = _problem({"vllm_extra_env": {name: "x"}}, "vllm_extra_env")
    assert "not a variable name" in text and "[A-Za-z_][A-Za-z0-9_]*" in text


@pytest.mark.parametrize("name", ["A", "_X", "NCCL_DEBUG", "a1_b2", "SAFETENSORS_FAST_GPU", "HF_HUB_OFFLINE"])
def test_posix_names_pass_and_render(name):
    s = load_settings({"vllm_model": TINY, "vllm_extra_env": {name: "1"}})
    plan = make_plan(TINY, "1xH100", s.plan_options())
    assert f'"{name}=1"' in render(s, plan, "/opt/vllm-fleet/venvs/v").unit


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "a\x00b", "a\x1bb", "a\u2028b", "a\x7fb"])
def test_an_environment_value_with_a_control_character_is_refused(value):
    assert "control character" in _problem({"vllm_extra_env": {"A": value}}, "vllm_extra_env")


@pytest.mark.parametrize("name", sorted(RUNTIME_ENV))
def test_the_variables_the_render_points_into_data_dir_are_refused(name):
    text = _problem({"vllm_extra_env": {name: "/elsewhere"}}, "vllm_extra_env")
    assert "vllm_data_dir" in text and name in text


def test_runtime_env_is_what_the_render_sets():
    s = load_settings({"vllm_model": TINY})
    plan = make_plan(TINY, "1xH100", s.plan_options())
    unit = render(s, plan, "/opt/vllm-fleet/venvs/v").unit
    for name, value in HostLayout.of(s).runtime_env.items():
        assert f'"{name}={value}"' in unit


def test_cuda_device_order_is_the_toolkits_with_vllm_gpus():
    assert "vllm_gpus" in _problem({"vllm_extra_env": {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}}, "vllm_extra_env")


# -- B2: vllm_served_model_name -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["--api-key", "-x", "-", "--"])
def test_a_served_name_vllm_would_read_as_an_option_is_refused(name):
    text = _problem({"vllm_served_model_name": name}, "vllm_served_model_name")
    assert "option" in text and "vllm_served_model_name" in text.split("remedy:", 1)[1]


@pytest.mark.parametrize("name", ["my model", "m\tx", "m\nx"])
def test_a_served_name_with_whitespace_or_a_control_character_is_refused(name):
    _problem({"vllm_served_model_name": name}, "vllm_served_model_name")


@pytest.mark.parametrize("name", ["org/model-v2", "MiniMax-M2", "gpt-4o", "a.b_c:1", "x-"])
def test_ordinary_served_names_pass_and_reach_argv(name):
    s = load_settings({"vllm_model": TINY, "vllm_served_model_name": name})
    plan = make_plan(TINY, "1xH100", s.plan_options())
    argv = plan.argv
    assert argv[argv.index("--served-model-name") + 1] == name


def test_router_model_follows_the_same_rule():
    _problem({"vllm_router_model": "--api-key"}, "vllm_router_model")
    assert load_settings({"vllm_router_model": "org/model-v2"}).router_model == "org/model-v2"


# -- B3, B4: unit and account names ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["-rf", "-", "--help", ".hidden", "_x", ":x", "a\\nb", "a\\x2db", "\\"])
def test_a_service_name_must_start_with_a_letter_or_digit_and_hold_no_backslash(name):
    text = _problem({"vllm_service_name": name}, "vllm_service_name")
    assert "letter or digit" in text


@pytest.mark.parametrize("name", ["vllm", "vllm-minimax", "0vllm", "a.b_c:d", "V" * 200])
def test_ordinary_service_names_pass(name):
    assert load_settings({"vllm_service_name": name}).service_name == name


@pytest.mark.parametrize("name", ["-rf", "_vllm", "-", "1vllm"])
def test_a_service_user_must_start_with_a_letter(name):
    text = _problem({"vllm_service_user": name}, "vllm_service_user")
    assert "lower-case" in text
