"""`vllm-fleet plan` end to end through the real argparse entry point, with golden files.

Regenerate the golden files after an intended change with
`UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/cli/test_plan_cli.py` and review the diff.
The text is as wide as the terminal (rich reads COLUMNS); the goldens are rendered
at GOLDEN_WIDTH, set through COLUMNS for every test here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
from rich.cells import cell_len

from vllm_fleet.cli.main import main
from vllm_fleet.planner.plan import make_plan
from vllm_fleet.cli.plan import command_lines

GOLDEN = Path(__file__).parent / "golden"
GOLDEN_WIDTH = 110

CASES = {
    "seed-4xa800-196608": ["--model", "minimax-m2", "--gpus", "4xA800-80G", "--tensor-parallel-size", "4",
                           "--max-model-len", "196608", "--kv-cache-memory-bytes", "10066657280"],
    "minimax-8xh200-auto": ["--model", "minimax-m2", "--gpus", "8xH200"],
    "gpt-oss-2xh100": ["--model", "gpt-oss-120b", "--gpus", "2xH100-80G", "--max-model-len", "131072"],
}


# Plans with errors (exit 1): the seed's length that does not fit, and "auto" with no room for any KV
# (the plan's max-model-len falls to 1, which must never reach a printed command).
UNDEPLOYABLE = {
    "seed-4xa800-196608": CASES["seed-4xa800-196608"],
    "too-large-auto": ["--model", "minimax-m2", "--gpus", "1xH100-80G"],
    "above-model-max": ["--model", "minimax-m2", "--gpus", "4xA800-80G", "--max-model-len", "10000000"],
    "no-kv-a800": ["--model", "minimax-m2", "--gpus", "1xA800-80G"],  # issue 11's case
}


@pytest.fixture(autouse=True)
def _golden_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """Render at GOLDEN_WIDTH whatever the terminal running the tests (rich: COLUMNS first)."""
    monkeypatch.setenv("COLUMNS", str(GOLDEN_WIDTH))


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _check(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs from the golden file; see module docstring"


@pytest.mark.parametrize("case", sorted(CASES))
def test_table_golden(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, CASES[case])
    _check(f"{case}.txt", out)
    assert rc == (1 if "NOT deployable" in out else 0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_json_golden(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, [*CASES[case], "--json"])
    _check(f"{case}.json", out)
    assert rc == (0 if json.loads(out)["ok"] else 1)


def test_seed_via_cli(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, [*CASES["seed-4xa800-196608"], "--json"])
    doc = json.loads(out)
    assert rc == 1
    assert doc["max_model_len_that_fits"] == 158560
    assert doc["errors"][0]["code"] == "KV_DOES_NOT_FIT"
    assert "(11.62 GiB KV cache is needed" in doc["errors"][0]["message"]
    assert "(9.38 GiB)" in doc["errors"][0]["message"]


@pytest.mark.parametrize(("argv", "needle"), [
    (["--model", "minimax-m3", "--gpus", "4xA800-80G"], "Did you mean 'minimax-m2'"),
    (["--model", "minimax-m2", "--gpus", "4xA900"], "unknown GPU 'A900'"),
    (["--model", "minimax-m2", "--gpus", "4xH200", "--gpu-memory-utilization", "1.5"], "gpu_memory_utilization"),
    (["--model", "minimax-m2", "--gpus", "4xH200", "--max-model-len", "lots"], "max_model_len"),
])
def test_invalid_input_exit_2_one_line(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, argv)
    assert rc == 2
    assert out == ""
    assert needle in err and err.count("\n") == 1


@pytest.mark.parametrize("case", sorted(UNDEPLOYABLE))
def test_undeployable_plan_prints_remedies_and_no_command(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, UNDEPLOYABLE[case])
    assert rc == 1
    assert "remedy: " in out and "ERROR" in out
    assert "command:" not in out and "vllm serve" not in out
    assert out.splitlines()[-1].startswith("verdict: NOT deployable")
    # a max-model-len the plan chose with no length fitting is no value: never "1", never "the largest that fits"
    lines = [line for line in out.splitlines() if "max-model-len" in line and "KV for" not in line]
    none_fits = case in ("too-large-auto", "no-kv-a800")
    assert lines and all(("none fits" in line) == none_fits for line in lines), lines
    assert not any(re.search(r"│ 1 +│|│ 1 \(", line) or "the largest that fits" in line for line in lines), lines
    rc, out, _ = _run(capsys, [*UNDEPLOYABLE[case], "--json"])
    doc = json.loads(out)
    assert rc == 1 and doc["ok"] is False and doc["errors"]
    assert doc["argv"] is None  # the key stays; nothing to launch
    assert all(e["remedy"] for e in doc["errors"])
    mml = next(f for f in doc["flags"] if f["flag"] == "--max-model-len")
    if none_fits:
        assert doc["max_model_len"] is None and mml["value"] is None and doc["max_model_len_that_fits"] == 0
    else:
        assert doc["max_model_len"] == int(mml["value"]) > 1


@pytest.mark.parametrize("case", ["minimax-8xh200-auto", "gpt-oss-2xh100"])
def test_deployable_plan_prints_the_argv(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, [*CASES[case], "--json"])
    argv = json.loads(out)["argv"]
    assert rc == 0 and argv[:2] == ["vllm", "serve"]
    rc, out, _ = _run(capsys, CASES[case])
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("command: "))
    end = next(i for i, line in enumerate(lines) if line.startswith("verdict: "))
    assert _as_shell_reads(lines[start:end]) == argv  # the lines paste into a shell as the one argv
    assert lines[end] == "verdict: deployable"


@pytest.mark.parametrize("case", [*sorted(CASES), *sorted(UNDEPLOYABLE)])
def test_plan_fits_80_columns(case: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    _, out, _ = _run(capsys, CASES.get(case) or UNDEPLOYABLE[case])
    too_wide = [line for line in out.splitlines() if cell_len(line) > 80]
    assert not too_wide, "\n".join(too_wide)
    assert "Flags" in out and out.splitlines()[-1].startswith("verdict: ")


def test_command_lines_keep_flags_with_values() -> None:
    argv = make_plan("minimax-m2", "8xH200").argv
    assert command_lines(argv, 10_000) == ["command: " + shlex.join(argv)]
    lines = command_lines(argv, 60)
    assert len(lines) > 1 and all(cell_len(line) <= 60 for line in lines)
    assert all(line.endswith(" \\") for line in lines[:-1]) and not lines[-1].endswith("\\")
    assert all(line.startswith("    --") for line in lines[1:])  # a line starts with a flag, never with a value
    assert _as_shell_reads(lines) == argv


def _as_shell_reads(lines: list[str]) -> list[str]:
    """The words a POSIX shell reads from the ``command:`` lines (backslash-newline joins lines)."""
    return shlex.split("\n".join(lines).removeprefix("command: ").replace("\\\n", ""))
