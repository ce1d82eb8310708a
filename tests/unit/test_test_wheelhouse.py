"""The e2e wheelhouse takes torch from a declared source (tests/e2e/wheelhouse.py `torch_wheel`), with one clear error.

No network: the source is an empty directory, and pip's own find-links and index settings from the environment
are pointed at nothing (PIP_FIND_LINKS: an empty directory, PIP_NO_INDEX=1, no config file).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e import wheelhouse


def _offline_pip(tmp_path: Path) -> list[str]:
    """`pip download` without touching the network: this interpreter's pip, else a venv seeded by ensurepip (its
    bundled wheel; the project's uv-made venv may have no pip)."""
    if importlib.util.find_spec("pip") is not None:
        python = sys.executable
    else:
        venv = tmp_path / "pip-venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
        python = str(venv / "bin" / "python")
    return [python, "-m", "pip", "download", "--disable-pip-version-check", "--quiet"]


def test_torch_from_an_empty_source_and_an_empty_cache_is_one_error_naming_the_setting(tmp_path, monkeypatch):
    empty, cache = tmp_path / "torch-source", tmp_path / "cache"
    empty.mkdir()
    (tmp_path / "no-links").mkdir()
    for name in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-links"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv(wheelhouse.TORCH_SOURCE_ENV, str(empty))
    monkeypatch.setattr(wheelhouse, "CACHE", cache)
    monkeypatch.setattr(wheelhouse, "_pip", lambda: _offline_pip(tmp_path))

    with pytest.raises(RuntimeError) as info:
        wheelhouse.torch_wheel()
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"no {wheelhouse.TORCH_REQUIREMENT} wheel")
    assert f"VLLM_FLEET_TORCH_SOURCE={empty}" in first  # the setting and the value it had
    assert "set VLLM_FLEET_TORCH_SOURCE to an index URL or a directory" in first  # the remedy
    assert str(cache / "torch") in first  # or where a wheel put by hand is found
    assert not (cache / "torch").exists()  # nothing half-found is cached
