"""`vllm-fleet plan` end to end through the real argparse entry point, with golden files.

Regenerate the golden files after an intended change with
`UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_plan_cli.py` and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vllm_fleet.cli import main

GOLDEN = Path(__file__).parent / "golden"

CASES = {
    "seed-4xa800-196608": ["--model", "minimax-m2", "--gpus", "4xA800-80G", "--tensor-parallel-size", "4",
                           "--max-model-len", "196608", "--kv-cache-memory-bytes", "10066657280"],
    "minimax-8xh200-auto": ["--model", "minimax-m2", "--gpus", "8xH200"],
    "gpt-oss-2xh100": ["--model", "gpt-oss-120b", "--gpus", "2xH100-80G", "--max-model-len", "131072"],
}


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
