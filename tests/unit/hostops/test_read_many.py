"""`read_many`: every fact of a deploy in one shell command, each value what ``host.get_fact`` alone returns.

Real pyinfra, real shell: the host is pyinfra's ``@local`` connector (this machine), the facts are the
toolkit's own and pyinfra's stock ``Command``, over paths made here; each value is compared with the one
pyinfra's own ``get_fact`` reads for the same arguments.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
from pyinfra.api import Config, FactBase, Inventory, State
from pyinfra.api.connect import connect_all
from pyinfra.context import ctx_host, ctx_state
from pyinfra.facts.server import Command, Home

from vllm_fleet.hostops import facts
from vllm_fleet.hostops.facts import FileStates, PathStates, Read, SystemAccount, TreeDigests, read, read_many, split_batch


@contextmanager
def local_host():
    inventory = Inventory((["@local"], {}))
    state = State(inventory, Config())
    connect_all(state)
    host = inventory.get_host("@local")
    sent: list[str] = []
    real = host.run_shell_command

    def counted(command, **kwargs):
        sent.append(str(command))
        return real(command, **kwargs)

    host.run_shell_command = counted
    with ctx_state.use(state), ctx_host.use(host):
        yield host, sent


class NoNewline(FactBase):
    """Output without a final newline, then an empty line in the middle: the lines must come through unchanged."""

    def command(self) -> str:
        return "printf 'a\\n\\nb'"

    def process(self, output):
        return list(output)


class ExitsEarly(FactBase):
    """``exit 0`` inside a fact's command ends that fact only, not the batch."""

    def command(self) -> str:
        return "echo first; exit 0; echo never"

    def process(self, output):
        return list(output)


class Fails(FactBase):
    def command(self) -> str:
        return "echo partial; exit 3"

    def process(self, output):
        return list(output)


class NeedsMissingBinary(FactBase):
    def requires_command(self, *args, **kwargs) -> str:
        return "vllm-fleet-no-such-binary"

    def command(self) -> str:
        return "echo unreachable"

    def process(self, output):
        return list(output)


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.json").write_text("{}\n")
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "w|eird name.bin").write_bytes(b"\0" * 100)
    (tmp_path / "f.txt").write_text("hello\n")
    return tmp_path


def test_one_command_reads_what_each_fact_reads_alone(tree):
    user = os.environ.get("USER") or "root"
    reads = [
        Read.of(PathStates, paths=[str(tree / "d"), str(tree / "f.txt"), str(tree / "absent")]),
        Read.of(FileStates, paths=[str(tree / "f.txt"), str(tree / "absent")]),
        Read.of(TreeDigests, path=str(tree / "d")),
        Read.of(TreeDigests, path=str(tree / "absent")),
        Read.of(SystemAccount, account=user),
        Read.of(Command, f"cat {tree / 'f.txt'}; echo second line"),
        Read.of(Command, "true"),  # empty output: the fact's default()
        Read.of(NoNewline),
        Read.of(ExitsEarly),
    ]
    with local_host() as (host, sent):
        assert read_many(host, reads) == 1
        assert len(sent) == 1
        batched = [read(host, r) for r in reads]
        assert len(sent) == 1  # every step's read is served from the batch
        alone = [host.get_fact(r.fact, *r.args, **dict(r.kwargs)) for r in reads]
    assert batched == alone
    assert batched[2]["sub/w|eird name.bin"].sha256 == "cd00e292c5970d3c5e2f0ffa5171e555bc46bfc4faddfb4a418b6840b86e79a3"
    assert batched[3] is None and batched[6] is None
    assert batched[5] == "hello\nsecond line"
    assert batched[7] == ["a", "", "b"] and batched[8] == ["first"]


def test_a_read_already_made_is_not_sent_again_and_a_run_reads_each_once(tree):
    r = Read.of(FileStates, paths=[str(tree / "f.txt")])
    with local_host() as (host, sent):
        read(host, r)
        assert read_many(host, [r, r]) == 0 and len(sent) == 1
        assert read_many(host, [Read.of(Command, "echo x"), Read.of(Command, "echo x")]) == 1 and len(sent) == 2


def test_a_failing_or_unparsable_fact_is_left_to_its_own_read(tree):
    """Not kept from the batch: read alone afterwards, so pyinfra reports it as it always did."""
    with local_host() as (host, sent):
        assert read_many(host, [Read.of(Fails), Read.of(NeedsMissingBinary), Read.of(Command, "echo ok")]) == 1
        assert read(host, Read.of(Command, "echo ok")) == "ok" and len(sent) == 1
        memo = vars(host.state)[facts.MEMO_ATTRIBUTE]
        assert not any(key[1] in (Fails, NeedsMissingBinary) for key in memo)


def test_connector_arguments_split_the_batch():
    """A fact read with ``_sudo`` (or another connector argument) goes in a command of its own kind."""
    with local_host() as (host, sent):
        n = read_many(host, [Read.of(Command, "echo a"), Read.of(Home, _sudo=False), Read.of(Command, "echo b", _env={"X": "1"})])
        assert n == 2 and len(sent) == 2


def test_split_batch_keeps_only_commands_that_ended():
    lines = ["<<n 0>>", "a", "", "<<n 0 rc 0>>", "<<n 1>>", "b", "<<n 1 rc 2>>", "<<n 2>>", "cut off"]
    assert split_batch(lines, 3, "n") == {0: (0, ["a"]), 1: (2, ["b"])}
