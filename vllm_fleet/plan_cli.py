"""`vllm-fleet plan`: print a plan without touching a host.

    vllm-fleet plan --model minimax-m2 --gpus 4xA800-80G --max-model-len 131072
    vllm-fleet plan --model minimax-m2 --gpus 8xH200 --json

Exit codes: 0 plan is deployable, 1 plan has errors (printed), 2 invalid input.
"""

from __future__ import annotations

import argparse
import io
import shlex

from rich.console import Console
from rich.table import Table

from vllm_fleet.hardware import GiB
from vllm_fleet.kv import KV_CACHE_DTYPE_ALIASES, KV_CACHE_DTYPE_BYTES
from vllm_fleet.modelinfo import list_profiles
from vllm_fleet.plan import Plan, make_plan, options_from

TABLE_WIDTH = 110


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `plan` on the `vllm-fleet` parser."""
    p = subparsers.add_parser(
        "plan",
        help="show layout, memory per GPU, max length and flags for a model on GPUs",
        description="Plan a vLLM deployment without touching a host. Options mirror vLLM's flags.",
    )
    p.add_argument("--model", required=True, help=f"profile ({', '.join(list_profiles())}), model dir or config.json")
    p.add_argument("--gpus", required=True, help="GPU spec, e.g. 4xA800-80G, 8xH200, 2xH100-80G")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, help="default: all GPUs / (PP x DP)")
    p.add_argument("--pipeline-parallel-size", "-pp", type=int)
    p.add_argument("--data-parallel-size", "-dp", type=int)
    ep = p.add_mutually_exclusive_group()
    ep.add_argument("--enable-expert-parallel", dest="enable_expert_parallel", action="store_true", default=None)
    ep.add_argument("--no-enable-expert-parallel", dest="enable_expert_parallel", action="store_false")
    p.add_argument("--max-model-len", help="tokens, or 'auto' (the largest that fits; default)")
    dtypes = [*KV_CACHE_DTYPE_BYTES, *KV_CACHE_DTYPE_ALIASES]
    p.add_argument("--kv-cache-dtype", choices=dtypes, help="default auto (the model dtype)")
    p.add_argument("--block-size", type=int)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--kv-cache-memory-bytes", type=int, help="fixed KV bytes per GPU (vLLM semantics)")
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--reasoning-parser")
    p.add_argument("--cudagraph-piecewise", action="store_true", default=None,
                   help="known-issue switch: --compilation-config '{\"cudagraph_mode\": \"PIECEWISE\"}'")
    p.add_argument("--enforce-eager", action="store_true", default=None)
    p.add_argument("--vllm-version")
    p.add_argument("--port", type=int)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Build and print the plan; 0 when deployable, 1 when it has errors."""
    max_len = args.max_model_len
    if max_len is not None and max_len != "auto":
        max_len = int(max_len) if max_len.isdigit() else max_len
    options = options_from(
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        data_parallel_size=args.data_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel,
        max_model_len=max_len,
        kv_cache_dtype=args.kv_cache_dtype,
        block_size=args.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        reasoning_parser=args.reasoning_parser,
        cudagraph_piecewise=args.cudagraph_piecewise,
        enforce_eager=args.enforce_eager,
        vllm_version=args.vllm_version,
        port=args.port,
    )
    plan = make_plan(args.model, args.gpus, options)
    print(plan.to_json() if args.json else render(plan), end="" if not args.json else "\n")
    return 0 if plan.ok else 1


def _gib(b: int) -> str:
    return f"{b / GiB:.2f} GiB"


def render(plan: Plan) -> str:
    """The human plan: fixed width, no colour, so it is stable text (golden-tested)."""
    out = io.StringIO()
    console = Console(file=out, width=TABLE_WIDTH, color_system=None, force_terminal=False, no_color=True)
    lay, mem = plan.layout, plan.memory_per_gpu
    console.print(f"Plan: {plan.model} on {plan.hardware}, vLLM {plan.vllm_version}")

    t = Table(title="Layout", title_justify="left", show_header=False)
    t.add_row("GPUs used", f"{lay.world_size} of {plan.gpu_count}")
    sizes = f"{lay.tensor_parallel_size} / {lay.pipeline_parallel_size} / {lay.data_parallel_size}"
    t.add_row("tensor / pipeline / data parallel", sizes)
    t.add_row("expert parallel", "yes" if lay.expert_parallel else "no")
    t.add_row("attention", plan.attention)
    console.print(t)

    m = Table(title="Memory per GPU", title_justify="left", show_header=False)
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
    console.print(m)

    s = Table(title="Context", title_justify="left", show_header=False)
    s.add_row("max-model-len", f"{plan.max_model_len:,} ({plan.max_model_len_source})")
    s.add_row("largest that fits", f"{plan.max_model_len_that_fits:,}")
    s.add_row("model maximum", f"{plan.model_max_len:,}")
    console.print(s)

    f = Table(title="Flags", title_justify="left")
    f.add_column("flag")
    f.add_column("value")
    f.add_column("why")
    for flag in plan.flags:
        f.add_row(flag.name, flag.value or "", flag.reason)
    for key, value in plan.env.items():
        f.add_row(f"env {key}", value, plan.env_reasons.get(key, ""))
    console.print(f)

    if plan.errors or plan.warnings:
        w = Table(title="Findings", title_justify="left")
        w.add_column("level")
        w.add_column("code")
        w.add_column("message / remedy")
        for level, items in (("ERROR", plan.errors), ("warning", plan.warnings)):
            for item in items:
                w.add_row(level, item.code, f"{item.message}\nremedy: {item.remedy}")
        console.print(w)
    console.print("command: " + shlex.join(plan.argv), soft_wrap=True)
    console.print("verdict: " + ("deployable" if plan.ok else f"NOT deployable ({len(plan.errors)} error(s))"))
    return out.getvalue()
