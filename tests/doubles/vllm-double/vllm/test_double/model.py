"""Model checks and KV-cache arithmetic of the vLLM TEST DOUBLE.

`load_model` applies the checks real vLLM 0.25 makes before loading weights
(MODEL is a directory with config.json, a supported architecture, custom code
needs --trust-remote-code, max_model_len within the config, attention heads
divisible by TP) and raises `EngineError` carrying vLLM's own error text.
`plan_kv` computes the KV-cache figures vLLM logs: bytes per token per GPU =
2 (K and V) x layers/PP x max(1, kv_heads // TP) x head_dim x dtype bytes;
tokens = KV bytes // (bytes per token x block size) x block size.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

GIB = 1 << 30
DEFAULT_KV_BYTES = 8 * GIB
DEFAULT_BLOCK_SIZE = 16
SUPPORTED_ARCHITECTURES = (
    "MiniMaxM2ForCausalLM",
    "Qwen3MoeForCausalLM",
    "DeepseekV3ForCausalLM",
    "GptOssForCausalLM",
    "Glm4MoeForCausalLM",
    "LlamaForCausalLM",
)
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}

_PYDANTIC_HEAD = "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n  Value error, "
_PYDANTIC_TAIL = " [type=value_error, input_value=ArgsKwargs((), {'model': ...}), input_type=ArgsKwargs]"


class EngineError(Exception):
    """A startup failure; `text` is what real vLLM prints as the exception, last line(s) of the traceback."""

    def __init__(self, text: str, engine_core: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.engine_core = engine_core  # raised inside the engine core process (then the API server reports it)


def _model_config_error(message: str) -> EngineError:
    """vLLM wraps ModelConfig errors in a pydantic ValidationError."""
    return EngineError(_PYDANTIC_HEAD + message + _PYDANTIC_TAIL)


@dataclass(frozen=True)
class ModelInfo:
    """What the double reads from MODEL/config.json."""

    path: str
    architecture: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int
    max_position_embeddings: Optional[int]
    max_model_len: int


@dataclass(frozen=True)
class KvPlan:
    """The KV-cache figures logged per GPU worker and per engine."""

    available_bytes: int
    bytes_per_token: int
    block_size: int
    num_tokens: int
    max_model_len: int
    explicit: bool  # the budget came from --kv-cache-memory-bytes or VLLM_DOUBLE_KV_BYTES

    @property
    def concurrency(self) -> float:
        """Maximum concurrency for max_model_len-token requests."""
        return self.num_tokens / self.max_model_len

    @property
    def needed_bytes(self) -> int:
        """KV bytes one max_model_len request needs on one GPU."""
        return self.max_model_len * self.bytes_per_token

    def estimated_max_len(self, available_bytes: int) -> int:
        """Longest request that fits `available_bytes`, in whole blocks."""
        per_block = self.bytes_per_token * self.block_size
        return (available_bytes // per_block) * self.block_size


def _invalid_path_text(model: str) -> str:
    return (
        f"Invalid repository ID or local directory specified: '{model}'.\n"
        "Please verify the following requirements:\n"
        "1. Provide a valid Hugging Face repository ID.\n"
        "2. Specify a local directory that contains a recognized configuration file.\n"
        "   - For Hugging Face models: ensure the presence of a 'config.json'.\n"
        "   - For Mistral models: ensure the presence of a 'params.json'."
    )


def _int_field(config: Mapping, key: str, path: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise EngineError(
            f"ValueError: {path}/config.json: {key} must be a positive integer, got {value!r} (vLLM test double)")
    return value


def load_model(args: argparse.Namespace, env: Mapping[str, str]) -> ModelInfo:
    """Read and check MODEL/config.json as vLLM would; raise EngineError with vLLM's text."""
    model = args.model_tag
    config_path = Path(model) / "config.json"
    if not config_path.is_file():
        raise _model_config_error(_invalid_path_text(model))
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise EngineError(f"json.decoder.JSONDecodeError: {config_path}: {exc}") from exc
    if not isinstance(config, dict):
        raise EngineError(f"ValueError: {config_path} is not a JSON object")
    if "auto_map" in config and not args.trust_remote_code:
        raise _model_config_error((
            f"The repository {model} contains custom code which must be executed to correctly load the model. "
            f"You can inspect the repository content at {model} .\n"
            "Please pass the argument `trust_remote_code=True` to allow custom code to be run."
        ))
    architectures = config.get("architectures") or []
    supported = [a for a in architectures if a in SUPPORTED_ARCHITECTURES]
    if not supported:
        raise _model_config_error((
            f"Model architectures {list(architectures)} are not supported for now. "
            f"Supported architectures: dict_keys({list(SUPPORTED_ARCHITECTURES)})"
        ))
    heads = _int_field(config, "num_attention_heads", model)
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or _int_field(config, "hidden_size", model) // heads
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    max_pos = config.get("max_position_embeddings")
    max_len = _max_model_len(args.max_model_len, max_pos, env)
    tp = args.tensor_parallel_size
    if heads % tp:
        raise EngineError(
            f"ValueError: Total number of attention heads ({heads}) must be divisible by tensor parallel size ({tp}).",
            engine_core=False,
        )
    return ModelInfo(
        path=model,
        architecture=supported[0],
        num_layers=_int_field(config, "num_hidden_layers", model),
        num_attention_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        dtype_bytes=_DTYPE_BYTES.get(dtype, 2),
        max_position_embeddings=max_pos,
        max_model_len=max_len,
    )


def _max_model_len(requested: Optional[int], max_pos: object, env: Mapping[str, str]) -> int:
    """--max-model-len, checked against the config like vLLM's _get_and_verify_max_len."""
    derived = max_pos if isinstance(max_pos, int) and max_pos > 0 else 2048
    if requested is None:
        return derived
    allow_long = env.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "0").lower() in ("1", "true")
    if requested > derived and not allow_long:
        raise EngineError(
            _PYDANTIC_HEAD
            + f"User-specified max_model_len ({requested}) is greater than the derived max_model_len "
            f"(max_position_embeddings={derived} or model_max_length=None in model's config.json). "
            "To allow overriding this maximum, set the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN=1. "
            "VLLM_ALLOW_LONG_MAX_MODEL_LEN must be used with extreme caution. If the model uses relative "
            "position encoding (RoPE), positions exceeding derived_max_model_len lead to nan. If the model "
            "uses absolute position encoding, positions exceeding derived_max_model_len will cause a CUDA "
            "array out-of-bounds error."
        )
    return requested


def plan_kv(info: ModelInfo, args: argparse.Namespace, env: Mapping[str, str]) -> KvPlan:
    """KV figures per GPU: budget from --kv-cache-memory-bytes, else VLLM_DOUBLE_KV_BYTES, else 8 GiB."""
    explicit = True
    if args.kv_cache_memory_bytes:
        budget = args.kv_cache_memory_bytes
    elif env.get("VLLM_DOUBLE_KV_BYTES"):
        budget = int(env["VLLM_DOUBLE_KV_BYTES"])
    else:
        budget, explicit = DEFAULT_KV_BYTES, False
    elem = 1 if args.kv_cache_dtype.startswith("fp8") else info.dtype_bytes
    layers = math.ceil(info.num_layers / args.pipeline_parallel_size)
    kv_heads = max(1, info.num_kv_heads // args.tensor_parallel_size)
    per_token = 2 * layers * kv_heads * info.head_dim * elem
    block = args.block_size or DEFAULT_BLOCK_SIZE
    tokens = (budget // (per_token * block)) * block
    return KvPlan(budget, per_token, block, tokens, info.max_model_len, explicit)


def kv_cache_error(plan: KvPlan, available: int) -> EngineError:
    """vLLM 0.25's error when one max_model_len request does not fit (the seed log has older wording)."""
    return EngineError(
        "ValueError: To serve at least one request with the model's max seq len "
        f"({plan.max_model_len}), ({plan.needed_bytes / GIB:.2f} GiB KV cache is needed, which is larger "
        f"than the available KV cache memory ({available / GIB:.2f} GiB). Based on the available memory, "
        f"the estimated maximum model length is {plan.estimated_max_len(available)}. Try increasing "
        "`gpu_memory_utilization` (which also controls CPU memory on the CPU backend) or decreasing "
        "`max_model_len` when initializing the engine. See "
        "https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details.",
        engine_core=True,
    )


def env_float(env: Mapping[str, str], name: str, default: float) -> float:
    """A float from the environment (the double's knobs), or the default."""
    raw = env.get(name, "").strip()
    return float(raw) if raw else default

