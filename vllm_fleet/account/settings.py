"""The account's settings section (pure: pydantic only): the system user the service runs as.

The directories the account step creates (base_dir, data_dir) are every capability's paths, so they
are core settings (vllm_fleet/settings.py). Composed into `vllm_fleet.settings.Settings`.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: A user name: lower-case letters, digits, _ and -, starting with a letter (useradd and chown would read a leading
#: ``-`` as an option; Debian's adduser NAME_REGEX), at most 31 characters.
_USER_RE = re.compile(r"[a-z][a-z0-9_-]{0,30}")


class AccountSection(BaseModel):
    """The service user."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    service_user: str = Field("vllm", description="unprivileged system user the service runs as")
    adopt_existing_user: bool = Field(False, description="True = take over an existing account of vllm_service_user that vllm-fleet did not create (its shell becomes nologin); False = preflight refuses it")

    @field_validator("service_user")
    @classmethod
    def _user(cls, v: str) -> str:
        if not _USER_RE.fullmatch(v) or v == "root":
            raise ValueError("is not a valid unprivileged user name: up to 31 lower-case letters, digits, _ and -, "
                             "starting with a letter; never root|set vllm_service_user to such a name, e.g. vllm")
        return v
