"""Validated settings of one host, built from its pyinfra host data.

Every tunable is a `vllm_`-prefixed key in host data (inventory host data,
group_data/<group>.py, group_data/all.py). `load_settings` turns the merged
data of one host into one typed `Settings` value, or raises one
`SettingsError` naming the host and, for each bad key, its value and remedy.
It runs while pyinfra is still planning, so bad input changes nothing.

Each capability owns its section of the settings, `vllm_fleet/<capability>/settings.py`
(its fields and their checks); the `vllm serve` options come from the table in
vllm_fleet/planner/options.py. This module holds the core section (what several
capabilities share: the model, its GPUs, the vLLM version, the unit name, the two
directories), composes `Settings` from the sections (`SECTIONS`), and keeps the checks
that need fields of several sections.

The defaults here and in group_data/all.py are the same by construction: a
unit test compares them, key by key.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from vllm_fleet.account.settings import AccountSection
from vllm_fleet.errors import Problem, SettingConflict, SettingsError
from vllm_fleet.planner import options as vllm_options
from vllm_fleet.preflight.settings import PreflightSection
from vllm_fleet.pyenv.settings import PyenvSection
from vllm_fleet.service.settings import SECRET_ENV as _SECRET_ENV
from vllm_fleet.service.settings import ServiceSection
from vllm_fleet.versions import VLLM_VERSION
from vllm_fleet.weights.settings import WeightsSection, WeightsSource

__all__ = ["PREFIX", "SECTIONS", "Settings", "WeightsSource", "load_settings"]

PREFIX = "vllm_"

_UNIT_RE = re.compile(r"^[A-Za-z0-9:_.\\-]{1,200}$")
_VERSION_RE = re.compile(r"^\d+\.\d+(\.\d+)?([a-z0-9.+-]*)$")
_HOSTNAME_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


class CoreSection(BaseModel):
    """What several capabilities share: the model and its GPUs (planner, preflight, weights, service),
    the vLLM version (pyenv and the planner), the unit name and the two directories (every path of
    vllm_fleet/layout.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    model: str = Field("minimax-m2", description="model profile name from models/*.yaml, or a local directory holding a config.json")
    gpus: list[int] | None = Field(None, description="GPU indices to use, e.g. [1, 3, 4, 5] (becomes CUDA_VISIBLE_DEVICES); None = all GPUs")
    version: str = Field(VLLM_VERSION, description="vLLM version (release channel) or minimum (nightly)")
    service_name: str = Field("vllm", description="systemd unit name (without .service)")
    base_dir: str = Field("/opt/vllm-fleet", description="venvs and the toolkit's programs on the host")
    data_dir: str = Field("/var/lib/vllm-fleet", description="weights, caches and state on the host")
    advertise_address: str | None = Field(None, description="address other hosts (a router, Prometheus, cluster peers) use to reach this host's vLLM; None = vllm_bind_host when it is one specific address, else the inventory's ssh_hostname or host name")

    @field_validator("advertise_address")
    @classmethod
    def _advertise(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            ip = ipaddress.ip_address(v)
        except ValueError:
            if not _HOSTNAME_RE.fullmatch(v) or len(v) > 253:
                raise ValueError("is neither an IP address nor a host name|use an address such as 10.0.0.5 or a DNS name "
                                 "such as gpu01.example.internal (no scheme, no port: the port is vllm_port)") from None
            return v
        if ip.is_unspecified:
            raise ValueError("is a wildcard, which no other host can connect to|use this host's own address, "
                             "e.g. 10.0.0.5, or leave vllm_advertise_address unset") from None
        return str(ip)


    @field_validator("gpus")
    @classmethod
    def _gpus(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("is empty|leave vllm_gpus unset (None) to use every GPU, or list indices like [0, 1]")
        if any(i < 0 for i in v):
            raise ValueError("GPU indices are never negative|use indices as `nvidia-smi -L` lists them, from 0")
        dups = sorted({i for i in v if v.count(i) > 1})
        if dups:
            raise ValueError(f"lists GPU {dups[0]} twice|list each GPU index once")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not _VERSION_RE.match(v):
            raise ValueError(f"is not a version|use a release such as {VLLM_VERSION}")
        return v

    @field_validator("service_name")
    @classmethod
    def _unit(cls, v: str) -> str:
        if not _UNIT_RE.match(v) or v.endswith(".service"):
            raise ValueError("is not a unit name|use letters, digits and -_. without the .service suffix, e.g. vllm")
        return v

    @field_validator("base_dir", "data_dir")
    @classmethod
    def _abs(cls, v: str) -> str:
        p = PurePosixPath(v)
        if not p.is_absolute() or ".." in p.parts or str(p) == "/":
            raise ValueError("must be an absolute path below /, without ..|use a path such as /opt/vllm-fleet")
        return str(p)


# The fields of the `vllm serve` options: one per row of vllm_fleet/planner/options.py (type,
# default, bounds, description, check), inherited by Settings.
ServeOptions = vllm_options.model("ServeOptions", vllm_options.OPTIONS)

# The sections of Settings, in order (group_data/all.py has one header per section, in this order):
# name -> the section's model. Each field of Settings is a field of exactly one of them.
SECTIONS: dict[str, type[BaseModel]] = {
    "core": CoreSection,
    "serve options": ServeOptions,
    "preflight": PreflightSection,
    "account": AccountSection,
    "pyenv": PyenvSection,
    "weights": WeightsSection,
    "service": ServiceSection,
}


# The bases are SECTIONS reversed: pydantic orders inherited fields from the last base to the first, so
# Settings.model_fields (and the problems of a SettingsError) follow SECTIONS and group_data/all.py.
class Settings(ServiceSection, WeightsSection, PyenvSection, AccountSection, PreflightSection, ServeOptions, CoreSection):
    """Everything a user can tune for one host. Field names are host-data keys without `vllm_`.

    The fields and their checks come from the sections (`SECTIONS`): the core section above, the
    `vllm serve` options (served_model_name, layout sizes, max_model_len, ..., bind_host, port,
    api_key, hf_token: the table in vllm_fleet/planner/options.py) and one section per capability
    (`vllm_fleet/<capability>/settings.py`). Settings declares no field of its own; it holds the
    checks that need fields of several sections, and the views.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # ---------------------------------------------------------------- checks --

    @model_validator(mode="after")
    def _cross(self) -> Settings:
        # Two rows of the serve options table (the table's checks are one row each).
        if self.api_key is None and not ipaddress.ip_address(self.bind_host).is_loopback:
            raise _Cross("api_key", None, f"is missing while vLLM listens on {self.bind_host}, reachable from other machines",
                         "set vllm_api_key (e.g. from an environment variable in group_data/all.py), or set vllm_bind_host = \"127.0.0.1\"")
        if self.advertise_address is not None:
            bind = ipaddress.ip_address(self.bind_host)
            if bind.is_loopback and not _is_loopback_name(self.advertise_address):
                raise _Cross("advertise_address", self.advertise_address,
                             f"is advertised to other hosts, but vLLM listens on {self.bind_host} only, which they cannot reach",
                             "set vllm_bind_host to this host's address or 0.0.0.0 (with vllm_api_key), or unset vllm_advertise_address")
            if not bind.is_unspecified and _is_ip(self.advertise_address) and ipaddress.ip_address(self.advertise_address) != bind:
                raise _Cross("advertise_address", self.advertise_address,
                             f"is not the address vLLM listens on (vllm_bind_host = {self.bind_host})",
                             f"advertise {self.bind_host}, set vllm_bind_host = \"0.0.0.0\", or unset vllm_advertise_address")
        # The core section's GPUs against the serve options' layout sizes.
        if self.gpus is not None:
            used = self.pipeline_parallel_size * self.data_parallel_size * (self.tensor_parallel_size or 1)
            if self.tensor_parallel_size is not None and used != len(self.gpus):
                raise _Cross("tensor_parallel_size", self.tensor_parallel_size,
                             f"times pipeline ({self.pipeline_parallel_size}) x data ({self.data_parallel_size}) parallel uses {used} GPUs, "
                             f"but vllm_gpus selects {len(self.gpus)}",
                             f"make TP x PP x DP equal the number of GPUs in vllm_gpus ({len(self.gpus)}), or leave vllm_tensor_parallel_size unset")
            if self.tensor_parallel_size is None and len(self.gpus) % (self.pipeline_parallel_size * self.data_parallel_size):
                raise _Cross("gpus", self.gpus,
                             f"selects {len(self.gpus)} GPUs, not a multiple of PP x DP = {self.pipeline_parallel_size * self.data_parallel_size}",
                             "select a number of GPUs divisible by vllm_pipeline_parallel_size x vllm_data_parallel_size")
        return self

    # ----------------------------------------------------------------- views --

    @property
    def cuda_visible_devices(self) -> str | None:
        return None if self.gpus is None else ",".join(str(i) for i in self.gpus)

    def plan_options(self, model_path: str | None = None):
        """The planner's options for this host (the planner decides every vLLM flag).

        One value per row of the options table that is not a secret (same names), plus the
        vLLM version, the model's path on the host and the extra args.
        """
        from vllm_fleet.planner.plan import PlanOptions

        values = {row.key: getattr(self, row.key) for row in vllm_options.plan_rows()}
        return PlanOptions(**values, vllm_version=self.version, model_path=model_path, extra_args=tuple(self.extra_args))


# A cross-field problem, carried out of a model validator with its key and remedy (the sections raise it too).
_Cross = SettingConflict


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_loopback_name(text: str) -> bool:
    """``text`` names the loopback: a loopback IP or localhost."""
    return ipaddress.ip_address(text).is_loopback if _is_ip(text) else text.rstrip(".").lower() == "localhost"


def _remedy_for(key: str, err: dict[str, Any]) -> tuple[str, str]:
    """Turn one pydantic error into (problem, remedy) text."""
    field = Settings.model_fields.get(key[len(PREFIX):])
    desc = field.description if field else ""
    msg: str = err.get("msg", "is invalid")
    if err["type"] == "value_error":
        text = msg.removeprefix("Value error, ")
        problem, _, remedy = text.partition("|")
        return problem, remedy or f"{key}: {desc}"
    expected = msg[0].lower() + msg[1:] if msg else "is invalid"
    return f"is invalid ({expected})", f"set {key} to a valid value: {desc}"


def _unknown_key_problem(key: str) -> Problem:
    known = [PREFIX + k for k in Settings.model_fields]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else "see group_data/all.py for every key"
    return Problem(key, "...", "is not a vllm-fleet setting", f"{hint} (remove or rename it)")


def load_settings(data: Mapping[str, Any], host: str | None = None) -> Settings:
    """Validate the `vllm_*` keys of one host's data into `Settings`.

    + data: the host's merged data (``host.data.dict()``); keys without the
      ``vllm_`` prefix belong to pyinfra and its connectors and are ignored.
    + host: the host's name, used in error messages.

    Raises `SettingsError` listing every bad key with its remedy.
    """
    problems: list[Problem] = []
    values: dict[str, Any] = {}
    for key, value in data.items():
        if not key.startswith(PREFIX):
            continue
        name = key[len(PREFIX):]
        if name not in Settings.model_fields:
            problems.append(_unknown_key_problem(key))
            continue
        values[name] = value
    try:
        settings = Settings(**values)
    except ValidationError as exc:
        for err in exc.errors():
            ctx = err.get("ctx") or {}
            if isinstance(ctx.get("error"), SettingConflict):
                problems.append(ctx["error"].problem)
                continue
            loc = err["loc"]
            key = PREFIX + str(loc[0]) if loc else PREFIX + "?"
            value = _shown(str(loc[0]), values.get(str(loc[0]))) if loc else None
            problem, remedy = _remedy_for(key, err)
            problems.append(Problem(key, value, problem, remedy))
        raise SettingsError(host, _dedupe(problems)) from None
    problems.extend(_model_problems(settings))
    if problems:
        raise SettingsError(host, problems)
    return settings


def _model_problems(settings: Settings) -> list[Problem]:
    """The model must name a profile in models/ or a directory holding config.json."""
    from vllm_fleet.errors import FleetError
    from vllm_fleet.planner.modelinfo import load_profile

    try:
        load_profile(settings.model)
    except FleetError as exc:
        return [Problem(PREFIX + "model", settings.model, str(exc).split("\n")[0],
                        "use a profile name from models/*.yaml (listed by `vllm-fleet plan --help`) or a directory holding config.json")]
    return []


def _shown(name: str, value: object) -> object:
    """A value as it may appear in an error: secrets, and argv/env that may hold one, masked."""
    if name in {r.key for r in vllm_options.rows(secret=True)}:
        return "***"
    if name == "extra_args" and isinstance(value, list):
        out, hide, secrets = [], False, vllm_options.secret_flags()
        for a in value:
            flag = vllm_options.flag_name(str(a))
            secret = flag in secrets
            out.append("***" if hide else f"{str(a).split('=', 1)[0]}=***" if secret and "=" in str(a) else a)
            hide = secret and "=" not in str(a)
        return out
    if name == "extra_env" and isinstance(value, dict):
        return {k: "***" if k in _SECRET_ENV else v for k, v in value.items()}
    return value


def _dedupe(problems: list[Problem]) -> list[Problem]:
    """Union-typed fields report one error per member type; keep the first per key."""
    seen: set[str] = set()
    out = []
    for p in problems:
        if p.key not in seen:
            seen.add(p.key)
            out.append(p)
    return out
