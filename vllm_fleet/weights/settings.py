"""The weights' settings section (pure: pydantic only): sources, the download unit's behaviour, verification.

Composed into `vllm_fleet.settings.Settings`; field names are host-data keys without `vllm_`
(docs/weights.md).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class WeightsSource(BaseModel):
    """One place the weights can come from (an entry of vllm_weights_sources)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["hf", "modelscope", "local"]
    repo: str | None = None
    endpoint: str | None = None
    revision: str | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _fields(self) -> "WeightsSource":
        if self.kind == "local":
            if not self.path or not self.path.startswith("/"):
                raise ValueError("a local source needs path: an absolute directory on the host holding config.json")
        elif not self.repo or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", self.repo):
            raise ValueError(f"a {self.kind} source needs repo: an id like MiniMaxAI/MiniMax-M2")
        if self.endpoint is not None and not re.match(r"^https?://[^@\s]+$", self.endpoint):
            raise ValueError("endpoint must be an http(s) URL without credentials (the token goes in vllm_hf_token)")
        return self


class WeightsSection(BaseModel):
    """Where the weights come from, how the deploy waits for them, retries, parallelism, re-hashing."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    weights_sources: list[WeightsSource] | None = Field(None, description="where the weights come from, tried in order: [{kind: hf|modelscope|local, repo, endpoint, revision, path}]; None = the local model dir of vllm_model is copied, or vLLM fetches the profile's repo itself")
    weights_wait: bool = Field(True, description="the deploy waits for the download unit (progress line); False = start it and go on")
    weights_wait_timeout_s: int = Field(6 * 3600, ge=10, description="how long the deploy waits for the download before failing (the unit keeps going; a rerun attaches)")
    weights_retries: int = Field(5, ge=1, le=100, description="attempts per source before the next source is tried")
    weights_backoff_s: float = Field(10.0, ge=0, description="wait before the second attempt; doubles per attempt, capped at 300 s")
    weights_workers: int = Field(8, ge=1, le=64, description="files downloaded in parallel")
    weights_reverify: bool = Field(False, description="hash every file again on the next run (normally only files whose size/mtime changed)")
    hf_xet: bool = Field(False, description="let huggingface_hub use Xet storage; off: HF mirrors (hf-mirror.com, local ones) serve plain HTTP resolve URLs only")
    purge_weights: bool = Field(False, description="uninstall.py also deletes the weights and caches under data_dir")
