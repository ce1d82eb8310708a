"""Every `vllm serve` argv the planner renders, checked by the REAL pinned vLLM.

One subprocess of tests/realvllm/check_argv.py, run by the real vLLM venv's
python (VLLM_FLEET_REAL_VLLM_PYTHON, made by tests/realvllm/ensure_venv.sh),
parses all of them with vLLM's own serve parser and validation, resolves the
tool-call / reasoning parser names in vLLM's registries and builds
AsyncEngineArgs (docs/real-vllm.md says exactly what is and is not checked).
Deliberately broken argv in the same run must be rejected: the check can fail.

The real vLLM's python is VLLM_FLEET_REAL_VLLM_PYTHON, else the one `./setup
--real-vllm` recorded in .venv/real-vllm-python. Skipped only when neither
names one; named but broken fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vllm_fleet.planner.modelinfo import list_profiles, load_profile
from vllm_fleet.planner.plan import Plan, PlanOptions, make_plan
from vllm_fleet.versions import VLLM_VERSION

HERE = Path(__file__).resolve().parent
CHECK_SCRIPT = HERE / "check_argv.py"
TINY_MODEL = HERE.parent / "fixtures" / "tiny-minimax-m2"
PYTHON_ENV = "VLLM_FLEET_REAL_VLLM_PYTHON"
RECORDED = HERE.parents[1] / ".venv" / "real-vllm-python"  # written by ./setup --real-vllm
VERSION_ENV = "VLLM_FLEET_CHECK_VLLM_VERSION"
CHECK_TIMEOUT_S = 300

HARDWARE = ("8xH200", "4xA800-80G", "2xH200")
LAYOUTS = ("TP", "TP+EP", "DP+EP", "PP")
SERVICE_SECRET_ENV = {"VLLM_API_KEY": "not-a-real-key"}
"""The service's EnvironmentFile carries the API key: its name must be one vLLM reads."""


def expected_version() -> str:
    """The vLLM version under check: the pin, or a one-off override (docs/real-vllm.md)."""
    return os.environ.get(VERSION_ENV) or VLLM_VERSION


@dataclass
class Case:
    """One argv to check, where it came from, and the env it runs with."""

    id: str
    argv: list[str]
    env: dict[str, str]
    layout: str = ""
    profile: str = ""
    variants: list[str] = field(default_factory=list)

    def item(self) -> dict[str, Any]:
        """check_argv.py's input form."""
        return {"id": self.id, "argv": self.argv, "env": self.env}


def layout_options(layout: str, gpus: int) -> dict[str, Any]:
    """PlanOptions for one of the supported layouts on `gpus` GPUs."""
    return {
        "TP": {},
        "TP+EP": {"enable_expert_parallel": True},
        "DP+EP": {"tensor_parallel_size": 1, "data_parallel_size": gpus, "enable_expert_parallel": True},
        "PP": {"pipeline_parallel_size": 2},
    }[layout]


def variant_options(profile: str) -> dict[str, dict[str, Any]]:
    """Non-default options a deploy may set; each is rendered on top of every layout."""
    out: dict[str, dict[str, Any]] = {
        "base": {},
        "piecewise": {"cudagraph_piecewise": True},
        "fp8kv": {"kv_cache_dtype": "fp8"},
        "eager+fixed-kv+block+len": {"enforce_eager": True, "kv_cache_memory_bytes": 8 * 2**30,
                                     "block_size": 16, "max_model_len": 8192, "gpu_memory_utilization": 0.85},
        "batch-limits+port": {"max_num_seqs": 64, "max_num_batched_tokens": 4096, "port": 9000, "bind_host": "0.0.0.0",
                              "served_model_name": "custom-name"},
        # vllm_nvlink_multicast / vllm_flashinfer_sampler = False: the env variables they add must be ones vLLM reads.
        "multicast-off+pytorch-sampler": {"nvlink_multicast": False, "flashinfer_sampler": False},
    }
    for parser in load_profile(profile).reasoning_parsers:
        out[f"reasoning={parser}"] = {"reasoning_parser": parser}
    return out


def plan_version() -> str:
    """The version plans target (a nightly override keeps the pin for the planner's rules)."""
    version = expected_version()
    return VLLM_VERSION if version == "nightly" else version


def case_of(plan: Plan, case_id: str, **meta: Any) -> Case:
    """A Case from a plan: its argv and the env the service would run with."""
    return Case(case_id, plan.argv, {**plan.env, **SERVICE_SECRET_ENV}, **meta)


def planner_cases() -> tuple[list[Case], dict[tuple[str, str], int]]:
    """Every deployable argv over profiles x hardware x layouts x variants, deduplicated,
    and how many deployable plans each (profile, layout) got."""
    cases: dict[str, Case] = {}
    coverage: dict[tuple[str, str], int] = {}
    for profile in list_profiles():
        for hw in HARDWARE:
            gpus = int(hw.split("x", 1)[0])
            for layout in LAYOUTS:
                for vname, extra in variant_options(profile).items():
                    options = PlanOptions(vllm_version=plan_version(), **layout_options(layout, gpus), **extra)
                    plan = make_plan(profile, hw, options)
                    if not plan.ok:
                        continue
                    coverage[(profile, layout)] = coverage.get((profile, layout), 0) + 1
                    key = json.dumps([plan.argv, plan.env])
                    if key not in cases:
                        cases[key] = case_of(plan, f"{profile}/{hw}/{layout}/{vname}", layout=layout, profile=profile)
    # The same planner on a local model directory (how the GPU smoke test and offline hosts serve).
    tiny = make_plan(str(TINY_MODEL), "1xH200", PlanOptions(vllm_version=plan_version(), max_model_len=8192,
                                                            gpu_memory_utilization=0.5))
    if tiny.ok:
        cases["tiny"] = case_of(tiny, "tiny-minimax-m2/1xH200/local-dir", layout="TP", profile="tiny")
    return list(cases.values()), coverage


def reference_case() -> Case:
    """A real planner argv (the seed's model, TP8+EP, PIECEWISE) that negatives mutate."""
    plan = make_plan("minimax-m2", "8xH200", PlanOptions(cudagraph_piecewise=True, vllm_version=plan_version()))
    assert plan.ok, plan.errors
    return case_of(plan, "reference")


def replace_value(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with `flag`'s value replaced (the flag must be there)."""
    i = argv.index(flag)
    return [*argv[: i + 1], value, *argv[i + 2:]]


NEGATIVES: dict[str, tuple[str, str]] = {
    # id: (stage that must reject it, text vLLM's error must contain)
    "neg/typo-flag": ("parse", "unrecognized arguments: --tensor-paralel-size"),
    "neg/unknown-reasoning-parser": ("api-server", "invalid reasoning parser: minimax_m9_think"),
    "neg/unknown-tool-parser": ("api-server", "invalid tool call parser: minimax_m9"),
    "neg/bad-cudagraph-mode": ("parse", "PIECEWIZE"),
    "neg/unknown-vllm-env": ("env", "Unknown vLLM environment variable detected: VLLM_USE_FLASHINFER_SAMPLR"),
    "neg/not-vllm-serve": ("prefix", "must start with 'vllm serve'"),
}


def negative_cases() -> list[Case]:
    """The reference argv with exactly one fault injected each."""
    ref = reference_case()
    argv, env = ref.argv, ref.env
    typo = [("--tensor-paralel-size" if a == "--tensor-parallel-size" else a) for a in argv]
    assert typo != argv
    bad_env = {**env, "VLLM_USE_FLASHINFER_SAMPLR": "0"}  # a misspelt vLLM variable (the plan's default env lacks the real one)
    return [
        Case("neg/typo-flag", typo, env),
        Case("neg/unknown-reasoning-parser", replace_value(argv, "--reasoning-parser", "minimax_m9_think"), env),
        Case("neg/unknown-tool-parser", replace_value(argv, "--tool-call-parser", "minimax_m9"), env),
        Case("neg/bad-cudagraph-mode",
             replace_value(argv, "--compilation-config", '{"cudagraph_mode": "PIECEWIZE"}'), env),
        Case("neg/unknown-vllm-env", argv, bad_env),
        Case("neg/not-vllm-serve", ["vllm", "bench", *argv[2:]], env),
    ]


def real_python() -> str:
    """The real vLLM venv's python, or skip when none is configured (dev machines)."""
    python = os.environ.get(PYTHON_ENV) or (RECORDED.read_text().strip() if RECORDED.is_file() else None)
    if not python:
        pytest.skip(f"{PYTHON_ENV} is unset and {RECORDED} absent: no real vLLM venv here (./setup --real-vllm builds one)")
    return python


def run_check(python: str, cases: list[Case]) -> dict[str, dict[str, Any]]:
    """One check_argv.py run over all cases; results by id. Any breakage of the run fails."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"
    try:
        proc = subprocess.run([python, str(CHECK_SCRIPT)], input=json.dumps([c.item() for c in cases]),
                              capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, env=env, check=False)
    except OSError as exc:
        pytest.fail(f"{PYTHON_ENV}={python} cannot run: {exc}")
    if proc.returncode != 0:
        pytest.fail(f"check_argv.py exited {proc.returncode} under {python}:\n{proc.stderr[-4000:]}")
    results = {}
    for line in proc.stdout.splitlines():
        result = json.loads(line)
        results[result["id"]] = result
    missing = [c.id for c in cases if c.id not in results]
    if missing:
        pytest.fail(f"check_argv.py gave no result for {missing}:\n{proc.stderr[-4000:]}")
    return results


@pytest.fixture(scope="module")
def checked() -> tuple[list[Case], dict[tuple[str, str], int], dict[str, dict[str, Any]]]:
    """All positive and negative cases, checked in ONE real-vLLM subprocess."""
    python = real_python()
    positives, coverage = planner_cases()
    results = run_check(python, positives + negative_cases())
    return positives, coverage, results


def test_the_real_vllm_is_the_version_under_check(checked) -> None:
    _, _, results = checked
    versions = {r["vllm_version"] for r in results.values()}
    assert len(versions) == 1, versions
    if expected_version() != "nightly":
        assert versions == {expected_version()}, f"{PYTHON_ENV} runs vLLM {versions}, expected {expected_version()}"


def test_every_profile_is_rendered_in_every_supported_layout(checked) -> None:
    positives, coverage, _ = checked
    missing = []
    for profile in list_profiles():
        moe = load_profile(profile).arch.moe is not None
        for layout in LAYOUTS:
            if (moe or "EP" not in layout) and not coverage.get((profile, layout)):
                missing.append(f"{profile} {layout}")
    assert not missing, f"no deployable plan on {HARDWARE} for: {missing} (add hardware that fits, or say why not)"
    assert len(positives) >= len(list_profiles()) * len(LAYOUTS)


def test_every_rendered_argv_is_accepted_by_real_vllm(checked) -> None:
    positives, _, results = checked
    rejected = [
        f"{c.id}: stage {results[c.id]['stage']}: {results[c.id]['error']}\n  argv: {c.argv}\n  env: {c.env}"
        for c in positives if not results[c.id]["ok"]
    ]
    assert not rejected, "real vLLM rejects rendered argv:\n" + "\n".join(rejected)


def test_rendered_argv_draws_no_vllm_warnings(checked) -> None:
    """Deprecated flags and duplicate flags only warn in vLLM; the planner must use neither."""
    positives, _, results = checked
    warned = [f"{c.id}: {results[c.id]['warnings']}" for c in positives if results[c.id]["warnings"]]
    assert not warned, "\n".join(warned)


@pytest.mark.parametrize("case_id", sorted(NEGATIVES))
def test_a_broken_argv_is_rejected(checked, case_id: str) -> None:
    _, _, results = checked
    stage, text = NEGATIVES[case_id]
    result = results[case_id]
    assert result["ok"] is False, f"{case_id} was accepted: the check cannot fail"
    assert result["stage"] == stage, result
    assert text in result["error"], result


def test_the_reference_argv_itself_is_accepted(checked) -> None:
    """The negatives differ from an accepted argv by one fault each."""
    positives, _, results = checked
    ref = reference_case()
    matches = [c.id for c in positives if c.argv == ref.argv and c.env == ref.env]
    assert matches, "the reference argv is not among the planner cases"
    assert all(results[m]["ok"] for m in matches), [results[m] for m in matches]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
