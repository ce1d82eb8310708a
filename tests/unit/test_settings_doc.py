"""docs/settings.md is generated from the settings classes and current; every checked setting says what it refuses."""

from __future__ import annotations

from pathlib import Path

from vllm_fleet import settingsdoc
from vllm_fleet.settings import PREFIX, Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "settings.md"


def test_docs_settings_md_is_current():
    assert DOC.read_text() == settingsdoc.render(), "regenerate: python -m vllm_fleet.settingsdoc > docs/settings.md"


def test_every_setting_has_its_type_default_and_description_in_the_doc():
    text = DOC.read_text()
    for name, field in Settings.model_fields.items():
        block = text.split(f"### {PREFIX}{name}\n", 1)[1].split("\n### ", 1)[0]
        assert field.description in block and "- type: `" in block and "- default: `" in block, name


def test_every_setting_with_a_check_says_what_it_refuses():
    checked = set()
    for dec in Settings.__pydantic_decorators__.field_validators.values():
        checked |= set(dec.info.fields)
    checked.add("weights_sources")  # WeightsSource's own model validator
    assert {name for name in checked if not settingsdoc.refused(name)} == set()
    assert set(settingsdoc.REFUSED) <= set(Settings.model_fields)


def test_a_rows_check_says_what_it_refuses_in_the_row_once():
    """Adding a checked vLLM option is one row: its refusal text is the row's, not a second entry here."""
    from vllm_fleet.planner import options

    for row in options.OPTIONS:
        if row.check is not None:
            assert row.refused, f"the options row {row.key} has a check but no refused text"
            assert row.refused not in settingsdoc.REFUSED.get(row.key, ""), f"REFUSED repeats the row {row.key}'s text"
            assert settingsdoc.refused(row.key).startswith(row.refused)


def test_every_bounded_setting_shows_its_bounds_and_why():
    text = DOC.read_text()
    for name in ("port", "kv_cache_memory_bytes", "tensor_parallel_size", "max_num_seqs", "weights_backoff_s"):
        block = text.split(f"### {PREFIX}{name}\n", 1)[1].split("\n### ", 1)[0]
        assert "- bounds: " in block and "(" in block.split("- bounds: ", 1)[1], name
    assert "CAP_NET_BIND_SERVICE" in text and "1 TiB" in text
