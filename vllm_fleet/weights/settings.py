"""The weights' settings section (pure: pydantic only): sources, the download unit's behaviour, verification.

Composed into `vllm_fleet.settings.Settings`; field names are host-data keys without `vllm_`
(docs/weights.md).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vllm_fleet.errors import url_credentials
from vllm_fleet.layout import served_dir_problem


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
            if not self.path or not self.path.startswith("/") or ".." in self.path.split("/"):
                raise ValueError("a local source needs path: an absolute directory on the host holding config.json (no ..)")
            hidden = served_dir_problem(self.path)
            if hidden is not None:
                raise ValueError(f"path {self.path} " + hidden)
        elif not self.repo or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", self.repo):
            raise ValueError(f"a {self.kind} source needs repo: an id like MiniMaxAI/MiniMax-M2")
        if self.endpoint is not None and not re.match(r"^https?://[^@\s]+$", self.endpoint):
            raise ValueError("endpoint must be an http(s) URL without credentials|set the source's endpoint to "
                             "https://HOST/ without user:password@ (a hub token goes in vllm_hf_token: "
                             "VLLM_FLEET_HF_TOKEN in the environment of the deploy)")
        if self.endpoint is not None and url_credentials(self.endpoint):
            raise ValueError("endpoint carries a credential in its query, which would stand in the download's config, "
                             "its log and the deploy's output|set the source's endpoint without it (a hub token goes in "
                             "vllm_hf_token: VLLM_FLEET_HF_TOKEN in the environment of the deploy)")
        return self


class WeightsSection(BaseModel):
    """Where the weights come from, how the deploy waits for them, retries, parallelism, re-hashing."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    weights_sources: list[WeightsSource] | None = Field(None, description="where the weights come from, tried in order: [{kind: hf|modelscope|local, repo, endpoint, revision, path}]; None = the local model dir of vllm_model is copied, or vLLM fetches the profile's repo itself")
    weights_wait: bool = Field(True, description="the deploy waits for the download unit (progress line); False = start it and go on")
    weights_wait_timeout_s: int = Field(6 * 3600, ge=10, le=7 * 86400, json_schema_extra={"bounds": "10 s to 7 days (604800 s): the unit keeps downloading after the wait, a rerun attaches"}, description="how long the deploy waits for the download before failing (the unit keeps going; a rerun attaches)")
    weights_stall_s: int = Field(300, ge=10, le=24 * 3600, description="the deploy's wait restarts the download unit when no byte arrived for this long while downloading (it resumes every partial file)")
    weights_restarts: int = Field(3, ge=0, le=100, description="restarts of a dead or stalled download unit by the deploy's wait before it stops with the unit's last log lines")
    weights_retries: int = Field(5, ge=1, le=100, json_schema_extra={"bounds": "1 to 100 attempts per source"}, description="attempts per source before the next source is tried")
    weights_backoff_s: float = Field(10.0, ge=0, le=300, json_schema_extra={"bounds": "0 to 300 s: the backoff doubles per attempt up to 300 s anyway"}, description="wait before the second attempt; doubles per attempt, capped at 300 s")
    weights_workers: int = Field(8, ge=1, le=64, json_schema_extra={"bounds": "1 to 64 parallel files (more only adds connections)"}, description="files downloaded in parallel")
    weights_reverify: bool = Field(False, description="hash every file again (in parallel) on every deploy that sets it (normally only files whose size/mtime changed)")
    hf_xet: bool = Field(False, description="let huggingface_hub use Xet storage; off: HF mirrors (hf-mirror.com, local ones) serve plain HTTP resolve URLs only")
    purge_weights: bool = Field(False, description="uninstall.py also deletes the weights and caches under data_dir")
