"""The rolling deploy's halt (pure): once a host fails its health gate, the hosts gated after it are not restarted.

Hosts are gated one at a time (``_serial``), or in batches of vllm_rolling_batch hosts (``_parallel``: a batch
finishes before the next starts, so a failure halts every later batch). The record lives in the pyinfra run
(`RollingHalt.of(state)` keeps one on the run's ``State`` object), never in a
module global: two runs in one process (tests, an API user) do not share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ATTRIBUTE = "_vllm_fleet_rolling_halt"


@dataclass
class RollingHalt:
    """The hosts whose gate failed in this run, in the order they failed."""

    failed: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, run) -> RollingHalt:
        """The record of the run ``run`` (pyinfra's ``State``; any object that takes attributes), created on first use."""
        halt = vars(run).get(ATTRIBUTE)
        if halt is None:
            halt = cls()
            setattr(run, ATTRIBUTE, halt)
        return halt

    def blocked(self) -> str | None:
        """Why a host may not be restarted now (None: it may)."""
        if not self.failed:
            return None
        return f"not restarted: the rolling deploy halted after {', '.join(self.failed)} failed its health gate"

    def record_failure(self, host_name: str) -> None:
        if host_name not in self.failed:
            self.failed.append(host_name)
