"""A pyinfra run of deploy code for one fake host, facts answered by a function: what the steps read and plan.

No host is reached: ``host.get_fact`` is replaced on the host object, so every fact (ours and pyinfra's stock
ones) is answered by ``answer(fact_class, kwargs)`` and recorded in ``reads``; the operations are planned
(their commands generated) as in ``pyinfra ... --dry``.
"""

from __future__ import annotations

import runpy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pyinfra.api import Config, Inventory, State
from pyinfra.api.state import StateStage
from pyinfra.context import ctx_config, ctx_host, ctx_inventory, ctx_state

REPO = Path(__file__).resolve().parents[2]


@dataclass
class FakeRun:
    state: State
    host: object
    reads: list[tuple[str, tuple, str]] = field(default_factory=list)
    batched: list[tuple[str, tuple, str]] = field(default_factory=list)  # the reads deploy.py's `read_many` made

    def keys(self) -> list[tuple[str, str]]:
        """(fact name, arguments) of every read, in order."""
        return [(name, f"{args!r} {kwargs}") for name, args, kwargs in self.reads]

    def twice(self) -> list[tuple[str, str]]:
        """The facts read more than once with the same arguments."""
        keys = self.keys()
        return sorted({k for k in keys if keys.count(k) > 1})

    def count(self, name: str) -> int:
        return sum(1 for n, _, _ in self.reads if n == name)

    def run_file(self, path: str | Path) -> None:
        """Execute a deploy file (deploy.py) for the fake host, as pyinfra's CLI does while planning. Its batch read
        (`read_many`: one shell command on a real host) reads each fact through the fake ``get_fact``, in order."""
        from vllm_fleet.hostops import facts

        def read_many(host, reads) -> int:
            start = len(self.reads)
            for r in reads:
                facts.read(host, r)
            self.batched += self.reads[start:]
            return 0

        real, facts.read_many = facts.read_many, read_many
        try:
            with self.context():
                runpy.run_path(str(REPO / path), run_name="__pyinfra_deploy__")
        finally:
            facts.read_many = real

    def execute(self) -> list:
        """Generate every planned operation's commands again, as pyinfra does when it executes them (it runs each
        operation's function a second time: once while planning to see a change, once to execute); returns them."""
        out = []
        with self.context():
            for op_hash in self.state.get_op_order():
                out += list(self.state.get_op_data_for_host(self.host, op_hash).command_generator())
        return out

    @contextmanager
    def context(self) -> Iterator[None]:
        with ctx_state.use(self.state), ctx_inventory.use(self.state.inventory), \
                ctx_config.use(self.state.config.copy()), ctx_host.use(self.host):
            yield


def fake_run(data: dict, answer: Callable[[type, dict], object], name: str = "fake",
             peers: tuple[tuple[str, dict], ...] = ()) -> FakeRun:
    """The run of ``name`` (``data``), with ``peers`` (name, data) as the inventory's other hosts (the fleet)."""
    inventory = Inventory(([(name, data), *peers], {}))
    state = State(inventory, Config())
    state.current_stage = StateStage.Prepare
    host = inventory.get_host(name)
    run = FakeRun(state, host)

    def get_fact(cls, *args, **kwargs):
        run.reads.append((cls.__name__, args, repr(sorted(kwargs.items()))))
        return answer(cls, args, kwargs)

    host.get_fact = get_fact  # the instance attribute wins over Host.get_fact for this host only
    return run
