"""The pinned vLLM's serve options as committed (vllm_fleet/planner/vllm_serve_flags.json) are the REAL ones.

The toolkit resolves extra `vllm serve` arguments against that file (prefixes, `--no-` twins,
`-tp`-style aliases: vllm_fleet/planner/serveargs.py). This test dumps the option table of the
real pinned vLLM (tests/realvllm/dump_serve_flags.py, run by the real vLLM venv's python, found
as tests/realvllm/test_real_vllm_argv.py finds it) and requires the committed file to be
exactly that dump. Skipped when no real vLLM venv is recorded; named but broken fails.

Regenerate after a vLLM bump::

    VLLM_PYTHON tests/realvllm/dump_serve_flags.py > vllm_fleet/planner/vllm_serve_flags.json
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.realvllm.test_real_vllm_argv import HERE, PYTHON_ENV, expected_version, real_python
from vllm_fleet.planner import serveargs

DUMP_SCRIPT = HERE / "dump_serve_flags.py"


def test_the_committed_flags_fixture_is_the_real_vllms():
    if expected_version() != serveargs.vllm_version():
        pytest.skip(f"checking vLLM {expected_version()}, the fixture is of {serveargs.vllm_version()}")
    python = real_python()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    try:
        proc = subprocess.run([python, str(DUMP_SCRIPT)], capture_output=True, text=True, timeout=300, env=env, check=False)
    except OSError as exc:
        pytest.fail(f"{PYTHON_ENV}={python} cannot run: {exc}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    real = json.loads(proc.stdout)
    committed = serveargs.table()
    assert real["vllm_version"] == committed["vllm_version"]
    real_flags = {f for o in real["options"] for f in o["flags"]}
    committed_flags = {f for o in committed["options"] for f in o["flags"]}
    assert real_flags == committed_flags, (
        f"missing from the fixture: {sorted(real_flags - committed_flags)}; not in vLLM: {sorted(committed_flags - real_flags)}; "
        f"regenerate with: {committed['regenerate']}")
    assert real == committed, f"the fixture differs from the real vLLM's dump (nargs, dests, parsers); regenerate: {committed['regenerate']}"
