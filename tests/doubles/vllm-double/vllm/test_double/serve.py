"""`vllm serve` of the TEST DOUBLE: the startup sequence, fault injection, serving, shutdown.

Order as in real vLLM 0.25: bind the port (fails at once when it is taken),
check the model config, then "initialise the engine" (VLLM_DOUBLE_STARTUP_SECONDS,
default 1) and log the KV-cache figures, then listen and answer. SIGTERM or
SIGINT ends it with status 0 within a second, at any stage.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import threading
from typing import List, Mapping, Optional, Sequence, Tuple

import vllm
from vllm.test_double import faults
from vllm.test_double.cli import non_default_args
from vllm.test_double.logs import ProcLog, set_uvicorn_log_level, stderr
from vllm.test_double.model import GIB, EngineError, ModelInfo, env_float, kv_cache_error, load_model, plan_kv
from vllm.test_double.server import DoubleServer, ServeState

TRACEBACK_HEAD = "Traceback (most recent call last):\n  [frames not shown: this is the vLLM test double]"


def _fail_api_server(error: EngineError) -> int:
    """An exception raised in the API server process: traceback to stderr, status 1."""
    stderr(f"{TRACEBACK_HEAD}\n{error.text}")
    return 1


def _fail_engine_core(engine: ProcLog, error: EngineError, workers: Sequence[str] = ()) -> int:
    """An exception in the engine core (or in each of its TP workers): logged there, then the API
    server's RuntimeError; status 1."""
    if workers:
        for worker in workers:
            ProcLog(worker).error("multiproc_executor.py", "WorkerProc failed to start.")
            ProcLog(worker).error("multiproc_executor.py", f"{TRACEBACK_HEAD}\n{error.text}")
    else:
        engine.error("core.py", "EngineCore failed to start.")
        engine.error("core.py", f"{TRACEBACK_HEAD}\n{error.text}")
    stderr(f"{TRACEBACK_HEAD}\n{faults.ENGINE_FAILED}")
    return 1


def _bind(host: str, port: int, state: ServeState, api: ProcLog, fault: Optional[str]) -> DoubleServer:
    """Bind the listening socket early, as vLLM does; the address_in_use fault fails the same way."""
    if fault == "address_in_use":
        raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
    return DoubleServer(host, port, state, api)


def _worker_names(tp: int, pp: int) -> List[str]:
    """vLLM's worker process names; a single GPU has none (the engine core runs the model)."""
    if tp * pp == 1:
        return []
    return [f"Worker_PP{p}_TP{t}" if pp > 1 else f"Worker_TP{t}" for p in range(pp) for t in range(tp)]


def _engine_start(model: ModelInfo, args: argparse.Namespace, env: Mapping[str, str],
                  fault: Optional[str], engine: ProcLog) -> Tuple[Optional[EngineError], List[str]]:
    """Log what vLLM's engine core logs while it starts; return the error that stops it (if any)
    and the worker processes that report it (none: the engine core does)."""
    tp, pp, dp = args.tensor_parallel_size, args.pipeline_parallel_size, args.data_parallel_size
    engine.info("core.py", (
        f"Initializing a V1 LLM engine (v{vllm.__version__}) with config: model='{model.path}', "
        f"tokenizer='{model.path}', trust_remote_code={args.trust_remote_code}, max_seq_len={model.max_model_len}, "
        f"download_dir={args.download_dir!r}, tensor_parallel_size={tp}, pipeline_parallel_size={pp}, "
        f"data_parallel_size={dp}, kv_cache_dtype={args.kv_cache_dtype}, enforce_eager={args.enforce_eager}, "
        f"served_model_name={(args.served_model_name or [model.path])[0]}, seed={args.seed}"
    ))
    workers = _worker_names(tp, pp)
    if fault == "free_memory":
        error = faults.free_memory_error(args.gpu_memory_utilization, env)
        if error:
            return error, workers[:1]
    engine.info("gpu_model_runner.py", f"Starting to load model {model.path}...")
    if fault == "oom":
        return faults.oom_error(env), workers[:1]
    engine.info("gpu_model_runner.py", "Model loading took 0.01 GiB memory and 0.366406 seconds")
    plan = plan_kv(model, args, env)
    available = faults.forced_kv_available(plan) if fault == "kv_cache" else plan.available_bytes
    for worker in workers or [engine.proc]:
        ProcLog(worker).info("gpu_worker.py", f"Available KV cache memory: {available / GIB:.2f} GiB")
    if (plan.explicit or fault == "kv_cache") and plan.needed_bytes > available:
        return kv_cache_error(plan, available), []
    engine.info("kv_cache_utils.py", f"GPU KV cache size: {plan.num_tokens:,} tokens")
    engine.info("kv_cache_utils.py",
                f"Maximum concurrency for {plan.max_model_len:,} tokens per request: {plan.concurrency:.2f}x")
    if fault == "illegal_memory" and faults.uses_full_cudagraphs(args.compilation_config, args.enforce_eager):
        return faults.illegal_memory_error(), workers[:1]
    engine.info("core.py", "init engine (profile, create kv cache, warmup model) took 1.00 seconds")
    return None, []


def serve(args: argparse.Namespace, env: Optional[Mapping[str, str]] = None) -> int:
    """Run `vllm serve`; returns the process exit status."""
    env = os.environ if env is None else env
    api, engine = ProcLog("APIServer"), ProcLog("EngineCore_DP0")
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
        return _run(server, args, env, fault, stop, api, engine)
    finally:
        server.server_close()


def _run(server: DoubleServer, args: argparse.Namespace, env: Mapping[str, str], fault: Optional[str],
         stop: threading.Event, api: ProcLog, engine: ProcLog) -> int:
    """Everything after the bind: model checks, engine start, serving until a signal or a crash."""
    try:
        model = load_model(args, env)
    except EngineError as exc:
        return _fail_api_server(exc)
    server.state.served_names = list(args.served_model_name or [model.path])
    server.state.max_model_len = model.max_model_len
    api.info("model.py", f"Resolved architecture: {model.architecture}")
    api.info("model.py", f"Using max model len {model.max_model_len}")
    if stop.wait(env_float(env, "VLLM_DOUBLE_STARTUP_SECONDS", 1.0)):
        return 0
    error, workers = _engine_start(model, args, env, fault, engine)
    if error:
        return _fail_engine_core(engine, error, workers)
    port = server.server_address[1]
    api.info("api_server.py", f"Starting vLLM server on http://{args.host or '0.0.0.0'}:{port}")
    server.server_activate()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    api.uvicorn(f"Started server process [{os.getpid()}]")
    api.uvicorn("Waiting for application startup.")
    api.uvicorn("Application startup complete.")
    crash_after = env_float(env, "VLLM_DOUBLE_CRASH_SECONDS", 5.0) if fault == "crash_after_start" else None
    status = 0
    if not stop.wait(crash_after):
        engine.error("core.py", "EngineCore encountered a fatal error.")
        engine.error("core.py", f"{TRACEBACK_HEAD}\n{faults.ENGINE_DEAD}")
        stderr(f"{TRACEBACK_HEAD}\n{faults.ENGINE_DEAD}")  # the API server's view of the dead engine
        status = 1
    api.uvicorn("Shutting down")
    server.shutdown()
    api.uvicorn("Waiting for application shutdown.")
    api.uvicorn("Application shutdown complete.")
    api.uvicorn(f"Finished server process [{os.getpid()}]")
    return status
