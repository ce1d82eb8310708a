"""Settings: host data -> one typed value, or one error naming host, key, value and remedy."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from vllm_fleet.errors import SettingsError
from vllm_fleet.settings import PREFIX, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
KEY = "k" * 24

# (case id, host data, key the error must name, words the message must contain)
MALFORMED = [
    ("port-too-high", {"vllm_port": 70000}, "vllm_port", "65535"),
    ("port-zero", {"vllm_port": 0}, "vllm_port", "greater than or equal to 1"),
    ("port-not-int", {"vllm_port": "http"}, "vllm_port", "valid integer"),
    ("typo-close-match", {"vllm_prot": 8100}, "vllm_prot", "did you mean vllm_port?"),
    ("typo-tp", {"vllm_tensor_paralel_size": 4}, "vllm_tensor_paralel_size", "did you mean vllm_tensor_parallel_size?"),
    ("unknown-no-match", {"vllm_zzzzzz": 1}, "vllm_zzzzzz", "group_data/all.py"),
    ("gpus-not-list", {"vllm_gpus": "1,3,4,5"}, "vllm_gpus", "valid list"),
    ("gpus-empty", {"vllm_gpus": []}, "vllm_gpus", "leave vllm_gpus unset"),
    ("gpus-negative", {"vllm_gpus": [-1]}, "vllm_gpus", "never negative"),
    ("gpus-duplicate", {"vllm_gpus": [1, 1]}, "vllm_gpus", "twice"),
    ("tp-not-matching-gpus", {"vllm_gpus": [0, 1, 2], "vllm_tensor_parallel_size": 2}, "vllm_tensor_parallel_size", "uses 2 GPUs"),
    ("gpus-not-multiple-of-pp", {"vllm_gpus": [0, 1, 2], "vllm_pipeline_parallel_size": 2}, "vllm_gpus", "not a multiple"),
    ("tp-zero", {"vllm_tensor_parallel_size": 0}, "vllm_tensor_parallel_size", "greater than or equal to 1"),
    ("public-bind-without-key", {"vllm_bind_host": "0.0.0.0"}, "vllm_api_key", "reachable from other machines"),
    ("bind-not-ip", {"vllm_bind_host": "localhost:8100"}, "vllm_bind_host", "not an IP address"),
    ("api-key-short", {"vllm_api_key": "abc"}, "vllm_api_key", "shorter than 8"),
    ("util-above-one", {"vllm_gpu_memory_utilization": 1.2}, "vllm_gpu_memory_utilization", "less than or equal to 1"),
    ("util-zero", {"vllm_gpu_memory_utilization": 0}, "vllm_gpu_memory_utilization", "greater than 0"),
    ("max-len-word", {"vllm_max_model_len": "max"}, "vllm_max_model_len", "valid integer"),
    ("max-len-tiny", {"vllm_max_model_len": 4}, "vllm_max_model_len", "too small"),
    ("kv-dtype", {"vllm_kv_cache_dtype": "int4"}, "vllm_kv_cache_dtype", "fp8"),
    ("block-size-odd", {"vllm_block_size": 24}, "vllm_block_size", "attention backends take"),
    ("kv-bytes-negative", {"vllm_kv_cache_memory_bytes": -5}, "vllm_kv_cache_memory_bytes", "greater than 0"),
    ("api-key-in-extra-args", {"vllm_extra_args": ["--api-key", "sekrit-value"]}, "vllm_extra_args", "EnvironmentFile"),
    ("plan-owned-flag", {"vllm_extra_args": ["--port=9000"]}, "vllm_extra_args", "set vllm_port instead"),
    ("secret-in-env", {"vllm_extra_env": {"HF_TOKEN": "hf_xxx"}}, "vllm_extra_env", "vllm_hf_token"),
    ("cuda-visible-in-env", {"vllm_extra_env": {"CUDA_VISIBLE_DEVICES": "0"}}, "vllm_extra_env", "vllm_gpus"),
    ("root-service-user", {"vllm_service_user": "root"}, "vllm_service_user", "never root"),
    ("unit-name-suffix", {"vllm_service_name": "vllm.service"}, "vllm_service_name", "without the .service"),
    ("relative-base-dir", {"vllm_base_dir": "opt/vllm"}, "vllm_base_dir", "absolute path"),
    ("python-2", {"vllm_python_version": "2.7"}, "vllm_python_version", "3.12"),
    ("version-garbage", {"vllm_version": "latest"}, "vllm_version", "not a version"),
    ("channel-unknown", {"vllm_channel": "beta"}, "vllm_channel", "nightly"),
    ("source-without-url", {"vllm_channel": "source"}, "vllm_source_url", "required"),
    ("url-without-source", {"vllm_source_url": "https://github.com/vllm-project/vllm"}, "vllm_channel", "not \"source\""),
    ("index-not-url", {"vllm_index_url": "pypi.example"}, "vllm_index_url", "not a URL"),
    ("find-links-relative", {"vllm_find_links": ["wheels"]}, "vllm_find_links", "absolute path"),
    ("keep-venvs-zero", {"vllm_keep_venvs": 0}, "vllm_keep_venvs", "greater than or equal to 1"),
    ("unknown-model", {"vllm_model": "minimax-m3"}, "vllm_model", "models/*.yaml"),
]


@pytest.mark.parametrize("data,key,words", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_host_data_names_host_key_value_and_remedy(data, key, words):
    with pytest.raises(SettingsError) as info:
        load_settings(data, host="gpu-7")
    msg = str(info.value)
    assert msg.startswith("host gpu-7: ")
    assert f"{key}=" in msg
    assert "remedy:" in msg
    assert words in msg
    assert len(info.value.problems) == 1


def test_at_least_twenty_malformed_cases():
    assert len(MALFORMED) >= 20


def test_all_problems_of_a_host_come_in_one_message():
    with pytest.raises(SettingsError) as info:
        load_settings({"vllm_port": "x", "vllm_gpus": "0,1", "vllm_prot": 1}, host="h")
    keys = {p.key for p in info.value.problems}
    assert keys == {"vllm_port", "vllm_gpus", "vllm_prot"}
    assert "3 bad settings" in str(info.value)


@pytest.mark.parametrize("data", [
    {"vllm_api_key": "short"},
    {"vllm_extra_args": ["--api-key", "sekrit-value"]},
    {"vllm_extra_args": ["--api-key=sekrit-value"]},
    {"vllm_extra_env": {"VLLM_API_KEY": "sekrit-value"}},
])
def test_errors_never_echo_a_secret(data):
    with pytest.raises(SettingsError) as info:
        load_settings(data, host="h")
    assert "sekrit-value" not in str(info.value) and "short" not in str(info.value).split("remedy")[0].replace("shorter", "")


def test_non_prefixed_keys_belong_to_pyinfra_and_are_ignored():
    s = load_settings({"ssh_user": "ubuntu", "_sudo": True, "vllm_port": 8200})
    assert s.port == 8200


def test_gpus_become_cuda_visible_devices():
    assert load_settings({"vllm_gpus": [1, 3, 4, 5]}).cuda_visible_devices == "1,3,4,5"
    assert load_settings({}).cuda_visible_devices is None


def test_public_bind_with_key_is_fine_and_key_stays_secret():
    s = load_settings({"vllm_bind_host": "0.0.0.0", "vllm_api_key": KEY})
    assert KEY not in repr(s) and KEY not in str(s.model_dump())
    assert s.api_key.get_secret_value() == KEY


def _group_data_all() -> dict:
    """The literal defaults in group_data/all.py (secrets come from the environment)."""
    tree = ast.parse((ROOT / "group_data" / "all.py").read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            try:
                out[name] = ast.literal_eval(node.value)
            except ValueError:
                out[name] = ast.unparse(node.value)
    return out


def test_group_data_all_lists_every_setting_once_with_its_default():
    data = _group_data_all()
    keys = {k for k in data if k.startswith(PREFIX)}
    assert keys == {PREFIX + f for f in Settings.model_fields}
    defaults = Settings().model_dump()
    for key in keys:
        field = key[len(PREFIX):]
        if field in ("api_key", "hf_token", "router_api_key"):
            assert "os.environ.get" in data[key], f"{key} must come from the environment"
        elif field == "version":
            assert data[key] == "VLLM_VERSION"
        else:
            assert data[key] == defaults[field], key


def test_group_data_all_has_a_comment_on_every_setting_line():
    for line in (ROOT / "group_data" / "all.py").read_text().splitlines():
        if line.startswith(PREFIX):
            assert "  # " in line, line


def test_nvlink_multicast_and_flashinfer_sampler_default_to_vllms_own_behaviour():
    s = load_settings({})
    assert s.nvlink_multicast is True and s.flashinfer_sampler is True
    options = s.plan_options()
    assert options.nvlink_multicast is True and options.flashinfer_sampler is True


def test_nvlink_multicast_and_flashinfer_sampler_reach_the_plan_options():
    options = load_settings({"vllm_nvlink_multicast": False, "vllm_flashinfer_sampler": False}).plan_options()
    assert options.nvlink_multicast is False and options.flashinfer_sampler is False


@pytest.mark.parametrize("key", ["vllm_nvlink_multicast", "vllm_flashinfer_sampler"])
def test_nvlink_multicast_and_flashinfer_sampler_are_booleans(key):
    with pytest.raises(SettingsError) as exc:
        load_settings({key: "sometimes"}, host="gpu01")
    assert key in str(exc.value) and "valid boolean" in str(exc.value)
