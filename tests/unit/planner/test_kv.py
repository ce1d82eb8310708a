"""vLLM 0.25 KV arithmetic (vllm_fleet.planner.kv) against vLLM's formulas and measured logs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from vllm_fleet.planner import kv
from vllm_fleet.planner.modelinfo import Architecture, load_profile

GiB = 1 << 30
TINY = "tests/fixtures/tiny-minimax-m2"


def minimax_layout(tp: int, dtype: str = "auto", block: int = 16) -> kv.KVLayout:
    arch = load_profile("minimax-m2").arch
    return kv.layout_for(arch, tensor_parallel_size=tp, pipeline_parallel_size=1, kv_cache_dtype=dtype, block_size=block)


def tiny_layout(tp: int) -> kv.KVLayout:
    arch = load_profile(TINY).arch
    return kv.layout_for(arch, tensor_parallel_size=tp, pipeline_parallel_size=1, kv_cache_dtype="auto", block_size=16)


def test_format_gib_rounds_like_vllm() -> None:
    assert kv.format_gib(12_482_248_704) == "11.62"  # exactly 11.625 GiB: round-half-even
    assert kv.format_gib(10_066_657_280) == "9.38"
    assert kv.format_gib(8 * GiB) == "8.0"


def test_page_size_full_attention_minimax_tp4() -> None:
    spec = minimax_layout(4).groups[0].spec
    # FullAttentionSpec: block * kv_heads/rank * (head + head_v) * dtype = 16 * 2 * 256 * 2
    assert spec.page_size_bytes == 16_384
    assert minimax_layout(4).bytes_per_token() == 62 * 2 * 2 * 128 * 2 == 63_488
    assert minimax_layout(4, "fp8").bytes_per_token() == 31_744


@pytest.mark.parametrize(("tp", "heads"), [(1, 8), (2, 4), (4, 2), (8, 1), (16, 1), (32, 1)])
def test_kv_heads_replicated_when_tp_exceeds_them(tp: int, heads: int) -> None:
    arch = load_profile("minimax-m2").arch
    assert kv.kv_heads_per_rank(arch, tp) == heads
    assert minimax_layout(tp).bytes_per_token() == 62 * 2 * heads * 128 * 2


def test_mla_latent_is_not_split_by_tp() -> None:
    arch = load_profile("deepseek-v3").arch
    for tp in (1, 8, 16):
        layout = kv.layout_for(arch, tensor_parallel_size=tp, pipeline_parallel_size=1, kv_cache_dtype="auto", block_size=16)
        # MLAAttentionSpec: block * 1 * (kv_lora_rank + qk_rope_head_dim) * dtype, no K/V pair.
        assert layout.groups[0].spec.page_size_bytes == 16 * 576 * 2
        assert layout.bytes_per_token() == 61 * 576 * 2


def test_seed_needed_memory_is_11_62_gib() -> None:
    needed = minimax_layout(4).max_memory_usage_bytes(196_608, 8192)
    assert needed == 196_608 * 63_488
    assert kv.format_gib(needed) == "11.62"


@pytest.mark.parametrize("available", [10_066_657_280, 10_067_673_087])
def test_seed_estimated_max_len_is_158560(available: int) -> None:
    # Every byte count that vLLM prints as "9.38 GiB" and that yields whole blocks.
    layout = minimax_layout(4)
    assert kv.format_gib(available) == "9.38"
    assert layout.estimate_max_model_len(available, 196_608, 8192) == 158_560


def test_estimate_block_edges() -> None:
    layout = minimax_layout(4)
    block_bytes = 16 * 63_488
    at = 9910 * block_bytes
    assert layout.estimate_max_model_len(at, 196_608, 8192) == 158_560
    assert layout.estimate_max_model_len(at - 1, 196_608, 8192) == 158_544  # one byte short of a block
    assert layout.estimate_max_model_len(at + block_bytes, 196_608, 8192) == 158_576
    assert layout.estimate_max_model_len(block_bytes - 1, 196_608, 8192) == 0
    # 1 token and 16 tokens cost the same block; 17 costs two.
    assert layout.max_memory_usage_bytes(1, 8192) == layout.max_memory_usage_bytes(16, 8192) == block_bytes
    assert layout.max_memory_usage_bytes(17, 8192) == 2 * block_bytes


def test_estimate_is_capped_by_requested_length() -> None:
    assert minimax_layout(4).estimate_max_model_len(100 * GiB, 131_072, 8192) == 131_072


def test_check_enough_returns_vllm_message() -> None:
    short = kv.check_enough_kv_cache_memory(minimax_layout(4), 10_066_657_280, 196_608, 8192)
    assert short is not None
    assert short.message() == (
        "To serve at least one request with the model's max seq len (196608), (11.62 GiB KV cache is needed, "
        "which is larger than the available KV cache memory (9.38 GiB). Based on the available memory, the "
        "estimated maximum model length is 158560."
    )
    assert kv.check_enough_kv_cache_memory(minimax_layout(4), 12_482_248_704, 196_608, 8192) is None
    assert kv.check_enough_kv_cache_memory(minimax_layout(4), 12_482_248_703, 196_608, 8192) is not None


# Measured on H200 with vLLM 0.25 (docs/gpu-validation.md): "Available KV cache memory" and
# "GPU KV cache size" for the tiny model, max_model_len 8192.
MEASURED = [
    (1, "69.41", 72_778_368),  # default, cold
    (1, "69.58", 72_960_640),  # --enforce-eager
    (1, "69.46", 72_829_568),  # PIECEWISE
    (1, "69.46", 72_835_776),  # warm cache
    (1, "41.5", 43_517_440),  # util 0.3
    (1, "8.0", 8_388_608),  # --kv-cache-memory-bytes 8589934592
    (2, "69.09", 144_894_080),  # TP=2, per GPU
]


@pytest.mark.parametrize(("tp", "gib", "tokens"), MEASURED)
def test_capacity_matches_measured_logs(tp: int, gib: str, tokens: int) -> None:
    layout = tiny_layout(tp)
    per_token = layout.bytes_per_token()
    assert per_token == {1: 1024, 2: 512}[tp]
    available = tokens * per_token  # smallest byte count that yields this many tokens
    assert kv.format_gib(available) == gib
    block = 16 * per_token
    assert layout.capacity(available, 8192, 8192)[0] == tokens
    assert layout.capacity(available + block - 1, 8192, 8192)[0] == tokens
    assert layout.capacity(available + block, 8192, 8192)[0] == tokens + 16
    assert layout.capacity(available - 1, 8192, 8192)[0] == tokens - 16


def test_concurrency_like_vllm_log() -> None:
    # "Maximum concurrency for 8,192 tokens per request: 8884.08x"
    _, concurrency = tiny_layout(1).capacity(72_778_368 * 1024, 8192, 8192)
    assert f"{concurrency:.2f}" == "8884.08"


def test_pipeline_split_like_get_pp_indices() -> None:
    assert kv.pp_layer_counts(62, 1) == [62]
    assert kv.pp_layer_counts(62, 4) == [15, 16, 16, 15]
    assert kv.pp_layer_counts(61, 2) == [31, 30]


def test_sliding_window_hybrid_groups_gpt_oss() -> None:
    arch = load_profile("gpt-oss-120b").arch
    layout = kv.layout_for(arch, tensor_parallel_size=4, pipeline_parallel_size=1, kv_cache_dtype="auto", block_size=16)
    kinds = sorted((g.spec.kind, g.num_layers) for g in layout.groups)
    assert kinds == [("full", 18), ("sliding", 18)]
    page = 16 * 2 * 2 * 64 * 2
    assert layout.page_size_bytes == page
    # full: cdiv(L, 16) blocks; sliding: cdiv(min(128 - 1 + 8192, L), 16) + 1 blocks; x group_size pools.
    assert layout.max_memory_usage_bytes(131_072, 8192) == 18 * page * (131_072 // 16 + 520 + 1)
    assert layout.max_memory_usage_bytes(100, 8192) == 18 * page * (7 + 7 + 1)


def _arch(full: int, sliding: int) -> Architecture:
    base = load_profile("gpt-oss-120b").arch
    types = ("full_attention",) * full + ("sliding_attention",) * sliding
    return replace(base, num_layers=full + sliding, layer_types=types)


@pytest.mark.parametrize(("full", "sliding", "groups"), [
    (13, 12, [13, 13]),  # max < 1.5 * min: group size = max (vLLM's gpt-oss-20b + eagle example)
    (10, 20, [10, 10, 10]),  # n:1 pattern: group size = min
    (3, 10, [3, 3, 3, 3, 3]),  # 10 sliding in 4 groups of 3,3,2,2 (padded to 3)
])
def test_hybrid_group_size_rule(full: int, sliding: int, groups: list[int]) -> None:
    layout = kv.layout_for(_arch(full, sliding), tensor_parallel_size=1, pipeline_parallel_size=1,
                           kv_cache_dtype="auto", block_size=16)
    assert len(layout.groups) == len(groups)
    assert layout.group_size == groups[0]


def test_unknown_kv_dtype_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown kv-cache dtype"):
        kv.normalize_kv_cache_dtype("int3")
    assert kv.normalize_kv_cache_dtype("bf16") == "bfloat16"
