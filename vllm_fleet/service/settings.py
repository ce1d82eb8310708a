"""The service's settings section (pure: pydantic only): the unit's restarts, the watchdog, the health gate, and what the
service gets beyond the plan (extra `vllm serve` arguments, extra environment).

The `vllm serve` options themselves (port, bind host, secrets, layout, ...) are rows of
vllm_fleet/planner/options.py. Composed into `vllm_fleet.settings.Settings`.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vllm_fleet.errors import url_credentials
from vllm_fleet.layout import RUNTIME_ENV
from vllm_fleet.planner import options as vllm_options

# Secret variables: the secret rows' own (VLLM_API_KEY, HF_TOKEN) and the hubs' other token variables.
SECRET_ENV = (*(r.env for r in vllm_options.rows(secret=True) if r.env), "HUGGING_FACE_HUB_TOKEN", "MODELSCOPE_API_TOKEN")
#: A POSIX environment variable name: what systemd's Environment= and EnvironmentFile= take.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: Variables the toolkit derives from other settings (besides the secrets): name -> (the setting to change instead,
#: why). The render sets them; vllm_extra_env may not. (The plan's own variables, VLLM_NO_USAGE_STATS,
#: NCCL_NVLS_ENABLE, ..., and HF_HUB_OFFLINE may be overridden: vllm_extra_env is the way to set them alone.)
OWNED_ENV = {
    "CUDA_VISIBLE_DEVICES": ("vllm_gpus", "the GPUs of vllm_gpus"),
    "CUDA_DEVICE_ORDER": ("vllm_gpus", "PCI_BUS_ID, so the indices of vllm_gpus are nvidia-smi's"),
    **{name: ("vllm_data_dir", "a cache below vllm_data_dir/cache, the one directory the service may write")
       for name in RUNTIME_ENV},
}


class ServiceSection(BaseModel):
    """Restarts and their backoff, the watchdog, GPU leftovers, the health gate's wait, extra args and extra environment."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    adopt_existing_unit: bool = Field(False, description="True = take over an existing unit of vllm_service_name (or of one of its companions: NAME-fetch, NAME-watchdog, ...) that vllm-fleet did not render (the deploy replaces or shadows it); False = preflight refuses it")
    restart_sec: int = Field(10, ge=1, le=3600, json_schema_extra={"bounds": "1 to 3600 s"}, description="seconds systemd waits before restarting a crashed vLLM (RestartSec)")
    restart_max_delay_s: int = Field(300, ge=1, le=3600, description="longest restart delay of the backoff (RestartMaxDelaySec, systemd >= 254; older systemd waits restart_sec every time)")
    watchdog: bool = Field(True, description="run the completion watchdog (<service>-watchdog.service): restarts a hung engine")
    watchdog_interval_s: int = Field(30, ge=1, le=3600, description="seconds between two watchdog probes (a 1-token completion)")
    watchdog_deadline_s: int = Field(30, ge=1, le=600, description="a probe that gets no answer within this many seconds is a miss")
    watchdog_misses: int = Field(3, ge=1, le=100, description="consecutive missed probes after which the watchdog restarts the service")
    reap_gpu_leftovers: bool = Field(True, description="before each start, end GPU processes left by this service (same user or its cgroup) and refuse to start while another program holds its GPUs")
    health_timeout_s: int | None = Field(None, ge=10, le=86400, json_schema_extra={"bounds": "10 s to a day (86400 s): a service that is not healthy after a day has hung"}, description="health gate wait after a restart; None = scaled to the weights size (as TimeoutStartSec)")
    gate_stability_s: int = Field(5, ge=0, le=600, json_schema_extra={"bounds": "0 to 600 s"}, description="after the gate's checks, seconds /health must stay 200 with the unit's MainPID and NRestarts unchanged")
    extra_args: list[str] = Field(default_factory=list, description="extra `vllm serve` arguments the plan does not own")
    extra_env: dict[str, str] = Field(default_factory=dict, description="extra non-secret environment for the service (applied last: it overrides the plan's)")

    @field_validator("extra_args")
    @classmethod
    def _extra_args(cls, v: list[str]) -> list[str]:
        vllm_options.check_extra_args(v)
        for a in v:
            if url_credentials(a):
                raise ValueError("passes a URL with credentials (user:password@ or a token in the query such as ?token=) "
                                 "in argv, where every user of the host can read it|"
                                 "use the URL without them (vLLM and its hubs read tokens from the environment: vllm_hf_token, set from "
                                 "VLLM_FLEET_HF_TOKEN in the environment of the deploy)")
        return v

    @field_validator("extra_env")
    @classmethod
    def _extra_env(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not ENV_NAME.fullmatch(k):
                raise ValueError(f"sets {k!r}, which is not a variable name (a POSIX name, [A-Za-z_][A-Za-z0-9_]*: "
                                 "systemd's Environment= takes no other)|rename it in vllm_extra_env to letters, digits "
                                 "and _, not starting with a digit (e.g. NCCL_DEBUG)")
            if k in SECRET_ENV:
                raise ValueError(f"sets {k}, a secret, in plain service environment|set vllm_api_key / vllm_hf_token instead")
            if k in OWNED_ENV:
                setting, why = OWNED_ENV[k]
                raise ValueError(f"sets {k}, which the toolkit sets itself ({why})|remove {k} from vllm_extra_env; "
                                 f"set {setting} instead (the toolkit derives it)")
            if url_credentials(v[k]):
                raise ValueError(f"sets {k} to a URL with credentials (user:password@ or a token in the query such as "
                                 "?token=), which would stand in the world-readable unit|"
                                 "use the URL without them; a hub token goes in vllm_hf_token (the root-only EnvironmentFile), set "
                                 "from VLLM_FLEET_HF_TOKEN in the environment of the deploy")
        return v
