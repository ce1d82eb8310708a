"""The plan: which GPUs, which layout, how memory splits per GPU, which flags and why.

`make_plan(model, hardware, options)` is pure: no host, no pyinfra. It is the
one place where `vllm serve` flags are decided; roles and templates render
`Plan.argv` / `Plan.env` as they are. Errors in `Plan.errors` mean "do not
deploy"; invalid input (unknown model, bad GPU spec, bad option) raises
`PlanError` instead.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, ValidationError, field_validator

from vllm_fleet.planner import kv
from vllm_fleet.planner import options as serve_options
from vllm_fleet.errors import FleetError
from vllm_fleet.planner.hardware import GiB, Hardware, HardwareError, parse_gpu_spec
from vllm_fleet.planner.modelinfo import Architecture, AttentionKind, ModelInfoError, Profile, load_profile, weight_parts
from vllm_fleet.versions import VLLM_VERSION

PIECEWISE_CONFIG = '{"cudagraph_mode": "PIECEWISE"}'

# NVLink multicast off in every library of a vLLM process that would use it (vllm_nvlink_multicast = False):
# variable -> (value, what it switches off).
MULTICAST_OFF_ENV: dict[str, tuple[str, str]] = {
    "NCCL_NVLS_ENABLE": ("0", "NCCL's NVLink SHARP (NVLS) collectives"),
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": ("1", "multicast in PyTorch's symmetric memory"),
    "NVSHMEM_DISABLE_NVLS": ("1", "NVSHMEM's NVLS (multicast) collectives"),
    "VLLM_ALLREDUCE_USE_SYMM_MEM": ("0", "vLLM's symmetric-memory all-reduce (it runs on multicast)"),
}


# The shortest context worth serving (the FITS_TOO_SHORT rule): a system prompt, a user question and an answer
# take about 2048 tokens; below that ordinary chat requests fail. A model with a shorter maximum: its maximum.
MIN_USEFUL_MAX_MODEL_LEN = 2048
#: max_model_len_source when "auto" finds no length that fits (no KV memory): the plan's max_model_len (1) is a
#: placeholder for its arithmetic, never shown as a value (the CLI prints "none fits", --json null).
NONE_FITS = "auto: no length fits in the KV cache"

# vLLM 0.25 serves an FP8 KV cache only on SM89+ (see the FP8_KV_UNSUPPORTED rule).
FP8_KV_MIN_CC = (8, 9)


class PlanError(FleetError):
    """Input the planner cannot plan with (unknown model, unparsable GPU spec, bad option)."""


class PlanOptions(serve_options.model("ServeOptions", serve_options.plan_rows(), remedy_separator="; ")):
    """Everything a user may choose. The serve options are inherited: one field per row of the
    table in vllm_fleet/planner/options.py that is not a secret, named by its setting key, with
    the row's type, default, bounds and check (the same as Settings')."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    vllm_version: str = VLLM_VERSION
    model_path: str | None = None
    extra_args: tuple[str, ...] = ()

    @field_validator("kv_cache_dtype")
    @classmethod
    def _kv_dtype(cls, v: str) -> str:
        return kv.normalize_kv_cache_dtype(v)

    @field_validator("extra_args")
    @classmethod
    def _no_secrets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        secret = serve_options.secret_in(v)
        if secret is not None:
            raise ValueError(f"{secret} must not travel in argv; put it in the service's EnvironmentFile")
        return v


@dataclass(frozen=True)
class Finding:
    """One rule's verdict: a warning, or an error that means "do not deploy"."""

    code: str
    message: str
    remedy: str

    def to_dict(self) -> dict[str, str]:
        """JSON form."""
        return {"code": self.code, "message": self.message, "remedy": self.remedy}


@dataclass(frozen=True)
class Flag:
    """One `vllm serve` argument and why the plan sets it."""

    name: str
    value: str | None
    reason: str

    def argv(self) -> list[str]:
        """The argv words of this flag."""
        return [self.name] if self.value is None else [self.name, self.value]


@dataclass(frozen=True)
class Layout:
    """How the model is split over GPUs."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int
    expert_parallel: bool

    @property
    def world_size(self) -> int:
        """GPUs used."""
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size


@dataclass(frozen=True)
class Overhead:
    """Non-KV, non-weight memory per GPU: which terms are measured and which estimated."""

    non_torch: int
    """Measured (docs/gpu-validation.md, H200, vLLM 0.25): CUDA/NCCL/allocator cost of a process."""
    activations: int
    """Estimate: peak of vLLM's profile_run (dummy forward or dummy sampler run)."""
    cuda_graphs: int
    """Estimate: graph pool for the largest captured batch (0 with --enforce-eager)."""
    margin: int
    """Estimate: MARGIN_FRACTION of the estimated terms (activations + CUDA graphs), calibrated so the
    seed's case comes out conservative; the measured non-torch term gets none."""

    @property
    def total(self) -> int:
        """Sum of the terms."""
        return self.non_torch + self.activations + self.cuda_graphs + self.margin


@dataclass(frozen=True)
class MemoryPerGpu:
    """How one GPU's memory splits, in bytes."""

    total: int
    requested: int
    weights: int
    overhead: Overhead
    available_for_kv: int
    kv_for_max_len: int
    available_is_exact: bool
    """True when --kv-cache-memory-bytes fixes it; False when predicted from the overhead model."""


@dataclass(frozen=True)
class Plan:
    """A complete, printable plan."""

    model: str
    hardware: str
    gpu_count: int
    vllm_version: str
    layout: Layout
    attention: str
    kv_cache_dtype: str
    block_size: int
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    max_model_len_source: str
    max_model_len_that_fits: int
    model_max_len: int
    kv_cache_bytes_per_token_per_gpu: int
    kv_capacity_tokens: int
    memory_per_gpu: MemoryPerGpu
    weights_bytes: int
    flags: tuple[Flag, ...]
    env: dict[str, str]
    env_reasons: dict[str, str]
    warnings: tuple[Finding, ...]
    errors: tuple[Finding, ...]
    model_path: str = ""
    """The model word of the argv: a directory on the host, or the repo id vLLM resolves."""
    served_model_name: str = ""
    """The id clients send in `model` (--served-model-name)."""
    reasoning_parser: str | None = None
    """The reasoning parser served (--reasoning-parser), None without one."""

    @property
    def argv(self) -> list[str]:
        """The exact `vllm serve` argv (no secrets: vLLM reads VLLM_API_KEY from the env)."""
        words = ["vllm", "serve"]
        for flag in self.flags:
            words += flag.argv()
        return words

    @property
    def ok(self) -> bool:
        """True when nothing stops a deploy."""
        return not self.errors

    @property
    def none_fits(self) -> bool:
        """"auto" found no length that fits: max_model_len (and its flag) is a placeholder, not a value to show."""
        return self.max_model_len_source == NONE_FITS

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON document of `vllm-fleet plan --json`."""
        mem = self.memory_per_gpu
        return {
            "model": self.model,
            "hardware": self.hardware,
            "gpu_count": self.gpu_count,
            "vllm_version": self.vllm_version,
            "ok": self.ok,
            "layout": {
                "tensor_parallel_size": self.layout.tensor_parallel_size,
                "pipeline_parallel_size": self.layout.pipeline_parallel_size,
                "data_parallel_size": self.layout.data_parallel_size,
                "expert_parallel": self.layout.expert_parallel,
            },
            "attention": self.attention,
            "kv_cache_dtype": self.kv_cache_dtype,
            "block_size": self.block_size,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_num_seqs": self.max_num_seqs,
            "kv_cache_bytes_per_token_per_gpu": self.kv_cache_bytes_per_token_per_gpu,
            "kv_cache_bytes_per_gpu": mem.kv_for_max_len,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "max_model_len": self.max_model_len,
            "max_model_len_source": self.max_model_len_source,
            "max_model_len_that_fits": self.max_model_len_that_fits,
            "model_max_len": self.model_max_len,
            "memory_per_gpu_bytes": {
                "total": mem.total,
                "requested": mem.requested,
                "weights": mem.weights,
                "overhead": mem.overhead.total,
                "overhead_terms": {
                    "non_torch_measured": mem.overhead.non_torch,
                    "activations_estimated": mem.overhead.activations,
                    "cuda_graphs_estimated": mem.overhead.cuda_graphs,
                    "margin_estimated": mem.overhead.margin,
                },
                "available_for_kv": mem.available_for_kv,
                "available_for_kv_exact": mem.available_is_exact,
            },
            "weights_bytes": self.weights_bytes,
            "argv": self.argv,
            "env": dict(self.env),
            "flags": [{"flag": f.name, "value": f.value, "reason": f.reason} for f in self.flags],
            "warnings": [w.to_dict() for w in self.warnings],
            "errors": [e.to_dict() for e in self.errors],
        }

    def to_json(self) -> str:
        """`to_dict` as indented, key-stable JSON."""
        return json.dumps(self.to_dict(), indent=2)


# --- overhead model (docs/planner.md, "Overhead") --------------------------------------

NON_TORCH_TP1 = int(0.79 * GiB)
"""Measured: requested minus available KV for the tiny model at TP=1 on H200 (0.62-0.79 GiB over 7 runs,
two of them through the toolkit's rendered launch: docs/gpu-validation.md)."""
NON_TORCH_MULTI = int(1.11 * GiB)
"""Measured: the same at TP=2 (NCCL, custom all-reduce; 1.05-1.11 GiB over 4 runs, TP+EP included);
assumed for larger TP too (not measured)."""
MARGIN_FRACTION = 0.5
"""Estimate: half the estimated terms (activations + CUDA graphs); the measured non-torch term
needs none. On H200 with vLLM 0.25 the model's terms alone predict the available KV memory to
within 0.1 GiB, on the conservative side (docs/gpu-validation.md; a margin of 3 % of GPU memory,
used until then, made those predictions 6 % low). 0.5 keeps the seed's 4xA800 case
conservative: 9.07 GiB predicted where vLLM had 9.38."""
SAMPLER_BYTES_PER_LOGIT = 26
"""Estimate: bf16 logits (2) + fp32 copy (4) + sorted values (4) + int64 sort indices (8) +
probs (4) + cumulative sum (4) live at the peak of the dummy top-k/top-p sampler run."""
CUDAGRAPH_CAPTURE_TOKENS = 512
"""vLLM default max_cudagraph_capture_size: min(max_num_seqs * 2, 512) (vllm/config/vllm.py)."""


def _activation_bytes_per_token(arch: Architecture, layout: Layout) -> int:
    """Estimated live bytes per token at the peak of one decoder layer's forward."""
    tp = layout.tensor_parallel_size
    act = 6 * arch.hidden_size * 2  # residual, normed input, attention out, MLP out, 2 temporaries
    if arch.attention is AttentionKind.MLA:
        act += (arch.num_attention_heads // tp) * (arch.qk_nope_head_dim + arch.qk_rope_head_dim + arch.v_head_dim) * 2
    else:
        act += (arch.num_attention_heads // tp + 2 * kv.kv_heads_per_rank(arch, tp)) * arch.head_dim * 2
    if arch.moe is not None:
        inter = arch.moe.intermediate_size if layout.expert_parallel else arch.moe.intermediate_size // tp
        # fused_moe workspaces: gate_up (2I), activation (I), down (hidden) per routed copy.
        act += arch.moe.experts_per_token * (3 * inter + arch.hidden_size) * 2
    else:
        act += 3 * (arch.intermediate_size // tp) * 2
    return act


def estimate_overhead(
    arch: Architecture, layout: Layout, max_num_batched_tokens: int, max_num_seqs: int, eager: bool
) -> Overhead:
    """The documented overhead model (docs/planner.md)."""
    per_token = _activation_bytes_per_token(arch, layout)
    forward = max_num_batched_tokens * per_token
    sampler = min(max_num_seqs, max_num_batched_tokens) * arch.vocab_size * SAMPLER_BYTES_PER_LOGIT
    graphs = 0 if eager else min(CUDAGRAPH_CAPTURE_TOKENS, max_num_seqs * 2) * per_token
    non_torch = NON_TORCH_TP1 if layout.world_size == 1 else NON_TORCH_MULTI
    activations = max(forward, sampler)
    return Overhead(non_torch, activations, graphs, int((activations + graphs) * MARGIN_FRACTION))


def weights_per_gpu(profile: Profile, layout: Layout) -> int:
    """Checkpoint bytes one GPU holds, from the architecture's parts scaled to the real total."""
    parts = weight_parts(profile.arch)
    tp, pp = layout.tensor_parallel_size, layout.pipeline_parallel_size
    ep = layout.tensor_parallel_size * layout.data_parallel_size if layout.expert_parallel else tp
    emb_share = parts.embeddings if pp == 1 else parts.embeddings // 2
    per_gpu = (parts.attention + parts.dense_mlp) / (tp * pp) + parts.experts / (ep * pp)
    per_gpu += emb_share / tp + parts.replicated / pp
    # Scale by real checkpoint size / computed size (safetensors sizes are authoritative).
    scale = profile.weights_bytes / parts.total if parts.total else 1.0
    return int(per_gpu * scale)


# --- rules -----------------------------------------------------------------------------


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _fp8_block_problems(arch: Architecture, tp: int, ep: bool) -> list[str]:
    """Weights whose per-rank shard is not a whole number of FP8 blocks (vLLM
    fp8_utils.validate_fp8_block_shape and the fused-MoE equivalent)."""
    q = arch.quantization
    if q is None or not q.is_fp8 or q.weight_block_size is None or tp == 1:
        return []
    bn, bk = q.weight_block_size
    out: list[str] = []
    if arch.moe is not None and not ep:
        inter = arch.moe.intermediate_size
        if inter % tp or (inter // tp) % bk or (inter // tp) % bn:
            # vllm/model_executor/layers/quantization/fp8.py Fp8MoEMethod.create_weights
            out.append(
                f"expert intermediate size {inter}/{tp}={inter / tp:g} is not divisible by the FP8 block {bn} "
                f"(vLLM: \"The output_size of gate's and up's weight = {inter // tp} is not divisible by "
                f"weight quantization block_n = {bn}\")"
            )
    if arch.attention is not AttentionKind.MLA:
        qd = arch.num_attention_heads * arch.head_dim
        if qd % tp == 0 and (qd // tp) % bn:
            out.append(f"attention q/o width {qd}/{tp}={qd // tp} is not divisible by the FP8 block {bn}")
        kvd = arch.num_kv_heads * arch.head_dim
        if arch.num_kv_heads >= tp and kvd % tp == 0 and (kvd // tp) % bn:
            out.append(f"attention k/v width {kvd}/{tp}={kvd // tp} is not divisible by the FP8 block {bn}")
    if arch.intermediate_size and (arch.moe is None or arch.moe.first_dense_layers):
        inter = arch.intermediate_size
        if inter % tp == 0 and (inter // tp) % bk:
            out.append(f"dense MLP width {inter}/{tp}={inter // tp} is not divisible by the FP8 block {bk}")
    return out


def _head_problems(arch: Architecture, tp: int) -> list[str]:
    out = []
    if arch.num_attention_heads % tp:
        out.append(f"{arch.num_attention_heads} attention heads are not divisible by TP={tp}")
    if arch.attention is not AttentionKind.MLA and arch.num_kv_heads % tp and tp % arch.num_kv_heads:
        out.append(f"{arch.num_kv_heads} KV heads and TP={tp}: neither divides the other")
    return out


def _good_tp(arch: Architecture, gpus: int, ep: bool) -> list[int]:
    return [t for t in _divisors(gpus) if not _head_problems(arch, t) and not _fp8_block_problems(arch, t, ep)]


# --- the plan --------------------------------------------------------------------------


def _load(model: str | Path, hardware: Hardware | str) -> tuple[Profile, Hardware]:
    try:
        profile = load_profile(model)
        hw = parse_gpu_spec(hardware) if isinstance(hardware, str) else hardware
    except (ModelInfoError, HardwareError) as exc:
        raise PlanError(str(exc)) from exc
    return profile, hw


def _batch_defaults(hw: Hardware, options: PlanOptions) -> tuple[int, int]:
    """vllm/engine/arg_utils.py defaults for the OpenAI server: 8192 tokens / 1024 seqs on
    GPUs with >= 70 GiB whose name lacks "a100", else 2048 / 256."""
    big = hw.min_memory_bytes >= 70 * GiB and not any("A100" in n.upper() for n in hw.names)
    tokens, seqs = (8192, 1024) if big else (2048, 256)
    return options.max_num_batched_tokens or tokens, options.max_num_seqs or seqs


def _layout(profile: Profile, hw: Hardware, options: PlanOptions) -> Layout:
    pp, dp = options.pipeline_parallel_size, options.data_parallel_size
    tp = options.tensor_parallel_size or max(1, hw.count // (pp * dp))
    ep = options.enable_expert_parallel
    if ep is None:
        moe = profile.arch.moe is not None
        if profile.expert_parallel in ("always", "never"):
            ep = moe and profile.expert_parallel == "always"
        else:
            ep = moe and (dp > 1 or bool(_fp8_block_problems(profile.arch, tp, False)))
    return Layout(tp, pp, dp, ep)


def served_model_name(profile: Profile, setting: str | None) -> str:
    """The id clients send as `model`: vllm_served_model_name when set, else the profile's name."""
    return setting or profile.name


def make_plan(model: str | Path, hardware: Hardware | str, options: PlanOptions | None = None) -> Plan:
    """Plan `model` on `hardware`: layout, memory per GPU, max length, flags, findings."""
    options = options or PlanOptions()
    profile, hw = _load(model, hardware)
    arch = profile.arch
    layout = _layout(profile, hw, options)
    tp = layout.tensor_parallel_size
    errors: list[Finding] = []
    warnings: list[Finding] = []

    if layout.world_size > hw.count:
        errors.append(Finding(
            "NOT_ENOUGH_GPUS",
            f"TP={tp} x PP={layout.pipeline_parallel_size} x DP={layout.data_parallel_size} needs "
            f"{layout.world_size} GPUs; the hardware has {hw.count}.",
            f"lower vllm_tensor_parallel_size / vllm_pipeline_parallel_size / vllm_data_parallel_size to fit {hw.count} GPUs, "
            "or select more with vllm_gpus.",
        ))
    elif layout.world_size < hw.count:
        warnings.append(Finding(
            "GPUS_UNUSED",
            f"the layout uses {layout.world_size} of {hw.count} GPUs.",
            "raise vllm_tensor_parallel_size or vllm_data_parallel_size to use them, or leave them for other work.",
        ))
    if len(hw.names) > 1:
        warnings.append(Finding(
            "MIXED_GPUS", f"mixed GPUs ({hw.describe()}); vLLM sizes every rank like the smallest.",
            "select identical GPUs with vllm_gpus for predictable memory.",
        ))
    if hw.memory_source == "nominal":
        warnings.append(Finding(
            "NOMINAL_MEMORY", f"{hw.names[0]} memory is the vendor's nominal size, not a measured CUDA total.",
            "plan with host facts (vllm-fleet reads nvidia-smi) for exact figures.",
        ))
    if profile.min_vllm_version and _version_tuple(options.vllm_version) < _version_tuple(profile.min_vllm_version):
        errors.append(Finding(
            "VLLM_TOO_OLD",
            f"{profile.name} needs vLLM >= {profile.min_vllm_version}; the plan targets {options.vllm_version} "
            f"(older vLLM says '{profile.architecture} is not currently supported').",
            f"set vllm_version = \"{VLLM_VERSION}\" (the toolkit's pin) or at least {profile.min_vllm_version}.",
        ))
    for problem in _head_problems(arch, tp):
        good = _good_tp(arch, hw.count, layout.expert_parallel)
        errors.append(Finding("TP_HEADS", f"{problem}; vLLM cannot split attention this way.",
                              f"set vllm_tensor_parallel_size to {', '.join(map(str, good)) or 'a divisor of the heads'}."))
    if arch.attention is not AttentionKind.MLA and tp > arch.num_kv_heads:
        warnings.append(Finding(
            "KV_REPLICATED",
            f"TP={tp} exceeds the {arch.num_kv_heads} KV heads: each rank keeps a replicated KV head, "
            f"so KV memory per token does not shrink beyond TP={arch.num_kv_heads}.",
            "prefer data parallel (+ expert parallel for MoE) over TP beyond the KV head count.",
        ))
    for problem in _fp8_block_problems(arch, tp, layout.expert_parallel):
        alternatives = [f"vllm_tensor_parallel_size = {t}" for t in _good_tp(arch, hw.count, False) if t > 1]
        alternatives += [f"vllm_enable_expert_parallel = True (TP{tp}+EP: experts stay whole)",
                         f"vllm_tensor_parallel_size = 1 with vllm_data_parallel_size = {hw.count} and expert parallel (DP{hw.count}+EP)"]
        errors.append(Finding(
            "FP8_BLOCK_TP",
            f"{problem}: vLLM refuses to shard block-quantized FP8 weights this way at TP={tp}.",
            f"set one of: {'; '.join(alternatives)}.",
        ))
    q = arch.quantization
    if q is not None and q.is_fp8 and hw.min_compute_capability < (8, 9):
        cc = "%d.%d" % hw.min_compute_capability
        warnings.append(Finding(
            "FP8_WEIGHT_ONLY",
            f"FP8 weights on compute capability {cc} (< 8.9, no FP8 tensor cores): vLLM falls back to "
            "weight-only FP8 through the Marlin kernel. It works but is slower; SGLang does not run it.",
            "accept the slower kernels, or use GPUs with compute capability >= 8.9 (L40S, H100/H800/H200, B200).",
        ))

    if options.kv_cache_dtype.startswith("fp8") and hw.min_compute_capability < FP8_KV_MIN_CC:
        cc = "%d.%d" % hw.min_compute_capability
        errors.append(Finding(
            "FP8_KV_UNSUPPORTED",
            f"vllm_kv_cache_dtype = {options.kv_cache_dtype} on compute capability {cc}: vLLM {options.vllm_version}'s "
            "attention backends need SM89+ for an FP8 KV cache (flash_attn.py supports_kv_cache_dtype, "
            "triton_attn.py raises \"FP8 KV cache is not supported by the Triton attention backend\").",
            "set vllm_kv_cache_dtype = \"auto\" (the model's dtype) and a shorter vllm_max_model_len, or use GPUs "
            "with compute capability >= 8.9.",
        ))

    tokens, seqs = _batch_defaults(hw, options)
    block = options.block_size or kv.DEFAULT_BLOCK_SIZE
    layout_kv = kv.layout_for(arch, tensor_parallel_size=tp, pipeline_parallel_size=layout.pipeline_parallel_size,
                              kv_cache_dtype=options.kv_cache_dtype, block_size=block)
    total = hw.min_memory_bytes
    requested = math.ceil(total * options.gpu_memory_utilization)  # gpu_worker.py request_memory
    weights = weights_per_gpu(profile, layout)
    overhead = estimate_overhead(arch, layout, tokens, seqs, options.enforce_eager)
    exact = options.kv_cache_memory_bytes is not None
    available = options.kv_cache_memory_bytes if exact else requested - weights - overhead.total
    if weights > requested:
        errors.append(Finding(
            "MODEL_TOO_LARGE",
            f"weights need {kv.format_gib(weights)} GiB per GPU at TP={tp} x PP={layout.pipeline_parallel_size}; "
            f"gpu_memory_utilization {options.gpu_memory_utilization} allows {kv.format_gib(requested)} GiB.",
            "spread the model over more GPUs (raise vllm_tensor_parallel_size / vllm_pipeline_parallel_size, or "
            "vllm_gpu_memory_utilization), or use a smaller/quantized variant (vllm_model).",
        ))

    model_max = arch.max_position_embeddings
    upper = model_max if options.max_model_len == "auto" else int(options.max_model_len)
    if options.max_model_len != "auto" and upper > model_max:
        errors.append(Finding(
            "MAX_LEN_ABOVE_MODEL",
            f"vllm_max_model_len {upper} exceeds the model's maximum ({model_max}, max_position_embeddings).",
            f"set vllm_max_model_len = {model_max} or less, or \"auto\".",
        ))
    fits = layout_kv.estimate_max_model_len(max(available, 0), upper, tokens) if available > 0 else 0
    if available <= 0:
        errors.append(Finding(
            "NO_KV_MEMORY",
            f"no memory left for the KV cache: {kv.format_gib(requested)} GiB requested, weights "
            f"{kv.format_gib(weights)} GiB + overhead {kv.format_gib(overhead.total)} GiB per GPU.",
            "raise vllm_gpu_memory_utilization, use more GPUs (vllm_tensor_parallel_size), or set vllm_kv_cache_memory_bytes.",
        ))
    if exact and weights + overhead.total + options.kv_cache_memory_bytes > total:
        errors.append(Finding(
            "KV_BYTES_ABOVE_GPU",
            f"vllm_kv_cache_memory_bytes {options.kv_cache_memory_bytes:,} ({kv.format_gib(options.kv_cache_memory_bytes)} GiB) "
            f"plus weights {kv.format_gib(weights)} GiB and overhead {kv.format_gib(overhead.total)} GiB is more than "
            f"one GPU's {kv.format_gib(total)} GiB.",
            f"set vllm_kv_cache_memory_bytes to at most {max(0, total - weights - overhead.total):,}, or leave it unset "
            "(vllm_gpu_memory_utilization sizes the KV cache).",
        ))
    useful = min(MIN_USEFUL_MAX_MODEL_LEN, model_max)
    if options.max_model_len == "auto":
        chosen = max(fits, 1)
        source = ("auto: the model's maximum" if fits >= model_max else
                  "auto: the largest that fits (planner estimate)" if fits > 0 else NONE_FITS)
        if available > 0 and fits < useful:
            errors.append(Finding(
                "FITS_TOO_SHORT",
                f"the longest context that fits is {fits} tokens, below the useful minimum of {useful} "
                f"(MIN_USEFUL_MAX_MODEL_LEN: a system prompt, a question and an answer; shorter, ordinary chat "
                "requests fail with 'maximum context length' errors).",
                "free KV memory: raise vllm_gpu_memory_utilization, use more GPUs (vllm_tensor_parallel_size), "
                "set vllm_kv_cache_dtype = \"fp8\", or lower vllm_max_num_batched_tokens / vllm_max_num_seqs.",
            ))
    else:
        chosen, source = upper, "requested"
        if upper < useful:
            # Not an error: a length the user sets is theirs (a classifier, short prompts, a test), unlike "auto"
            # calling a layout deployable when what fits is too short.
            warnings.append(Finding(
                "MAX_LEN_SHORT",
                f"vllm_max_model_len {upper} is below the useful minimum of {useful} tokens (MIN_USEFUL_MAX_MODEL_LEN: "
                "a system prompt, a question and an answer); ordinary chat requests will fail with 'maximum context "
                "length' errors.",
                f"set vllm_max_model_len to {useful} or more, or \"auto\"; keep it only if every request is that short.",
            ))
        short = kv.check_enough_kv_cache_memory(layout_kv, available, upper, tokens) if available > 0 else None
        if short is not None:
            errors.append(Finding("KV_DOES_NOT_FIT", short.message(), _fit_remedy(
                short, profile, layout, hw, options, weights, overhead, requested, total, tokens)))

    kv_for_len = layout_kv.max_memory_usage_bytes(chosen, tokens)
    capacity, _ = layout_kv.capacity(max(available, 0), chosen, tokens)
    memory = MemoryPerGpu(total, requested, weights, overhead, available, kv_for_len, exact)

    for issue in profile.known_issues:
        if issue.when_expert_parallel and layout.expert_parallel and not options.cudagraph_piecewise:
            warnings.append(Finding(f"KNOWN_ISSUE_{issue.key.upper()}", issue.description, issue.remedy))

    flags = _flags(profile, layout, options, chosen, source)
    env, env_reasons = _env(options)
    return Plan(
        model=profile.name, hardware=hw.describe(), gpu_count=hw.count, vllm_version=options.vllm_version,
        layout=layout, attention=arch.attention.value, kv_cache_dtype=options.kv_cache_dtype, block_size=block,
        max_num_batched_tokens=tokens, max_num_seqs=seqs, max_model_len=chosen, max_model_len_source=source,
        max_model_len_that_fits=fits, model_max_len=model_max,
        kv_cache_bytes_per_token_per_gpu=layout_kv.bytes_per_token(), kv_capacity_tokens=capacity,
        memory_per_gpu=memory, weights_bytes=profile.weights_bytes, flags=tuple(flags), env=env,
        env_reasons=env_reasons, warnings=tuple(warnings), errors=tuple(errors),
        model_path=_model_path(profile, options), served_model_name=served_model_name(profile, options.served_model_name),
        reasoning_parser=_reasoning_parser(profile, options),
    )


def _fit_remedy(short: kv.KVShortfall, profile: Profile, layout: Layout, hw: Hardware, options: PlanOptions,
                weights: int, overhead: Overhead, requested: int, total: int, tokens: int) -> str:
    """What would make the requested length fit: the length that does, a utilization, fp8 KV."""
    ways = [f"vllm_max_model_len = {short.estimated_max_len}" if short.estimated_max_len
            else "more GPUs (a higher vllm_tensor_parallel_size)"]
    if options.kv_cache_memory_bytes is None:
        util = (weights + overhead.total + short.needed) / total
        if util <= 0.98:
            ways.append(f"vllm_gpu_memory_utilization = {math.ceil(util * 100) / 100:.2f}")
    if options.kv_cache_dtype == "auto" and profile.arch.dtype_bytes > 1 and hw.min_compute_capability >= FP8_KV_MIN_CC:
        fp8 = kv.layout_for(profile.arch, tensor_parallel_size=layout.tensor_parallel_size,
                            pipeline_parallel_size=layout.pipeline_parallel_size, kv_cache_dtype="fp8",
                            block_size=options.block_size or kv.DEFAULT_BLOCK_SIZE)
        if fp8.max_memory_usage_bytes(short.max_model_len, tokens) <= short.available:
            ways.append("vllm_kv_cache_dtype = \"fp8\" (halves KV memory; small accuracy cost)")
    return "set " + ", or ".join(ways) + "."


def _model_path(profile: Profile, options: PlanOptions) -> str:
    """What `vllm serve` is given as the model: the host's directory, the profile's local dir or repo id."""
    return options.model_path or (str(profile.local_path) if profile.local_path else profile.hf_repo or profile.name)


def _flags(profile: Profile, layout: Layout, options: PlanOptions, max_len: int, source: str) -> list[Flag]:
    """The argv after `vllm serve`, each with its reason; spellings from the options table."""
    f = serve_options.flag
    flags = [
        Flag(_model_path(profile, options), None, "the model: a local snapshot directory or the HF repo id vLLM resolves"),
        Flag(f("served_model_name"), served_model_name(profile, options.served_model_name), "the id clients send in `model`"),
        Flag(f("bind_host"), options.bind_host, "listen address"),
        Flag(f("port"), str(options.port), "listen port"),
        Flag(f("tensor_parallel_size"), str(layout.tensor_parallel_size), "GPUs each model replica is split over"),
    ]
    if layout.pipeline_parallel_size > 1:
        flags.append(Flag(f("pipeline_parallel_size"), str(layout.pipeline_parallel_size), "layers split over stages"))
    if layout.data_parallel_size > 1:
        flags.append(Flag(f("data_parallel_size"), str(layout.data_parallel_size), "independent attention replicas"))
    if layout.expert_parallel:
        why = "requested" if options.enable_expert_parallel else (
            "experts stay whole per rank: the FP8 block rule forbids splitting them at this TP"
            if _fp8_block_problems(profile.arch, layout.tensor_parallel_size, False)
            else "MoE experts are distributed across ranks")
        flags.append(Flag(f("enable_expert_parallel"), None, why))
    flags.append(Flag(f("max_model_len"), str(max_len), source))
    flags.append(Flag(f("gpu_memory_utilization"), f"{options.gpu_memory_utilization:g}", "fraction of each GPU vLLM may use"))
    flags += [Flag(name, value, reason) for name, value, reason in serve_options.free_flags(options)]
    if profile.trust_remote_code:
        flags.append(Flag(serve_options.TRUST_REMOTE_CODE, None, "the checkpoint ships custom code that vLLM must load"))
    if profile.tool_call_parser:
        flags.append(Flag("--enable-auto-tool-choice", None, "let the model decide when to call tools"))
        flags.append(Flag("--tool-call-parser", profile.tool_call_parser, "parses this model's tool-call format"))
    reasoning = _reasoning_parser(profile, options)
    if reasoning:
        flags.append(Flag(f("reasoning_parser"), reasoning, "profile default" if not options.reasoning_parser else "requested"))
    if options.cudagraph_piecewise:
        flags.append(Flag(f("cudagraph_piecewise"), PIECEWISE_CONFIG,
                          "known issue: full CUDA graphs crash with an illegal memory access; PIECEWISE avoids it"))
    for word in options.extra_args:
        flags.append(Flag(word, None, "extra argument given by the user"))
    return flags


def _reasoning_parser(profile: Profile, options: PlanOptions) -> str | None:
    """The reasoning parser served: the requested one (checked against the profile's), else the profile's."""
    reasoning = options.reasoning_parser or profile.reasoning_parser
    if reasoning:
        allowed = {profile.reasoning_parser, *profile.reasoning_parsers}
        if options.reasoning_parser and profile.reasoning_parsers and reasoning not in allowed:
            raise PlanError(f"reasoning parser {reasoning!r} is not one of {sorted(a for a in allowed if a)} for {profile.name}.")
    return reasoning or None


def _env(options: PlanOptions) -> tuple[dict[str, str], dict[str, str]]:
    """The service's environment from the plan, with a reason per variable.

    Beyond the three that stop usage reporting and buffering, the plan sets only what a setting
    asks for: by default NCCL, PyTorch, NVSHMEM and vLLM keep their own choices (NVLink multicast
    where the GPUs and the fabric have it, vLLM's choice of sampler). The host's facts (GPU names,
    memory, compute capability) cannot tell whether multicast works, so the plan never switches it
    off by itself.
    """
    values = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
    reasons = {
        "VLLM_NO_USAGE_STATS": "no usage reporting from servers",
        "DO_NOT_TRACK": "no usage reporting from servers",
        "PYTHONUNBUFFERED": "log lines reach the journal as they happen",
    }
    if not options.flashinfer_sampler:
        values["VLLM_USE_FLASHINFER_SAMPLER"] = "0"
        reasons["VLLM_USE_FLASHINFER_SAMPLER"] = "vllm_flashinfer_sampler = False: top-k/top-p sampling in PyTorch, not FlashInfer"
    if not options.nvlink_multicast:
        for key, (value, what) in MULTICAST_OFF_ENV.items():
            values[key] = value
            reasons[key] = f"vllm_nvlink_multicast = False: {what} off"
    return values, reasons


def options_from(**kwargs: Any) -> PlanOptions:
    """PlanOptions from loose values, turning pydantic's errors into one PlanError."""
    try:
        return PlanOptions(**{k: v for k, v in kwargs.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise PlanError(f"option {where}={first.get('input')!r}: {first['msg']}.") from exc
