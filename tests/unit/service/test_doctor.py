"""The doctor on real vLLM failure texts (tests/fixtures/vllm-logs, see its README)."""

from __future__ import annotations

import json
import pathlib

import pytest

from vllm_fleet.cli import main as cli
from vllm_fleet.service.doctor import diagnose, examine
from vllm_fleet.preflight.parse import GpuProcess, Listener

LOGS = pathlib.Path(__file__).resolve().parents[2] / "fixtures" / "vllm-logs"


def log(name: str) -> str:
    return (LOGS / name).read_text(encoding="utf-8")


# fixture -> (codes in order, settings of the first diagnosis, status)
CASES = {
    "seed_kv_cache.log": (["kv_cache_too_small"], {"vllm_max_model_len": 158560}, "failed"),
    "v025_kv_cache_journal.log": (
        ["kv_cache_too_small", "engine_core_init_failed"], {"vllm_max_model_len": 158560}, "failed"),
    "seed_free_memory.log": (
        ["free_memory_below_utilization", "engine_core_init_failed"],
        {"vllm_gpu_memory_utilization": 0.47}, "failed"),
    "v025_free_memory_tp4.log": (
        ["free_memory_below_utilization", "engine_core_init_failed"],
        {"vllm_gpu_memory_utilization": 0.47}, "failed"),
    "seed_address_in_use.log": (["address_in_use"], {"vllm_port": 8001}, "failed"),
    "v025_address_in_use.log": (["address_in_use"], {"vllm_port": 8101}, "failed"),
    "seed_invalid_repo.log": (
        ["invalid_model_path"],
        {"vllm_model": "/home/1/.cache/huggingface/hub/models--MiniMaxAI--MiniMax-M2/snapshots/<commit>"},
        "failed"),
    "v025_invalid_repo.log": (
        ["invalid_model_path"],
        {"vllm_model": "/var/lib/vllm-fleet/hf/hub/models--MiniMaxAI--MiniMax-M2/snapshots/<commit>"},
        "failed"),
    "seed_remote_code.log": (["trust_remote_code_missing"], {}, "failed"),
    "v025_remote_code.log": (["trust_remote_code_missing"], {}, "failed"),
    "seed_illegal_memory_access.log": (["cuda_illegal_memory_access"], {"vllm_cudagraph_piecewise": True}, "failed"),
    "torch_illegal_memory_access.log": (
        ["cuda_illegal_memory_access", "engine_core_init_failed"], {"vllm_cudagraph_piecewise": True}, "failed"),
    "seed_unsupported.log": (["unsupported_architecture"], {"vllm_version": "0.25.0"}, "failed"),
    "issue40_unsupported_journal.log": (["unsupported_architecture"], {"vllm_version": "0.25.0"}, "failed"),
    "v025_unsupported_arch.log": (["unsupported_architecture"], {"vllm_version": "0.25.0"}, "failed"),
    "torch_cuda_oom.log": (
        ["cuda_out_of_memory", "engine_core_init_failed"], {"vllm_gpu_memory_utilization": 0.85}, "failed"),
    "v025_flashinfer_missing.log": (
        ["missing_module", "engine_core_init_failed"],
        {"vllm_flashinfer_sampler": False}, "failed"),
    "v025_fp8_marlin_healthy.log": (["fp8_weight_only_marlin"], {}, "healthy"),
    "restart_then_healthy.log": ([], None, "healthy"),
    "unknown_nccl_failure.log": (["engine_core_init_failed"], {}, "unknown"),
    # Configuration errors vLLM 0.25.0 raises at startup that a setting causes (texts in the fixtures' README).
    "v025_config_tp_heads.log": (["tensor_parallel_heads"], {"vllm_tensor_parallel_size": 4}, "failed"),
    "v025_config_expert_parallel_dense.log": (
        ["expert_parallel_dense_model"], {"vllm_enable_expert_parallel": False}, "failed"),
    "v025_config_pp_unsupported.log": (["pipeline_parallel_unsupported"], {"vllm_pipeline_parallel_size": 1}, "failed"),
    "v025_config_batched_below_len.log": (
        ["max_num_batched_tokens_below_max_model_len"], {"vllm_max_num_batched_tokens": 8192}, "failed"),
    "v025_config_batched_below_seqs.log": (
        ["max_num_batched_tokens_below_max_num_seqs"], {"vllm_max_num_batched_tokens": 256}, "failed"),
    "v025_config_world_size.log": (["more_ranks_than_gpus"], {"vllm_tensor_parallel_size": 4}, "failed"),
    "v025_config_kv_dtype.log": (["invalid_kv_cache_dtype"], {"vllm_kv_cache_dtype": "auto"}, "failed"),
    # Crash classes, from vLLM's, systemd 252's and the toolkit's journal lines.
    "v025_max_model_len_restart_loop_journal.log": (
        ["max_model_len_above_model", "restart_loop"], {"vllm_max_model_len": 8192}, "failed"),
    "v025_engine_sigkill_journal.log": (["engine_died"], {}, "failed"),
    "v025_engine_sigkill_restarted_journal.log": (["engine_died", "restart_loop"], {}, "healthy"),
    "v025_oom_kill_journal.log": (["oom_killed", "engine_died"], {}, "failed"),
    "v025_engine_fatal_journal.log": (
        ["engine_fatal_error", "cuda_illegal_memory_access", "engine_died"], {}, "failed"),
    "watchdog_restart_journal.log": (["watchdog_restart"], {"vllm_watchdog_deadline_s": 60}, "failed"),
    "start_limit_journal.log": (
        ["max_model_len_above_model", "start_limit_hit", "restart_loop"], {"vllm_max_model_len": 8192}, "failed"),
    "gpu_held_journal.log": (["gpu_held_by_other", "restart_loop"], {"vllm_gpus": None}, "failed"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixture_diagnosis(name: str) -> None:
    codes, settings, status = CASES[name]
    report = examine(log(name))
    assert [d.code for d in report.diagnoses] == codes
    assert report.status == status
    if settings is not None:
        assert report.diagnoses[0].settings == settings


def test_every_fixture_is_covered() -> None:
    assert {p.name for p in LOGS.glob("*.log")} == set(CASES)


def test_kv_cache_numbers_and_both_wordings() -> None:
    seed, current = diagnose(log("seed_kv_cache.log"))[0], diagnose(log("v025_kv_cache_journal.log"))[0]
    for item in (seed, current):
        assert "196608" in item.summary and "11.62 GiB needed, 9.38 GiB available" in item.summary
        assert "vllm_max_model_len = 158560" in item.remedy
        assert "vllm_gpu_memory_utilization" in item.remedy and 'vllm_kv_cache_dtype = "fp8"' in item.remedy
    assert "models's" in seed.evidence and "model's max seq len" in current.evidence


def test_kv_cache_without_estimate_suggests_auto() -> None:
    text = ("ValueError: To serve at least one request with the model's max seq len (8192), "
            "(1.0 GiB KV cache is needed, which is larger than the available KV cache memory (0.5 GiB). "
            "Try increasing `gpu_memory_utilization`")
    assert diagnose(text)[0].settings == {"vllm_max_model_len": "auto"}


def test_engine_core_points_at_root_cause_above() -> None:
    items = diagnose(log("v025_kv_cache_journal.log"))
    root, engine = items
    assert root.line < engine.line
    assert f"Root cause: kv_cache_too_small (line {root.line})" in engine.summary
    assert engine.remedy.startswith("fix the root cause: set vllm_max_model_len = 158560")


def test_engine_core_without_known_cause_shows_lines_above() -> None:
    report = examine(log("unknown_nccl_failure.log"))
    engine = report.diagnoses[0]
    assert "No known root cause found above it" in engine.summary
    assert "NCCL error" in engine.remedy
    assert report.exit_code == 1
    assert any("NCCL error" in line for line in report.error_lines)


def test_prefixes_do_not_break_matching_and_evidence_is_the_logged_line() -> None:
    item = diagnose(log("v025_kv_cache_journal.log"))[0]
    assert item.evidence.startswith("Nov 28 10:00:07 gpu01 vllm[4100]: (EngineCore_DP0 pid=4377) ERROR ")
    colored = ("2026-11-28T10:00:00+0000 gpu01 vllm[1]: \x1b[36m(Worker_TP1 pid=9)\x1b[0m "
               "\x1b[31mERROR\x1b[0m 11-28 10:00:00 [core.py:1] OSError: [Errno 98] Address already in use\r")
    assert [d.code for d in diagnose(colored)] == ["address_in_use"]


def test_free_memory_takes_the_tightest_gpu_and_names_holders() -> None:
    holder = GpuProcess(gpu_index=0, gpu_uuid="GPU-0", pid=4242, name="python", used_memory_mib=41000)
    item = diagnose(log("v025_free_memory_tp4.log"), gpu_processes=[holder])[0]
    assert item.settings == {"vllm_gpu_memory_utilization": 0.47}  # floor(37.95 / 79.25, 2)
    assert "cuda:0, cuda:1, cuda:3" in item.summary and "pid 4242 (python, 41000 MiB on GPU 0)" in item.summary
    assert "vllm_gpus" in item.remedy


def test_free_memory_holders_from_pasted_nvidia_smi_rows() -> None:
    text = log("seed_free_memory.log") + (
        "|    0   N/A  N/A         31337      C   /usr/bin/python3                      41234MiB |\n")
    assert "pid 31337 (/usr/bin/python3, 41234 MiB on GPU 0)" in diagnose(text)[0].summary


def test_address_in_use_names_port_and_owner() -> None:
    owner = Listener(proto="tcp", address="0.0.0.0", port=8100, pid=777, process="sglang")
    item = diagnose(log("v025_address_in_use.log"), port_owner=owner)[0]
    assert "Port 8100 " in item.summary and "pid 777 (sglang)" in item.summary
    assert "vllm's default" not in item.summary.lower()
    seed = diagnose(log("seed_address_in_use.log"))[0]
    assert "Port 8000 (vLLM's default" in seed.summary


def test_uvicorn_bind_wording_gives_the_port() -> None:
    text = "ERROR:    [Errno 98] error while attempting to bind on address ('0.0.0.0', 8123): address already in use"
    assert diagnose(text)[0].settings == {"vllm_port": 8124}


def test_invalid_snapshot_dir_and_plain_path() -> None:
    base = "Value error, Invalid repository ID or local directory specified: '{}'."
    incomplete = diagnose(base.format("/x/models--A--B/snapshots/abc"))[0]
    assert "download is incomplete" in incomplete.summary and incomplete.settings == {}
    plain = diagnose(base.format("/data/mymodel"))[0]
    assert "config.json" in plain.summary


def test_illegal_access_with_piecewise_already_on() -> None:
    text = ("INFO 11-28 10:00:00 [api_utils.py:273] non-default args: {'compilation_config': "
            "{'cudagraph_mode': 'PIECEWISE'}}\n"
            "torch.AcceleratorError: CUDA error: an illegal memory access was encountered\n")
    item = diagnose(text)[0]
    assert item.settings == {} and "--enforce-eager" in item.remedy


def test_unsupported_arch_reports_the_running_version() -> None:
    item = diagnose(log("v025_unsupported_arch.log"))[0]
    assert "vLLM 0.11.0" in item.summary and "MiniMaxM2ForCausalLM" in item.summary
    other = diagnose("Value error, Model architectures ['FooForCausalLM'] are not supported for now.")[0]
    assert other.settings == {} and "not verified" in other.remedy


def test_oom_numbers() -> None:
    item = diagnose(log("torch_cuda_oom.log"))[0]
    assert "279.60 GiB" in item.summary and "GPU 0" in item.summary
    assert "--max-num-seqs" in item.remedy and "vllm_max_model_len" in item.remedy


def test_oom_without_the_argument_starts_from_the_options_rows_default(monkeypatch) -> None:
    """vLLM logs only non-default args: without gpu_memory_utilization there, the value was the row's default."""
    import dataclasses

    from vllm_fleet.planner import options

    text = log("torch_cuda_oom.log").replace(", 'gpu_memory_utilization': 0.9}", "}")
    assert "'gpu_memory_utilization'" not in text
    assert diagnose(text)[0].settings == {"vllm_gpu_memory_utilization": 0.85}
    rows = tuple(dataclasses.replace(r, default=0.8) if r.key == "gpu_memory_utilization" else r for r in options.OPTIONS)
    monkeypatch.setattr(options, "OPTIONS", rows)
    item = diagnose(text)[0]
    assert item.settings == {"vllm_gpu_memory_utilization": 0.75} and "0.8 -> 0.75" in item.remedy


def test_fp8_marlin_is_a_warning_on_a_healthy_start() -> None:
    report = examine(log("v025_fp8_marlin_healthy.log"))
    assert [d.severity for d in report.diagnoses] == ["warning"]
    assert report.exit_code == 0


def test_missing_module_names_the_package() -> None:
    item = diagnose("ModuleNotFoundError: No module named 'cv2'")[0]
    assert "pip install opencv-python-headless" in item.remedy
    broken = diagnose("ModuleNotFoundError: No module named 'vllm._C'")[0]
    assert "vllm_version" in broken.remedy


def test_only_the_last_start_counts() -> None:
    text = log("restart_then_healthy.log")
    assert "To serve at least one request" in text  # the first start failed ...
    assert examine(text).status == "healthy"  # ... the restart came up


def test_empty_log_is_unknown() -> None:
    report = examine("")
    assert (report.status, report.exit_code, report.diagnoses) == ("unknown", 1, [])


def test_cli_exit_codes_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["doctor", str(LOGS / "seed_kv_cache.log")]) == 3
    assert "vllm_max_model_len = 158560" in capsys.readouterr().out
    assert cli.main(["doctor", "--json", str(LOGS / "v025_free_memory_tp4.log")]) == 3
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "failed" and result["exit_code"] == 3
    assert [d["code"] for d in result["diagnoses"]] == ["free_memory_below_utilization", "engine_core_init_failed"]
    assert cli.main(["doctor", str(LOGS / "v025_fp8_marlin_healthy.log")]) == 0
    assert cli.main(["doctor", str(LOGS / "unknown_nccl_failure.log")]) == 1
    assert "no known failure found" in capsys.readouterr().out
    assert cli.main(["doctor", str(LOGS / "missing.log")]) == 2


def test_cli_reads_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(log("seed_address_in_use.log")))
    assert cli.main(["doctor", "-"]) == 3
    assert "address_in_use" in capsys.readouterr().out


def test_an_engine_killed_without_a_python_error_says_where_to_look() -> None:
    died = diagnose(log("v025_engine_sigkill_journal.log"))[0]
    assert "died without a Python error: it was killed by a signal" in died.summary
    assert "exit status 0" in died.summary and "journalctl -k" in died.remedy and "dmesg" in died.remedy
    oom, engine = diagnose(log("v025_oom_kill_journal.log"))
    assert "OOM killer" in oom.summary and "host ran out of RAM" in oom.summary and "journalctl -k" in oom.remedy
    assert "the OOM killer killed it (oom_killed)" in engine.summary
    fatal, _, engine = diagnose(log("v025_engine_fatal_journal.log"))
    assert fatal.remedy.endswith("torch.AcceleratorError: CUDA error: an illegal memory access was encountered")
    assert "after the Python error logged above it" in engine.summary


def test_a_crash_the_service_came_back_from_is_a_warning() -> None:
    report = examine(log("v025_engine_sigkill_restarted_journal.log"))
    died = report.diagnoses[0]
    assert died.severity == "warning" and died.summary.startswith("Earlier in this journal (before the last start)")
    assert report.exit_code == 0


def test_watchdog_restart_restart_loop_start_limit_and_a_foreign_gpu_holder() -> None:
    watchdog = diagnose(log("watchdog_restart_journal.log"))[0]
    assert "The engine hung: 3 completions in a row got no answer within 30 s" in watchdog.summary
    assert "vllm_watchdog_deadline_s" in watchdog.remedy
    loop = [d for d in diagnose(log("v025_max_model_len_restart_loop_journal.log")) if d.code == "restart_loop"][0]
    assert "restarted the service 3 time(s)" in loop.summary
    limit = [d for d in diagnose(log("start_limit_journal.log")) if d.code == "start_limit_hit"][0]
    assert "systemctl reset-failed" in limit.remedy and "StartLimitIntervalSec=0" in limit.remedy
    held = diagnose(log("gpu_held_journal.log"))[0]
    assert "pid 7311 (python3, user alice, cgroup /user.slice/user-1001.slice/session-12.scope)" in held.summary
    assert "70000 MiB on GPU 1" in held.summary and "vllm_gpus" in held.remedy


def test_config_errors_name_the_setting_and_the_value_that_works() -> None:
    too_long = diagnose(log("v025_max_model_len_restart_loop_journal.log"))[0]
    assert "vllm_max_model_len (999999) is longer than the model's own limit (max_position_embeddings=8192" in too_long.summary
    assert too_long.remedy.startswith('set vllm_max_model_len = 8192 or "auto"')
    heads = diagnose(log("v025_config_tp_heads.log"))[0]
    assert heads.remedy.startswith("set vllm_tensor_parallel_size = 4 (the largest size up to 5 that divides 48)")
    world = diagnose(log("v025_config_world_size.log"))[0]
    assert "needs 8 GPUs" in world.summary and "sees 4" in world.summary and "vllm_gpus" in world.remedy
