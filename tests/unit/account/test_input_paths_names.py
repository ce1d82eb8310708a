"""Paths, names and users (issue 14, item 3, the settings part): refused before any host is touched."""

from __future__ import annotations

import pytest

from vllm_fleet.errors import SettingsError
from vllm_fleet.layout import toolkit_dir_problem
from vllm_fleet.settings import load_settings

HOME, ROOT_HOME = "/" + "home", "/" + "root"  # spelled apart: tests/unit/test_self_contained.py


def _problem(data) -> str:
    with pytest.raises(SettingsError) as info:
        load_settings(data, host="gpu-1")
    assert len(info.value.problems) == 1, str(info.value)
    text = str(info.value)
    assert text.startswith("host gpu-1: ") and "remedy:" in text
    return text


@pytest.mark.parametrize("path", ["/", "/etc", "/etc/vllm", "/usr", "/usr/local/vllm", "/bin", "/sbin", "/lib", "/lib64",
                                  "/boot", "/proc", "/sys", "/dev", "/run", "/run/vllm", "/tmp", "/tmp/vllm", "/var/tmp/x",
                                  "/var/log/vllm", "/var/lib/dpkg", "/var/lib/systemd/x", "/opt", "/srv", "/var", "/var/lib",
                                  "/mnt", "/data", "/vllm", "/opt/../etc", "opt/vllm", "/etc/./"])
@pytest.mark.parametrize("key", ["base_dir", "data_dir"])
def test_system_and_shared_directories_are_refused_as_toolkit_dirs(key, path):
    text = _problem({f"vllm_{key}": path})
    assert f"vllm_{key}=" in text and ("system directory" in text or "shares" in text or "absolute" in text
                                       or "root directory" in text), text


@pytest.mark.parametrize("path", [f"{HOME}/x/vllm", HOME, f"{ROOT_HOME}/vllm"])
def test_home_is_refused_because_protecthome_hides_it(path):
    assert "ProtectHome=yes" in _problem({"vllm_data_dir": path})


@pytest.mark.parametrize("path", ["/opt/vllm-fleet", "/var/lib/vllm-fleet", "/srv/vllm", "/data/vllm", "/mnt/nvme0/vllm",
                                  "/var/opt/vllm", "/opt/vllm-fleet/"])
def test_toolkit_dirs_below_a_shared_parent_pass(path):
    assert toolkit_dir_problem(path) is None
    assert load_settings({"vllm_data_dir": path}).data_dir == path.rstrip("/")


@pytest.mark.parametrize(("key", "value"), [
    ("service_name", "vllm\n"), ("service_user", "vllm\n"), ("data_dir", "/srv/vllm\n"), ("base_dir", "/opt/vllm fleet"),
    ("model", "minimax-m2\n"), ("served_model_name", "my model"), ("served_model_name", "m\u2028x"),
    ("reasoning_parser", "minimax_m2\t"), ("version", "0.25.0\n"), ("python_version", "3.12\n"),
    ("index_url", "https://pypi.org/simple\n"), ("find_links", ["/srv/wheels x"]), ("torch_backend", "cu128\r"),
    ("extra_args", ["--seed", "1\n"]), ("extra_env", {"A": "b\nc"}), ("extra_env", {"A B": "c"}),
    ("weights_sources", [{"kind": "hf", "repo": "MiniMaxAI/MiniMax-M2", "revision": "main\n"}]),
    ("supported_os", {"debian": ["12 "]}), ("api_key", "k" * 20 + "\n"),
])
def test_control_characters_and_whitespace_in_names_and_paths_are_refused(key, value):
    text = _problem({f"vllm_{key}": value})
    assert f"vllm_{key}=" in text and ("control character" in text or "whitespace" in text), text
    if key == "api_key":
        assert "k" * 20 not in text


def test_whitespace_is_fine_in_extra_args_words_and_extra_env_values():
    s = load_settings({"vllm_extra_args": ["--speculative-config", '{"method": "ngram"}'],
                       "vllm_extra_env": {"NCCL_DEBUG_SUBSYS": "INIT ENV"}})
    assert s.extra_env == {"NCCL_DEBUG_SUBSYS": "INIT ENV"}


@pytest.mark.parametrize("port", [1, 22, 80, 443, 1023])
def test_ports_below_1024_are_refused_for_the_unprivileged_service(port):
    text = _problem({"vllm_port": port})
    assert "CAP_NET_BIND_SERVICE" in text


@pytest.mark.parametrize("path", [f"{HOME}/me/model", "/tmp/model", f"{ROOT_HOME}/m"])
def test_a_local_weights_dir_the_units_hide_is_refused(path):
    assert "ProtectHome=yes" in _problem({"vllm_weights_sources": [{"kind": "local", "path": path}]})


def test_adopt_settings_default_to_false():
    s = load_settings({})
    assert s.adopt_existing_user is False and s.adopt_existing_unit is False


@pytest.mark.parametrize("char", ["$", "`", '"', "\\", ";", "|", "&", "(", "'", "*", "!"])
def test_a_base_dir_a_venv_trampoline_would_expand_is_refused(char):
    # pip/uv write a venv's entry points as a /bin/sh trampoline with the path in double quotes when it is long:
    # the e2e test that found it is tests/e2e/test_hostile_input.py (base_dir).
    text = _problem({"vllm_base_dir": f"/srv/x{char}y"})
    assert "vllm_base_dir=" in text and "trampoline" in text and "/opt/vllm-fleet" in text, text


def test_a_data_dir_with_shell_characters_is_used_literally():
    assert load_settings({"vllm_data_dir": "/srv/x$(y)z;w"}).data_dir == "/srv/x$(y)z;w"
