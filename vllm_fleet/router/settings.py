"""The router's settings section (pure: pydantic only), read on the hosts of the inventory group `routers`.

A host in that group runs `vllm-router` (PyPI ``vllm-router``, the Rust router of vllm-project/router) in
front of the replicas of one model: docs/router.md. Composed into `vllm_fleet.settings.Settings`.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

ROUTER_VERSION = "0.1.17"
"""The vllm-router release the toolkit installs and was measured with (docs/router.md)."""

POLICIES = ("cache_aware", "round_robin", "power_of_two", "consistent_hash", "random")
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
BEARER_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]{8,511}=*")
"""RFC 6750's b64token: what a client can send as `Authorization: Bearer KEY`, and what the front's config carries
verbatim (no quote, no `$`, no space: nothing nginx would read as syntax or a variable)."""


class RouterSection(BaseModel):
    """The router of a host in the `routers` group (ignored on other hosts)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    router_model: str | None = Field(None, description="served model name the router routes (what clients send as \"model\"); None = the one model the fleet serves")
    router_replicas: list[str] | None = Field(None, description="inventory host names of the replicas behind the router; None = every host serving vllm_router_model")
    router_port: int = Field(8000, ge=1024, le=65535, description="port clients reach the router at (its key-checking front, nginx)")
    router_bind_host: str = Field("127.0.0.1", description="address the router's front listens on; anything but loopback requires a router key (vllm_router_api_key or vllm_api_key)")
    router_api_key: SecretStr | None = Field(None, description="the key clients send to the router (Authorization: Bearer); None = this host's vllm_api_key")
    router_internal_port: int = Field(8002, ge=1024, le=65535, description="loopback port of vllm-router itself behind the front (its /add_worker and /remove_worker answer anyone who reaches it)")
    router_metrics_port: int = Field(8001, ge=1024, le=65535, description="port of the router's Prometheus /metrics (on vllm_router_bind_host)")
    router_policy: Literal["cache_aware", "round_robin", "power_of_two", "consistent_hash", "random"] = Field(
        "cache_aware", description="how the router picks a replica: cache_aware sends a prompt to the replica that served its prefix (prefix-cache reuse) unless the load is uneven")
    router_health_interval_s: int = Field(5, ge=1, le=300, description="seconds between the router's health checks of each replica")
    router_probe_interval_s: int = Field(10, ge=1, le=600, description="seconds between the router host's 1-token completion probes of each replica (a hung engine keeps /health at 200)")
    router_probe_deadline_s: int = Field(30, ge=1, le=600, description="a probe not answered within this many seconds is a miss")
    router_probe_misses: int = Field(2, ge=1, le=100, description="misses in a row that take a replica out of the router's rotation (its next answered probe puts it back)")
    router_version: str = Field(ROUTER_VERSION, description="vllm-router release installed in the router's own venv")
    rolling_batch: int = Field(1, ge=1, le=64, description="replicas a rolling change restarts at once (each drained at its router first); the others keep serving")
    rolling_drain_timeout_s: int = Field(60, ge=0, le=3600, description="a rolling change waits at most this long for a replica's requests in flight to finish after the router stopped sending it new ones")

    @field_validator("router_model")
    @classmethod
    def _router_model(cls, v: str | None) -> str | None:
        from vllm_fleet.planner.options import check_served_name

        return check_served_name(v, "vllm_router_model")

    @field_validator("router_bind_host")
    @classmethod
    def _router_bind(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise ValueError("is not an IP address|use 127.0.0.1 (this host only) or the host's private address") from None
        return v

    @field_validator("router_api_key")
    @classmethod
    def _router_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not BEARER_TOKEN.fullmatch(v.get_secret_value()):
            raise ValueError("is not a bearer token of 8-512 characters (letters, digits, - . _ ~ + / and = at the end)|"
                             "use a long random key, e.g. `openssl rand -hex 24`")
        return v

    @field_validator("router_version")
    @classmethod
    def _router_version(cls, v: str) -> str:
        if not _VERSION_RE.fullmatch(v):
            raise ValueError("is not a release version (X.Y.Z)|use a vllm-router release, e.g. " + ROUTER_VERSION)
        return v
