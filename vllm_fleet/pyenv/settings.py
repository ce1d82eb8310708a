"""The Python env's settings section (pure: pydantic only): where vLLM and torch come from, and the venvs kept.

The vLLM version itself is a core setting (vllm_fleet/settings.py): the planner reads it too.
Composed into `vllm_fleet.settings.Settings`; field names are host-data keys without `vllm_`.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vllm_fleet.errors import SettingConflict, url_credentials

_PY_RE = re.compile(r"^3\.(\d{1,2})$")


class PyenvSection(BaseModel):
    """Python, the channel (release, nightly, source), torch, package indexes, wheels, venvs kept."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    python_version: str = Field("3.12", description="Python version of the service venv (uv installs it if the host lacks it)")
    channel: Literal["release", "nightly", "source"] = Field("release", description="where vLLM comes from")
    source_url: str | None = Field(None, description="git URL for channel=source")
    source_ref: str | None = Field(None, description="git ref (commit, tag, branch) for channel=source")
    torch_backend: str = Field("auto", description="torch build: auto (from the driver's CUDA), cu128, cu130, cpu, ...")
    index_url: str | None = Field(None, description="Python package index (a mirror); None = PyPI")
    extra_index_urls: list[str] = Field(default_factory=list, description="extra package indexes")
    find_links: list[str] = Field(default_factory=list, description="local wheel directories or URLs to find packages in")
    keep_venvs: int = Field(2, ge=1, le=10, json_schema_extra={"bounds": "1 to 10 venvs (each about 9 GB)"}, description="venvs kept for rollback (older ones are pruned)")
    torch_version: str | None = Field(None, description="torch version to pin (None = what the vLLM release requires)")
    torch_index_url: str | None = Field(None, description="index of torch builds for the backend, e.g. a mirror of download.pytorch.org/whl/cu128 (None = uv --torch-backend)")
    nightly_index_url: str = Field("https://wheels.vllm.ai/nightly", description="extra index for channel=nightly")
    no_index: bool = Field(False, description="install only from vllm_find_links / vllm_wheelhouse, never from an index")
    wheelhouse: str | None = Field(None, description="directory of wheels on the control machine, pushed to the host and installed from with --no-index (air-gapped hosts)")
    purge_venvs: bool = Field(False, description="uninstall.py also deletes the venvs under base_dir")

    @field_validator("python_version")
    @classmethod
    def _py(cls, v: str) -> str:
        m = _PY_RE.match(v)
        if not m or not 10 <= int(m.group(1)) <= 13:
            raise ValueError("is not a Python vLLM supports|use 3.10, 3.11, 3.12 or 3.13")
        return v

    @field_validator("index_url", "source_url", "torch_index_url", "nightly_index_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(https?|file|git\+https?|ssh)://", v):
            raise ValueError("is not a URL|use a full URL such as https://pypi.org/simple")
        if v is not None and url_credentials(v):
            raise ValueError("holds credentials (user:password@ or a token in the query such as ?token=), which would appear "
                             "in commands, process lists and logs|set the URL without them, and put them in "
                             "/root/.netrc on the host (uv, pip and git read it; a token as the password of the index host's entry)")
        return v

    @field_validator("torch_backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        from vllm_fleet.pyenv.stack import KNOWN_BACKENDS

        if v != "auto" and v not in KNOWN_BACKENDS:
            raise ValueError(f"is not a torch backend|use auto (from the driver's CUDA) or one of {', '.join(KNOWN_BACKENDS)}")
        return v

    @field_validator("torch_version")
    @classmethod
    def _torch_version(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"\d+\.\d+(\.\d+)?", v):
            raise ValueError("is not a torch release|use a version such as 2.11.0 (the build, +cu130 etc., comes from vllm_torch_backend)")
        return v

    @field_validator("wheelhouse")
    @classmethod
    def _wheelhouse(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from pathlib import Path

        try:
            p = Path(v).expanduser()
            wheels = p.is_dir() and any(p.glob("*.whl"))
        except (OSError, RuntimeError, ValueError):  # ~nouser, a name too long, a NUL byte
            wheels = False
        if not wheels:
            raise ValueError("is not a directory of wheels on the control machine|build one (e.g. `pip download -d DIR vllm==X`, "
                             "or `python tests/e2e/wheelhouse.py` for the test hosts) and point vllm_wheelhouse at it")
        return str(p.resolve())

    @field_validator("extra_index_urls", "find_links")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for u in v:
            if not (re.match(r"^(https?|file)://", u) or u.startswith("/")):
                raise ValueError(f"entry {u!r} is neither a URL nor an absolute path|use https://... or /path/to/wheels")
            if url_credentials(u):
                raise ValueError("holds credentials (user:password@ or a token in the query such as ?token=), which would "
                                 "appear in commands, process lists and logs|list the URL without them, and put them in "
                                 "/root/.netrc on the host (uv and pip read it; a token as the password of the host's entry)")
        return v

    @model_validator(mode="after")
    def _source_channel(self):
        if self.channel == "source" and not self.source_url:
            raise SettingConflict("source_url", None, "is required when vllm_channel = \"source\"",
                                  "set vllm_source_url to a git URL of vLLM (and vllm_source_ref to a commit or tag)")
        if self.channel != "source" and (self.source_url or self.source_ref):
            raise SettingConflict("channel", self.channel, "is not \"source\" but vllm_source_url/ref are set",
                                  "set vllm_channel = \"source\", or remove vllm_source_url/vllm_source_ref")
        return self
