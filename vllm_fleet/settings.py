"""Validated settings of one host, built from its pyinfra host data.

Every tunable is a `vllm_`-prefixed key in host data (inventory host data,
group_data/<group>.py, group_data/all.py). `load_settings` turns the merged
data of one host into one typed `Settings` value, or raises one
`SettingsError` naming the host and, for each bad key, its value and remedy.
It runs while pyinfra is still planning, so bad input changes nothing.

The defaults here and in group_data/all.py are the same by construction: a
unit test compares them, key by key.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from vllm_fleet.errors import Problem, SettingsError
from vllm_fleet.planner import options as vllm_options
from vllm_fleet.versions import VLLM_VERSION

PREFIX = "vllm_"

# Secret variables: the secret rows' own (VLLM_API_KEY, HF_TOKEN) and the hubs' other token variables.
_SECRET_ENV = (*(r.env for r in vllm_options.rows(secret=True) if r.env), "HUGGING_FACE_HUB_TOKEN", "MODELSCOPE_API_TOKEN")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,30}$")
_UNIT_RE = re.compile(r"^[A-Za-z0-9:_.\\-]{1,200}$")
_PY_RE = re.compile(r"^3\.(\d{1,2})$")
_VERSION_RE = re.compile(r"^\d+\.\d+(\.\d+)?([a-z0-9.+-]*)$")
_HOSTNAME_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


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


# The fields of the `vllm serve` options: one per row of vllm_fleet/planner/options.py (type,
# default, bounds, description, check), inherited by Settings.
_ServeOptions = vllm_options.model("ServeOptions", vllm_options.OPTIONS)


class Settings(_ServeOptions):
    """Everything a user can tune for one host. Field names are host-data keys without `vllm_`.

    The `vllm serve` options (served_model_name, layout sizes, max_model_len, ..., bind_host, port,
    api_key, hf_token) are inherited: their fields come from the table in vllm_fleet/planner/options.py.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # -- the model (how it is laid out on the GPUs: the options table) --
    model: str = Field("minimax-m2", description="model profile name from models/*.yaml, or a local directory holding a config.json")
    gpus: list[int] | None = Field(None, description="GPU indices to use, e.g. [1, 3, 4, 5] (becomes CUDA_VISIBLE_DEVICES); None = all GPUs")
    extra_args: list[str] = Field(default_factory=list, description="extra `vllm serve` arguments the plan does not own")
    extra_env: dict[str, str] = Field(default_factory=dict, description="extra non-secret environment for the service (applied last: it overrides the plan's)")

    # -- the service --
    service_user: str = Field("vllm", description="unprivileged system user the service runs as")
    service_name: str = Field("vllm", description="systemd unit name (without .service)")
    base_dir: str = Field("/opt/vllm-fleet", description="venvs and the toolkit's programs on the host")
    data_dir: str = Field("/var/lib/vllm-fleet", description="weights, caches and state on the host")
    restart_sec: int = Field(10, ge=1, le=3600, description="seconds systemd waits before restarting a crashed vLLM (RestartSec)")
    health_timeout_s: int | None = Field(None, ge=10, description="health gate wait after a restart; None = scaled to the weights size (as TimeoutStartSec)")
    purge_venvs: bool = Field(False, description="uninstall.py also deletes the venvs under base_dir")
    purge_weights: bool = Field(False, description="uninstall.py also deletes the weights and caches under data_dir")
    advertise_address: str | None = Field(None, description="address other hosts (a router, Prometheus, cluster peers) use to reach this host's vLLM; None = vllm_bind_host when it is one specific address, else the inventory's ssh_hostname or host name")

    # -- the Python stack --
    python_version: str = Field("3.12", description="Python version of the service venv (uv installs it if the host lacks it)")
    version: str = Field(VLLM_VERSION, description="vLLM version (release channel) or minimum (nightly)")
    channel: Literal["release", "nightly", "source"] = Field("release", description="where vLLM comes from")
    source_url: str | None = Field(None, description="git URL for channel=source")
    source_ref: str | None = Field(None, description="git ref (commit, tag, branch) for channel=source")
    torch_backend: str = Field("auto", description="torch build: auto (from the driver's CUDA), cu128, cu130, cpu, ...")
    index_url: str | None = Field(None, description="Python package index (a mirror); None = PyPI")
    extra_index_urls: list[str] = Field(default_factory=list, description="extra package indexes")
    find_links: list[str] = Field(default_factory=list, description="local wheel directories or URLs to find packages in")
    keep_venvs: int = Field(2, ge=1, le=10, description="venvs kept for rollback (older ones are pruned)")
    torch_version: str | None = Field(None, description="torch version to pin (None = what the vLLM release requires)")
    torch_index_url: str | None = Field(None, description="index of torch builds for the backend, e.g. a mirror of download.pytorch.org/whl/cu128 (None = uv --torch-backend)")
    nightly_index_url: str = Field("https://wheels.vllm.ai/nightly", description="extra index for channel=nightly")
    no_index: bool = Field(False, description="install only from vllm_find_links / vllm_wheelhouse, never from an index")
    wheelhouse: str | None = Field(None, description="directory of wheels on the control machine, pushed to the host and installed from with --no-index (air-gapped hosts)")

    # -- weights (docs/weights.md) --
    weights_sources: list[WeightsSource] | None = Field(None, description="where the weights come from, tried in order: [{kind: hf|modelscope|local, repo, endpoint, revision, path}]; None = the local model dir of vllm_model is copied, or vLLM fetches the profile's repo itself")
    weights_wait: bool = Field(True, description="the deploy waits for the download unit (progress line); False = start it and go on")
    weights_wait_timeout_s: int = Field(6 * 3600, ge=10, description="how long the deploy waits for the download before failing (the unit keeps going; a rerun attaches)")
    weights_retries: int = Field(5, ge=1, le=100, description="attempts per source before the next source is tried")
    weights_backoff_s: float = Field(10.0, ge=0, description="wait before the second attempt; doubles per attempt, capped at 300 s")
    weights_workers: int = Field(8, ge=1, le=64, description="files downloaded in parallel")
    weights_reverify: bool = Field(False, description="hash every file again on the next run (normally only files whose size/mtime changed)")
    hf_xet: bool = Field(False, description="let huggingface_hub use Xet storage; off: HF mirrors (hf-mirror.com, local ones) serve plain HTTP resolve URLs only")

    # -- preflight --
    disk_headroom_gib: int = Field(20, ge=0, description="free disk kept beyond venv + weights")
    supported_os: dict[str, list[str]] = Field(
        default_factory=lambda: {"ubuntu": ["22.04", "24.04"], "debian": ["12"]},
        description="OS id -> supported VERSION_IDs (from /etc/os-release)",
    )

    # ---------------------------------------------------------------- checks --

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

    @field_validator("service_user")
    @classmethod
    def _user(cls, v: str) -> str:
        if not _USER_RE.match(v) or v == "root":
            raise ValueError("is not a valid unprivileged user name|use a lower-case name such as vllm (never root)")
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

    @field_validator("python_version")
    @classmethod
    def _py(cls, v: str) -> str:
        m = _PY_RE.match(v)
        if not m or not 10 <= int(m.group(1)) <= 13:
            raise ValueError("is not a Python vLLM supports|use 3.10, 3.11, 3.12 or 3.13")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not _VERSION_RE.match(v):
            raise ValueError(f"is not a version|use a release such as {VLLM_VERSION}")
        return v

    @field_validator("index_url", "source_url", "torch_index_url", "nightly_index_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(https?|file|git\+https?|ssh)://", v):
            raise ValueError("is not a URL|use a full URL such as https://pypi.org/simple")
        if v is not None and re.match(r"^[a-z+]+://[^/@]*:[^/@]*@", v):
            raise ValueError("holds a password, which would appear in commands and logs|put the credentials in /root/.netrc on the host (uv and pip read it) and use the URL without them")
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

        p = Path(v).expanduser()
        if not p.is_dir() or not any(p.glob("*.whl")):
            raise ValueError("is not a directory of wheels on the control machine|build one (e.g. `pip download -d DIR vllm==X`, "
                             "or `python tests/e2e/wheelhouse.py` for the test hosts) and point vllm_wheelhouse at it")
        return str(p.resolve())

    @field_validator("extra_index_urls", "find_links")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for u in v:
            if not (re.match(r"^(https?|file)://", u) or u.startswith("/")):
                raise ValueError(f"entry {u!r} is neither a URL nor an absolute path|use https://... or /path/to/wheels")
            if re.match(r"^[a-z+]+://[^/@]*:[^/@]*@", u):
                raise ValueError("holds a password, which would appear in commands and logs|put the credentials in /root/.netrc on the host and use the URL without them")
        return v

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
            if k in _SECRET_ENV:
                raise ValueError(f"sets {k}, a secret, in plain service environment|set vllm_api_key / vllm_hf_token instead")
            if k == "CUDA_VISIBLE_DEVICES":
                raise ValueError("sets CUDA_VISIBLE_DEVICES|set vllm_gpus instead (the toolkit derives it)")
        return v

    @model_validator(mode="after")
    def _cross(self) -> Settings:
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
        if self.channel == "source" and not self.source_url:
            raise _Cross("source_url", None, "is required when vllm_channel = \"source\"",
                         "set vllm_source_url to a git URL of vLLM (and vllm_source_ref to a commit or tag)")
        if self.channel != "source" and (self.source_url or self.source_ref):
            raise _Cross("channel", self.channel, "is not \"source\" but vllm_source_url/ref are set",
                         "set vllm_channel = \"source\", or remove vllm_source_url/vllm_source_ref")
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


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_loopback_name(text: str) -> bool:
    """``text`` names the loopback: a loopback IP or localhost."""
    return ipaddress.ip_address(text).is_loopback if _is_ip(text) else text.rstrip(".").lower() == "localhost"


class _Cross(ValueError):
    """A cross-field problem, carried out of a model validator with its key and remedy."""

    def __init__(self, key: str, value: object, problem: str, remedy: str):
        super().__init__(problem)
        self.problem = Problem(PREFIX + key, value, problem, remedy)


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
            if isinstance(ctx.get("error"), _Cross):
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
