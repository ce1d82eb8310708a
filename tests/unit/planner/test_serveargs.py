"""Extra `vllm serve` args are read the way the pinned vLLM's parser reads them (vllm_fleet/planner/serveargs.py).

The option table is vllm_fleet/planner/vllm_serve_flags.json, dumped from the real vLLM 0.25.0
parser (tests/realvllm/dump_serve_flags.py; tests/realvllm/test_serve_flags_fixture.py checks it
still is the real one).
"""

from __future__ import annotations

import pytest

from vllm_fleet.errors import SettingsError
from vllm_fleet.planner import options, serveargs
from vllm_fleet.planner.plan import PlanError, options_from
from vllm_fleet.settings import load_settings
from vllm_fleet.versions import VLLM_VERSION


def _refused(words, **data) -> str:
    with pytest.raises(SettingsError) as info:
        load_settings({"vllm_extra_args": words, **data}, host="gpu-1")
    text = str(info.value)
    assert text.startswith("host gpu-1: vllm_extra_args=") and "remedy:" in text, text
    return text


def test_the_fixture_is_of_the_pinned_vllm_and_holds_every_rows_flag():
    assert serveargs.vllm_version() == VLLM_VERSION
    flags = set(serveargs.all_flags())
    assert len(flags) > 250  # vLLM 0.25.0's serve parser has 271 options (more spellings)
    for row in options.OPTIONS:
        for f in row.flags:
            assert f in flags, f"{row.key}: {f} is no option of vLLM {VLLM_VERSION}"


@pytest.mark.parametrize(("words", "setting"), [
    (["--max-model", "4096"], "vllm_max_model_len"),             # a unique prefix (argparse allow_abbrev)
    (["--max_model=4096"], "vllm_max_model_len"),                # underscores + prefix + '='
    (["--max_model_len", "4096"], "vllm_max_model_len"),
    (["--tensor-par", "2"], "vllm_tensor_parallel_size"),
    (["-tp", "2"], "vllm_tensor_parallel_size"),
    (["--no-enable-exp"], "vllm_enable_expert_parallel"),        # the --no- twin, abbreviated
    (["-ep"], "vllm_enable_expert_parallel"),                    # an alias only vLLM's table has
    (["--enable-expert-parallel=1"], "vllm_enable_expert_parallel"),
    (["-cc.cudagraph_mode=PIECEWISE"], "vllm_cudagraph_piecewise"),  # a dotted key of the owned JSON option
    (["--compilation_config.mode", "3"], "vllm_cudagraph_piecewise"),
    (["--gpu-memory-util", "0.5"], "vllm_gpu_memory_utilization"),
    (["--served-model", "x"], "vllm_served_model_name"),
    (["--model", "other/repo"], "vllm_model"),
    (["--trust-remote"], "the model profile (models/*.yaml)"),
    (["--no-trust-remote-code"], "the model profile (models/*.yaml)"),
])
def test_a_plan_owned_flag_is_refused_whatever_the_spelling(words, setting):
    text = _refused(words)
    assert "which the plan owns" in text and f"set {setting} instead" in text


@pytest.mark.parametrize("words", [
    ["--api-k", "sk-secret-1234"], ["--api_key=sk-secret-1234"], ["--api-key", "sk-secret-1234"],
    ["--hf-tok", "sk-secret-1234"], ["--hf_token=sk-secret-1234"], ["--seed", "1", "--hf-to=sk-secret-1234"],
])
def test_a_secret_flag_is_refused_whatever_the_spelling_and_its_value_never_shown(words):
    text = _refused(words)
    assert "EnvironmentFile" in text and "sk-secret-1234" not in text
    with pytest.raises(PlanError, match="must not travel in argv"):
        options_from(extra_args=tuple(words))


@pytest.mark.parametrize("words", [["--config", "x.yaml"], ["--config=x.yaml"], ["--seed", "1", "--config", "/etc/x.yml"]])
def test_config_files_are_refused_with_the_remedy(words):
    text = _refused(words)
    assert "--config" in text and "YAML file the plan cannot check" in text and "vllm_extra_args" in text


@pytest.mark.parametrize("words", [["-h"], ["--help"], ["--hel"]])
def test_help_is_refused(words):
    assert "prints its help and exits" in _refused(words)


@pytest.mark.parametrize(("words", "why"), [
    (["--api", "x"], "ambiguous option: --api could match --api-key, --api-server-count"),
    (["--conf", "x.yaml"], "ambiguous option: --conf could match --config, --config-format"),
    (["--seed"], "expected one argument"),
    (["--enable-prefix-caching=yes"], "ignored explicit argument"),
])
def test_words_vllms_parser_refuses_are_refused_with_its_reason(words, why):
    text = _refused(words)
    assert why in text and "spell each option in full" in text and "'x'" not in text


@pytest.mark.parametrize("words", [["--swap-space", "4"], ["--disable-log-requests"], ["stray-positional"]])
def test_unknown_words_are_refused_for_the_pinned_release(words):
    text = _refused(words)
    assert "unrecognized arguments" in text and repr(words[0]) in text
    # Another vLLM version has other options: only what the pinned table proves is refused.
    assert load_settings({"vllm_extra_args": words, "vllm_version": "0.26.0"}).extra_args == words


@pytest.mark.parametrize("words", [
    ["--enable-prefix-caching"], ["--max-num-partial-prefills", "4"], ["-O3"], ["--seed=1"], ["--enable_prefix_caching"],
    ["--speculative-config.method", "ngram"], ["--config-format", "hf"], ["--uvicorn-log", "info"],
])
def test_other_options_pass(words):
    assert load_settings({"vllm_extra_args": words}).extra_args == words


def test_non_string_words_are_refused_not_a_traceback():
    text = _refused(["--seed", 1])
    assert "not a string" in text or "valid string" in text


def test_the_parser_reads_words_as_vllm_does():
    parsed = serveargs.parse(["--max_model", "5", "-n4", "-O3", "--foo", "bar", "--compilation-config.mode=3"])
    assert [(u.flag, u.values) for u in parsed.uses] == [
        ("--max-model-len", ("5",)), ("--nnodes", ("4",)), ("--optimization-level", ("3",)), ("--compilation-config", ("3",))]
    assert parsed.unknown == ("--foo", "bar")
    assert serveargs.masked(["--seed", "1", "--api-k=abc", "--hf-token", "hf_x"], options.secret_flags()) == [
        "--seed", "1", "***", "--hf-token", "***"]
