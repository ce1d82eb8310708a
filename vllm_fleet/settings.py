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
from vllm_fleet.cluster.settings import ClusterSection
from vllm_fleet.router.settings import RouterSection
from vllm_fleet.layout import toolkit_dir_problem, venv_dir_problem
from vllm_fleet.errors import Problem, SettingConflict, SettingsError
from vllm_fleet.planner import options as vllm_options
from vllm_fleet.planner import serveargs
from vllm_fleet.preflight.settings import PreflightSection
from vllm_fleet.pyenv.settings import PyenvSection
from vllm_fleet.service.settings import SECRET_ENV as _SECRET_ENV
from vllm_fleet.service.settings import ServiceSection
from vllm_fleet.versions import VLLM_VERSION
from vllm_fleet.weights.settings import WeightsSection, WeightsSource

__all__ = ["PREFIX", "SECTIONS", "Settings", "WeightsSource", "load_settings"]

PREFIX = "vllm_"

#: A unit name: letters, digits and ``:_.-``, starting with a letter or digit (systemctl reads a leading ``-`` as an
#: option); no backslash (systemd C-unescapes ExecStart words and unit names: ``a\x2db`` is ``a-b``).
_UNIT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9:_.-]{0,199}")
_VERSION_RE = re.compile(r"^\d+\.\d+(\.\d+)?([a-z0-9.+-]*)$")
MAX_GPU_INDEX = 63  # no host has more than 64 GPUs (nvidia-smi indices 0-63)
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
        if any(i > MAX_GPU_INDEX for i in v) or len(v) > MAX_GPU_INDEX + 1:
            raise ValueError(f"names more GPUs or a higher index than a host has (at most {MAX_GPU_INDEX + 1}, indices "
                             f"0-{MAX_GPU_INDEX})|use indices as `nvidia-smi -L` lists them, from 0")
        dups = sorted({i for i in v if v.count(i) > 1})
        if dups:
            raise ValueError(f"lists GPU {dups[0]} twice|list each GPU index once")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not _VERSION_RE.fullmatch(v) or len(v) > 64:
            raise ValueError(f"is not a version|use a release such as {VLLM_VERSION}")
        return v

    @field_validator("service_name")
    @classmethod
    def _unit(cls, v: str) -> str:
        if not _UNIT_RE.fullmatch(v) or v.endswith(".service"):
            raise ValueError("is not a unit name: up to 200 letters, digits and :_.-, starting with a letter or digit "
                             "(systemctl would read a leading - as an option; systemd unescapes a backslash), without "
                             "the .service suffix|set vllm_service_name to such a name, e.g. vllm or vllm-minimax")
        return v

    @field_validator("base_dir", "data_dir")
    @classmethod
    def _abs(cls, v: str) -> str:
        problem = toolkit_dir_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return str(PurePosixPath(v))

    @field_validator("base_dir")
    @classmethod
    def _venv_safe(cls, v: str) -> str:
        problem = venv_dir_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    @field_validator("model")
    @classmethod
    def _model_word(cls, v: str) -> str:
        if not v or len(v) > 1024:
            raise ValueError("is empty or longer than any profile name or path (1024)|use a profile name from "
                             "models/*.yaml, or a directory holding config.json")
        return v


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
    "router": RouterSection,
    "cluster": ClusterSection,
}


# The bases are SECTIONS reversed: pydantic orders inherited fields from the last base to the first, so
# Settings.model_fields (and the problems of a SettingsError) follow SECTIONS and group_data/all.py.
class Settings(ClusterSection, RouterSection, ServiceSection, WeightsSection, PyenvSection, AccountSection, PreflightSection, ServeOptions, CoreSection):
    """Everything a user can tune for one host. Field names are host-data keys without `vllm_`.

    Before the fields' checks, `load_settings` refuses control characters in every string of every
    setting, and whitespace in every one but the words of vllm_extra_args and the values of
    vllm_extra_env (`text_problem`): names and paths reach unit files, commands and log lines.

    The fields and their checks come from the sections (`SECTIONS`): the core section above, the
    `vllm serve` options (served_model_name, layout sizes, max_model_len, ..., bind_host, port,
    api_key, hf_token: the table in vllm_fleet/planner/options.py) and one section per capability
    (`vllm_fleet/<capability>/settings.py`). Settings declares no field of its own; it holds the
    checks that need fields of several sections, and the views.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

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
        # The service's extra args against the vLLM version: the pinned release's parser knows every option.
        if self.channel == "release" and self.version == serveargs.vllm_version():
            try:
                vllm_options.check_extra_args(self.extra_args, known_only=True)
            except ValueError as exc:
                problem, _, remedy = str(exc).partition("|")
                raise _Cross("extra_args", serveargs.masked(self.extra_args, vllm_options.secret_flags()), problem, remedy) from None
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
    extra = field.json_schema_extra if field is not None and isinstance(field.json_schema_extra, dict) else {}
    why = extra.get("bounds")
    if why and err["type"] in ("less_than_equal", "less_than", "greater_than", "greater_than_equal", "finite_number"):
        return f"is out of bounds ({expected})", f"set {key} within its bounds, {why}"
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
    bad_text = False
    for name, value in list(values.items()):
        text = text_problem(name, value)
        if text is not None:
            problem, _, remedy = text.partition("|")
            problems.append(Problem(PREFIX + name, _shown(name, value), problem, remedy))
            del values[name]  # the other keys are still checked; checks across keys wait for this one
            bad_text = True
    try:
        settings = Settings(**values)
    except ValidationError as exc:
        for err in exc.errors():
            ctx = err.get("ctx") or {}
            if isinstance(ctx.get("error"), SettingConflict):
                if not bad_text:
                    problems.append(ctx["error"].problem)
                continue
            loc = err["loc"]
            key = PREFIX + str(loc[0]) if loc else PREFIX + "?"
            value = _shown(str(loc[0]), values.get(str(loc[0]))) if loc else None
            problem, remedy = _remedy_for(key, err)
            problems.append(Problem(key, value, problem, remedy))
        raise SettingsError(host, _dedupe(problems)) from None
    if not problems:
        problems.extend(_model_problems(settings))
    if problems:
        raise SettingsError(host, problems)
    return settings


#: Whitespace is allowed in these settings' words (vllm_extra_args) or values (vllm_extra_env); control
#: characters nowhere.
FREE_TEXT = ("extra_args", "extra_env")


def _strings(value: object, free: bool, depth: int = 0):
    """Every string in ``value`` (nested lists, dicts: keys and values), with whether whitespace is allowed there."""
    if depth > 8:
        return
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        yield value, free
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k, False, depth + 1)
            yield from _strings(v, free, depth + 1)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _strings(item, free, depth + 1)


def text_problem(name: str, value: object) -> str | None:
    """``problem|remedy`` when a string in setting ``name`` holds a control character, or whitespace where a
    name or path is (everywhere but the words of vllm_extra_args and the values of vllm_extra_env); else None.

    Control characters: Unicode categories Cc, Cf, Cs, Zl and Zp (newlines, NUL, escapes, bidi marks,
    U+2028): a newline would end a line of a unit or env file, or of a log line.
    """
    import unicodedata

    for text, free in _strings(value, name in FREE_TEXT):
        for c in text:
            cat = unicodedata.category(c)
            what = f"U+{ord(c):04X} {unicodedata.name(c, cat)}"
            if cat in ("Cc", "Cf", "Cs", "Zl", "Zp"):
                return (f"holds a control character ({what}), which would break the unit file, a command or a log line|"
                        "remove it (a trailing newline from a file or a heredoc is the usual cause)")
            if not free and (c.isspace() or cat == "Zs"):
                return (f"holds whitespace ({what}) in a name or path, where systemd and the shell would split it|"
                        "use a name or path without spaces")
    return None


def _model_problems(settings: Settings) -> list[Problem]:
    """The model must name a profile in models/ or a directory holding config.json; the checks of the serve
    options against the model that need no host (a length above the model's maximum, the reasoning parser)."""
    from vllm_fleet.errors import FleetError
    from vllm_fleet.planner.modelinfo import load_profile

    try:
        profile = load_profile(settings.model)
    except Exception as exc:  # noqa: BLE001 - whatever stops reading the model (~nouser, a name too long) is this setting's
        if not isinstance(exc, FleetError):
            exc = FleetError(f"cannot be read as a profile or a model directory ({type(exc).__name__}: {exc})")
        return [Problem(PREFIX + "model", settings.model, (str(exc) or type(exc).__name__).split("\n")[0],
                        "use a profile name from models/*.yaml (listed by `vllm-fleet plan --help`) or a directory holding config.json")]
    out = []
    model_max = profile.arch.max_position_embeddings
    if isinstance(settings.max_model_len, int) and settings.max_model_len > model_max:
        out.append(Problem(PREFIX + "max_model_len", settings.max_model_len,
                           f"is above the maximum context of {profile.name} ({model_max} tokens, max_position_embeddings)",
                           f"set vllm_max_model_len = {model_max} or less, or \"auto\" (the largest that fits)"))
    if settings.reasoning_parser is not None:
        allowed = sorted({p for p in (profile.reasoning_parser, *profile.reasoning_parsers) if p})
        known = serveargs.reasoning_parsers()
        if profile.reasoning_parsers and settings.reasoning_parser not in allowed:
            out.append(Problem(PREFIX + "reasoning_parser", settings.reasoning_parser,
                               f"is not a reasoning parser of {profile.name}",
                               f"set vllm_reasoning_parser to one of {', '.join(allowed)}, or leave it unset (the profile's default)"))
        elif settings.version == serveargs.vllm_version() and settings.reasoning_parser not in known:
            out.append(Problem(PREFIX + "reasoning_parser", settings.reasoning_parser,
                               f"is no reasoning parser of vLLM {serveargs.vllm_version()}: vLLM would refuse to start",
                               f"set vllm_reasoning_parser to one of {', '.join(known)}, or leave it unset"))
    return out


SECTION_SECRETS = frozenset({"router_api_key"})
"""Secrets of the capability sections (the options table marks its own: api_key, hf_token)."""


def _shown(name: str, value: object) -> object:
    """A value as it may appear in an error: secrets, and argv/env that may hold one, masked."""
    if name in {r.key for r in vllm_options.rows(secret=True)} or name in SECTION_SECRETS:
        return "***"
    if name == "extra_args" and isinstance(value, list):
        if not all(isinstance(a, str) for a in value):
            return ["***" if isinstance(a, str) else a for a in value]
        return serveargs.masked(value, vllm_options.secret_flags())
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
