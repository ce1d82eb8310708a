"""Validate `vllm serve` argv lists with the installed, real vLLM's own code.

Run by the REAL vLLM venv's python (never by the project's venv; it does not
import vllm_fleet). Input on stdin: a JSON array of items, each
``{"id": str, "argv": ["vllm", "serve", MODEL, ...], "env": {NAME: VALUE}}``
(``env`` optional). Output on stdout: one JSON object per item, one per line::

    {"id": ..., "ok": true|false, "stage": <first failing stage or null>,
     "error": <vLLM's error text or null>, "warnings": [...],
     "vllm_version": "0.25.0", "platform": "cpu"}

Everything vLLM itself prints goes to stderr. Exit status 0 when every item
was checked (whatever the verdicts), 2 on bad input.

Stages, in vLLM 0.25.0's own order for `vllm serve` (vllm/entrypoints/cli/main.py
-> cli/serve.py -> openai/api_server.py -> engine/arg_utils.py):

1. ``prefix``: the argv starts with ``vllm serve``.
2. ``env``: every ``VLLM_*`` name in ``env`` is one vLLM knows
   (``vllm.envs.environment_variables``; what ``envs.validate_environ`` checks)
   and its value parses with vLLM's own reader for it. The env stays applied for
   the later stages.
3. ``parse``: the top-level ``FlexibleArgumentParser`` with the ``serve``
   subcommand built by ``ServeSubcommand.subparser_init`` (``make_arg_parser``:
   FrontendArgs + AsyncEngineArgs), parsing ``["serve", *argv[2:]]`` exactly as
   ``vllm`` does. JSON flags such as ``--compilation-config`` become config
   objects here (pydantic-validated), so a bad key or value fails here.
4. ``validate``: ``ServeSubcommand.validate`` (= ``validate_parsed_serve_args``).
5. ``api-server``: ``model_tag`` -> ``model`` as ``ServeSubcommand.cmd`` does,
   the reasoning parser copied into ``structured_outputs_config`` as
   ``EngineArgs.create_engine_config`` does, then vLLM's
   ``validate_api_server_args`` (tool-call and reasoning parser names against
   ``ToolParserManager`` / ``ReasoningParserManager``).
6. ``parsers``: ``ToolParserManager.get_tool_parser`` and
   ``ReasoningParserManager.get_reasoning_parser`` for the names given: the
   parser classes are really imported (a registered name whose module fails to
   import fails here).
7. ``engine-args``: ``AsyncEngineArgs.from_cli_args`` (dataclass construction,
   ``__post_init__``: sub-config objects, quantization config, plugins, and the
   HF_HUB_OFFLINE model-path resolution against an empty, temporary HF cache:
   a repo id must be well formed; nothing is downloaded).

Warnings (reported, not failures here; the caller decides): flags vLLM marks
deprecated, and anything vLLM logs at WARNING or above during stages 3-7
(for example "Found duplicate keys").

NOT checked (needs the model's config.json and a GPU platform):
``create_engine_config`` -- ModelConfig (architecture support, dtype,
max_model_len vs the model), CacheConfig, ParallelConfig (world size vs GPUs),
quantization vs hardware, platform checks. The GPU smoke test (tests/gpu/)
covers that path for one model.

Without a GPU, vLLM 0.25.0's platform detection finds no platform and building
the parser fails with "Failed to infer device type" (VLLM_TARGET_DEVICE does not
change that in 0.25.0). As vLLM's own ``vllm bench`` entry point does, this
script then installs ``CpuPlatform`` as the current platform; the platform used
is reported in every result.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, TextIO

SNAPSHOT = "0" * 40
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def claim_stdout() -> TextIO:
    """Keep the real stdout for results; send everything else written to fd 1 to stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(saved, "w", buffering=1)


class WarningCollector(logging.Handler):
    """Collects WARNING+ records of vLLM's loggers while an item is checked."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Store the formatted message."""
        self.messages.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def applied_env(env: dict[str, str]):
    """Set `env` in os.environ for the duration; restore the previous values."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ensure_platform() -> str:
    """Use vLLM's detected platform; without one (no GPU), CpuPlatform as `vllm bench` does."""
    from vllm import platforms

    if platforms.current_platform.is_unspecified():
        from vllm.platforms.cpu import CpuPlatform

        platforms.current_platform = CpuPlatform()
    return str(platforms.current_platform.device_type)


def fake_hf_snapshot(cache: Path, model: str) -> None:
    """An empty snapshot dir for `model` in the temporary HF cache, so offline
    path resolution (EngineArgs.__post_init__) succeeds without any download."""
    if os.path.exists(model) or not REPO_ID.match(model):
        return
    repo = cache / ("models--" + model.replace("/", "--"))
    (repo / "snapshots" / SNAPSHOT).mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)


class Checker:
    """vLLM's serve parser, built once, and the checks run per argv."""

    def __init__(self, hf_cache: Path) -> None:
        self.platform = ensure_platform()
        import vllm
        from vllm.entrypoints.cli.serve import ServeSubcommand
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        self.version = vllm.__version__
        self.hf_cache = hf_cache
        self.serve = ServeSubcommand()
        self.parser = FlexibleArgumentParser(prog="vllm", description="vLLM CLI")
        subparsers = self.parser.add_subparsers(required=False, dest="subparser")
        self.serve.subparser_init(subparsers).set_defaults(dispatch_function=self.serve.cmd)
        self.deprecated = FlexibleArgumentParser._deprecated

    def check(self, argv: list[str], env: dict[str, str]) -> dict[str, Any]:
        """Run the stages on one argv; the first failing stage ends the check."""
        collector = WarningCollector()
        vllm_logger = logging.getLogger("vllm")
        vllm_logger.addHandler(collector)
        state: dict[str, Any] = {}
        stages: list[tuple[str, Callable[[], None]]] = [
            ("prefix", lambda: self._prefix(argv)),
            ("env", lambda: self._env(env)),
            ("parse", lambda: state.update(args=self._parse(argv))),
            ("validate", lambda: self.serve.validate(state["args"])),
            ("api-server", lambda: self._api_server(state["args"])),
            ("parsers", lambda: self._parsers(state["args"])),
            ("engine-args", lambda: self._engine_args(state["args"])),
        ]
        result: dict[str, Any] = {"ok": True, "stage": None, "error": None}
        try:
            with applied_env(env):
                for name, run in stages:
                    try:
                        run()
                    except BaseException as exc:  # noqa: BLE001 - argparse exits; report every failure
                        if isinstance(exc, KeyboardInterrupt):
                            raise
                        result = {"ok": False, "stage": name, "error": _describe(exc)}
                        break
        finally:
            vllm_logger.removeHandler(collector)
        warnings = list(collector.messages)
        if "args" in state:
            warnings += self._deprecated_used(state["args"])
        result.update(warnings=warnings, vllm_version=self.version, platform=self.platform)
        return result

    @staticmethod
    def _prefix(argv: list[str]) -> None:
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise ValueError(f"argv must be a list of strings, got {argv!r}")
        if argv[:2] != ["vllm", "serve"]:
            raise ValueError(f"argv must start with 'vllm serve', got {argv[:2]!r}")

    @staticmethod
    def _env(env: dict[str, str]) -> None:
        from vllm import envs

        for name, value in env.items():
            if not name.startswith("VLLM_"):
                continue
            if name not in envs.environment_variables:
                raise ValueError(f"Unknown vLLM environment variable detected: {name}")
            try:
                envs.environment_variables[name]()
            except Exception as exc:
                raise ValueError(f"{name}={value!r}: vLLM cannot read it: {_describe(exc)}") from exc

    def _parse(self, argv: list[str]) -> argparse.Namespace:
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                args = self.parser.parse_args(["serve", *argv[2:]])
        except SystemExit as exc:
            lines = [ln.strip() for ln in stderr.getvalue().splitlines() if ln.strip()]
            start = next((i for i, ln in enumerate(lines) if ": error: " in ln), max(len(lines) - 1, 0))
            raise ValueError(" | ".join(lines[start:]) or f"argparse exited with {exc.code}") from None
        if args.subparser != "serve":
            raise ValueError(f"parsed as subcommand {args.subparser!r}, not serve")
        return args

    @staticmethod
    def _api_server(args: argparse.Namespace) -> None:
        from vllm.entrypoints.openai.api_server import validate_api_server_args

        if getattr(args, "model_tag", None) is not None:
            args.model = args.model_tag
        args.structured_outputs_config = copy.deepcopy(args.structured_outputs_config)
        if args.reasoning_parser:
            args.structured_outputs_config.reasoning_parser = args.reasoning_parser
        validate_api_server_args(args)

    @staticmethod
    def _parsers(args: argparse.Namespace) -> None:
        from vllm.reasoning import ReasoningParserManager
        from vllm.tool_parsers import ToolParserManager

        if args.tool_call_parser:
            ToolParserManager.get_tool_parser(args.tool_call_parser)
        if args.reasoning_parser:
            ReasoningParserManager.get_reasoning_parser(args.reasoning_parser)

    def _engine_args(self, args: argparse.Namespace) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs

        fake_hf_snapshot(self.hf_cache, args.model)
        if args.tokenizer:
            fake_hf_snapshot(self.hf_cache, args.tokenizer)
        AsyncEngineArgs.from_cli_args(args)

    def _deprecated_used(self, args: argparse.Namespace) -> list[str]:
        return [
            f"deprecated flag used: --{a.dest.replace('_', '-')}"
            for a in self.deprecated
            if hasattr(args, a.dest) and getattr(args, a.dest) != a.default
        ]


def _describe(exc: BaseException) -> str:
    """`Type: message`, or the last traceback line when the message is empty."""
    text = str(exc).strip()
    if not text:
        text = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return f"{type(exc).__name__}: {text}"


def _items(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise ValueError("stdin must hold a JSON array")
    items = []
    for i, item in enumerate(raw):
        if isinstance(item, list):
            item = {"argv": item}
        if not isinstance(item, dict) or "argv" not in item:
            raise ValueError(f"item {i}: expected an argv list or an object with 'argv'")
        items.append({"id": str(item.get("id", i)), "argv": item["argv"], "env": dict(item.get("env") or {})})
    return items


def main() -> int:
    """Read items from stdin, write one JSON result line per item to stdout."""
    out = claim_stdout()
    try:
        items = _items(json.load(sys.stdin))
    except ValueError as exc:
        print(f"check_argv: bad input: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="check-argv-hf-") as hf_cache:
        os.environ["HF_HUB_OFFLINE"] = "1"  # never download: set before huggingface_hub is imported
        os.environ["HF_HUB_CACHE"] = hf_cache
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        checker = Checker(Path(hf_cache))
        for item in items:
            result = {"id": item["id"], **checker.check(item["argv"], item["env"])}
            out.write(json.dumps(result) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
