"""Argument parsing of the vLLM TEST DOUBLE: `vllm serve MODEL [flags]`, `vllm --version`.

Only the serve flags vllm-fleet renders exist here; anything else is rejected
with argparse's "unrecognized arguments" error and exit status 2, as real
vLLM does. Like vLLM's FlexibleArgumentParser, `--flag_name` is read as
`--flag-name`, and boolean flags also have a `--no-` form.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Sequence

import vllm

KV_CACHE_DTYPES = ("auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc", "fp8_ds_mla")
UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
_HUMAN_INT = re.compile(r"^(\d+(?:\.\d+)?)([kKmMgGtT]?)$")
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def human_readable_int(value: str) -> int:
    """Parse `8192`, `32k` (x1000) or `32K` (x1024), as vLLM's human_readable_int does."""
    match = _HUMAN_INT.match(value.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"invalid human-readable integer: {value!r}")
    number, suffix = match.groups()
    scale = _DECIMAL.get(suffix) or _BINARY.get(suffix) or 1
    if "." in number and scale == 1:
        raise argparse.ArgumentTypeError(f"decimal numbers need a suffix (k, K, m, M, ...): {value!r}")
    return int(float(number) * scale)


def json_object(value: str) -> dict:
    """Parse a JSON object argument such as --compilation-config '{"cudagraph_mode": "PIECEWISE"}'."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return parsed


def utilization(value: str) -> float:
    """A fraction in (0, 1] for --gpu-memory-utilization."""
    try:
        number = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid float value: {value!r}") from exc
    if not 0.0 < number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return number


def positive_int(value: str) -> int:
    """An integer >= 1."""
    try:
        number = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid int value: {value!r}") from exc
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _add_bool(parser: argparse.ArgumentParser, *names: str) -> None:
    """A boolean engine flag with its `--no-` twin, like vLLM's dataclass-derived flags."""
    parser.add_argument(*names, action=argparse.BooleanOptionalAction, default=False)


def build_parser() -> argparse.ArgumentParser:
    """The `vllm` parser with its `serve` subcommand."""
    parser = argparse.ArgumentParser(
        prog="vllm",
        description="TEST DOUBLE of the vLLM CLI (vllm-fleet CI). It serves no model.",
        allow_abbrev=False,
    )
    parser.add_argument("-v", "--version", action="version", version=vllm.__version__)
    sub = parser.add_subparsers(dest="subparser", required=True)
    serve = sub.add_parser(
        "serve",
        prog="vllm serve",
        help="start the (double's) OpenAI-compatible API server",
        description="TEST DOUBLE of `vllm serve`: same flags as vllm-fleet renders; canned answers.",
        allow_abbrev=False,
    )
    serve.add_argument("model_tag", metavar="MODEL", help="local model directory holding config.json")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", nargs="+", default=None)
    serve.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1)
    serve.add_argument("--pipeline-parallel-size", "-pp", type=positive_int, default=1)
    serve.add_argument("--data-parallel-size", "-dp", type=positive_int, default=1)
    _add_bool(serve, "--enable-expert-parallel")
    serve.add_argument("--max-model-len", type=human_readable_int, default=None)
    serve.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto")
    serve.add_argument("--block-size", type=positive_int, default=None)
    serve.add_argument("--gpu-memory-utilization", type=utilization, default=0.9)
    serve.add_argument("--kv-cache-memory-bytes", type=human_readable_int, default=None)
    _add_bool(serve, "--trust-remote-code")
    serve.add_argument("--tool-call-parser", default=None)
    serve.add_argument("--reasoning-parser", default=None)
    _add_bool(serve, "--enable-auto-tool-choice")
    serve.add_argument("--compilation-config", "-cc", type=json_object, default=None)
    _add_bool(serve, "--enforce-eager")
    serve.add_argument("--max-num-seqs", type=positive_int, default=None)
    serve.add_argument("--max-num-batched-tokens", type=human_readable_int, default=None)
    serve.add_argument("--api-key", nargs="+", default=None)
    serve.add_argument("--disable-log-requests", action="store_true", default=False)
    serve.add_argument("--uvicorn-log-level", choices=UVICORN_LOG_LEVELS, default="info")
    serve.add_argument("--generation-config", default="auto")
    serve.add_argument("--download-dir", default=None)
    serve.add_argument("--seed", type=int, default=None)
    return parser


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """Read `--some_flag[=v]` as `--some-flag[=v]`, as vLLM's FlexibleArgumentParser does."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            key, sep, value = arg.partition("=")
            arg = key.replace("_", "-") + sep + value
        out.append(arg)
    return out


def non_default_args(args: argparse.Namespace) -> dict:
    """The flags that differ from their defaults, for the startup log; the API key is redacted."""
    defaults = vars(build_parser().parse_args(["serve", args.model_tag]))
    shown: dict = {"model_tag": args.model_tag}
    for key, value in vars(args).items():
        if key in ("subparser", "model_tag") or defaults.get(key) == value:
            continue
        shown[key] = ["<redacted>"] * len(value) if key == "api_key" else value
    return shown


def run(argv: Sequence[str]) -> int:
    """Entry point: parse argv (exit 2 on bad flags) and run the subcommand."""
    args = build_parser().parse_args(normalize_argv(argv))
    from vllm.test_double.serve import serve  # imported late: `--help` stays instant

    return serve(args)
