"""The options table (vllm_fleet.planner.options): every derived part follows its rows."""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_fleet.errors import SettingsError
from vllm_fleet.planner import options
from vllm_fleet.planner.plan import PlanError, PlanOptions, make_plan, options_from
from vllm_fleet.settings import PREFIX, Settings, load_settings

ROOT = Path(__file__).resolve().parents[3]
TINY = str(ROOT / "tests/fixtures/tiny-minimax-m2")
ROWS = {r.key: r for r in options.OPTIONS}
SECRET_SPELLINGS = [(r.key, f) for r in options.rows(secret=True) for f in r.flags]
OWNED_SPELLINGS = [(r.key, f) for r in options.rows(secret=False) for f in r.flags]


def _spellings(flag: str, value: str) -> list[list[str]]:
    """The ways a word list can set ``flag`` in vLLM's parser: --flag v, --flag=v, --flag_name[=v]."""
    out = [[flag, value], [f"{flag}={value}"]]
    if flag.startswith("--") and "-" in flag[2:]:
        under = "--" + flag[2:].replace("-", "_")
        out += [[under, value], [f"{under}={value}"]]
    return out


def test_keys_and_flags_are_unique():
    assert len(ROWS) == len(options.OPTIONS)
    spellings = [f for r in options.OPTIONS for f in r.flags]
    assert len(spellings) == len(set(spellings))


@pytest.mark.parametrize("key", sorted(ROWS))
def test_every_row_is_a_settings_field_with_its_default_bounds_and_description(key):
    row, field = ROWS[key], Settings.model_fields[key]
    assert field.default == row.default
    assert field.description == row.description
    assert field.annotation == row.type
    bounds = {type(m).__name__.lower(): getattr(m, type(m).__name__.lower()) for m in field.metadata}
    assert bounds == {k: v for k, v in (("ge", row.ge), ("gt", row.gt), ("le", row.le)) if v is not None}


@pytest.mark.parametrize("key", sorted(r.key for r in options.plan_rows()))
def test_every_plan_row_is_a_plan_option_and_settings_pass_it_by_name(key):
    field = PlanOptions.model_fields[key]
    assert field.default == ROWS[key].default
    assert getattr(Settings().plan_options(), key) == ROWS[key].default


def test_secrets_are_no_plan_options():
    for row in options.rows(secret=True):
        assert row.key not in PlanOptions.model_fields


def test_plan_options_carry_the_settings_values():
    values = {"vllm_port": 8200, "vllm_max_num_seqs": 64, "vllm_kv_cache_dtype": "fp8", "vllm_bind_host": "10.0.0.1",
              "vllm_api_key": "k" * 24, "vllm_enforce_eager": True, "vllm_nvlink_multicast": False}
    opts = load_settings(values).plan_options("/x")
    assert (opts.port, opts.max_num_seqs, opts.kv_cache_dtype, opts.bind_host) == (8200, 64, "fp8", "10.0.0.1")
    assert opts.enforce_eager is True and opts.nvlink_multicast is False and opts.model_path == "/x"


def _group_data() -> dict[str, tuple[object, str]]:
    """group_data/all.py: key -> (value, comment)."""
    text = (ROOT / "group_data" / "all.py").read_text()
    out = {}
    for line in text.splitlines():
        if not line.startswith(PREFIX):
            continue
        code, _, comment = line.partition("  # ")
        name, _, value = code.partition(" = ")
        try:
            parsed: object = ast.literal_eval(value.strip())
        except ValueError:
            parsed = value.strip()
        out[name.strip()[len(PREFIX):]] = (parsed, comment)
    return out


def group_data_line(row: options.Option) -> str:
    """The line of group_data/all.py for a row: ``vllm_KEY = DEFAULT``, the comment at column 42 (two spaces before
    it when the code is longer), the row's description; a secret from the environment (``VLLM_FLEET_KEY``)."""
    if row.secret:
        env = f"VLLM_FLEET_{row.key.upper()}"
        value = f'SecretStr(os.environ["{env}"]) if os.environ.get("{env}") else None'
    else:
        value = json.dumps(row.default) if isinstance(row.default, str) else repr(row.default)
    code = f"{PREFIX}{row.key} = {value}"
    return f"{code:<40} # {row.description}" if len(code) < 40 else f"{code}  # {row.description}"


@pytest.mark.parametrize("key", sorted(ROWS))
def test_every_row_has_its_group_data_line_with_its_default_and_description(key):
    """group_data/all.py stays hand-kept (the file users read, with the other sections' lines and the secrets'
    environment variables); a row without its line, or with another default or comment, fails with the line to paste."""
    row = ROWS[key]
    line = group_data_line(row)
    lines = [ln for ln in (ROOT / "group_data" / "all.py").read_text().splitlines() if ln.startswith(f"{PREFIX}{key} = ")]
    header = "# --- serve options (vllm_fleet/planner/options.py) ---"
    if not lines:  # pytest.fail: the message as it is (an assert's message would be indented)
        pytest.fail(f"group_data/all.py has no line for {PREFIX}{key}; paste this under {header!r}:\n{line}", pytrace=False)
    if lines != [line]:
        pytest.fail(f"group_data/all.py's line for {PREFIX}{key} is not the row's; replace it with:\n{line}", pytrace=False)
    value, comment = _group_data()[key]
    if row.secret:
        assert "os.environ.get" in str(value), f"{key} must come from the environment"
    else:
        assert value == row.default
    assert comment == row.description


def test_a_row_without_its_group_data_line_fails_with_the_line_to_paste(monkeypatch):
    row = options.Option("new_flag", "--new-flag", int | None, None, "a new flag; None = vLLM's default", owner="free")
    monkeypatch.setitem(ROWS, "new_flag", row)
    with pytest.raises(pytest.fail.Exception) as info:
        test_every_row_has_its_group_data_line_with_its_default_and_description("new_flag")
    assert "\nvllm_new_flag = None                     # a new flag; None = vLLM's default" in str(info.value)


@pytest.mark.parametrize(("key", "flag"), SECRET_SPELLINGS)
def test_a_secret_flag_in_extra_args_is_refused_in_every_spelling(key, flag):
    for words in _spellings(flag, "sekrit-value"):
        with pytest.raises(SettingsError) as info:
            load_settings({"vllm_extra_args": words}, host="h")
        assert "EnvironmentFile" in str(info.value) and "sekrit-value" not in str(info.value), words
        with pytest.raises(PlanError, match="must not travel in argv"):
            options_from(extra_args=tuple(words))


@pytest.mark.parametrize(("key", "flag"), OWNED_SPELLINGS)
def test_an_owned_flag_in_extra_args_names_its_setting_in_every_spelling(key, flag):
    for words in _spellings(flag, "1"):
        with pytest.raises(SettingsError, match=f"set {PREFIX}{key} instead"):
            load_settings({"vllm_extra_args": words}, host="h")


@pytest.mark.parametrize("words", [["--no-enforce-eager"], ["--no-enable-expert-parallel"], ["--no_enforce_eager"]])
def test_the_no_twin_of_a_boolean_flag_is_owned_too(words):
    with pytest.raises(SettingsError, match="which the plan owns"):
        load_settings({"vllm_extra_args": words})


def test_other_flags_pass_in_extra_args():
    s = load_settings({"vllm_extra_args": ["--enable-prefix-caching", "--max-num-partial-prefills", "4", "-O3"]})
    assert s.extra_args == ["--enable-prefix-caching", "--max-num-partial-prefills", "4", "-O3"]
    with pytest.raises(SettingsError, match="models/"):
        load_settings({"vllm_extra_args": ["--trust-remote-code"]})


@pytest.mark.parametrize(("value", "ok"), [(15, False), (16, True), ("auto", True)])
def test_max_model_len_has_one_bound_in_settings_and_plan(value, ok):
    if ok:
        assert Settings(max_model_len=value).max_model_len == value
        assert options_from(max_model_len=value).max_model_len == value
        return
    with pytest.raises(SettingsError, match="too small"):
        load_settings({"vllm_max_model_len": value})
    with pytest.raises(PlanError, match="too small to serve anything; use"):
        options_from(max_model_len=value)


def test_block_size_check_holds_in_both():
    with pytest.raises(SettingsError, match="attention backends take"):
        load_settings({"vllm_block_size": 24})
    with pytest.raises(PlanError, match="attention backends take"):
        options_from(block_size=24)


def test_free_rows_render_as_given_only_when_set():
    assert options.free_flags(PlanOptions()) == []
    got = options.free_flags(PlanOptions(max_num_seqs=8, enforce_eager=True, kv_cache_dtype="bf16"))
    assert [(f, v) for f, v, _ in got] == [("--kv-cache-dtype", "bfloat16"), ("--max-num-seqs", "8"), ("--enforce-eager", None)]


def test_every_flag_the_plan_renders_is_spelled_by_a_row():
    plan = make_plan("minimax-m2", "8xH200", PlanOptions(
        pipeline_parallel_size=2, tensor_parallel_size=4, enable_expert_parallel=True, block_size=32, max_num_seqs=8,
        max_num_batched_tokens=4096, enforce_eager=True, kv_cache_memory_bytes=1 << 34, kv_cache_dtype="fp8",
        cudagraph_piecewise=True, served_model_name="m"))
    known = {f for r in options.OPTIONS for f in r.flags}
    profile_flags = {"--trust-remote-code", "--enable-auto-tool-choice", "--tool-call-parser"}
    names = [f.name for f in plan.flags[1:]]
    assert set(names) - profile_flags <= known
    assert (plan.model_path, plan.served_model_name, plan.reasoning_parser) == (
        plan.argv[2], "m", "minimax_m2_append_think")


@pytest.mark.parametrize("command", ["plan", "render"])
def test_every_cli_row_is_an_option_of_plan_and_render(command):
    from vllm_fleet.cli import plan as plan_cli, render as render_cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    (plan_cli if command == "plan" else render_cli).add_parser(sub)
    options_of = set(sub.choices[command]._option_string_actions)
    for row in options.rows(cli=True):
        assert row.cli_option in options_of, row.key
    for row in options.rows(cli=False):
        assert row.cli_option not in options_of, row.key


ADD_A_ROW = r"""
import json, sys, tempfile
from pathlib import Path
from vllm_fleet.planner import options as o
o.OPTIONS = (*o.OPTIONS,
    o.Option("enable_prefix_caching", "--enable-prefix-caching", bool, False, "test row: cache prefixes",
             owner="free", reason="test row"),
    o.Option("max_num_partial_prefills", "--max-num-partial-prefills", int | None, None, "test row: partial prefills",
             owner="free", ge=1, reason="test row"))
from vllm_fleet.cli.main import main
from vllm_fleet.errors import SettingsError
from vllm_fleet.planner.plan import make_plan
from vllm_fleet.settings import Settings, load_settings

out = {"fields": [k for k in ("enable_prefix_caching", "max_num_partial_prefills") if k in Settings.model_fields]}
s = load_settings({"vllm_enable_prefix_caching": True, "vllm_max_num_partial_prefills": 2})
out["argv"] = make_plan("minimax-m2", "4xH200", s.plan_options()).argv
out["default_argv"] = make_plan("minimax-m2", "4xH200", load_settings({}).plan_options()).argv
try:
    load_settings({"vllm_max_num_partial_prefills": 0})
except SettingsError as exc:
    out["bound"] = str(exc)
try:
    load_settings({"vllm_extra_args": ["--max-num-partial-prefills=3"]})
except SettingsError as exc:
    out["refused"] = str(exc)
import contextlib, io
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    out["plan_rc"] = main(["plan", "--model", "minimax-m2", "--gpus", "4xH200", "--enable-prefix-caching",
                           "--max-num-partial-prefills", "4", "--json"])
out["plan_argv"] = json.loads(buf.getvalue())["argv"]
d = tempfile.mkdtemp()
with contextlib.redirect_stdout(io.StringIO()):
    out["render_rc"] = main(["render", "--model", sys.argv[1], "--gpus", "1xH200", "--enable-prefix-caching",
                             "--out", d])
out["unit"] = (Path(d) / "vllm.service").read_text()
print(json.dumps(out))
"""


def test_adding_a_row_is_all_it_takes():
    """A row appended to the table (before the models are built) is a setting, a plan and render option, and argv."""
    proc = subprocess.run([sys.executable, "-c", ADD_A_ROW, TINY], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["fields"] == ["enable_prefix_caching", "max_num_partial_prefills"]
    argv = out["argv"]
    assert "--enable-prefix-caching" in argv and argv[argv.index("--max-num-partial-prefills") + 1] == "2"
    assert not {"--enable-prefix-caching", "--max-num-partial-prefills"} & set(out["default_argv"])
    assert "vllm_max_num_partial_prefills" in out["bound"] and "greater than or equal to 1" in out["bound"]
    assert "set vllm_max_num_partial_prefills instead" in out["refused"]
    assert out["plan_rc"] == 0 and "--enable-prefix-caching" in out["plan_argv"]
    assert out["plan_argv"][out["plan_argv"].index("--max-num-partial-prefills") + 1] == "4"
    exec_start = next(line for line in out["unit"].splitlines() if line.startswith("ExecStart="))
    assert out["render_rc"] == 0 and " --enable-prefix-caching" in exec_start
