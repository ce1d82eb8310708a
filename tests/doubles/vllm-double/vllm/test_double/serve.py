"""`vllm serve` of the TEST DOUBLE: the startup sequence, fault injection, serving, shutdown.

Order as in real vLLM 0.25: bind the port (fails at once when it is taken),
check the model config, then start the engine process (vllm.test_double.engine:
it "initialises" for VLLM_DOUBLE_STARTUP_SECONDS, default 1, and logs the KV-cache
figures), then listen and answer, forwarding each completion to the engine.
SIGTERM or SIGINT ends both with status 0 within a second, at any stage; the
engine's death ends the API server with status 0 (as vLLM 0.25 does).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import threading
from typing import Mapping, Optional

import vllm
from vllm.test_double import faults
from vllm.test_double.cli import non_default_args
from vllm.test_double.logs import ProcLog, set_uvicorn_log_level, stderr
from vllm.test_double.client import ENGINE_EXITED, EngineClient
from vllm.test_double.model import EngineError, env_float, load_model
from vllm.test_double.server import DoubleServer, ServeState

TRACEBACK_HEAD = "Traceback (most recent call last):\n  [frames not shown: this is the vLLM test double]"


def _fail_api_server(error: EngineError) -> int:
    """An exception raised in the API server process: traceback to stderr, status 1."""
    stderr(f"{TRACEBACK_HEAD}\n{error.text}")
    return 1


def _fail_engine_core() -> int:
    """The engine process failed to start (it logged its own error): the API server's RuntimeError; status 1."""
    stderr(f"{TRACEBACK_HEAD}\n{faults.ENGINE_FAILED}")
    return 1


def _bind(host: str, port: int, state: ServeState, api: ProcLog, fault: Optional[str]) -> DoubleServer:
    """Bind the listening socket early, as vLLM does; the address_in_use fault fails the same way."""
    if fault == "address_in_use":
        raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
    return DoubleServer(host, port, state, api)


def serve(args: argparse.Namespace, env: Optional[Mapping[str, str]] = None) -> int:
    """Run `vllm serve`; returns the process exit status."""
    env = os.environ if env is None else env
    api = ProcLog("APIServer")
    set_uvicorn_log_level(args.uvicorn_log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    api.info("api_utils.py", f"vLLM server version {vllm.__version__}, serving model {args.model_tag}")
    api.info("api_utils.py", "This is the vLLM TEST DOUBLE of vllm-fleet CI: it loads no model, answers canned text.")
    api.info("api_utils.py", f"non-default args: {non_default_args(args)}")
    try:
        fault = faults.read_fault(env)
    except faults.UnknownFault as exc:
        stderr(str(exc))
        return 1
    host = args.host or "0.0.0.0"
    keys = list(args.api_key or ([env["VLLM_API_KEY"]] if env.get("VLLM_API_KEY") else []))
    state = ServeState(served_names=[], model_root=args.model_tag, max_model_len=0, version=vllm.__version__,
                       api_keys=keys, reasoning_parser=args.reasoning_parser, tool_call_parser=args.tool_call_parser,
                       auto_tool_choice=args.enable_auto_tool_choice, unhealthy=fault == "unhealthy")
    try:
        server = _bind(host, args.port, state, api, fault)
    except OSError as exc:
        return _fail_api_server(EngineError(f"OSError: [Errno {exc.errno}] {exc.strerror}"))
    try:
        return _run(server, args, env, fault, stop, api)
    finally:
        server.server_close()


def _run(server: DoubleServer, args: argparse.Namespace, env: Mapping[str, str], fault: Optional[str],
         stop: threading.Event, api: ProcLog) -> int:
    """Everything after the bind: model checks, the engine process, serving until a signal or the engine's death.

    As in vLLM 0.25: when the engine process dies, /health answers 503 at once and the API server exits
    with status 0 at its next watchdog tick (every VLLM_DOUBLE_WATCHDOG_SECONDS, vLLM's 5 s).
    """
    try:
        model = load_model(args, env)
    except EngineError as exc:
        return _fail_api_server(exc)
    server.state.served_names = list(args.served_model_name or [model.path])
    server.state.max_model_len = model.max_model_len
    api.info("model.py", f"Resolved architecture: {model.architecture}")
    api.info("model.py", f"Using max model len {model.max_model_len}")
    engine = EngineClient.start(args, env)
    try:
        ready = engine.wait_ready(stop)
        if ready == "stopped":
            return 0
        if ready == "failed":
            engine.proc.wait(5)
            return _fail_engine_core()
        server.state.engine = engine
        engine.monitor(lambda: api.warning("core_client.py", ENGINE_EXITED))
        port = server.server_address[1]
        api.info("api_server.py", f"Starting vLLM server on http://{args.host or '0.0.0.0'}:{port}")
        server.server_activate()
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        api.uvicorn(f"Started server process [{os.getpid()}]")
        api.uvicorn("Waiting for application startup.")
        api.uvicorn("Application startup complete.")
        tick = env_float(env, "VLLM_DOUBLE_WATCHDOG_SECONDS", 5.0)
        while not stop.wait(tick):
            if engine.dead.is_set():  # vLLM's terminate_if_errored: server.should_exit = True
                break
        if engine.dead.is_set() and fault == "crash_after_start":
            # vLLM's output handler saw the engine's error: EngineDeadError in the API server's log.
            stderr(f"{TRACEBACK_HEAD}\n{faults.ENGINE_DEAD}")
        api.uvicorn("Shutting down")
        server.shutdown()
        api.uvicorn("Waiting for application shutdown.")
        api.uvicorn("Application shutdown complete.")
        api.uvicorn(f"Finished server process [{os.getpid()}]")
        return 0
    finally:
        engine.stop()
