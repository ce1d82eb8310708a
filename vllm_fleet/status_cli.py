"""`vllm-fleet status INVENTORY`: one table for every host of a pyinfra inventory.

    vllm-fleet status inventory/prod.py
    vllm-fleet status inventory/ci.py --limit fleet-c --json

Connects with pyinfra's API (the inventory's connectors, users, sudo and
group_data, as a deploy would) and runs the installed health-gate program's
`status` on each host, which reads systemd (state, NRestarts, uptime),
vLLM's /health, /version and /v1/models (with the key from the env file, on
the host) and nvidia-smi. Changes nothing. Exit 0 when every host's service is
active and healthy, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex

from vllm_fleet.errors import FleetError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `status` subcommand."""
    p = subparsers.add_parser("status", help="one table: unit state, model, vLLM version, uptime, restarts, GPU memory, health",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inventory", help="pyinfra inventory file, e.g. inventory/prod.py")
    p.add_argument("--limit", action="append", default=[], help="only these hosts (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object per host instead of the table")
    p.set_defaults(func=run)


def collect(inventory_path: str, limit: list[str] | None = None) -> dict[str, dict]:
    """Each host's status (the gate program's JSON, or {"error": ...})."""
    import sys

    from pyinfra.api import Config, State
    from pyinfra.api.connect import connect_all, disconnect_all
    from pyinfra.api.facts import get_fact
    from pyinfra.context import ctx_host, ctx_inventory, ctx_state
    from pyinfra.facts.server import Command
    from pyinfra_cli.inventory import make_inventory

    from vllm_fleet.settings import load_settings

    here = os.path.dirname(os.path.abspath(inventory_path))
    root = os.path.dirname(here) if os.path.basename(here) == "inventory" else here
    if root not in sys.path:
        sys.path.append(root)  # group_data may import the project, as under the pyinfra CLI
    state = State(check_for_changes=False)
    state.cwd = root
    ctx_state.set(state)
    inventory = make_inventory(inventory_path, cwd=root)
    ctx_inventory.set(inventory)
    selected = [h for h in inventory if not limit or h.name in limit or h.name.removeprefix("@docker/") in limit]
    state.init(inventory, Config(), initial_limit=selected)
    connect_all(state)
    out: dict[str, dict] = {}
    try:
        for host in state.inventory.get_active_hosts():
            try:
                s = load_settings(host.data.dict(), host=host.name)
            except FleetError as exc:
                out[host.name] = {"error": str(exc).splitlines()[0]}
                continue
            cfg = f"/etc/vllm-fleet/{s.service_name}.gate.json"
            cmd = (f"test -r {cfg} && /usr/bin/python3 {shlex.quote(s.base_dir)}/bin/vllm-fleet-gate status {cfg} "
                   f"|| echo '{{\"unit\": \"not installed\"}}'")
            with ctx_state.use(state), ctx_host.use(host):
                text = get_fact(state, host, Command, args=(cmd,))
            try:
                out[host.name] = json.loads(text or "{}")
            except ValueError:
                out[host.name] = {"error": (text or "")[:200]}
        for host in inventory:
            if host.name not in out and host in selected:
                out[host.name] = {"error": "could not connect"}
    finally:
        disconnect_all(state)
    return out


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 86400}d{s % 86400 // 3600:02d}h" if s >= 86400 else f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def healthy(item: dict) -> bool:
    """Active and /health 200."""
    return str(item.get("unit", "")).startswith("active/") and item.get("health") == 200


def table(rows: dict[str, dict]) -> str:
    """The status table as text."""
    from rich.console import Console
    from rich.table import Table
    import io

    t = Table(title="vllm-fleet status")
    for col in ("host", "unit", "model", "vLLM", "uptime", "restarts", "GPU memory used/total MiB", "health", "last gate"):
        t.add_column(col)
    for name, item in rows.items():
        if "error" in item:
            t.add_row(name, "error", item["error"], "", "", "", "", "", "")
            continue
        gpus = " ".join(f"{g['index']}:{g['used_mib']}/{g['total_mib']}" for g in item.get("gpus") or []) or "-"
        last = item.get("last_gate")
        t.add_row(name, str(item.get("unit")), str(item.get("model") or "-"), str(item.get("version") or "-"),
                  _uptime(item.get("uptime_s")), str(item.get("restarts", "-")), gpus,
                  str(item.get("health") or "no answer"), "-" if not last else ("passed" if last["ok"] else "FAILED"))
    buf = io.StringIO()
    Console(file=buf, width=200).print(t)
    return buf.getvalue()


def run(args: argparse.Namespace) -> int:
    """Print the table (or JSON lines); 0 when all hosts are healthy."""
    rows = collect(args.inventory, args.limit)
    if args.json:
        for name, item in rows.items():
            print(json.dumps({"host": name, **item}))
    else:
        print(table(rows), end="")
    return 0 if rows and all(healthy(r) for r in rows.values()) else 1
