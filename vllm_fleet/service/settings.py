"""The service's settings section (pure: pydantic only): the unit's restarts, the health gate, and what the
service gets beyond the plan (extra `vllm serve` arguments, extra environment).

The `vllm serve` options themselves (port, bind host, secrets, layout, ...) are rows of
vllm_fleet/planner/options.py. Composed into `vllm_fleet.settings.Settings`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vllm_fleet.planner import options as vllm_options

# Secret variables: the secret rows' own (VLLM_API_KEY, HF_TOKEN) and the hubs' other token variables.
SECRET_ENV = (*(r.env for r in vllm_options.rows(secret=True) if r.env), "HUGGING_FACE_HUB_TOKEN", "MODELSCOPE_API_TOKEN")


class ServiceSection(BaseModel):
    """RestartSec, the health gate's wait, extra args and extra environment."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    restart_sec: int = Field(10, ge=1, le=3600, description="seconds systemd waits before restarting a crashed vLLM (RestartSec)")
    health_timeout_s: int | None = Field(None, ge=10, description="health gate wait after a restart; None = scaled to the weights size (as TimeoutStartSec)")
    extra_args: list[str] = Field(default_factory=list, description="extra `vllm serve` arguments the plan does not own")
    extra_env: dict[str, str] = Field(default_factory=dict, description="extra non-secret environment for the service (applied last: it overrides the plan's)")

    @field_validator("extra_args")
    @classmethod
    def _extra_args(cls, v: list[str]) -> list[str]:
        secrets, owned = vllm_options.secret_flags(), vllm_options.owned_flags()
        for a in v:
            flag = vllm_options.flag_name(a)
            if flag in secrets:
                raise ValueError(f"passes {flag} in argv, where every user of the host can read it|set vllm_api_key / vllm_hf_token instead: they go to the service's EnvironmentFile")
            if flag in owned:
                raise ValueError(f"sets {flag}, which the plan owns|set {owned[flag]} instead")
        return v

    @field_validator("extra_env")
    @classmethod
    def _extra_env(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if k in SECRET_ENV:
                raise ValueError(f"sets {k}, a secret, in plain service environment|set vllm_api_key / vllm_hf_token instead")
            if k == "CUDA_VISIBLE_DEVICES":
                raise ValueError("sets CUDA_VISIBLE_DEVICES|set vllm_gpus instead (the toolkit derives it)")
        return v
