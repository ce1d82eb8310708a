"""Fault injection of the vLLM TEST DOUBLE: fail the ways real vLLM fails.

The fault name comes from the file /etc/vllm-fleet-test/engine-fault (path
overridable with VLLM_DOUBLE_FAULT_FILE, for unit tests) when it exists and
is not empty, else from the environment variable VLLM_DOUBLE_FAULT. The
error texts are real vLLM/PyTorch texts (from the seed log where it has them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

from vllm.test_double.model import EngineError, KvPlan

FAULT_FILE = "/etc/vllm-fleet-test/engine-fault"
FAULTS = {
    "kv_cache": "KV cache too small for one max_model_len request (ValueError), exit 1",
    "free_memory": "free GPU memory below --gpu-memory-utilization (ValueError), exit 1; passes at util <= 0.47",
    "illegal_memory": "CUDA illegal memory access during CUDA graph capture, exit 1; "
    "passes with --compilation-config {\"cudagraph_mode\": \"PIECEWISE\"} or --enforce-eager",
    "address_in_use": "OSError: [Errno 98] Address already in use, exit 1",
    "crash_after_start": "serve healthy, then the engine dies: exit 1 after VLLM_DOUBLE_CRASH_SECONDS (5)",
    "unhealthy": "serve, but /health and completions answer 500",
    "memory_hog": "serve healthy, then the engine allocates host memory (64 MiB every 0.1 s) until the OOM killer "
    "(or VLLM_DOUBLE_HOG_MIB) stops it",
    "oom": "torch.OutOfMemoryError while loading weights, exit 1",
}
ENGINE_FAILED = "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}"
ENGINE_DEAD = ("vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. "
               "See stack trace (above) for the root cause.")


class UnknownFault(Exception):
    """The fault file or VLLM_DOUBLE_FAULT names no known fault."""


def read_fault(env: Mapping[str, str]) -> Optional[str]:
    """The injected fault, None for none; the fault file wins over the environment."""
    path = Path(env.get("VLLM_DOUBLE_FAULT_FILE") or FAULT_FILE)
    source, name = "", ""
    try:
        name = path.read_text().strip()
        source = str(path)
    except FileNotFoundError:
        pass
    if not name:
        name, source = env.get("VLLM_DOUBLE_FAULT", "").strip(), "VLLM_DOUBLE_FAULT"
    if not name:
        return None
    if name not in FAULTS:
        raise UnknownFault(
            f"vLLM test double: unknown fault {name!r} (from {source}); known faults: {', '.join(sorted(FAULTS))}"
        )
    return name


def free_memory_error(utilization: float, env: Mapping[str, str], rank: int = 0) -> Optional[EngineError]:
    """vLLM 0.25's free-memory error (the seed's, plus the device) when utilization x total exceeds free."""
    total = float(env.get("VLLM_DOUBLE_GPU_TOTAL_GIB") or 79.25)
    free = float(env.get("VLLM_DOUBLE_GPU_FREE_GIB") or 37.95)
    desired = utilization * total
    if desired <= free:
        return None
    return EngineError(
        f"ValueError: Free memory on device cuda:{rank} ({free:.2f}/{total:.2f} GiB) on startup is less than "
        f"desired GPU memory utilization ({utilization}, {desired:.2f} GiB). Decrease GPU memory utilization or reduce "
        "GPU memory used by other processes.",
        engine_core=True,
    )


def oom_error(env: Mapping[str, str]) -> EngineError:
    """PyTorch's CUDA out-of-memory error as raised while loading weights."""
    total = float(env.get("VLLM_DOUBLE_GPU_TOTAL_GIB") or 79.25)
    return EngineError(
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
        f"of {total:.2f} GiB of which 1.12 GiB is free. Including non-PyTorch memory, this process has "
        f"{total - 1.12:.2f} GiB memory in use. Of the allocated memory {total - 2.75:.2f} GiB is allocated by "
        "PyTorch, and 1.02 GiB is reserved by PyTorch but unallocated. If reserved but unallocated memory is "
        "large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See "
        "documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)",
        engine_core=True,
    )


def illegal_memory_error() -> EngineError:
    """The CUDA illegal memory access the seed log fixes with PIECEWISE CUDA graphs."""
    return EngineError(
        "torch.AcceleratorError: CUDA error: an illegal memory access was encountered\n"
        "CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below "
        "might be incorrect.\n"
        "For debugging consider passing CUDA_LAUNCH_BLOCKING=1\n"
        "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.",
        engine_core=True,
    )


def uses_full_cudagraphs(compilation_config: Optional[dict], enforce_eager: bool) -> bool:
    """True unless eager mode or a cudagraph_mode without full graphs (PIECEWISE, NONE) is chosen."""
    if enforce_eager:
        return False
    mode = str((compilation_config or {}).get("cudagraph_mode", "FULL_AND_PIECEWISE")).upper()
    return mode not in ("PIECEWISE", "NONE")


def forced_kv_available(plan: KvPlan) -> int:
    """The kv_cache fault: only 80% of what one max_model_len request needs (or less) is available."""
    return min(plan.available_bytes, int(plan.needed_bytes * 0.8))
