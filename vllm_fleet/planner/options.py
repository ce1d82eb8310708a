"""The table of `vllm serve` options the toolkit knows: one row per option, everything derived from it.

Each `Option` row says, once: the setting key (host data `vllm_<key>`), the vLLM flag, the
Python type, the default, the bounds, who renders it (``owner``), whether its value is a
secret, and the description used for Settings' ``Field(description=...)``, group_data/all.py's
comment and the CLI help. From `OPTIONS` come:

- the Settings fields for these options and the PlanOptions fields (`model`, both classes
  inherit the model it builds; a row's ``check`` validates the value in both);
- `Settings.plan_options()` / `options_from` (field names are the setting keys);
- the `vllm-fleet plan` and `vllm-fleet render` options (`add_arguments`);
- the flags extra args may not set (`owned_flags`) and the secret ones (`secret_flags`),
  refused in every spelling vLLM's parser accepts (`check_extra_args`, through
  vllm_fleet/planner/serveargs.py: prefixes, underscores, ``=``, dotted keys, ``--config``);
- the argv of the ``free`` options (`free_flags`): rendered as given when set.

``owner="plan"``: the planner decides or renders the value itself (planner/plan.py `_flags`,
which takes the flag's spelling from the row); ``owner="free"``: the plan renders the value as
given, ``flag value`` (``flag`` alone for a boolean) when it differs from the default.

Adding a vLLM flag is one row here (plus planner logic when the plan decides it).

The table is read when the models are built (import of settings.py and planner/plan.py) and
when flags are rendered or checked, never copied elsewhere (the vLLM test double keeps its own
parser, as vLLM does; tests/unit/test_vllm_double.py checks it takes every row's flag).
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, create_model, field_validator

from vllm_fleet.planner import serveargs
from vllm_fleet.planner.kv import KV_CACHE_DTYPE_ALIASES, KV_CACHE_DTYPE_BYTES

KV_CACHE_DTYPES = (*KV_CACHE_DTYPE_BYTES, *KV_CACHE_DTYPE_ALIASES)
MIN_MAX_MODEL_LEN = 16
MAX_MAX_MODEL_LEN = 2**24
"""16 Mi tokens: above the context of every released model (10 M is the largest)."""
BLOCK_SIZES = (16, 32, 64, 128, 256)
"""What vLLM 0.25's attention backends take (get_supported_kernel_block_sizes): flash_attn, triton and flex
attention multiples of 16, the MLA backends 32, 64, 128 or 256; powers of two, as the planner's block math assumes."""
MAX_GPUS_PER_REPLICA = 64
"""TP and PP: the largest NVLink domain (a GB200 NVL72 rack) has 72 GPUs; TP must divide the heads (powers of two)."""
MAX_KV_CACHE_BYTES = 2**40
"""1 TiB: more than any GPU's memory (the largest have 288 GB); the plan also checks it against the real GPUs."""
MIN_PORT = 1024

_GPUS_WHY = (f"at most {MAX_GPUS_PER_REPLICA}: the largest NVLink domain (a GB200 NVL72 rack) has 72 GPUs, "
             "and the size must divide the model's attention heads")
_DP_WHY = "at most 1024 replicas: more GPUs than any one endpoint spans"
_LEN_WHY = f"{MIN_MAX_MODEL_LEN} to {MAX_MAX_MODEL_LEN} tokens (more than any released model's context), or \"auto\""
_KV_WHY = ("at most 1 TiB, more than any GPU's memory (the largest have 288 GB); the plan also refuses more than "
           "the selected GPUs hold beside the weights")
_BLOCK_WHY = "16, 32, 64, 128 or 256: the block sizes vLLM 0.25's attention backends take (get_supported_kernel_block_sizes)"
_SEQS_WHY = "at most 65536: vLLM sizes per-sequence state for it up front; no GPU batches more"
_TOKENS_WHY = "at most 4194304 (4 Mi): vLLM sizes the activations of one step for it; no GPU holds more"
_PORT_WHY = ("1024 to 65535: the service runs as an unprivileged user without CAP_NET_BIND_SERVICE, which cannot bind "
             "ports below 1024 (vLLM's own port check refuses them too)")


@dataclass(frozen=True)
class Option:
    """One `vllm serve` option (or one setting the plan reads for the serve process)."""

    key: str
    """Setting key without `vllm_`; also the PlanOptions field and the CLI option (`--` + dashed key)."""
    flag: str | None
    """The vLLM flag; None: no flag of its own (the plan turns it into other flags or environment)."""
    type: Any
    """The Python type (annotation) of the setting."""
    default: Any
    description: str
    """Settings' description, group_data/all.py's comment, the CLI help."""
    owner: Literal["plan", "free"] = "plan"
    secret: bool = False
    """The value is a secret: never a setting that reaches argv; the flag is refused in extra args."""
    env: str | None = None
    """A secret's environment variable: the service gets it from its EnvironmentFile instead of the flag."""
    aliases: tuple[str, ...] = ()
    """Other spellings of the flag vLLM accepts (-tp, -cc); CLI aliases where the CLI option is the flag."""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    check: Callable[[Any], Any] | None = None
    """Extra validation: value -> value, or ValueError("problem|remedy")."""
    refused: str = ""
    """What ``check`` refuses, in the words of docs/settings.md's "refused" line (required with a check)."""
    reason: str = ""
    """Why the plan renders it (the plan's Flags table) for ``free`` rows."""
    cli: bool = True
    """Offered by `vllm-fleet plan` and `vllm-fleet render`."""
    cli_type: Callable[[str], Any] | None = None
    """How the CLI parses the word (default: the type's base: int, float, str)."""
    bounds: str = ""
    """Why the bounds are what they are (shown in the remedy when a value is outside them, and in docs/settings.md)."""

    @property
    def flags(self) -> tuple[str, ...]:
        """Every spelling of the flag (none without a flag)."""
        return () if self.flag is None else (self.flag, *self.aliases)

    @property
    def cli_option(self) -> str:
        """The CLI option: ``--`` + the key with dashes."""
        return "--" + self.key.replace("_", "-")

    def field(self) -> Any:
        """The pydantic Field of this row (its ``bounds`` text in json_schema_extra)."""
        bounds = {k: v for k, v in (("ge", self.ge), ("gt", self.gt), ("le", self.le)) if v is not None}
        extra = {"bounds": self.bounds} if self.bounds else None
        return Field(self.default, description=self.description, json_schema_extra=extra, **bounds)


# ------------------------------------------------------------------------------ checks --

def _check_max_model_len(v: int | str) -> int | str:
    if isinstance(v, int) and v < MIN_MAX_MODEL_LEN:
        raise ValueError('is too small to serve anything|use "auto" or a length such as 131072')
    if isinstance(v, int) and v > MAX_MAX_MODEL_LEN:
        raise ValueError(f'is above {MAX_MAX_MODEL_LEN} tokens, more than the context of any released model|'
                         'use "auto" (the largest that fits) or the model\'s own maximum')
    return v


def check_served_name(v: str | None, key: str = "vllm_served_model_name") -> str | None:
    """A served model name (what clients send as "model"): one argv word vLLM reads as the value of
    --served-model-name, so never one its parser would read as an option (a leading ``-``: ``--api-key``).
    Whitespace and control characters are refused for every name (vllm_fleet.settings.text_problem); ``/``, ``.``,
    ``:`` and the like stay valid (``org/model-v2``): vLLM takes any other string."""
    if v is not None and v.startswith("-"):
        raise ValueError("starts with '-', so vLLM's parser would read it as an option, not as the name|"
                         f"set {key} to a name starting with a letter or digit, e.g. org/model-v2")
    return v


def _check_block_size(v: int | None) -> int | None:
    if v is not None and v not in BLOCK_SIZES:
        raise ValueError(f"is not a KV block size vLLM's attention backends take ({', '.join(map(str, BLOCK_SIZES))}: "
                         "multiples of 16, powers of two, 256 at most)|use 16, 32 or 64, or leave it unset")
    return v


def _check_bind_host(v: str) -> str:
    try:
        ipaddress.ip_address(v)
    except ValueError:
        raise ValueError("is not an IP address|use an address such as 127.0.0.1 or 0.0.0.0") from None
    return v


def _check_api_key(v: SecretStr | None) -> SecretStr | None:
    if v is not None and len(v.get_secret_value()) < 8:
        raise ValueError("is shorter than 8 characters|use a long random key, e.g. `openssl rand -hex 24`")
    if v is not None and len(v.get_secret_value()) > 512:
        raise ValueError("is longer than 512 characters|use a random key of 24-64 characters, e.g. `openssl rand -hex 24`")
    return v


def _int_or_word(word: str) -> int | str:
    """A CLI length: a number, else the word as given (the model's validation names it)."""
    return int(word) if word.isdigit() else word


# ------------------------------------------------------------------------------- table --

OPTIONS: tuple[Option, ...] = (
    Option("served_model_name", "--served-model-name", str | None, None,
           'name clients send as "model"; None = the profile name', check=check_served_name,
           refused="a name starting with `-` (`--api-key`: vLLM's parser would read an option, not the name); "
                   "whitespace or a control character. Anything else vLLM takes: `org/model-v2`"),
    Option("tensor_parallel_size", "--tensor-parallel-size", int | None, None,
           "TP size; None = the planner picks (all selected GPUs / (PP x DP))", aliases=("-tp",), ge=1,
           le=MAX_GPUS_PER_REPLICA, bounds=_GPUS_WHY),
    Option("pipeline_parallel_size", "--pipeline-parallel-size", int, 1,
           "PP size (layers split across GPUs / nodes)", aliases=("-pp",), ge=1, le=MAX_GPUS_PER_REPLICA, bounds=_GPUS_WHY),
    Option("data_parallel_size", "--data-parallel-size", int, 1,
           "DP size (replicas; with expert parallel for MoE: DP+EP)", aliases=("-dp",), ge=1, le=1024, bounds=_DP_WHY),
    Option("enable_expert_parallel", "--enable-expert-parallel", bool | None, None,
           "expert parallel for MoE; None = the planner's layout rules decide"),
    Option("max_model_len", "--max-model-len", int | Literal["auto"], "auto",
           'context length to serve; "auto" = the largest that fits in the KV cache',
           check=_check_max_model_len, refused=f"below {MIN_MAX_MODEL_LEN} or above {MAX_MAX_MODEL_LEN}",
           cli_type=_int_or_word, bounds=_LEN_WHY),
    Option("gpu_memory_utilization", "--gpu-memory-utilization", float, 0.9,
           "fraction of each GPU's memory vLLM may use (lower it if others share the GPU)", gt=0.0, le=1.0),
    Option("kv_cache_memory_bytes", "--kv-cache-memory-bytes", int | None, None,
           "fixed KV cache bytes per GPU (vLLM semantics; overrides gpu_memory_utilization for KV)",
           owner="free", gt=0, le=MAX_KV_CACHE_BYTES, bounds=_KV_WHY,
           reason="fixed KV cache size per GPU (skips vLLM's memory profiling for KV sizing)"),
    Option("kv_cache_dtype", "--kv-cache-dtype", Literal[KV_CACHE_DTYPES], "auto",
           "KV cache dtype: auto (the model's dtype) | bf16 | fp8 (halves KV memory, small quality cost)",
           owner="free", reason="KV cache element type"),
    Option("block_size", "--block-size", int | None, None,
           "KV cache block size in tokens (a power of two); None = vLLM's default",
           owner="free", check=_check_block_size, refused=f"anything but {', '.join(map(str, BLOCK_SIZES))}",
           bounds=_BLOCK_WHY, reason="tokens per KV block (pinned so the plan is exact)"),
    Option("max_num_seqs", "--max-num-seqs", int | None, None,
           "most sequences per batch; None = vLLM's default for the GPU",
           owner="free", ge=1, le=65536, bounds=_SEQS_WHY, reason="most sequences per batch (sizes activations)"),
    Option("max_num_batched_tokens", "--max-num-batched-tokens", int | None, None,
           "most tokens per batch; None = vLLM's default for the GPU",
           owner="free", ge=1, le=2**22, bounds=_TOKENS_WHY, reason="most tokens per batch (sizes activations)"),
    Option("enforce_eager", "--enforce-eager", bool, False,
           "True = no CUDA graphs / torch.compile (faster start, slower serving)",
           owner="free", reason="no CUDA graphs / torch.compile"),
    Option("reasoning_parser", "--reasoning-parser", str | None, None,
           "reasoning parser; None = the profile's default (minimax_m2_append_think keeps <think> in content)"),
    Option("cudagraph_piecewise", "--compilation-config", bool, False,
           'True = --compilation-config {"cudagraph_mode": "PIECEWISE"} '
           '(fixes "CUDA error: an illegal memory access")', aliases=("-cc",)),
    Option("nvlink_multicast", None, bool, True,
           "NVLink multicast as NCCL, PyTorch, NVSHMEM and vLLM choose; False = off (NCCL_NVLS_ENABLE=0 "
           "and 3 more variables) where it fails, docs/planner.md", cli=False),
    Option("flashinfer_sampler", None, bool, True,
           "top-k/top-p sampler as vLLM chooses; False = VLLM_USE_FLASHINFER_SAMPLER=0, the PyTorch sampler "
           "(a venv without FlashInfer)", cli=False),
    Option("bind_host", "--host", str, "127.0.0.1",
           "address vLLM listens on; anything but loopback requires vllm_api_key", check=_check_bind_host,
           refused="anything but an IP address"),
    Option("port", "--port", int, 8100,
           "TCP port vLLM listens on (preflight fails if another process owns it)", ge=MIN_PORT, le=65535, bounds=_PORT_WHY),
    Option("api_key", "--api-key", SecretStr | None, None,
           "API key clients must send; lives only in the service's root-only (0600) EnvironmentFile, never in argv or logs",
           secret=True, env="VLLM_API_KEY", check=_check_api_key, refused="shorter than 8 or longer than 512 characters",
           cli=False),
    Option("hf_token", "--hf-token", SecretStr | None, None,
           "Hugging Face token for gated repos; lives only in an EnvironmentFile (same handling)",
           secret=True, env="HF_TOKEN", cli=False),
)

# Flags no row sets but something else owns: refused in extra args, with where to set them instead.
TRUST_REMOTE_CODE = "--trust-remote-code"  # the profile's trust_remote_code (planner/plan.py renders it)
OTHER_OWNED_FLAGS = {TRUST_REMOTE_CODE: "the model profile (models/*.yaml)",
                     "--model": "vllm_model"}  # vLLM moves a --model word in front of the plan's model


def rows(*, secret: bool | None = None, owner: str | None = None, cli: bool | None = None) -> tuple[Option, ...]:
    """The table's rows, filtered."""
    return tuple(r for r in OPTIONS if (secret is None or r.secret == secret) and (owner is None or r.owner == owner)
                 and (cli is None or r.cli == cli))


def row(key: str) -> Option:
    """The row of setting ``key``."""
    for r in OPTIONS:
        if r.key == key:
            return r
    raise KeyError(key)


def flag(key: str) -> str:
    """The vLLM flag of setting ``key`` (the planner's spelling of every flag it renders)."""
    name = row(key).flag
    if name is None:
        raise KeyError(f"{key} has no flag")
    return name


def plan_rows() -> tuple[Option, ...]:
    """The rows the plan reads: every row whose value is not a secret (PlanOptions' fields)."""
    return rows(secret=False)


# ------------------------------------------------------------------------------ models --

def model(name: str, table: Iterable[Option], *, remedy_separator: str = "|") -> type[BaseModel]:
    """A pydantic model with one field per row (type, default, bounds, description) and each row's check.

    Settings and PlanOptions inherit one each. ``remedy_separator`` replaces the "|" between a
    check's problem and remedy (Settings splits them into its error; the planner prints one line).
    """
    table = tuple(table)
    fields = {r.key: (r.type, r.field()) for r in table}
    validators = {f"_check_{r.key}": _validator(r, remedy_separator) for r in table if r.check is not None}
    return create_model(name, __validators__=validators, **fields)


def _validator(r: Option, separator: str) -> Any:
    check = r.check

    def _check(cls: type, v: Any) -> Any:
        try:
            return check(v)
        except ValueError as exc:
            raise ValueError(str(exc).replace("|", separator)) from None

    _check.__name__ = f"_check_{r.key}"
    return field_validator(r.key)(_check)


# --------------------------------------------------------------------------------- CLI --

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per CLI row: ``--dashed-key``, help = the description.

    Where the option is the vLLM flag itself (``--tensor-parallel-size``), the flag's aliases
    (``-tp``) are CLI aliases too; where it is not (``--cudagraph-piecewise`` renders
    ``--compilation-config``, alias ``-cc``), they are not.
    """
    for r in rows(cli=True):
        names = [r.cli_option, *(r.aliases if r.cli_option == r.flag else ())]
        help_text = r.description.replace("%", "%%")
        base = _base_type(r.type)
        if base is bool:
            action = "store_true" if r.default is False else argparse.BooleanOptionalAction
            parser.add_argument(*names, dest=r.key, action=action, default=None, help=help_text)
        elif r.cli_type is not None:
            parser.add_argument(*names, dest=r.key, type=r.cli_type, default=None, help=help_text)
        elif getattr(base, "__origin__", None) is Literal:
            parser.add_argument(*names, dest=r.key, choices=list(base.__args__), default=None, help=help_text)
        else:
            parser.add_argument(*names, dest=r.key, type=base, default=None, help=help_text)


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The CLI rows' values the user gave (setting key -> value)."""
    out = {}
    for r in rows(cli=True):
        value = getattr(args, r.key, None)
        if value is not None:
            out[r.key] = value
    return out


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> int; a Literal stays itself."""
    members = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    if getattr(annotation, "__origin__", None) is Literal or not members:
        return annotation
    return members[0] if len(members) == 1 else annotation


# ------------------------------------------------------------------------- extra args --

def flag_name(word: str) -> str | None:
    """The flag a `vllm serve` word names, with vLLM's exact-spelling rules only; None for a value.

    vLLM's parser reads ``--flag=value`` as ``--flag value`` and ``--flag_name`` as ``--flag-name``.
    Prefixes, dotted keys and ``--config`` need the parser: `check_extra_args` (vllm_fleet/planner/serveargs.py).
    """
    if not word.startswith("-") or word == "-" or word[1:2].isdigit() or word[1:2] == ".":
        return None
    name = word.split("=", 1)[0]
    return "--" + name[2:].replace("_", "-") if name.startswith("--") else name


def secret_flags() -> tuple[str, ...]:
    """The flags whose value is a secret (refused in extra args: argv is readable by every user),
    in every spelling the pinned vLLM's parser has for them."""
    out: list[str] = []
    for r in rows(secret=True):
        for f in r.flags:
            out += [s for s in (f, *serveargs.spellings(f)) if s not in out]
    return tuple(out)


def owned_flags() -> dict[str, str]:
    """Flags extra args may not set -> the setting (or place) that sets them instead.

    Every spelling of every row's flag (secrets excepted: `secret_flags`) that the table or the
    pinned vLLM's parser has (``-tp``, a boolean's ``--no-`` twin), and the flags set from
    elsewhere (OTHER_OWNED_FLAGS).
    """
    out: dict[str, str] = {}
    for r in rows(secret=False):
        for f in r.flags:
            for s in (f, *serveargs.spellings(f)):
                out.setdefault(s, "vllm_" + r.key)
        if _base_type(r.type) is bool and r.flag is not None and r.flag.startswith("--"):
            out.setdefault("--no-" + r.flag[2:], "vllm_" + r.key)  # vLLM's BooleanOptionalAction twin
    for f, where in OTHER_OWNED_FLAGS.items():
        for s in (f, *serveargs.spellings(f)):
            out.setdefault(s, where)
    return out


def _owner(use: serveargs.Use, table: dict[str, str]) -> str | None:
    return next((table[f] for f in (use.written, *use.flags) if f in table), None)


def check_extra_args(words: Iterable[str], *, known_only: bool = False) -> None:
    """Refuse extra `vllm serve` words that set what they may not, however vLLM would spell it.

    The words are read as the pinned vLLM's parser reads them (serveargs.parse: underscores,
    ``=``, dotted keys, unique prefixes). Refused: a secret flag (argv is readable by every user
    of the host), a flag the plan owns (its setting is named), ``--config`` (options from a file
    the plan cannot check), ``--help``, and words vLLM's parser refuses (an ambiguous prefix, a
    missing value). ``known_only``: also refuse words that are no option of the pinned vLLM (for
    a deploy of that version, where vLLM would stop with "unrecognized arguments").

    Raises ValueError("problem|remedy").
    """
    words = list(words)
    for w in words:
        if not isinstance(w, str):
            raise ValueError(f"holds {w!r}, not a string|write every argument as a string, e.g. [\"--seed\", \"1\"]")
    secrets, owned = set(secret_flags()), owned_flags()
    uses = [serveargs.Use(flags, "", w.split("=", 1)[0]) for w in serveargs.rewrite(words)
            if (flags := serveargs.resolve(w)) is not None]
    try:
        parsed = serveargs.parse(words)
    except serveargs.ServeArgsError as exc:
        parsed = exc
    for use in [*uses, *(parsed.uses if isinstance(parsed, serveargs.Parsed) else ())]:
        if secrets & {use.written, *use.flags}:
            raise ValueError(f"passes {use.flag} in argv, where every user of the host can read it|"
                             "set vllm_api_key / vllm_hf_token instead: they go to the service's EnvironmentFile")
        if (where := _owner(use, owned)) is not None:
            raise ValueError(f"sets {use.flag} (written {use.written}), which the plan owns|set {where} instead")
        if serveargs.CONFIG_FLAG in use.flags:
            raise ValueError(f"passes {serveargs.CONFIG_FLAG}: vLLM would read more options from a YAML file the plan "
                             "cannot check (plan-owned and secret flags included)|put those options in vllm_extra_args "
                             "(or their vllm_ settings) instead of a config file")
        if "--help" in use.flags:
            raise ValueError(f"passes {use.written}: vLLM prints its help and exits, the service would never serve|"
                             "remove it from vllm_extra_args")
    if isinstance(parsed, serveargs.ServeArgsError):
        raise ValueError(f"is not what vLLM {serveargs.vllm_version()}'s parser accepts ({parsed})|"
                         "spell each option in full, with its value (`vllm serve --help=all` lists them)")
    if known_only and parsed.unknown:
        word = parsed.unknown[0]
        kind = "an option" if word.startswith("-") else "a positional word (the model is the plan's)"
        raise ValueError(f"holds {word.split('=', 1)[0]!r}, {kind} vLLM {serveargs.vllm_version()}'s `vllm serve` does not "
                         "have: vLLM would stop with \"unrecognized arguments\"|check the spelling (`vllm serve --help=all`), "
                         "or remove it from vllm_extra_args")


def secret_in(args: Iterable[str]) -> str | None:
    """The first secret flag ``args`` set (as vLLM's help spells it), or None; words vLLM would refuse count
    as secret when one of their words could be the prefix of a secret flag."""
    secrets = set(secret_flags())
    words = list(args)
    try:
        uses = serveargs.parse(words).uses
    except serveargs.ServeArgsError:
        for w in words:
            name = flag_name(w)
            if name and name.startswith("--") and any(s.startswith(name) for s in secrets):
                return next(s for s in secrets if s.startswith(name))
        return None
    for use in uses:
        if secrets & {use.written, *use.flags}:
            return use.flag
    return None


# ----------------------------------------------------------------------------- render --

def free_flags(values: Mapping[str, Any] | Any) -> list[tuple[str, str | None, str]]:
    """``(flag, value or None, reason)`` of each free row set to something other than its default.

    ``values``: a mapping or an object (PlanOptions) holding the rows' keys. A boolean renders
    its flag alone when True.
    """
    get = values.get if isinstance(values, Mapping) else lambda k: getattr(values, k)
    out = []
    for r in rows(owner="free"):
        value = get(r.key)
        if r.flag is None or value is None or value is False or value == r.default:
            continue
        out.append((r.flag, None if value is True else str(value), r.reason))
    return out
