#!/usr/bin/env python3
"""vllm-fleet router launcher: start vllm-router from the deploy's JSON config (runs in the router's venv).

    vllm-fleet-router /opt/vllm-fleet/router/vllm-router.json

Installed by vllm_fleet/router/step.py as HostLayout.router_program and run by the router unit with the
python of the router's venv. The config holds no secret: vllm-router passes each client's
`Authorization` header through to the replica it picks, and the replicas check it (docs/router.md).
Standard library only, besides vllm_router itself.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

# The config's keys, as RouterArgs (vllm_router/router_args.py of vllm-router 0.1.17) names them.
KEYS = ("worker_urls", "host", "port", "policy", "prometheus_host", "prometheus_port", "health_check_interval_secs",
        "health_check_endpoint", "health_failure_threshold", "health_success_threshold", "health_check_timeout_secs",
        "retry_max_retries", "request_timeout_secs", "worker_startup_timeout_secs", "worker_startup_check_interval",
        "cb_timeout_duration_secs", "log_level")


def router_args(config: dict) -> dict:
    """The RouterArgs keyword arguments of a config (unknown keys refused: a typo must not be ignored)."""
    unknown = sorted(set(config) - set(KEYS))
    if unknown:
        raise SystemExit(f"vllm-fleet-router: unknown config keys {unknown}")
    return {k: config[k] for k in KEYS if k in config}


ANSI = re.compile(rb"\x1b\[[0-9;]*[A-Za-z]")


def serve(config_path: str) -> int:
    """Run the router in this process (blocks: the Rust router holds this process until it stops)."""
    with open(config_path, encoding="utf-8") as fh:
        kwargs = router_args(json.load(fh))
    from vllm_router.launch_router import launch_router  # noqa: PLC0415 - only in the router's venv
    from vllm_router.router_args import RouterArgs  # noqa: PLC0415

    launch_router(RouterArgs(**kwargs))
    return 0


def relay(src, dst) -> None:
    """Copy ``src`` to ``dst`` line by line without ANSI colour codes."""
    for line in iter(src.readline, b""):
        dst.write(ANSI.sub(b"", line))
        dst.flush()


def main(argv: list) -> int:
    """Run the router as a child and relay its output without colour codes (vllm-router colours its log lines
    even when its output is no terminal; the journal would keep the escape codes). SIGTERM and SIGINT go to the
    child; the exit status is the child's."""
    if len(argv) == 3 and argv[1] == "--serve":
        return serve(argv[2])
    if len(argv) != 2:
        sys.stderr.write(__doc__)
        return 2
    with open(argv[1], encoding="utf-8") as fh:
        router_args(json.load(fh))  # a bad config fails here, in the unit's main process, with its message
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", argv[1]],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    relay(child.stdout, sys.stdout.buffer)
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
