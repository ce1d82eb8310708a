"""Settings sections: each capability owns its section (vllm_fleet/<capability>/settings.py), Settings composes them.

- every Settings field is a field of exactly one section (or of the serve options table), and
  Settings declares none of its own; no two sections define a validator of the same name (one
  would shadow the other in the composed class);
- a section module is pure and stands alone: no pyinfra, no step/facts/hostops, nothing of
  another capability, not vllm_fleet.settings (which composes it);
- group_data/all.py has one header per section, in the order of SECTIONS, naming the section's
  module, and every line sits under its own section's header.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.unit.test_layout_rule import CAPABILITIES
from vllm_fleet.planner import options as vllm_options
from vllm_fleet.settings import PREFIX, SECTIONS, ServeOptions, Settings

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "vllm_fleet"
HEADER = re.compile(r"^# --- (?P<name>.+) \((?P<path>[\w/.]+\.py)\) ---$")


def _path(section: type) -> str:
    return section.__module__.replace(".", "/") + ".py"


def test_every_field_belongs_to_exactly_one_section():
    owners: dict[str, list[str]] = {}
    for name, section in SECTIONS.items():
        for field in section.model_fields:
            owners.setdefault(field, []).append(name)
    assert set(owners) == set(Settings.model_fields), "Settings declares a field of no section"
    shared = {f: names for f, names in owners.items() if len(names) > 1}
    assert not shared, f"fields in several sections: {shared}"
    assert not Settings.__dict__.get("__annotations__"), "Settings composes the sections and declares no field"


def test_the_serve_options_section_is_the_table():
    assert set(ServeOptions.model_fields) == {r.key for r in vllm_options.OPTIONS}
    assert SECTIONS["serve options"] is ServeOptions


def test_every_capability_has_its_section_and_every_section_is_a_base_of_settings():
    modules = {section.__module__ for section in SECTIONS.values()}
    for name in CAPABILITIES:
        assert (PACKAGE / name / "settings.py").is_file(), f"vllm_fleet/{name}/settings.py is missing"
        assert f"vllm_fleet.{name}.settings" in modules, f"no section of SECTIONS comes from vllm_fleet/{name}/settings.py"
    assert set(Settings.__bases__) == set(SECTIONS.values())


def test_settings_fields_come_in_the_order_of_the_sections():
    assert list(Settings.model_fields) == [f for section in SECTIONS.values() for f in section.model_fields]


def test_no_two_sections_name_a_validator_alike():
    seen: dict[str, str] = {}
    for name, section in SECTIONS.items():
        decorators = section.__pydantic_decorators__
        for kind in ("field_validators", "model_validators"):
            for validator in getattr(decorators, kind):
                assert validator not in seen, f"{validator} is defined by {seen[validator]} and {name}"
                seen[validator] = name
    composed = Settings.__pydantic_decorators__
    sections_field = {v for s in SECTIONS.values() for v in s.__pydantic_decorators__.field_validators}
    sections_model = {v for s in SECTIONS.values() for v in s.__pydantic_decorators__.model_validators}
    assert set(composed.field_validators) == sections_field, "Settings' field checks are its sections'"
    assert set(composed.model_validators) == sections_model | {"_cross"}, "Settings adds only the cross-section check"


@pytest.mark.parametrize("name", list(SECTIONS))
def test_each_section_validates_its_defaults_on_its_own(name):
    SECTIONS[name]()


def _imports(path: Path) -> set[str]:
    """Full dotted names of every module `path` imports, at any depth (function-level imports count)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names.add(node.module or "")
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_a_section_module_imports_no_pyinfra_step_facts_or_other_capability(capability):
    path = PACKAGE / capability / "settings.py"
    for module in _imports(path):
        parts = module.split(".")
        assert parts[0] != "pyinfra", f"{path.name} of {capability} imports {module}"
        if parts[0] != "vllm_fleet":
            continue
        assert module != "vllm_fleet.settings", f"vllm_fleet/{capability}/settings.py imports vllm_fleet.settings (it composes the sections)"
        assert not {"step", "facts", "hostops"} & set(parts[1:]), f"vllm_fleet/{capability}/settings.py imports {module}"
        other = parts[1] if len(parts) > 1 else None
        assert other not in set(CAPABILITIES) - {capability}, f"vllm_fleet/{capability}/settings.py imports {module} of another capability"


def _group_data_sections() -> tuple[list[tuple[str, str]], dict[str, str]]:
    """group_data/all.py: the headers in order (name, module path), and setting -> its header's name."""
    headers, under, current = [], {}, None
    for line in (ROOT / "group_data" / "all.py").read_text().splitlines():
        m = HEADER.match(line)
        if m:
            headers.append((m["name"], m["path"]))
            current = m["name"]
        elif line.startswith(PREFIX):
            under[line.split("=", 1)[0].strip()[len(PREFIX):]] = current
    return headers, under


def test_group_data_all_has_one_header_per_section_in_order_naming_its_module():
    headers, _ = _group_data_sections()
    assert headers == [(name, _path(section)) for name, section in SECTIONS.items()]
    for _, path in headers:
        assert (ROOT / path).is_file(), path


@pytest.mark.parametrize("name", list(SECTIONS))
def test_group_data_all_lists_each_section_under_its_own_header(name):
    _, under = _group_data_sections()
    misplaced = {field: under.get(field) for field in SECTIONS[name].model_fields if under.get(field) != name}
    assert not misplaced, f"under another header than '{name}' (field: header): {misplaced}"
