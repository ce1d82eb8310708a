"""One-fact operations, tested the way pyinfra tests its own (tests/operations/*.json in the pyinfra repo):
fact output and arguments in, the commands the operation yields out, as data.

Each tests/unit/hostops/operations/<operation>.json is a list of cases:

    {"case": "...", "kwargs": {...}, "facts": {"FactName": ["output line", ...]}, "commands": [...]}

A fact is given as its command's output lines and parsed by the fact's own ``process`` (so the
parser is under test too); a fact the case does not list answers None. Commands are written as
the shell text pyinfra runs; ``"[login user] ..."`` marks a command run without sudo, and
``["upload", dest, remote temp file]`` a file upload (``"TMP"``: pyinfra's own temp file name).
``"commands": []`` is a no-op. ``"reads"`` names the one fact read when ``facts`` lists more.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pyinfra.api import FileUploadCommand, StringCommand

from tests.unit.fakerun import fake_run
from vllm_fleet.hostops import operations as ops

CASES = Path(__file__).with_name("operations")


def _kwargs(op: str, kwargs: dict) -> dict:
    """JSON arguments -> the operation's arguments."""
    kw = dict(kwargs)
    if op == "managed_files":
        kw["files"] = [ops.ManagedFile(**f) for f in kw["files"]]
    elif op == "directories":
        kw["dirs"] = [ops.Dir(*d) for d in kw["dirs"]]
    return kw


def _command(c) -> str | list[str]:
    if isinstance(c, FileUploadCommand):
        temp = c.remote_temp_filename
        return ["upload", c.dest, "TMP" if temp.startswith("/tmp/pyinfra-") else temp]  # TMP: pyinfra's own temp file
    text = str(c)
    if isinstance(c, StringCommand) and c.connector_arguments.get("_sudo") is False:
        return f"[login user] {text}"
    return text


def _cases():
    for path in sorted(CASES.glob("*.json")):
        for case in json.loads(path.read_text()):
            yield pytest.param(path.stem, case, id=f"{path.stem}: {case['case']}")


@pytest.mark.parametrize("op,case", list(_cases()))
def test_operation_yields_the_commands_for_its_facts(op, case):
    facts = case.get("facts", {})

    def answer(cls, args, kwargs):
        lines = facts.get(cls.__name__)
        return None if lines is None else cls().process(lines)

    run = fake_run({}, answer)
    with run.context():
        getattr(ops, op)(name=case["case"], **_kwargs(op, case["kwargs"]))  # planned: pyinfra runs it to see a change
        planned = [n for n, _, _ in run.reads if n not in ("Home", "TmpDir")]
        op_hash = run.state.get_op_order()[-1]
        got = [_command(c) for c in run.state.get_op_data_for_host(run.host, op_hash).command_generator()]
    assert got == case["commands"]
    # one fact per operation (+ the login user's home for a secret upload, pyinfra's temp dir for an upload)
    assert planned == [case.get("reads", next(iter(facts), None))]


def test_every_case_file_is_an_operation():
    for path in CASES.glob("*.json"):
        assert callable(getattr(ops, path.stem, None)), path.name
