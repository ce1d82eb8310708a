"""`vllm-fleet plan`: print a plan without touching a host.

    vllm-fleet plan --model minimax-m2 --gpus 4xA800-80G --max-model-len 131072
    vllm-fleet plan --model minimax-m2 --gpus 8xH200 --json
    vllm-fleet plan --model minimax-m2 --gpus 4xA800-80G --nodes 2     # one model across 2 such hosts

With --nodes N (N >= 2) --gpus is ONE node's GPUs and the plan is a multi-node cluster
(vllm_fleet/planner/cluster.py, docs/multi-node.md): layout, KV per GPU, max-model-len, why
this layout, and each rank's command line (rank 0 serves the API, the others run headless).

Output is as wide as the terminal (rich detects it; COLUMNS, or 80 when not a
terminal). An undeployable plan prints its errors and remedies and no launch
command; with --json its "argv" is null. Where "auto" finds no length that
fits, max-model-len shows "none fits" (--json: null), never the planner's
placeholder.
Exit codes: 0 plan is deployable, 1 plan has errors (printed), 2 invalid input.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import shlex
from typing import Any

from rich.cells import cell_len
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from vllm_fleet.planner.hardware import GiB
from vllm_fleet.planner import options as serve_options
from vllm_fleet.planner.cluster import DEFAULT_PORT, HEAD_PLACEHOLDER, ClusterError, ClusterPlan, make_cluster_plan
from vllm_fleet.planner.hardware import HardwareError, parse_gpu_spec
from vllm_fleet.planner.modelinfo import list_profiles
from vllm_fleet.planner.plan import Plan, make_plan, options_from

#: What the Context and Flags tables show for max-model-len when "auto" found no length that fits (`Plan.none_fits`).
NONE_FITS_TEXT = "none fits"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `plan` on the `vllm-fleet` parser."""
    p = subparsers.add_parser(
        "plan",
        help="show layout, memory per GPU, max length and flags for a model on GPUs",
        description="Plan a vLLM deployment without touching a host. Options mirror vLLM's flags.",
    )
    p.add_argument("--model", required=True, help=f"profile ({', '.join(list_profiles())}), model dir or config.json")
    p.add_argument("--gpus", required=True, help="GPU spec, e.g. 4xA800-80G, 8xH200, 2xH100-80G (with --nodes: the GPUs of each node)")
    p.add_argument("--nodes", type=int, default=1, metavar="N",
                   help="plan one model across N identical hosts (vLLM's native multi-node runtime; docs/multi-node.md): "
                        "--gpus is then each node's GPUs, and every rank's command line is printed")
    p.add_argument("--cluster-layout", choices=("auto", "pp", "dp-ep"), default="auto",
                   help="with --nodes: pp = TP inside a node, PP across nodes; dp-ep = data-parallel attention + expert "
                        "parallel (MoE); auto = the planner's choice")
    p.add_argument("--head-address", default=HEAD_PLACEHOLDER, help="with --nodes: the head's address on the cluster network "
                   f"(--master-addr); default the placeholder {HEAD_PLACEHOLDER}")
    p.add_argument("--cluster-port", type=int, default=DEFAULT_PORT, help=f"with --nodes: the head's rendezvous port (default {DEFAULT_PORT})")
    serve_options.add_arguments(p)  # one option per row of vllm_fleet/planner/options.py
    p.add_argument("--vllm-version")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Build and print the plan; 0 when deployable, 1 when it has errors."""
    options = options_from(**serve_options.given(args), vllm_version=args.vllm_version)
    if args.nodes != 1:
        return run_cluster(args, options)
    plan = make_plan(args.model, args.gpus, options)
    print(json.dumps(document(plan), indent=2) if args.json else render(plan), end="" if not args.json else "\n")
    return 0 if plan.ok else 1


def run_cluster(args: argparse.Namespace, options) -> int:
    """`plan --nodes N`: the cluster plan; 0 when deployable, 1 when it has errors."""
    if args.nodes < 2:
        raise ClusterError(f"--nodes {args.nodes}: a cluster needs at least 2 nodes (leave --nodes out for one host).")
    try:
        node = parse_gpu_spec(args.gpus)
    except HardwareError as exc:
        raise ClusterError(str(exc)) from exc
    nodes = [(f"node{r}", node) for r in range(args.nodes)]
    cp = make_cluster_plan(args.model, nodes, options, layout=args.cluster_layout, head_address=args.head_address,
                           port=args.cluster_port)
    if args.json:
        doc = document(cp.plan)
        doc["cluster"] = {"nodes": cp.nodes, "gpus_per_node": cp.gpus_per_node, "layout": cp.layout,
                          "head_address": cp.head_address, "port": cp.port, "reasons": list(cp.reasons),
                          "ranks": [{"rank": r.rank, "headless": r.headless, "argv": list(r.argv) if cp.ok else None,
                                     "env": r.env} for r in cp.ranks]}
        print(json.dumps(doc, indent=2))
    else:
        print(render_cluster(cp), end="")
    return 0 if cp.ok else 1


def render_cluster(cp: ClusterPlan) -> str:
    """The human cluster plan: the whole-cluster plan (`render`), why this layout, and each rank's command."""
    text = render(cp.plan).replace("verdict: deployable\n", "")
    text = "\n".join(line for line in text.splitlines() if not line.startswith(("command: ", "    --")) or not cp.ok) + "\n"
    out = io.StringIO()
    console = Console(file=out, color_system=None, force_terminal=False, no_color=True)
    console.print(f"Cluster: {cp.nodes} nodes x {cp.node_hardware}, layout {cp.layout}, head {cp.head_address}:{cp.port}",
                  markup=False, highlight=False)
    console.print(f"KV per GPU: {cp.plan.kv_cache_bytes_per_token_per_gpu:,} bytes/token; max-model-len "
                  f"{cp.plan.max_model_len:,}", markup=False, highlight=False)
    for reason in cp.reasons:
        console.print(f"why: {reason}", markup=False, highlight=False)
    if cp.ok:
        for r in cp.ranks:
            console.print(f"rank {r.rank} ({'headless worker' if r.headless else 'head: serves the API'}):",
                          markup=False, highlight=False)
            for line in command_lines(list(r.argv), console.width):
                console.print("  " + line, markup=False, highlight=False, soft_wrap=True)
        console.print("env on every rank: the plan's, plus NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME (vllm_cluster_ifname) "
                      "and VLLM_HOST_IP (vllm_cluster_address) where set", markup=False, highlight=False)
        console.print("verdict: deployable (the per-node units and deploy are not built yet: docs/multi-node.md)",
                      markup=False, highlight=False)
    return text + out.getvalue()


def document(plan: Plan) -> dict[str, Any]:
    """The `--json` document: `Plan.to_dict`, with "argv" null when the plan has errors.

    The key stays (the document's keys are stable); a null argv says there is no
    command to launch, as the text output prints none.
    """
    doc = plan.to_dict()
    if not plan.ok:
        doc["argv"] = None
    if plan.none_fits:  # no length fits: the placeholder is no value (null, as in the flags)
        doc["max_model_len"] = None
        for f in doc["flags"]:
            if f["flag"] == serve_options.flag("max_model_len"):
                f["value"] = None
    return doc


def _gib(b: int) -> str:
    return f"{b / GiB:.2f} GiB"


def _table(title: str, *columns: str | tuple[str, int], header: bool = True) -> Table:
    """A left-titled table whose cells fold, so that it fits any terminal width.

    A column given as ``(name, ratio)`` shares the room by ratio when the table is
    wider than the terminal (`_print`); the others keep their natural width.
    """
    t = Table(title=title, title_justify="left", show_header=header)
    for column in columns:
        name, ratio = column if isinstance(column, tuple) else (column, None)
        t.add_column(name if header else "", overflow="fold", ratio=ratio)
    return t


def _share(room: int, natural: list[int], ratios: list[int | None]) -> list[int]:
    """Column widths summing to ``room``: by ratio, yet no column wider than it needs.

    A column without a ratio keeps its natural width. A column whose share exceeds
    its natural width gets that width, and what it leaves goes to the others by
    ratio (rich's own ratio split, with ``expand``, would give it all of its share).
    """
    widths = [n if r is None else 0 for n, r in zip(natural, ratios)]
    left = room - sum(widths)
    weight = {i: r for i, r in enumerate(ratios) if r}
    while weight:
        total = sum(weight.values())
        capped = [i for i, r in weight.items() if natural[i] * total <= left * r]
        if not capped:
            for i, r in weight.items():  # as rich's ratio_distribute: rounded up, the last takes the rest
                widths[i] = max(1, math.ceil(left * r / total))
                total -= r
                left -= widths[i]
            break
        for i in capped:
            widths[i] = natural[i]
            left -= natural[i]
            del weight[i]
    return widths


def _print(console: Console, table: Table) -> None:
    """Print ``table``; wider than the console, its ratio columns share the room (`_share`).

    Left to itself rich narrows the widest columns first, so that on an 80-column
    terminal a column of prose ends no wider than the identifiers beside it.
    """
    ratios = [c.ratio for c in table.columns]
    if any(ratios):
        wide = console.options.update_width(10**6)
        natural = [max(Measurement.get(console, wide, cell).maximum for cell in (c.header, *c.cells))
                   for c in table.columns]
        room = console.width - (console.measure(table, options=wide).maximum - sum(natural))
        if sum(natural) > room:
            for column, width in zip(table.columns, _share(room, natural, ratios)):
                column.width = width
    console.print(table)


def command_lines(argv: list[str], width: int) -> list[str]:
    """``command: ...`` as lines no wider than ``width`` where the words allow.

    One line when it fits; else the `vllm serve MODEL` head and the flags, each with
    its value, packed onto lines ending in `` \\``, so that the text still pastes
    into a shell as one command. A flag never parts from its value; a pair wider
    than ``width`` overflows on a line of its own.
    """
    groups: list[list[str]] = []
    for word in argv:
        if groups and not word.startswith("--"):
            groups[-1].append(word)
        else:
            groups.append([word])
    texts = [shlex.join(g) for g in groups]
    lines = ["command: " + texts[0]]
    for i, text in enumerate(texts[1:], start=2):
        marker = 2 if i < len(texts) else 0  # room for " \\" unless this is the last pair
        if cell_len(lines[-1]) + 1 + cell_len(text) + marker <= width:
            lines[-1] += " " + text
        else:
            lines[-1] += " \\"
            lines.append("    " + text)
    return lines


def render(plan: Plan) -> str:
    """The human plan: no colour, as wide as the terminal (rich: COLUMNS, else 80 off a terminal).

    The text is golden-tested at a width the tests set through COLUMNS. A plan with
    errors shows them with their remedies and no launch command.
    """
    out = io.StringIO()
    console = Console(file=out, color_system=None, force_terminal=False, no_color=True)
    lay, mem = plan.layout, plan.memory_per_gpu
    console.print(f"Plan: {plan.model} on {plan.hardware}, vLLM {plan.vllm_version}")

    t = _table("Layout", "what", "value", header=False)
    t.add_row("GPUs used", f"{lay.world_size} of {plan.gpu_count}")
    sizes = f"{lay.tensor_parallel_size} / {lay.pipeline_parallel_size} / {lay.data_parallel_size}"
    t.add_row("tensor / pipeline / data parallel", sizes)
    t.add_row("expert parallel", "yes" if lay.expert_parallel else "no")
    t.add_row("attention", plan.attention)
    _print(console, t)

    m = _table("Memory per GPU", "what", "value", header=False)
    o = mem.overhead
    m.add_row("total (as CUDA reports)", _gib(mem.total))
    m.add_row("requested (x gpu_memory_utilization)", _gib(mem.requested))
    m.add_row("weights", _gib(mem.weights))
    m.add_row("overhead", f"{_gib(o.total)} = non-torch {_gib(o.non_torch)} (measured) + activations "
              f"{_gib(o.activations)} + CUDA graphs {_gib(o.cuda_graphs)} + margin {_gib(o.margin)} (estimates)")
    m.add_row("available for KV cache", _gib(mem.available_for_kv) + (" (fixed)" if mem.available_is_exact else " (predicted)"))
    kv_note = f"kv-cache-dtype {plan.kv_cache_dtype}, block {plan.block_size}"
    m.add_row("KV for max-model-len", f"{_gib(mem.kv_for_max_len)} ({kv_note})")
    m.add_row("KV bytes per token", f"{plan.kv_cache_bytes_per_token_per_gpu:,}")
    m.add_row("KV capacity", f"{plan.kv_capacity_tokens:,} tokens")
    _print(console, m)

    s = _table("Context", "what", "value", header=False)
    length = NONE_FITS_TEXT if plan.none_fits else f"{plan.max_model_len:,}"
    s.add_row("max-model-len", f"{length} ({plan.max_model_len_source})")
    s.add_row("largest that fits", f"{plan.max_model_len_that_fits:,}")
    s.add_row("model maximum", f"{plan.model_max_len:,}")
    _print(console, s)

    f = _table("Flags", ("flag", 5), ("value", 3), ("why", 6))
    for flag in plan.flags:
        none_fits = plan.none_fits and flag.name == serve_options.flag("max_model_len")
        f.add_row(flag.name, NONE_FITS_TEXT if none_fits else flag.value or "", flag.reason)
    for key, value in plan.env.items():
        f.add_row(f"env {key}", value, plan.env_reasons.get(key, ""))
    _print(console, f)

    if plan.errors or plan.warnings:
        w = _table("Findings", "level", ("code", 1), ("message / remedy", 2))
        for level, items in (("ERROR", plan.errors), ("warning", plan.warnings)):
            for item in items:
                w.add_row(level, item.code, f"{item.message}\nremedy: {item.remedy}")
        _print(console, w)
    if plan.ok:
        for line in command_lines(plan.argv, console.width):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        console.print("verdict: deployable")
    else:
        console.print(f"verdict: NOT deployable ({len(plan.errors)} error(s)); no launch command, see the remedies",
                      markup=False, highlight=False)
    return out.getvalue()
