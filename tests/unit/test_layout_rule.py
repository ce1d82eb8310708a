"""The rule that keeps the code easy to change (docs/design.md), checked on every module.

- Each capability is one folder of vllm_fleet/; its pyinfra parts are `step.py`
  (the @deploy) and `facts.py` (pyinfra facts); `hostops/` holds the shared
  one-fact operations and `hostops/fleet.py`, which gets the run's fleet
  topology from pyinfra's context (`vllm_fleet/fleet.py` is its pure logic);
  `cli/status.py` connects with pyinfra's API to read the fleet. Every other
  module is pure: it never imports pyinfra.
- A capability's host programs are its `hostprog.py` (and `hostprog_<name>.py` for a second one): stdlib only, no import of
  vllm_fleet, since it runs on the host outside any venv of ours.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "vllm_fleet"
CAPABILITIES = ("preflight", "account", "pyenv", "weights", "service", "router")
MAY_USE_PYINFRA = {"step.py", "facts.py"}
PYINFRA_MODULES = {"hostops/operations.py", "hostops/facts.py", "hostops/abort.py", "hostops/fleet.py", "cli/status.py"}


def _imports(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, at any depth (function-level imports count)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_pure_modules_never_import_pyinfra(path: Path):
    rel = str(path.relative_to(PACKAGE))
    if path.name in MAY_USE_PYINFRA or rel in PYINFRA_MODULES:
        return
    assert "pyinfra" not in _imports(path), f"vllm_fleet/{rel} is pure logic and imports pyinfra"


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*/hostprog*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_host_programs_are_stdlib_only(path: Path):
    outside = {name for name in _imports(path) if name not in sys.stdlib_module_names and name != "__future__"}
    # Lazy imports of what the program runs next to, in a venv of its own: the weights worker's download
    # client (the fetch venv), the pyenv program's `verify` (run by the venv it just built), the router's launcher
    # (the router venv).
    allowed = {"weights": {"huggingface_hub", "modelscope", "modelscope_hub"}, "pyenv": {"vllm", "torch"},
               "router": {"vllm_router"}}.get(
        path.parent.name, set())
    assert outside <= allowed, f"{path.relative_to(PACKAGE)} imports {sorted(outside - allowed)}"


def test_every_capability_is_one_folder_with_its_step():
    for name in CAPABILITIES:
        folder = PACKAGE / name
        assert (folder / "__init__.py").is_file() and (folder / "step.py").is_file(), name
    assert not (PACKAGE.parent / "roles").exists(), "the steps live in their capability's folder, not roles/"
    assert not (PACKAGE.parent / "templates").exists(), "templates live in their capability's folder"
