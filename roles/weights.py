"""Weights: put the model where vLLM will read it, and say which directory that is.

Today one source is implemented: a model directory on the control machine
(a tiny test model, a fine-tune, an air-gapped copy) is synced to
``{data_dir}/models/<name>`` on the host, owned by the service user. A
profile name (a Hugging Face / ModelScope repo) is served by repo id and
fetched by vLLM itself until the detached, resumable, verified download of
issue 5 lands here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta

from roles.ops import mirror_dir
from vllm_fleet.settings import Settings


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from and the path (or repo id) `vllm serve` gets."""

    local_dir: Path | None
    serve_path: str


def source(settings: Settings) -> ModelSource:
    """Decide, without touching the host, what `vllm serve` will be given."""
    local = Path(settings.model)
    if local.is_dir():
        return ModelSource(local.resolve(), f"{settings.data_dir}/models/{local.resolve().name}")
    return ModelSource(None, "")  # the planner uses the profile's repo id


@deploy("Weights")
def apply(settings: Settings, src: ModelSource) -> OperationMeta | None:
    """Place the weights; return the operation whose change means "the weights changed"."""
    if src.local_dir is None:
        return None
    return mirror_dir(
        name=f"Ensure {src.serve_path} holds exactly the model files of {src.local_dir}",
        src=str(src.local_dir),
        dest=src.serve_path,
        user=settings.service_user,
        group=settings.service_user,
    )
