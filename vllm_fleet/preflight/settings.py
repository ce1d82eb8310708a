"""The preflight's settings section (pure: pydantic only): what a host must offer before anything changes.

Composed into `vllm_fleet.settings.Settings`; field names are host-data keys without `vllm_`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PreflightSection(BaseModel):
    """Disk headroom and the operating systems preflight accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    disk_headroom_gib: int = Field(20, ge=0, le=100_000, description="free disk kept beyond venv + weights",
                                   json_schema_extra={"bounds": "0 to 100000 GiB (100 TB, more than a host's disks)"})
    supported_os: dict[str, list[str]] = Field(
        default_factory=lambda: {"ubuntu": ["22.04", "24.04"], "debian": ["12"]},
        description="OS id -> supported VERSION_IDs (from /etc/os-release)",
    )
