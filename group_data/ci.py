"""Overrides for the CI test hosts (inventory/ci.py): containers without GPUs or internet.

The model is the tiny MiniMax-M2-architecture config under tests/fixtures, so
the planner and preflight run the same code paths as for the real model.
"""

vllm_model = "tests/fixtures/tiny-minimax-m2"   # tiny config of the real architecture (no weights needed to plan)
vllm_python_version = "3.11"                    # Debian 12's python3
vllm_gpu_memory_utilization = 0.5               # leaves room beside the emulated "other process" on fleet-c GPU 1
vllm_disk_headroom_gib = 1                      # CI disks are small
