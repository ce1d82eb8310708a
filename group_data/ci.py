"""Overrides for the CI test hosts (inventory/ci.py): containers without GPUs or internet.

The model is the tiny MiniMax-M2-architecture config under tests/fixtures, so
the planner and preflight run the same code paths as for the real model.
The Python stack comes from a local wheelhouse (tests/e2e/wheelhouse.py: the
vLLM TEST DOUBLE as `vllm`, uv, the real torch 2.13.0 CPU wheel and its
dependencies), pushed to each host and installed with --no-index.
"""

import os
from pathlib import Path

vllm_model = "tests/fixtures/tiny-minimax-m2"   # tiny config of the real architecture (no weights needed to plan)
vllm_python_version = "3.11"                    # Debian 12's python3
vllm_gpu_memory_utilization = 0.5               # leaves room beside the emulated "other process" on fleet-c GPU 1
vllm_disk_headroom_gib = 1                      # CI disks are small
vllm_restart_sec = 2                            # the engine-crash e2e test waits for systemd's restart
vllm_wheelhouse = os.environ.get("VLLM_FLEET_CI_WHEELHOUSE") or str(
    Path(os.environ.get("VLLM_FLEET_CACHE", Path.home() / ".cache" / "vllm-fleet")) / "wheelhouse")  # built by tests/e2e/wheelhouse.py
vllm_torch_backend = "cpu"                      # the wheelhouse holds torch's CPU build (emulated GPUs: CUDA check is skipped)
vllm_torch_version = "2.13.0"                   # the vLLM double requires no torch: pin the one in the wheelhouse
