"""The newcomer's path is one path: README's setup, demo and test commands are what exists and what CI runs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _block_after(heading: str) -> list[str]:
    """The command lines of the first ``` block after a README heading."""
    section = README.split(f"## {heading}\n", 1)[1]
    block = section.split("```", 2)[1]
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines() if line.strip()]


def test_readme_names_one_setup_one_demo_one_test_command():
    assert _block_after("Setup") == ["./setup"]
    assert _block_after("Try it: the local demo") == ["./demo"]
    assert _block_after("Test") == [".venv/bin/python -m pytest"]
    for script in ("setup", "demo"):
        path = ROOT / script
        assert path.is_file() and path.stat().st_mode & 0o111, f"./{script} is missing or not executable"


def test_ci_runs_the_readme_setup_then_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    phases = re.findall(r'^phase "[^"]+" (.+)$', ci, flags=re.M)
    assert phases[0] == "./setup --real-vllm"
    assert "--real-vllm" in README.split("## Setup", 1)[1].split("## ", 1)[0]  # the option CI adds is documented
    assert phases[1].removesuffix(" || rc=$?") == _block_after("Test")[0]


def test_uv_is_pinned_once_for_the_control_venv_and_the_hosts_wheelhouse():
    pins = re.findall(r'^\s*"uv==([^"]+)"', (ROOT / "pyproject.toml").read_text(), flags=re.M)  # 3.10: no tomllib
    assert len(pins) == 1
    version = pins[0]
    setup = re.search(r"^UV_VERSION=(\S+)", (ROOT / "setup").read_text(), flags=re.M)
    assert setup and setup.group(1) == version
    from tests.e2e import wheelhouse

    assert wheelhouse.UV_VERSION == version


def test_setup_help_and_a_wrong_option():
    helped = subprocess.run([str(ROOT / "setup"), "--help"], capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0 and "--real-vllm" in helped.stdout
    wrong = subprocess.run([str(ROOT / "setup"), "--bogus"], capture_output=True, text=True, timeout=30)
    assert wrong.returncode == 2 and "unknown option --bogus" in wrong.stderr


def test_pyinfra_debug_log_is_ignored_by_the_repositorys_own_gitignore(tmp_path):
    """pyinfra leaves pyinfra-debug.log in the working directory after an internal error (issue 11): never untracked
    noise in a checkout, at the top or in a subdirectory. Only the repository's .gitignore counts here (no global
    excludes file, no .git/info/exclude of this clone)."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: git check-ignore needs one")
    for where in ("pyinfra-debug.log", "inventory/pyinfra-debug.log"):
        proc = subprocess.run(["git", "-c", f"core.excludesFile={tmp_path / 'none'}", "check-ignore", "-v", "--no-index",
                               where], cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"{where} is not ignored: add pyinfra-debug.log to .gitignore"
        assert proc.stdout.startswith(".gitignore:"), proc.stdout  # the repository's file, not this clone's exclude
