"""Plan bounds and findings (issue 14, item 6): absurd sizes refused with the bound and why; no layout called
deployable below a useful length; remedies name the setting to change; settings-only checks before any fact."""

from __future__ import annotations

import re

import pytest

from vllm_fleet.errors import SettingsError
from vllm_fleet.planner.hardware import GiB
from vllm_fleet.planner.modelinfo import list_profiles, load_profile
from vllm_fleet.planner.plan import MIN_USEFUL_MAX_MODEL_LEN, PlanOptions, make_plan
from vllm_fleet.settings import load_settings
from vllm_fleet.weights import source as wplan


def _problem(data) -> str:
    with pytest.raises(SettingsError) as info:
        load_settings(data, host="gpu-1")
    assert len(info.value.problems) == 1, str(info.value)
    return str(info.value)


@pytest.mark.parametrize(("key", "value", "why"), [
    ("kv_cache_memory_bytes", 10**15, "more than any GPU's memory"),        # a petabyte
    ("kv_cache_memory_bytes", 2**40 + 1, "1 TiB"),
    ("tensor_parallel_size", 1024, "NVLink domain"),
    ("pipeline_parallel_size", 65, "NVLink domain"),
    ("data_parallel_size", 10**6, "replicas"),
    ("max_num_seqs", 10**9, "65536"),
    ("max_num_batched_tokens", 10**12, "4194304"),
    ("disk_headroom_gib", 10**9, "100 TB"),
    ("weights_wait_timeout_s", 10**9, "7 days"),
    ("weights_backoff_s", 10**6, "300 s"),
    ("health_timeout_s", 10**9, "a day"),
    ("port", 80, "CAP_NET_BIND_SERVICE"),
])
def test_absurd_sizes_are_refused_with_the_bound_and_why(key, value, why):
    text = _problem({f"vllm_{key}": value})
    assert f"vllm_{key}={value!r}" in text and "out of bounds" in text and why in text, text


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("key", ["gpu_memory_utilization", "weights_backoff_s"])
def test_nan_and_infinities_are_refused(key, value):
    assert f"vllm_{key}=" in _problem({f"vllm_{key}": value})


@pytest.mark.parametrize("value", [1, 2, 8, 24, 512, 4096, 10**9])
def test_block_sizes_are_what_vllm_takes(value):
    assert "attention backends take" in _problem({"vllm_block_size": value})


@pytest.mark.parametrize("value", [16, 32, 64, 128, 256])
def test_vllm_block_sizes_pass(value):
    assert load_settings({"vllm_block_size": value}).block_size == value


def test_max_model_len_above_the_model_is_a_settings_error_before_any_fact():
    model_max = load_profile("minimax-m2").arch.max_position_embeddings
    text = _problem({"vllm_max_model_len": model_max + 1})
    assert f"vllm_max_model_len = {model_max} or less" in text and "max_position_embeddings" in text
    assert "--max-model-len" not in text
    assert "above 16777216" in _problem({"vllm_max_model_len": 10**12})


def test_the_reasoning_parser_is_checked_before_any_fact():
    assert "not a reasoning parser of minimax-m2" in _problem({"vllm_reasoning_parser": "qwen3"})
    tiny = "tests/fixtures/tiny-minimax-m2"
    text = _problem({"vllm_model": tiny, "vllm_reasoning_parser": "no_such_parser"})
    assert "no reasoning parser of vLLM 0.25.0" in text and "minimax_m2_append_think" in text
    assert load_settings({"vllm_model": tiny, "vllm_reasoning_parser": "minimax_m2"}).reasoning_parser == "minimax_m2"


def test_a_petabyte_kv_cache_is_not_deployable():
    plan = make_plan("minimax-m2", "8xH200", PlanOptions(kv_cache_memory_bytes=2**40))
    assert not plan.ok and "KV_BYTES_ABOVE_GPU" in [e.code for e in plan.errors]
    err = next(e for e in plan.errors if e.code == "KV_BYTES_ABOVE_GPU")
    assert "vllm_kv_cache_memory_bytes" in err.remedy


def test_a_length_below_the_useful_minimum_is_not_deployable():
    # A small fixed KV budget: "auto" finds only a short length that fits.
    plan = make_plan("minimax-m2", "8xH200", PlanOptions(kv_cache_memory_bytes=16 * 1024**2))
    assert plan.max_model_len_that_fits < MIN_USEFUL_MAX_MODEL_LEN
    codes = [e.code for e in plan.errors]
    assert "FITS_TOO_SHORT" in codes and not plan.ok
    err = next(e for e in plan.errors if e.code == "FITS_TOO_SHORT")
    assert str(MIN_USEFUL_MAX_MODEL_LEN) in err.message and "vllm_gpu_memory_utilization" in err.remedy


def test_the_cli_prints_problems_and_no_launch_command_for_such_a_plan(capsys):
    from vllm_fleet.cli.main import main

    rc = main(["plan", "--model", "minimax-m2", "--gpus", "8xH200", "--kv-cache-memory-bytes", str(16 * 1024**2)])
    out = capsys.readouterr().out
    assert rc == 1 and "FITS_TOO_SHORT" in out and "NOT deployable" in out and "vllm serve" not in out


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]+")


@pytest.mark.parametrize("profile", list_profiles())
@pytest.mark.parametrize("hw", ["1xH200", "2xA800-80G", "4xA800-80G", "8xH100-80G"])
def test_remedies_name_settings_never_vllm_flags(profile, hw):
    for options in (PlanOptions(), PlanOptions(max_model_len=10**6), PlanOptions(tensor_parallel_size=3),
                    PlanOptions(kv_cache_dtype="fp8", max_model_len=200_000), PlanOptions(gpu_memory_utilization=0.2),
                    PlanOptions(kv_cache_memory_bytes=200 * GiB)):
        plan = make_plan(profile, hw, options)
        for f in (*plan.errors, *plan.warnings):
            assert not FLAG.findall(f.remedy.replace("--compilation-config", "")), (f.code, f.remedy)


def test_weights_warnings_for_an_unpinned_revision_and_another_modelscope_repo():
    profile = load_profile("minimax-m2")
    assert profile.revision is None and profile.modelscope_repo == "MiniMax/MiniMax-M2"
    s = load_settings({"vllm_weights_sources": [{"kind": "modelscope", "repo": "someone/MiniMax-M2-copy"}]})
    lines = wplan.source_warnings(s, profile)
    assert any("has no revision" in w and "vllm_weights_sources[0]" in w for w in lines)
    assert any("differs from the profile's modelscope_repo MiniMax/MiniMax-M2" in w for w in lines)
    pinned = load_settings({"vllm_weights_sources": [{"kind": "modelscope", "repo": "MiniMax/MiniMax-M2", "revision": "a" * 40}]})
    assert wplan.source_warnings(pinned, profile) == []
    by_repo_id = wplan.source_warnings(load_settings({}), profile)
    assert len(by_repo_id) == 1 and "vLLM fetches MiniMaxAI/MiniMax-M2 itself" in by_repo_id[0]


@pytest.mark.parametrize("revision", ["main", "master", "v1.0", "refs/pr/1", "a" * 39, "a" * 41, "g" * 40, "A" * 40])
@pytest.mark.parametrize("kind,repo", [("hf", "MiniMaxAI/MiniMax-M2"), ("modelscope", "MiniMax/MiniMax-M2")])
def test_a_branch_or_tag_revision_is_not_pinned(kind, repo, revision):
    """A branch (main, master) or a tag can move: hosts may serve different weights, like no revision at all. A commit
    id is 40 lower-case hex digits (huggingface_hub's REGEX_COMMIT_HASH; anything else is looked up as a ref)."""
    profile = load_profile("minimax-m2")
    s = load_settings({"vllm_weights_sources": [{"kind": kind, "repo": repo, "revision": revision}]})
    lines = wplan.source_warnings(s, profile)
    assert len(lines) == 1 and f"revision {revision!r}" in lines[0] and "vllm_weights_sources[0]" in lines[0], lines
    assert "commit sha" in lines[0].split("remedy:", 1)[1]


@pytest.mark.parametrize("revision", ["0123456789abcdef0123456789abcdef01234567", "f" * 40])
def test_a_commit_sha_is_pinned(revision):
    s = load_settings({"vllm_weights_sources": [{"kind": "hf", "repo": "MiniMaxAI/MiniMax-M2", "revision": revision}]})
    assert wplan.source_warnings(s, load_profile("minimax-m2")) == []


def test_a_profile_that_pins_a_branch_is_not_pinned():
    import dataclasses

    profile = load_profile("minimax-m2")
    branch = dataclasses.replace(profile, revision="main") if dataclasses.is_dataclass(profile) else \
        profile.model_copy(update={"revision": "main"})
    by_repo_id = wplan.source_warnings(load_settings({}), branch)
    assert len(by_repo_id) == 1 and "'main', a branch or tag" in by_repo_id[0]
    hub = load_settings({"vllm_weights_sources": [{"kind": "hf", "repo": "MiniMaxAI/MiniMax-M2"}]})
    assert "the profile's revision 'main'" in wplan.source_warnings(hub, branch)[0]
