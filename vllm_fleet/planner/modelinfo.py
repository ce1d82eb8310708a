"""Model facts: profiles (models/*.yaml) and the architecture read from a HF config.json.

A profile is the toolkit's knowledge about one model: where to download it
(HF / ModelScope repo ids), the minimum vLLM that serves it, its recommended
serve flags and known issues, and a `config` block holding the fields of the
model's own config.json that the planner needs. Both a profile's `config` block
and a real config.json go through the same parser (`Architecture.from_hf_config`).
"""

from __future__ import annotations

import difflib
import functools
import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from vllm_fleet.errors import FleetError

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "half": 2, "float": 4}


class ModelInfoError(FleetError):
    """A model name, profile or config.json the planner cannot use."""


class AttentionKind(str, Enum):
    """How a model's attention stores its KV cache (decides vLLM's KV spec)."""

    STANDARD = "standard"
    """Multi-head: one KV head per query head."""
    GQA = "gqa"
    """Grouped-query: fewer KV heads than query heads."""
    MLA = "mla"
    """Multi-head latent (DeepSeek-V3, Kimi-K2): one compressed latent per token, not split by TP."""
    SLIDING_WINDOW = "sliding_window"
    """Some or all layers attend only to the last `sliding_window` tokens (gpt-oss)."""


@dataclass(frozen=True)
class Quantization:
    """The checkpoint's `quantization_config`, as far as the planner needs it."""

    method: str
    """`fp8`, `mxfp4`, `awq`, ... (`quant_method`)."""
    weight_block_size: tuple[int, int] | None = None
    """[block_n, block_k] of block-wise FP8 (e.g. [128, 128]); None for per-tensor/channel."""
    modules_to_not_convert: tuple[str, ...] = ()

    @property
    def is_fp8(self) -> bool:
        """True for FP8 weights (which need compute capability >= 8.9 to run natively)."""
        return self.method.startswith("fp8")


@dataclass(frozen=True)
class MoE:
    """Mixture-of-experts sizes."""

    num_experts: int
    experts_per_token: int
    intermediate_size: int
    """Per-expert FFN width (`moe_intermediate_size`, or `intermediate_size` for MiniMax-M2)."""
    num_shared_experts: int = 0
    first_dense_layers: int = 0
    """Leading layers with a dense MLP instead of experts (DeepSeek `first_k_dense_replace`)."""


@dataclass(frozen=True)
class Architecture:
    """What vLLM's memory arithmetic needs to know about a model, from its config.json."""

    architecture: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    dtype: str
    attention: AttentionKind
    intermediate_size: int = 0
    """Dense MLP width (used by dense layers only)."""
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    q_lora_rank: int = 0
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    """Per-layer `full_attention` / `sliding_attention` (gpt-oss); empty when all full."""
    quantization: Quantization | None = None
    moe: MoE | None = None
    tie_word_embeddings: bool = False

    @property
    def dtype_bytes(self) -> int:
        """Bytes per element of the model dtype (what `--kv-cache-dtype auto` uses)."""
        return DTYPE_BYTES[self.dtype]

    @property
    def mla_head_size(self) -> int:
        """Latent cache width per token and layer: kv_lora_rank + qk_rope_head_dim (576 for DeepSeek-V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_sliding(self, layer: int) -> bool:
        """Whether layer `layer` uses sliding-window attention."""
        if self.sliding_window is None:
            return False
        if not self.layer_types:
            return True
        return self.layer_types[layer] == "sliding_attention"

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], where: str = "config") -> "Architecture":
        """Read the fields vLLM uses from a HF config.json dict (text config of multimodal models too)."""
        cfg = dict(cfg.get("text_config") or {}, **{k: v for k, v in cfg.items() if k != "text_config"})

        def need(*keys: str) -> Any:
            for key in keys:
                if cfg.get(key) is not None:
                    return cfg[key]
            raise ModelInfoError(f"{where}: missing {' / '.join(keys)}; cannot size the KV cache without it.")

        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        layers = int(need("num_hidden_layers"))
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
        if dtype not in DTYPE_BYTES:
            raise ModelInfoError(f"{where}: unsupported dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}.")
        kv_lora_rank = int(cfg.get("kv_lora_rank") or 0)
        window = cfg.get("sliding_window")
        layer_types = tuple(cfg.get("layer_types") or ())
        use_window = window is not None and cfg.get("use_sliding_window", True) is not False
        if layer_types and "sliding_attention" not in layer_types:
            use_window = False
        if layer_types and len(layer_types) != layers:
            raise ModelInfoError(f"{where}: layer_types has {len(layer_types)} entries for {layers} layers.")
        if kv_lora_rank:
            kind = AttentionKind.MLA
        elif use_window:
            kind = AttentionKind.SLIDING_WINDOW
        elif kv_heads < heads:
            kind = AttentionKind.GQA
        else:
            kind = AttentionKind.STANDARD
        return cls(
            architecture=str((cfg.get("architectures") or ["unknown"])[0]),
            num_layers=layers,
            num_attention_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            hidden_size=hidden,
            vocab_size=int(need("vocab_size")),
            max_position_embeddings=int(need("max_position_embeddings")),
            dtype=dtype,
            attention=kind,
            intermediate_size=int(cfg.get("intermediate_size") or 0),
            kv_lora_rank=kv_lora_rank,
            qk_rope_head_dim=int(cfg.get("qk_rope_head_dim") or 0),
            qk_nope_head_dim=int(cfg.get("qk_nope_head_dim") or 0),
            v_head_dim=int(cfg.get("v_head_dim") or 0),
            q_lora_rank=int(cfg.get("q_lora_rank") or 0),
            sliding_window=int(window) if use_window else None,
            layer_types=layer_types if use_window else (),
            quantization=_quantization(cfg.get("quantization_config")),
            moe=_moe(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


def _quantization(qc: dict[str, Any] | None) -> Quantization | None:
    if not qc:
        return None
    block = qc.get("weight_block_size")
    return Quantization(
        method=str(qc.get("quant_method", "unknown")),
        weight_block_size=(int(block[0]), int(block[1])) if block else None,
        modules_to_not_convert=tuple(qc.get("modules_to_not_convert") or ()),
    )


def _moe(cfg: dict[str, Any]) -> MoE | None:
    experts = cfg.get("num_local_experts") or cfg.get("n_routed_experts") or cfg.get("num_experts")
    if not experts:
        return None
    return MoE(
        num_experts=int(experts),
        experts_per_token=int(cfg.get("num_experts_per_tok") or 1),
        intermediate_size=int(cfg.get("moe_intermediate_size") or cfg.get("intermediate_size")),
        num_shared_experts=int(cfg.get("n_shared_experts") or 0),
        first_dense_layers=int(cfg.get("first_k_dense_replace") or 0),
    )


@dataclass(frozen=True)
class KnownIssue:
    """A documented failure and the switch that avoids it."""

    key: str
    description: str
    remedy: str
    when_expert_parallel: bool = False
    """Only relevant when expert parallelism is on (how the seed hit it)."""


@dataclass(frozen=True)
class Profile:
    """Everything the toolkit knows about one model."""

    name: str
    architecture: str
    arch: Architecture
    hf_repo: str | None = None
    modelscope_repo: str | None = None
    revision: str | None = None
    min_vllm_version: str | None = None
    trust_remote_code: bool = False
    weights_bytes: int = 0
    """Total checkpoint size (download and disk sizing; per-GPU weights derive from it)."""
    weights_bytes_source: str = "computed from the architecture"
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    reasoning_parsers: tuple[str, ...] = ()
    enable_auto_tool_choice: bool = False
    expert_parallel: str = "auto"
    """`auto` (planner decides from the layout), `always` or `never`."""
    known_issues: tuple[KnownIssue, ...] = ()
    local_path: Path | None = None
    """Set when the model was given as a directory/config.json rather than a profile name."""


def list_profiles() -> list[str]:
    """Names of the profiles in models/ (file stems), sorted."""
    return sorted(p.stem for p in MODELS_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """A profile by name (models/NAME.yaml), by YAML path, or built from a config.json / model dir."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return _profile_from_yaml(path)
    if path.is_dir() or path.name == "config.json":
        return _profile_from_config(path)
    candidate = MODELS_DIR / f"{text}.yaml"
    if "/" not in text and candidate.is_file():
        return _profile_from_yaml(candidate)
    names = list_profiles()
    close = difflib.get_close_matches(text, names, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ModelInfoError(
        f"unknown model {text!r}.{hint} Give a profile name ({', '.join(names)}), "
        "a model directory holding config.json, or a path to a config.json."
    )


@functools.lru_cache(maxsize=64)
def _profile_from_yaml(path: Path) -> Profile:
    """Parse one profile file (cached: profiles do not change while a process runs)."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ModelInfoError(f"profile {path}: not valid YAML ({exc}).") from exc
    if not isinstance(data, dict) or "config" not in data:
        raise ModelInfoError(f"profile {path}: expected a mapping with a `config` block (the model's config.json fields).")
    arch = Architecture.from_hf_config(data["config"], where=f"profile {path.name}")
    flags = data.get("flags") or {}
    issues = tuple(
        KnownIssue(
            key=k,
            description=str(v["description"]).strip(),
            remedy=str(v["remedy"]).strip(),
            when_expert_parallel=bool(v.get("when_expert_parallel", False)),
        )
        for k, v in (data.get("known_issues") or {}).items()
    )
    weights = data.get("weights_bytes")
    return Profile(
        name=str(data.get("name") or path.stem),
        architecture=arch.architecture,
        arch=arch,
        hf_repo=data.get("hf_repo"),
        modelscope_repo=data.get("modelscope_repo"),
        revision=data.get("revision"),
        min_vllm_version=str(data["min_vllm_version"]) if data.get("min_vllm_version") else None,
        trust_remote_code=bool(flags.get("trust_remote_code", False)),
        weights_bytes=int(weights) if weights else estimate_weights_bytes(arch),
        weights_bytes_source=str(data.get("weights_bytes_source") or "computed from the architecture"),
        tool_call_parser=flags.get("tool_call_parser"),
        reasoning_parser=flags.get("reasoning_parser"),
        reasoning_parsers=tuple(flags.get("reasoning_parsers") or ()),
        enable_auto_tool_choice=bool(flags.get("enable_auto_tool_choice", False)),
        expert_parallel=str(flags.get("expert_parallel", "auto")),
        known_issues=issues,
    )


def _profile_from_config(path: Path) -> Profile:
    config = path / "config.json" if path.is_dir() else path
    if not config.is_file():
        raise ModelInfoError(f"{path}: no config.json there; give a model directory or a path to its config.json.")
    try:
        cfg = json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise ModelInfoError(f"{config}: not valid JSON ({exc}).") from exc
    arch = Architecture.from_hf_config(cfg, where=str(config))
    shards = sorted(config.parent.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards)
    return Profile(
        name=config.parent.name,
        architecture=arch.architecture,
        arch=arch,
        weights_bytes=size or estimate_weights_bytes(arch),
        weights_bytes_source="sum of the *.safetensors files" if size else "computed from the architecture",
        local_path=config.parent.resolve(),
    )


# --- weights -------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightParts:
    """Checkpoint bytes by how vLLM shards them."""

    attention: int
    """All layers' attention projections: split by TP (replicated per DP rank)."""
    dense_mlp: int
    """Dense MLP layers and shared experts: split by TP."""
    experts: int
    """Routed experts: split by TP, or by EP size when expert parallelism is on."""
    embeddings: int
    """Input embedding + LM head: vocab-parallel, split by TP."""
    replicated: int
    """Router gates and norms: every rank holds a full copy."""

    @property
    def total(self) -> int:
        """Sum of all parts."""
        return self.attention + self.dense_mlp + self.experts + self.embeddings + self.replicated


def _linear_bytes(rows: int, cols: int, arch: Architecture, module: str) -> int:
    """Bytes of one linear weight stored as the checkpoint's quantization stores it."""
    q = arch.quantization
    if q is None or any(m in module for m in q.modules_to_not_convert):
        return rows * cols * arch.dtype_bytes
    if q.is_fp8:
        scales = 4
        if q.weight_block_size:
            bn, bk = q.weight_block_size
            scales = -(-rows // bn) * -(-cols // bk) * 4
        return rows * cols + scales
    if q.method == "mxfp4":
        # 4-bit values (two per byte) + one 8-bit scale per 32 values.
        return rows * cols // 2 + rows * cols // 32
    return rows * cols * arch.dtype_bytes


def weight_parts(arch: Architecture) -> WeightParts:
    """Estimate checkpoint bytes from the architecture (used when no safetensors sizes are known)."""
    h = arch.hidden_size
    if arch.attention is AttentionKind.MLA:
        qk_head = arch.qk_nope_head_dim + arch.qk_rope_head_dim
        q = (
            _linear_bytes(arch.q_lora_rank, h, arch, "self_attn.q_a_proj")
            + _linear_bytes(arch.num_attention_heads * qk_head, arch.q_lora_rank, arch, "self_attn.q_b_proj")
            if arch.q_lora_rank
            else _linear_bytes(arch.num_attention_heads * qk_head, h, arch, "self_attn.q_proj")
        )
        kv = _linear_bytes(arch.kv_lora_rank + arch.qk_rope_head_dim, h, arch, "self_attn.kv_a_proj") + _linear_bytes(
            arch.num_attention_heads * (arch.qk_nope_head_dim + arch.v_head_dim), arch.kv_lora_rank, arch, "self_attn.kv_b_proj"
        )
        o = _linear_bytes(h, arch.num_attention_heads * arch.v_head_dim, arch, "self_attn.o_proj")
        attn_layer = q + kv + o
    else:
        qd, kvd = arch.num_attention_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        attn_layer = (
            _linear_bytes(qd, h, arch, "self_attn.q_proj")
            + 2 * _linear_bytes(kvd, h, arch, "self_attn.k_proj")
            + _linear_bytes(h, qd, arch, "self_attn.o_proj")
        )
    moe = arch.moe
    dense_layers = arch.num_layers if moe is None else moe.first_dense_layers
    dense = dense_layers * 3 * _linear_bytes(arch.intermediate_size, h, arch, "mlp") if arch.intermediate_size else 0
    experts = replicated = 0
    if moe is not None:
        moe_layers = arch.num_layers - moe.first_dense_layers
        one = 3 * _linear_bytes(moe.intermediate_size, h, arch, "experts")
        experts = moe_layers * moe.num_experts * one
        dense += moe_layers * moe.num_shared_experts * one
        # vLLM builds the router gate unquantized (ReplicatedLinear, quant_config=None).
        replicated = moe_layers * moe.num_experts * h * arch.dtype_bytes
    emb = arch.vocab_size * h * arch.dtype_bytes * (1 if arch.tie_word_embeddings else 2)
    return WeightParts(arch.num_layers * attn_layer, dense, experts, emb, replicated)


def estimate_weights_bytes(arch: Architecture) -> int:
    """Total checkpoint bytes computed from the architecture and its quantization."""
    return weight_parts(arch).total
