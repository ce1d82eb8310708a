"""The engine-core process of the vLLM TEST DOUBLE (`EngineCore_DP0`), a subprocess of the API server.

Real vLLM 0.25 runs its engine core in a process of its own, started by the API
server; what the toolkit has to survive depends on that split (measured on an
H200 under systemd, docs/gpu-validation.md):

- the engine dies (SIGKILL, the OOM killer): the API server logs
  "[shutdown] MPClient: engine core exited unexpectedly; starting cleanup",
  answers /health with 503, and at its next watchdog tick (every 5 s) exits
  with status **0**;
- the engine hangs (SIGSTOP): /health and /metrics stay 200, completions never
  answer;
- the API server is SIGKILLed: the engine is left running (systemd's cgroup
  kill ends it).

This module is that engine: it does the startup work the API server used to do
in-process (the KV lines, the startup faults), then answers each request the API
server forwards over a socket pair ("req ID" -> "done ID"). It loads no model.

    python -m vllm.test_double.engine FD ARGS_JSON     # started by vllm.test_double.serve only
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import List, Mapping, Optional, Tuple

import vllm
from vllm.test_double import faults
from vllm.test_double.logs import ProcLog
from vllm.test_double.model import EngineError, ModelInfo, env_float, kv_cache_error, load_model, plan_kv

GIB = 1 << 30
TRACEBACK_HEAD = "Traceback (most recent call last):\n  [frames not shown: this is the vLLM test double]"
CRASH_TEXT = "RuntimeError: vLLM test double: injected engine crash (fault crash_after_start)"


def worker_names(tp: int, pp: int) -> List[str]:
    """vLLM's worker process names; a single GPU has none (the engine core runs the model)."""
    if tp * pp == 1:
        return []
    return [f"Worker_PP{p}_TP{t}" if pp > 1 else f"Worker_TP{t}" for p in range(pp) for t in range(tp)]


def engine_start(model: ModelInfo, args: argparse.Namespace, env: Mapping[str, str],
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
    workers = worker_names(tp, pp)
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


def log_failure(engine: ProcLog, error: EngineError, workers: List[str]) -> None:
    """The engine core's (or each TP worker's) failure lines, as vLLM logs them."""
    if workers:
        for worker in workers:
            ProcLog(worker).error("multiproc_executor.py", "WorkerProc failed to start.")
            ProcLog(worker).error("multiproc_executor.py", f"{TRACEBACK_HEAD}\n{error.text}")
    else:
        engine.error("core.py", "EngineCore failed to start.")
        engine.error("core.py", f"{TRACEBACK_HEAD}\n{error.text}")


def _crash(engine: ProcLog) -> None:
    """crash_after_start: a Python error in the engine's busy loop; the engine process exits 1."""
    engine.error("core.py", "EngineCore encountered a fatal error.")
    engine.error("core.py", f"{TRACEBACK_HEAD}\n{CRASH_TEXT}")
    os._exit(1)


def _hog(env: Mapping[str, str]) -> None:
    """memory_hog: touch 64 MiB of host memory every 0.1 s, up to VLLM_DOUBLE_HOG_MIB (default: no limit),
    so that a cgroup memory limit brings the kernel's OOM killer (what a worker OOM-kill looks like)."""
    limit = env_float(env, "VLLM_DOUBLE_HOG_MIB", 0.0)
    held = []
    while not limit or len(held) * 64 < limit:
        held.append(bytearray(64 << 20))  # zero-filled: the pages are touched
        time.sleep(0.1)
    while True:
        time.sleep(3600)


def _serve(conn: socket.socket, env: Mapping[str, str]) -> None:
    """Answer each forwarded request; when the API server is gone (EOF), stay alive like vLLM's engine does."""
    reader = conn.makefile("rb")
    delay = env_float(env, "VLLM_DOUBLE_REQUEST_SECONDS", 0.0)  # how long each request is in flight (decoding)
    lock = threading.Lock()

    def done(rid: str) -> None:
        with lock:
            try:
                conn.sendall(f"done {rid}\n".encode())
            except OSError:
                pass

    for line in reader:
        word, _, rid = line.decode().strip().partition(" ")
        if word == "req":
            if delay > 0:
                timer = threading.Timer(delay, done, args=(rid,))
                timer.daemon = True
                timer.start()
            else:
                done(rid)
    # The API server died without stopping us: keep "holding the GPU" until someone kills the process group
    # (systemd does). VLLM_DOUBLE_ORPHAN_SECONDS bounds it for tests run outside systemd.
    limit = env_float(env, "VLLM_DOUBLE_ORPHAN_SECONDS", 0.0)
    if limit > 0:
        time.sleep(limit)
        return
    while True:
        signal.pause()


def main(argv: List[str]) -> int:
    """The engine process: start up (faults, KV lines), report ready/failed, then serve."""
    fd, args = int(argv[0]), argparse.Namespace(**json.loads(argv[1]))
    env = os.environ
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # the API server's shutdown
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the API server, which stops us
    engine = ProcLog("EngineCore_DP0")
    conn = socket.socket(fileno=fd)
    fault = faults.read_fault(env)
    model = load_model(args, env)
    time.sleep(env_float(env, "VLLM_DOUBLE_STARTUP_SECONDS", 1.0))
    error, workers = engine_start(model, args, env, fault, engine)
    if error:
        log_failure(engine, error, workers)
        conn.sendall(b"failed\n")
        return 1
    conn.sendall(b"ready\n")
    if fault == "crash_after_start":
        timer = threading.Timer(env_float(env, "VLLM_DOUBLE_CRASH_SECONDS", 5.0), _crash, args=(engine,))
        timer.daemon = True
        timer.start()
    if fault == "memory_hog":
        threading.Thread(target=_hog, args=(env,), daemon=True).start()
    _serve(conn, env)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
