"""No module-level mutable state in the deploy code (issue 12): what a run learns lives in the run.

A step, fact or operation module that keeps a list, dict or set at module level shares it between
every host and every run of the process; the values steps hand on are in vllm_fleet/handoff.py
and the run's own records on pyinfra's State (e.g. vllm_fleet/service/rolling.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1].parent / "vllm_fleet"
PYINFRA_SIDE = sorted([*PACKAGE.glob("*/step.py"), *PACKAGE.glob("*/facts.py"), *PACKAGE.glob("hostops/*.py")])
MUTABLE_CALLS = {"list", "dict", "set", "defaultdict", "OrderedDict", "Counter", "deque", "WeakKeyDictionary",
                 "WeakValueDictionary"}


def _mutable(node: ast.expr | None) -> bool:
    if isinstance(node, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)):
        return True
    if isinstance(node, ast.Call):
        fn = node.func
        name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
        return name in MUTABLE_CALLS
    return False


@pytest.mark.parametrize("path", PYINFRA_SIDE, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_level_mutable_state(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and _mutable(node.value):
            bad += [ast.unparse(t) for t in node.targets]
        elif isinstance(node, ast.AnnAssign) and _mutable(node.value):
            bad.append(ast.unparse(node.target))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for d in node.decorator_list:
                fn = d.func if isinstance(d, ast.Call) else d
                if (fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")) in ("lru_cache", "cache"):
                    bad.append(f"{node.name} (a process-wide cache)")
    assert not bad, f"vllm_fleet/{path.relative_to(PACKAGE)} keeps module-level mutable state: {bad}"
