"""vLLM's KV-cache arithmetic, re-implemented line for line for the pinned version.

Every function here names the vLLM 0.25.0 function it mirrors; docs/planner.md
walks through them. Sizes are per GPU (per worker): vLLM plans each worker's
cache from that worker's layers and that worker's share of the KV heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vllm_fleet.planner.modelinfo import Architecture, AttentionKind

GiB = 1 << 30

DEFAULT_BLOCK_SIZE = 16
"""vllm/config/cache.py CacheConfig.DEFAULT_BLOCK_SIZE; FlashAttention/Triton keep it (MultipleOf(16))."""

# vllm/config/cache.py CacheDType (the subset whose size the planner knows) -> bytes per element.
# "auto" means the model dtype; fp8 variants are stored as uint8 (vllm/utils/torch_utils.py
# STR_DTYPE_TO_TORCH_DTYPE).
KV_CACHE_DTYPE_BYTES: dict[str, int | None] = {
    "auto": None,
    "float16": 2,
    "bfloat16": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
}
KV_CACHE_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def cdiv(a: int, b: int) -> int:
    """Ceiling division (vllm/utils/math_utils.py cdiv)."""
    return -(-a // b)


def format_gib(b: int) -> str:
    """vllm/utils/mem_utils.py format_gib: `str(round(b / GiB, 2))`, as vLLM prints GiB."""
    return f"{round(b / GiB, 2)}"


def normalize_kv_cache_dtype(name: str) -> str:
    """vLLM's spelling of a KV-cache dtype (`bf16` -> `bfloat16`); ValueError if unknown."""
    name = KV_CACHE_DTYPE_ALIASES.get(name, name)
    if name not in KV_CACHE_DTYPE_BYTES:
        raise ValueError(f"unknown kv-cache dtype {name!r}; expected one of {', '.join(KV_CACHE_DTYPE_BYTES)}")
    return name


def kv_dtype_bytes(kv_cache_dtype: str, arch: Architecture) -> int:
    """Bytes per cached element: the model dtype for `auto`, 1 for fp8."""
    size = KV_CACHE_DTYPE_BYTES[normalize_kv_cache_dtype(kv_cache_dtype)]
    return arch.dtype_bytes if size is None else size


def kv_heads_per_rank(arch: Architecture, tensor_parallel_size: int) -> int:
    """vllm/config/model.py ModelConfig.get_num_kv_heads: MLA caches one latent; else
    max(1, total // tp): heads are replicated when TP exceeds the KV head count."""
    if arch.attention is AttentionKind.MLA:
        return 1
    return max(1, arch.num_kv_heads // tensor_parallel_size)


def pp_layer_counts(num_layers: int, pp_size: int) -> list[int]:
    """vllm/distributed/utils.py get_pp_indices: layers per pipeline stage (remainder to the
    stages before the last)."""
    parts = [num_layers // pp_size] * pp_size
    for i in range(2, num_layers % pp_size + 2):
        parts[-i] += 1
    return parts


@dataclass(frozen=True)
class LayerSpec:
    """One attention layer's cache format on one worker (vllm/v1/kv_cache_interface.py)."""

    kind: Literal["full", "sliding", "mla"]
    block_size: int
    num_kv_heads: int
    head_size: int
    dtype_bytes: int
    sliding_window: int | None = None

    @property
    def page_size_bytes(self) -> int:
        """Bytes of one block of one layer.

        FullAttentionSpec/SlidingWindowSpec.real_page_size_bytes:
        block * kv_heads * (head_size + head_size_v) * dtype (K and V);
        MLAAttentionSpec.real_page_size_bytes: block * 1 * head_size * dtype (one latent).
        """
        per_token_elems = self.head_size if self.kind == "mla" else 2 * self.head_size
        return self.block_size * self.num_kv_heads * per_token_elems * self.dtype_bytes

    def max_memory_usage_bytes(self, max_model_len: int, max_num_batched_tokens: int) -> int:
        """Bytes one request of `max_model_len` tokens can hold in this layer.

        FullAttentionSpec.max_memory_usage_bytes: cdiv(max_model_len, block) * page.
        SlidingWindowSpec.max_admission_blocks_per_request:
        cdiv(min(window - 1 + max_num_batched_tokens, max_model_len), block) + 1 blocks.
        """
        if self.kind == "sliding":
            assert self.sliding_window is not None
            tokens = min(self.sliding_window - 1 + max_num_batched_tokens, max_model_len)
            return (cdiv(tokens, self.block_size) + 1) * self.page_size_bytes
        return cdiv(max_model_len, self.block_size) * self.page_size_bytes


@dataclass(frozen=True)
class KVGroup:
    """A KV cache group: layers sharing one block table (vllm KVCacheGroupSpec)."""

    spec: LayerSpec
    num_layers: int


@dataclass(frozen=True)
class KVLayout:
    """The KV cache groups of one worker and the arithmetic vLLM runs on them."""

    groups: tuple[KVGroup, ...]

    @property
    def group_size(self) -> int:
        """Layers per group (padded groups count as full): the number of shared pools."""
        return max(g.num_layers for g in self.groups)

    @property
    def page_size_bytes(self) -> int:
        """The (uniform) page size; vLLM get_uniform_page_size asserts there is one."""
        sizes = {g.spec.page_size_bytes for g in self.groups}
        assert len(sizes) == 1, "vLLM unifies page sizes before grouping"
        return sizes.pop()

    @property
    def num_layers(self) -> int:
        """Attention layers on this worker."""
        return sum(g.num_layers for g in self.groups)

    def bytes_per_token(self) -> int:
        """Cache bytes per token summed over this worker's layers, ignoring block rounding
        and sliding windows (what a full-attention token costs)."""
        return sum(g.num_layers * g.spec.page_size_bytes // g.spec.block_size for g in self.groups)

    def max_memory_usage_bytes(self, max_model_len: int, max_num_batched_tokens: int) -> int:
        """vllm/v1/core/kv_cache_utils.py _max_memory_usage_bytes_from_groups (general case):
        group_size * page_size * sum over groups of cdiv(spec.max_memory_usage_bytes, page_size)."""
        page = self.page_size_bytes
        blocks = sum(
            cdiv(g.spec.max_memory_usage_bytes(max_model_len, max_num_batched_tokens), page) for g in self.groups
        )
        return self.group_size * page * blocks

    def estimate_max_model_len(self, available: int, upper: int, max_num_batched_tokens: int) -> int:
        """kv_cache_utils.py _estimate_max_model_len_from_groups: binary search over 1..upper
        for the longest length whose max_memory_usage_bytes fits; 0 if not even 1 token fits."""

        def fits(length: int) -> bool:
            return self.max_memory_usage_bytes(length, max_num_batched_tokens) <= available

        left, right = 1, upper
        if not fits(left):
            return 0
        result = 1
        while left <= right:
            mid = (left + right) // 2
            if fits(mid):
                result, left = mid, mid + 1
            else:
                right = mid - 1
        return result

    def num_blocks(self, available: int) -> int:
        """kv_cache_utils.py get_num_blocks: available // page_size // group_size."""
        return max(available // self.page_size_bytes // self.group_size, 0)

    def capacity(self, available: int, max_model_len: int, max_num_batched_tokens: int) -> tuple[int, float]:
        """kv_cache_utils.py get_kv_cache_capacity: (GPU KV cache size in tokens, max concurrency)
        as vLLM logs them: concurrency = num_blocks / blocks per max-length request."""
        per_request = sum(g.spec.max_memory_usage_bytes(max_model_len, max_num_batched_tokens) for g in self.groups)
        memory_per_block = self.page_size_bytes * self.group_size
        blocks_per_request = cdiv(self.group_size * per_request, memory_per_block)
        concurrency = self.num_blocks(available) / blocks_per_request
        return int(concurrency * max_model_len), concurrency


def layout_for(
    arch: Architecture,
    *,
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    kv_cache_dtype: str,
    block_size: int,
) -> KVLayout:
    """The KV cache groups of the largest pipeline stage, as vLLM builds them.

    Uniform models: one group of all layers (_get_kv_cache_groups_uniform_spec).
    Full + sliding layers (hybrid KV cache manager, on by default on GPUs):
    _get_kv_cache_groups_uniform_page_size: per type, groups of `group_size` layers, where
    group_size is the smallest type's count, or the largest's when max < 1.5 * min.
    """
    heads = kv_heads_per_rank(arch, tensor_parallel_size)
    dtype = kv_dtype_bytes(kv_cache_dtype, arch)
    layers = max(pp_layer_counts(arch.num_layers, pipeline_parallel_size))
    if arch.attention is AttentionKind.MLA:
        return KVLayout((KVGroup(LayerSpec("mla", block_size, 1, arch.mla_head_size, dtype), layers),))
    full = LayerSpec("full", block_size, heads, arch.head_dim, dtype)
    sliding = LayerSpec("sliding", block_size, heads, arch.head_dim, dtype, arch.sliding_window)
    counts = {"full": 0, "sliding": 0}
    for layer in range(layers):
        counts["sliding" if arch.is_sliding(layer) else "full"] += 1
    present = {kind: n for kind, n in counts.items() if n}
    if len(present) == 1:
        spec = sliding if "sliding" in present else full
        return KVLayout((KVGroup(spec, layers),))
    smallest, largest = min(present.values()), max(present.values())
    group_size = largest if largest < smallest * 1.5 else smallest
    groups: list[KVGroup] = []
    for kind, n in present.items():
        spec = sliding if kind == "sliding" else full
        for i in range(cdiv(n, group_size)):
            groups.append(KVGroup(spec, len(range(i, n, cdiv(n, group_size)))))
    return KVLayout(tuple(groups))


@dataclass(frozen=True)
class KVShortfall:
    """What vLLM's check_enough_kv_cache_memory would raise, with its numbers."""

    max_model_len: int
    needed: int
    available: int
    estimated_max_len: int

    def message(self) -> str:
        """The text of vLLM's ValueError (kv_cache_utils.py _check_enough_kv_cache_memory)."""
        estimated = (
            f"Based on the available memory, the estimated maximum model length is {self.estimated_max_len}. "
            if self.estimated_max_len > 0
            else ""
        )
        return (
            f"To serve at least one request with the model's max seq len ({self.max_model_len}), "
            f"({format_gib(self.needed)} GiB KV cache is needed, which is larger than the available "
            f"KV cache memory ({format_gib(self.available)} GiB). {estimated}"
        ).rstrip()


def check_enough_kv_cache_memory(
    layout: KVLayout, available: int, max_model_len: int, max_num_batched_tokens: int
) -> KVShortfall | None:
    """kv_cache_utils.py _check_enough_kv_cache_memory: None when one max-length request fits."""
    needed = layout.max_memory_usage_bytes(max_model_len, max_num_batched_tokens)
    if needed <= available:
        return None
    estimated = layout.estimate_max_model_len(available, max_model_len, max_num_batched_tokens)
    return KVShortfall(max_model_len, needed, available, estimated)
