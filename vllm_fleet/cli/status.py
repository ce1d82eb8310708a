"""`vllm-fleet status INVENTORY`: one table for every host of a pyinfra inventory.

    vllm-fleet status inventory/prod.py
    vllm-fleet status inventory/ci.py --limit fleet-c --json

Connects with pyinfra's API (the inventory's connectors, users, sudo and
group_data, as a deploy would) and runs the installed health-gate program's
`status` on each host, which reads systemd (state, NRestarts, uptime),
vLLM's /health, /version and /v1/models (with the key from the env file, on
the host) and nvidia-smi. Changes nothing. Hosts come in inventory order; the
table is as wide as the terminal (one block per host when nine columns do not
fit); --json prints one object per host, its numbers as JSON numbers. Exit 0
when every host's service is active and healthy, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import time
from collections.abc import Mapping

from vllm_fleet.layout import HostLayout
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
    """Each selected host's status (the gate program's JSON, or {"error": ...}), in inventory order."""
    names, results = _gather(inventory_path, limit)
    return in_inventory_order(names, results)


def _gather(inventory_path: str, limit: list[str] | None) -> tuple[list[str], dict[str, dict]]:
    """The selected hosts' names in inventory order, and the gate's answer of each host that connected.

    The answers come in pyinfra's order of active hosts (a set: different on each
    run); `in_inventory_order` puts them back in the inventory's.
    """
    import sys

    from pyinfra.api import Config, State
    from pyinfra.api.connect import connect_all, disconnect_all
    from pyinfra.api.facts import get_fact
    from pyinfra.context import ctx_host, ctx_inventory, ctx_state
    from pyinfra.facts.server import Command
    from pyinfra_cli.inventory import make_inventory

    from vllm_fleet import fleet as fleet_model
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
    try:
        topo = fleet_model.topology([(h.name, h.data.dict(), tuple(h.groups)) for h in inventory])
    except FleetError:
        topo = fleet_model.Topology()  # the per-host rows say what is wrong
    connect_all(state)
    out: dict[str, dict] = {}
    try:
        for host in state.inventory.get_active_hosts():
            route, router = topo.route_on(host.name), None
            if route is not None:
                with ctx_state.use(state), ctx_host.use(host):
                    text = get_fact(state, host, Command, args=(router_status_command(route.admin_url, route.rolling_dir),))
                router = router_row(route, text or "")
            if host.name in topo.router_only:
                out[host.name] = {"role": "router", "router": router}
                continue
            try:
                s = load_settings(host.data.dict(), host=host.name)
            except FleetError as exc:
                out[host.name] = {"error": str(exc).splitlines()[0]}
                continue
            lay = HostLayout.of(s)
            cfg = shlex.quote(lay.gate_config)
            cmd = (f"test -r {cfg} && /usr/bin/python3 {shlex.quote(lay.gate_program)} status {cfg} "
                   f"|| echo '{{\"unit\": \"not installed\"}}'")
            with ctx_state.use(state), ctx_host.use(host):
                text = get_fact(state, host, Command, args=(cmd,))
            try:
                out[host.name] = json.loads(text or "{}")
            except ValueError:
                out[host.name] = {"error": (text or "")[:200]}
            if route is not None:
                out[host.name]["router"] = router
    finally:
        disconnect_all(state)
    return [h.name for h in selected], out


def router_status_command(url: str, rolling_dir: str = "") -> str:
    """Shell for a router host: the JSON of the router's GET /workers (or {"error": ...}), with "rolling": the
    replicas a rolling change has drained and not yet put back ({upstream URL: [record, since]}, from
    `HostLayout.router_rolling_dir`)."""
    code = ("import json,os,sys,urllib.parse,urllib.request\n"
            "try: out=json.loads(urllib.request.urlopen(sys.argv[1] + '/workers', timeout=5).read().decode())\n"
            "except Exception as e: out={'error': str(e)}\n"
            "rolling={}\n"
            "try: names=os.listdir(sys.argv[2])\n"
            "except OSError: names=[]\n"
            "for n in names:\n"
            " try: rec,_,since=open(os.path.join(sys.argv[2],n)).read().strip().rpartition(' '); rolling[urllib.parse.unquote(n)]=[json.loads(rec),int(since)]\n"
            " except (OSError,ValueError): pass\n"
            "out['rolling']=rolling\n"
            "print(json.dumps(out))")
    return f"python3 -c {shlex.quote(code)} {shlex.quote(url)} {shlex.quote(rolling_dir or '/nonexistent')}"


def router_row(route, text: str) -> dict:
    """The router's part of its host's row: where it listens, and each configured replica with whether the router
    has it in rotation (a drained replica is not: a rolling change is on it) and healthy."""
    try:
        answer = json.loads(text)
    except ValueError:
        answer = {"error": text[:200] or "no answer"}
    listed = {w.get("url"): w for w in answer.get("workers", []) if isinstance(w, dict)}
    rolling = answer.get("rolling") if isinstance(answer.get("rolling"), dict) else {}
    return {
        "url": route.url, "model": route.model, "policy": route.policy,
        **({"error": str(answer["error"])} if "error" in answer else {}),
        "upstreams": [{"host": m.host, "url": url, "in_rotation": url in listed,
                       "healthy": listed[url].get("is_healthy") if url in listed else None,
                       "rolling_since": _since(rolling.get(url))}
                      for m, url in route.upstreams],
    }


def _since(record) -> int | None:
    """The epoch second a rolling change drained the replica ([record, since] from the router host), else None."""
    if isinstance(record, list) and len(record) == 2 and isinstance(record[1], int):
        return record[1]
    return None


def router_lines(rows: dict[str, dict]) -> list[str]:
    """One block per router under the table: its replicas, in rotation or not, healthy or not."""
    lines = []
    for name, item in rows.items():
        r = item.get("router")
        if not r:
            continue
        head = f"router on {name} at {r['url']} for {r['model']} (policy {r['policy']})"
        lines.append(head + (f": does not answer ({r['error']})" if "error" in r else ":"))
        for u in r["upstreams"]:
            since = u.get("rolling_since")
            if since is not None:
                when = time.strftime("%H:%M:%S", time.localtime(since))
                state = f"OUT OF ROTATION: a rolling change is on it (drained at {when})"
            elif u["in_rotation"]:
                state = "in rotation, " + ("healthy" if u["healthy"] else "UNHEALTHY")
            else:
                state = "OUT OF ROTATION (no rolling change: taken out by the prober after missed probes, or at the router)"
            lines.append(f"  {u['host']} {u['url']}: {state}")
    return lines


def in_inventory_order(names: list[str], results: Mapping[str, dict]) -> dict[str, dict]:
    """The rows: one per name of ``names`` (the selected hosts, in inventory order).

    A host without a result did not connect. Numbers the gate sent as text (older
    gates and nvidia-smi's fields: "32768") become numbers (`_numbers`).
    """
    rows = {name: _numbers(results[name]) if name in results else {"error": "could not connect"} for name in names}
    for row in rows.values():
        if "error" not in row and "restarts" in row:  # an installed unit's status
            row["restart_loop"] = restart_loop(row)
    return rows


LOOP_RESTARTS = 3
LOOP_UPTIME_S = 600


def restart_loop(item: dict) -> bool:
    """True when the service is in a restart loop: systemd is between two tries (``activating/auto-restart``, or
    starting again after restarts), or it restarted at least LOOP_RESTARTS times and has been up less than
    LOOP_UPTIME_S. With Restart=always and no start limit the unit never ends "failed"; this is how it shows."""
    unit = str(item.get("unit", ""))
    restarts = item.get("restarts") if isinstance(item.get("restarts"), int) else 0
    if unit == "activating/auto-restart":
        return True
    if unit.startswith("activating/") and restarts > 0:
        return True
    uptime = item.get("uptime_s")
    return restarts >= LOOP_RESTARTS and (uptime is None or uptime < LOOP_UPTIME_S)


NUMERIC = ("restarts", "uptime_s", "health")
"""Fields of a gate status that are numbers; each GPU's are in NUMERIC_GPU."""
NUMERIC_GPU = ("index", "used_mib", "total_mib")


def _number(value: object) -> int | float | None:
    """``value`` as an int or float; None when it is no number ("[N/A]" from nvidia-smi, null)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _numbers(item: dict) -> dict:
    """A copy of ``item`` with its numeric fields as JSON numbers (or null)."""
    out = dict(item)
    for key in NUMERIC:
        if key in out:
            out[key] = _number(out[key])
    if isinstance(out.get("gpus"), list):
        out["gpus"] = [{**g, **{k: _number(g[k]) for k in NUMERIC_GPU if k in g}} if isinstance(g, dict) else g
                       for g in out["gpus"]]
    return out


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 86400}d{s % 86400 // 3600:02d}h" if s >= 86400 else f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def healthy(item: dict) -> bool:
    """Active and /health 200; a router-only host: its router answers and has every replica in rotation, healthy."""
    if item.get("role") == "router":
        r = item.get("router") or {}
        return "error" not in r and all(u["in_rotation"] and u["healthy"] for u in r.get("upstreams", []))
    return str(item.get("unit", "")).startswith("active/") and item.get("health") == 200


COLUMNS = ("host", "unit", "model", "vLLM", "uptime", "restarts", "GPU memory used/total MiB", "health", "last gate")


def _cells(name: str, item: dict) -> list[str]:
    """The table row of one host (an error's text goes under "model")."""
    if "error" in item:
        return [name, "error", str(item["error"]), "", "", "", "", "", ""]
    if item.get("role") == "router":
        r = item.get("router") or {}
        return [name, "router only", str(r.get("model", "-")), "-", "-", "-", "-", "-", "-"]
    gpus = " ".join(f"{_text(g.get('index'))}:{_text(g.get('used_mib'))}/{_text(g.get('total_mib'))}"
                    for g in item.get("gpus") or []) or "-"
    last = item.get("last_gate")
    return [name, str(item.get("unit")), str(item.get("model") or "-"), str(item.get("version") or "-"),
            _uptime(item.get("uptime_s")),
            _text(item.get("restarts"), "-") + (" (restart loop)" if item.get("restart_loop") else ""), gpus,
            str(item.get("health") or "no answer"), "-" if not last else ("passed" if last["ok"] else "FAILED")]


def _text(value: object, missing: str = "?") -> str:
    """A cell: ``value``, or ``missing`` for None (a number the host did not report)."""
    return missing if value is None else str(value)


def table(rows: dict[str, dict]) -> str:
    """The status as text, as wide as the terminal (rich: COLUMNS, else 80 off a terminal).

    One table, its cells wrapping, when its longest words fit the width; on a
    narrower terminal (nine columns do not fit 80) one two-column block per host,
    so that no host name or state is cut into pieces.
    """
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text
    import io

    buf = io.StringIO()
    console = Console(file=buf)
    t = Table(title="vllm-fleet status")
    for col in COLUMNS:
        t.add_column(col, overflow="fold")
    cells = {name: _cells(name, item) for name, item in rows.items()}
    for row in cells.values():
        t.add_row(*map(Text, row))  # Text: what hosts send is no rich markup
    if console.measure(t, options=console.options.update_width(10**6)).minimum <= console.width:
        console.print(t)
        return buf.getvalue()
    console.print("vllm-fleet status", markup=False, highlight=False)
    for name, row in cells.items():
        block = Table(title=Text(name), title_justify="left", show_header=False)
        block.add_column(no_wrap=True)
        block.add_column(overflow="fold")
        if "error" in rows[name]:
            block.add_row("error", Text(row[2]))
        else:
            for col, cell in zip(COLUMNS[1:], row[1:]):
                block.add_row(col, Text(cell))
        console.print(block)
    return buf.getvalue()


def run(args: argparse.Namespace) -> int:
    """Print the table (or JSON lines); 0 when all hosts are healthy."""
    rows = collect(args.inventory, args.limit)
    if args.json:
        for name, item in rows.items():
            print(json.dumps({"host": name, **item}))
    else:
        print(table(rows), end="")
        for line in router_lines(rows):
            print(line)
    return 0 if rows and all(healthy(r) for r in rows.values()) else 1
