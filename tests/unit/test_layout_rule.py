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


def _classes_deriving(path: Path, base: str) -> list[str]:
    """Names of the classes `path` defines with `base` (``FactBase`` or ``FactBase[...]``) among their bases."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ClassDef):
            for b in node.bases:
                b = b.value if isinstance(b, ast.Subscript) else b
                if (isinstance(b, ast.Name) and b.id == base) or (isinstance(b, ast.Attribute) and b.attr == base):
                    out.append(node.name)
    return out


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_facts_live_in_facts_modules(path: Path):
    if path.name == "facts.py":
        return
    assert not _classes_deriving(path, "FactBase"), (
        f"vllm_fleet/{path.relative_to(PACKAGE)} defines the fact(s) {_classes_deriving(path, 'FactBase')}: "
        f"a capability's facts go in its facts.py")


# What only vllm_fleet/layout.py may spell: a path below a formatted path on the host (a venv's programs and
# site-packages, the download's status file, the wheelhouse manifest), and the secret upload directory. The host
# programs are stdlib-only and get their directories from the configs the layout fills; their file names are checked
# against the layout's in tests/unit/test_host_layout.py. Docstrings may show the tree.
SUB_PATHS = ("/bin/", "/lib/python3", "/status.json", "/MANIFEST.json")
UPLOAD_DIR = ".vllm-fleet-upload"


def _formatted_sub_paths(path: Path) -> list[str]:
    """The f-strings of `path` that append one of SUB_PATHS to a formatted value, and any code string naming UPLOAD_DIR."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            for before, part in zip(node.values, node.values[1:]):
                if (isinstance(before, ast.FormattedValue) and isinstance(part, ast.Constant)
                        and str(part.value).startswith(SUB_PATHS)):
                    found.append(f"line {node.lineno}: {{...}}{part.value}")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and UPLOAD_DIR in node.value
              and id(node) not in docstrings):
            found.append(f"line {node.lineno}: {node.value}")
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_layout_formats_host_sub_paths(path: Path):
    if path.name == "layout.py" or path.name.startswith("hostprog"):
        return
    found = _formatted_sub_paths(path)
    assert not found, f"vllm_fleet/{path.relative_to(PACKAGE)} formats host paths itself ({found}): take them from HostLayout"
