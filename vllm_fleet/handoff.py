"""What the steps of deploy.py hand each other: frozen values, importable without pyinfra.

deploy.py passes them explicitly, in the order the steps run:

    model = weights.source(settings)                 # ModelSource
    state = preflight.run(settings, model)           # HostState
    venv = python_env.apply(settings, state)         # Venv
    fetched = weights.apply(settings, model, state)  # WeightsResult
    service.apply(settings, state, venv, fetched)

A "did this change in the run" value is anything with ``did_change() -> bool``
(`Changed`): pyinfra's ``OperationMeta`` is one, and a test may pass its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from vllm_fleet.planner.plan import Plan
from vllm_fleet.preflight.parse import Snapshot
from vllm_fleet.pyenv.stack import BuildSpec
from vllm_fleet.weights.source import FetchPlan


@runtime_checkable
class Changed(Protocol):
    """Says, once operations ran, whether one changed the host (pyinfra's ``OperationMeta.did_change``)."""

    def did_change(self) -> bool: ...


def any_changed(*values: Changed | None):
    """An ``_if`` callable: any of the values changed something (None entries ignored)."""
    real = [v for v in values if v is not None]
    return lambda: any(v.did_change() for v in real)


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from and the path (or repo id) `vllm serve` gets (from vllm_fleet/weights/step.py `source`).

    + local_dir: a model directory on the control machine mirrored to the host (None: none)
    + serve_path: what `vllm serve` is given ("" : the profile's repo id)
    + fetch: the download's plan (``vllm_weights_sources`` set), else None
    """

    local_dir: Path | None
    serve_path: str
    fetch: FetchPlan | None = None


@dataclass(frozen=True)
class HostState:
    """What preflight learnt and decided for one host (vllm_fleet/preflight/step.py `run`), for the later steps."""

    snapshot: Snapshot
    plan: Plan


@dataclass(frozen=True)
class Venv:
    """The venv the service runs from (vllm_fleet/pyenv/step.py `apply` -> vllm_fleet/service/step.py).

    + path: the venv directory on the host; `{path}/bin/vllm` is what ExecStart runs.
    + changed: what says "the venv's content changed" (None: nothing to build).
    + previous_path: the newest other usable venv, the rollback target (None: there is none).
    + spec: what was asked for (version, backend, install arguments).
    """

    path: str
    changed: Changed | None
    previous_path: str | None
    spec: BuildSpec


@dataclass(frozen=True)
class WeightsResult:
    """What vllm_fleet/weights/step.py `apply` hands the service step.

    + changed: what says "the weights changed in this run" (None: nothing placed by the deploy)
    + ready: False when the download is not known to be complete when the service step runs
      (``vllm_weights_wait = False`` and the weights were not complete while planning): the
      service is then not (re)started
    + reason: why not ready ("" when ready)
    """

    changed: Changed | None = None
    ready: bool = True
    reason: str = ""

    def did_change(self) -> bool:
        return self.changed is not None and self.changed.did_change()
