"""The plan (vllm_fleet.planner.plan): seed reproduction, rules, memory model, argv and env."""

from __future__ import annotations

import pytest

from vllm_fleet.planner.hardware import GiB, Hardware
from vllm_fleet.planner.plan import (
    MARGIN_FRACTION,
    MIN_USEFUL_MAX_MODEL_LEN,
    NON_TORCH_MULTI,
    NON_TORCH_TP1,
    PlanError,
    PlanOptions,
    make_plan,
    options_from,
)

TINY = "tests/fixtures/tiny-minimax-m2"
SEED_AVAILABLE = 10_066_657_280  # a byte count vLLM prints as 9.38 GiB


def codes(findings: tuple) -> list[str]:
    return [f.code for f in findings]


def test_seed_error_reproduced_exactly() -> None:
    plan = make_plan("minimax-m2", "4xA800-80G", PlanOptions(
        tensor_parallel_size=4, kv_cache_dtype="auto", max_model_len=196_608, kv_cache_memory_bytes=SEED_AVAILABLE))
    assert codes(plan.errors) == ["KV_DOES_NOT_FIT"]
    assert "max seq len (196608), (11.62 GiB KV cache is needed" in plan.errors[0].message
    assert "available KV cache memory (9.38 GiB)" in plan.errors[0].message
    assert "estimated maximum model length is 158560." in plan.errors[0].message
    assert "vllm_max_model_len = 158560" in plan.errors[0].remedy
    assert plan.max_model_len_that_fits == 158_560
    assert plan.kv_cache_bytes_per_token_per_gpu == 63_488
    assert plan.memory_per_gpu.kv_for_max_len == 12_482_248_704
    assert not plan.ok


def test_seed_fits_at_131072_as_the_seed_finally_ran() -> None:
    plan = make_plan("minimax-m2", "4xA800-80G", PlanOptions(max_model_len=131_072, kv_cache_memory_bytes=SEED_AVAILABLE))
    assert plan.ok
    assert "--max-model-len" in plan.argv and plan.argv[plan.argv.index("--max-model-len") + 1] == "131072"


def test_predicted_seed_memory_is_conservative() -> None:
    # vLLM (0.13, per the seed) left 9.38 GiB for KV at utilization 0.9; the overhead model
    # must not promise more, and should be within 1 GiB of it.
    plan = make_plan("minimax-m2", "4xA800-80G", PlanOptions(max_model_len=196_608))
    available = plan.memory_per_gpu.available_for_kv
    assert available <= 10_067_673_087
    assert available > 10_066_657_280 - GiB
    assert codes(plan.errors) == ["KV_DOES_NOT_FIT"]
    # A800 is SM80: vLLM 0.25 has no FP8 KV cache there, so the remedy must not offer it.
    assert plan.errors[0].remedy == "set vllm_max_model_len = 153424, or vllm_gpu_memory_utilization = 0.94."


def test_fp8_kv_is_offered_only_where_vllm_serves_it() -> None:
    short = make_plan("minimax-m2", "4xH100-80G", PlanOptions(max_model_len=196_608, gpu_memory_utilization=0.86))
    assert codes(short.errors) == ["KV_DOES_NOT_FIT"]
    assert 'vllm_kv_cache_dtype = "fp8"' in short.errors[0].remedy
    refused = make_plan("minimax-m2", "4xA800-80G", PlanOptions(kv_cache_dtype="fp8"))
    assert "FP8_KV_UNSUPPORTED" in codes(refused.errors)
    assert "FP8_KV_UNSUPPORTED" not in codes(make_plan("minimax-m2", "4xH200", PlanOptions(kv_cache_dtype="fp8")).errors)


def test_auto_len_is_largest_that_fits_and_says_so() -> None:
    plan = make_plan("minimax-m2", "4xA800-80G", PlanOptions())
    assert plan.max_model_len == plan.max_model_len_that_fits < 196_608
    assert plan.max_model_len_source == "auto: the largest that fits (planner estimate)"
    assert plan.ok
    big = make_plan("minimax-m2", "8xH200", PlanOptions())
    assert big.max_model_len == 196_608
    assert big.max_model_len_source == "auto: the model's maximum"


def test_fp8_on_ampere_warns_weight_only() -> None:
    assert "FP8_WEIGHT_ONLY" in codes(make_plan("minimax-m2", "4xA800-80G").warnings)
    assert "FP8_WEIGHT_ONLY" not in codes(make_plan("minimax-m2", "4xH200").warnings)


def test_fp8_block_rule_at_tp8_without_ep() -> None:
    plan = make_plan("minimax-m2", "8xH200", PlanOptions(enable_expert_parallel=False))
    err = [e for e in plan.errors if e.code == "FP8_BLOCK_TP"]
    assert len(err) == 1
    assert "1536/8=192" in err[0].message
    assert "vllm_tensor_parallel_size = 4" in err[0].remedy and "TP8+EP" in err[0].remedy and "DP8+EP" in err[0].remedy


def test_expert_parallel_chosen_where_the_layout_needs_it() -> None:
    plan = make_plan("minimax-m2", "8xH200")
    assert plan.layout.expert_parallel
    assert "--enable-expert-parallel" in plan.argv
    assert "FP8_BLOCK_TP" not in codes(plan.errors)
    assert "KNOWN_ISSUE_CUDAGRAPH_PIECEWISE" in codes(plan.warnings)
    assert not make_plan("minimax-m2", "4xH200").layout.expert_parallel


def test_piecewise_switch_renders_compilation_config() -> None:
    plan = make_plan("minimax-m2", "8xH200", PlanOptions(cudagraph_piecewise=True))
    i = plan.argv.index("--compilation-config")
    assert plan.argv[i + 1] == '{"cudagraph_mode": "PIECEWISE"}'
    assert "KNOWN_ISSUE_CUDAGRAPH_PIECEWISE" not in codes(plan.warnings)


def test_qwen3_fp8_tp8_also_needs_ep() -> None:
    assert "FP8_BLOCK_TP" in codes(make_plan("qwen3-235b-a22b", "8xH200", PlanOptions(enable_expert_parallel=False)).errors)


def test_tp_not_dividing_heads() -> None:
    plan = make_plan("minimax-m2", "5xH200")
    assert "TP_HEADS" in codes(plan.errors)
    assert "48 attention heads are not divisible by TP=5" in plan.errors[0].message


def test_tp_beyond_kv_heads_warns_replication() -> None:
    plan = make_plan("minimax-m2", "16xH200")
    assert "KV_REPLICATED" in codes(plan.warnings)
    assert plan.kv_cache_bytes_per_token_per_gpu == make_plan("minimax-m2", "8xH200").kv_cache_bytes_per_token_per_gpu


def test_model_larger_than_gpus() -> None:
    plan = make_plan("deepseek-v3", "4xA800-80G")
    assert {"MODEL_TOO_LARGE", "NO_KV_MEMORY"} <= set(codes(plan.errors))


def test_max_len_above_model() -> None:
    plan = make_plan("minimax-m2", "8xH200", PlanOptions(max_model_len=300_000))
    assert "MAX_LEN_ABOVE_MODEL" in codes(plan.errors)


def test_vllm_too_old() -> None:
    plan = make_plan("minimax-m2", "8xH200", PlanOptions(vllm_version="0.10.2"))
    assert "VLLM_TOO_OLD" in codes(plan.errors)
    assert "VLLM_TOO_OLD" not in codes(make_plan("minimax-m2", "8xH200").errors)


def test_gpu_count_rules() -> None:
    assert "GPUS_UNUSED" in codes(make_plan("minimax-m2", "8xH200", PlanOptions(tensor_parallel_size=4)).warnings)
    assert "NOT_ENOUGH_GPUS" in codes(make_plan("minimax-m2", "4xH200", PlanOptions(tensor_parallel_size=8)).errors)


def test_hardware_from_facts() -> None:
    facts = [{"name": "NVIDIA H200", "memory_total_mib": 143771, "compute_cap": "9.0"}] * 2
    plan = make_plan(TINY, Hardware.from_facts(facts), PlanOptions(kv_cache_memory_bytes=69 * GiB))
    assert plan.layout.tensor_parallel_size == 2
    assert plan.kv_cache_bytes_per_token_per_gpu == 512  # measured: one KV head per rank at TP=2


def test_tiny_model_kv_cache_memory_bytes_like_the_h200_run() -> None:
    # docs/gpu-validation.md: --kv-cache-memory-bytes 8589934592 -> "GPU KV cache size: 8,388,608 tokens".
    plan = make_plan(TINY, "1xH200", PlanOptions(max_model_len=8192, kv_cache_memory_bytes=8_589_934_592))
    assert plan.kv_capacity_tokens == 8_388_608
    assert plan.memory_per_gpu.available_is_exact
    assert plan.argv[2].endswith("tiny-minimax-m2")  # a model directory goes after `vllm serve`


def test_overhead_terms() -> None:
    one = make_plan(TINY, "1xH200", PlanOptions(max_model_len=8192, gpu_memory_utilization=0.5))
    two = make_plan(TINY, "2xH200", PlanOptions(max_model_len=8192, gpu_memory_utilization=0.5))
    assert one.memory_per_gpu.overhead.non_torch == NON_TORCH_TP1
    assert two.memory_per_gpu.overhead.non_torch == NON_TORCH_MULTI
    eager = make_plan(TINY, "1xH200", PlanOptions(enforce_eager=True))
    assert eager.memory_per_gpu.overhead.cuda_graphs == 0 < one.memory_per_gpu.overhead.cuda_graphs
    # The margin covers the estimated terms only (the non-torch term is measured).
    for plan in (one, two, eager):
        o = plan.memory_per_gpu.overhead
        assert o.margin == int((o.activations + o.cuda_graphs) * MARGIN_FRACTION)
    # Measured through the toolkit's rendered launch (tests/gpu/results, docs/gpu-validation.md):
    # the lowest available KV memory at utilization 0.5 on H200 was 69.41 GiB at TP=1 and 69.09 GiB
    # per GPU at TP=2. The prediction is conservative, by less than 0.2 GiB (it was 4.3 GiB with a
    # margin of 3 % of GPU memory).
    assert 69.41 * GiB - 0.2 * GiB < one.memory_per_gpu.available_for_kv < 69.41 * GiB
    assert 69.09 * GiB - 0.2 * GiB < two.memory_per_gpu.available_for_kv < 69.09 * GiB


def test_argv_env_and_no_secrets() -> None:
    plan = make_plan("minimax-m2", "4xH200")
    assert plan.argv[:3] == ["vllm", "serve", "MiniMaxAI/MiniMax-M2"]
    for flag in ("--trust-remote-code", "--enable-auto-tool-choice"):
        assert flag in plan.argv
    assert plan.argv[plan.argv.index("--reasoning-parser") + 1] == "minimax_m2_append_think"
    assert plan.argv[plan.argv.index("--tool-call-parser") + 1] == "minimax_m2"
    assert not any("api-key" in a for a in plan.argv)
    assert "CUDA_VISIBLE_DEVICES" not in plan.env
    with pytest.raises(PlanError, match="--api-key must not travel in argv"):
        options_from(extra_args=("--api-key=sk-123",))


MULTICAST_VARS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
                  "VLLM_ALLREDUCE_USE_SYMM_MEM": "0"}


@pytest.mark.parametrize("hardware", ["1xH200", "2xH200", "8xH200", "4xA800-80G"])
def test_default_env_leaves_multicast_and_sampler_to_vllm(hardware: str) -> None:
    # Nothing of the GPU test machine in what users get: by default vLLM, NCCL, PyTorch and NVSHMEM
    # keep their own choices (NVLink multicast where the fabric has it, vLLM's sampler).
    plan = make_plan(TINY, hardware)
    assert plan.env == {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
    assert set(plan.env_reasons) == set(plan.env)


@pytest.mark.parametrize("hardware", ["1xH200", "2xH200"])
def test_multicast_off_sets_the_four_variables_with_the_setting_as_reason(hardware: str) -> None:
    plan = make_plan(TINY, hardware, PlanOptions(nvlink_multicast=False))
    assert {k: plan.env[k] for k in MULTICAST_VARS} == MULTICAST_VARS
    assert "VLLM_USE_FLASHINFER_SAMPLER" not in plan.env
    for key in MULTICAST_VARS:
        assert plan.env_reasons[key].startswith("vllm_nvlink_multicast = False: ")


def test_flashinfer_sampler_off_sets_the_variable_with_the_setting_as_reason() -> None:
    plan = make_plan(TINY, "2xH200", PlanOptions(flashinfer_sampler=False))
    assert plan.env["VLLM_USE_FLASHINFER_SAMPLER"] == "0"
    assert plan.env_reasons["VLLM_USE_FLASHINFER_SAMPLER"].startswith("vllm_flashinfer_sampler = False: ")
    assert not set(MULTICAST_VARS) & set(plan.env)


def test_env_reasons_name_no_file_outside_the_repository() -> None:
    plan = make_plan(TINY, "2xH200", PlanOptions(nvlink_multicast=False, flashinfer_sampler=False))
    assert set(plan.env_reasons) == set(plan.env)
    for reason in plan.env_reasons.values():
        assert "NOTES.md" not in reason and "KINDS.md" not in reason and "../" not in reason, reason


def test_reasoning_parser_choice() -> None:
    plan = make_plan("minimax-m2", "4xH200", PlanOptions(reasoning_parser="minimax_m2"))
    assert plan.argv[plan.argv.index("--reasoning-parser") + 1] == "minimax_m2"
    with pytest.raises(PlanError, match="reasoning parser 'qwen3'"):
        make_plan("minimax-m2", "4xH200", PlanOptions(reasoning_parser="qwen3"))


def test_invalid_input_raises_plan_error() -> None:
    with pytest.raises(PlanError, match="Did you mean 'minimax-m2'"):
        make_plan("minimax-m3", "4xH200")
    with pytest.raises(PlanError, match="unknown GPU"):
        make_plan("minimax-m2", "4xZ100")
    with pytest.raises(PlanError, match="gpu_memory_utilization"):
        options_from(gpu_memory_utilization=1.2)
    with pytest.raises(PlanError, match="kv_cache_dtype"):
        options_from(kv_cache_dtype="int3")


def test_json_document_has_the_stable_keys() -> None:
    doc = make_plan("minimax-m2", "4xA800-80G").to_dict()
    for key in ("layout", "kv_cache_bytes_per_token_per_gpu", "kv_cache_bytes_per_gpu", "max_model_len",
                "max_model_len_that_fits", "memory_per_gpu_bytes", "argv", "env", "warnings"):
        assert key in doc
    assert set(doc["layout"]) == {"tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "expert_parallel"}
    assert {"weights", "overhead", "available_for_kv"} <= set(doc["memory_per_gpu_bytes"])
    assert all(set(w) >= {"code", "message"} for w in doc["warnings"])


@pytest.mark.parametrize("model", ["qwen3-235b-a22b", "gpt-oss-120b", "deepseek-v3", "minimax-m2.1", "minimax-m2.5"])
def test_other_profiles_plan_on_8xh200(model: str) -> None:
    plan = make_plan(model, "8xH200")
    assert plan.ok, plan.errors
    assert plan.max_model_len > 0 and plan.weights_bytes > 50e9


def test_suggested_utilization_makes_the_length_fit() -> None:
    plan = make_plan("minimax-m2", "4xH100-80G", PlanOptions(max_model_len=196_608))
    err = [e for e in plan.errors if e.code == "KV_DOES_NOT_FIT"][0]
    util = float(err.remedy.split("vllm_gpu_memory_utilization = ")[1].split(",")[0].split(" ")[0].rstrip("."))
    again = make_plan("minimax-m2", "4xH100-80G", PlanOptions(max_model_len=196_608, gpu_memory_utilization=util))
    assert again.ok, again.errors


def test_batch_limits_the_plan_sizes_with_reach_the_argv() -> None:
    """The activation estimate uses max_num_seqs / max_num_batched_tokens: vLLM must get the same values."""
    plan = make_plan("minimax-m2", "8xH200", PlanOptions(max_num_seqs=64, max_num_batched_tokens=4096))
    argv = plan.argv
    assert argv[argv.index("--max-num-seqs") + 1] == "64"
    assert argv[argv.index("--max-num-batched-tokens") + 1] == "4096"
    assert "--max-num-seqs" not in make_plan("minimax-m2", "8xH200", PlanOptions()).argv


@pytest.mark.parametrize("length", [16, 512, 2047])
def test_an_explicit_length_below_the_useful_minimum_is_served_with_a_warning(length):
    """B7: "auto" refuses a fit below MIN_USEFUL_MAX_MODEL_LEN (FITS_TOO_SHORT); an explicit shorter length is the
    user's choice (a classifier, an embedding-like use, a test), so it is planned as asked, but the plan says so."""
    plan = make_plan("minimax-m2", "8xH200", PlanOptions(max_model_len=length))
    assert plan.max_model_len == length and not plan.errors
    short = [w for w in plan.warnings if w.code == "MAX_LEN_SHORT"]
    assert len(short) == 1 and str(MIN_USEFUL_MAX_MODEL_LEN) in short[0].message
    assert "vllm_max_model_len" in short[0].remedy and "--max-model-len" not in short[0].remedy


@pytest.mark.parametrize("length", [2048, 8192])
def test_a_length_at_the_minimum_gets_no_such_warning(length):
    plan = make_plan("minimax-m2", "8xH200", PlanOptions(max_model_len=length))
    assert not [w for w in plan.warnings if w.code == "MAX_LEN_SHORT"]
