"""Property: any value of any setting gives valid settings or one SettingsError naming the key, never a traceback.

Random and adversarial values (wrong types, huge and negative numbers, NaN and infinities,
strings with newlines, control characters, ``$(...)``, spaces and other Unicode, system paths,
nested lists and dicts, bytes) are fed to every setting through the entry the deploy uses
(deploy.py: `load_settings` with the host's name), and what the deploy does with valid
settings before any host fact is read follows: the host layout, the weights' fetch plan and
its warnings, the plan options, a plan on fixed hardware and the service's rendered files. Either that succeeds, or the
only exception is the project's error class (`FleetError`; from `load_settings`, a
`SettingsError` whose message names the host and the setting key with a remedy). A secret's
value never appears in an error.
"""

from __future__ import annotations

import math
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_fleet.errors import FleetError, SettingsError
from vllm_fleet.layout import HostLayout
from vllm_fleet.planner.plan import make_plan
from vllm_fleet.service.render import RenderError, render
from vllm_fleet.settings import FREE_TEXT, PREFIX, Settings, load_settings
from vllm_fleet.weights import source as wplan

KEYS = sorted(Settings.model_fields)
SECRET_KEYS = {"api_key", "hf_token"}
SECRET_VALUE = "s3cr3t-Value-42"

ADVERSARIAL_STRINGS = [
    "", " ", "a b", "vllm\n", "\n", "x\r\ny", "\t", "\x00", "\x1b[31m", "\u2028", "\u202e", "\ufeff", "\x85",
    "$(id)", "`id`", "; rm -rf /", "a && b", "'", '"', "\\", "%", "{{ x }}", "${HOME}", "*", "~", "~nouser/x",
    "/", "/etc", "/etc/passwd", "/tmp", "/tmp/x", "/" + "home" + "/x", "/root", "/opt", "/var/lib", "/usr", "/proc/self",
    "/dev/null", "/opt/../etc", "../x", "relative/path", "/opt/vllm fleet", "/opt/vllm-fleet\n", "//opt//x",
    "ä/ü", "模型", "😀", "a" * 5000, "/" + "a" * 5000, "-", "--api-key", "--api-key=" + SECRET_VALUE, "-1", "0",
    "1e400", "nan", "inf", "auto", "true", "None", "127.0.0.1", "0.0.0.0", "::", "localhost", "http://x",
    "https://user:pw@example.com/simple", "file:///tmp", "3.12", "0.25.0", "minimax-m2", "vllm", "root",
]
NUMBERS = st.one_of(
    st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 15, 16, 1023, 1024, 65535, 65536, 2**31, 2**63, 10**18, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 0.5]),
)
STRINGS = st.one_of(st.sampled_from(ADVERSARIAL_STRINGS), st.text(max_size=40), st.text(alphabet=st.characters(codec="utf-8"), max_size=8))
LEAVES = st.one_of(st.none(), st.booleans(), NUMBERS, STRINGS, st.binary(max_size=8))
VALUES = st.recursive(
    LEAVES,
    lambda children: st.one_of(st.lists(children, max_size=4), st.tuples(children, children),
                               st.dictionaries(STRINGS, children, max_size=3)),
    max_leaves=8,
)
SOURCES = st.lists(st.fixed_dictionaries(
    {"kind": st.sampled_from(["hf", "modelscope", "local", "s3"])},
    optional={"repo": st.one_of(STRINGS, st.just("MiniMaxAI/MiniMax-M2")), "path": STRINGS,
              "revision": st.one_of(STRINGS, st.none()), "endpoint": STRINGS, "extra": VALUES},
), max_size=3)


def value_for(key: str):
    """Anything at all, and for structured settings also values of nearly the right shape."""
    if key == "weights_sources":
        return st.one_of(VALUES, SOURCES)
    if key in ("extra_args", "gpus", "extra_index_urls", "find_links"):
        return st.one_of(VALUES, st.lists(st.one_of(STRINGS, NUMBERS), max_size=5))
    if key in ("extra_env", "supported_os"):
        return st.one_of(VALUES, st.dictionaries(STRINGS, st.one_of(STRINGS, st.lists(STRINGS, max_size=3)), max_size=3))
    return VALUES


def deploy_entry(data: dict) -> None:
    """What deploy.py does with one host's data before reading any host fact (pure parts)."""
    s = load_settings(data, host="gpu-1")
    HostLayout.of(s)
    plan = wplan.fetch_plan(s)
    if plan is not None:
        wplan.check_serve_path(plan.serve_path) if plan.sources[0].kind != "local" else None
    wplan.source_warnings(s, None)
    options = s.plan_options()
    plan = make_plan(s.model, "8xH200", options)
    render(s, plan, HostLayout.of(s).venv("vllm-test"))  # what the host gets: accepted settings always render


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _accepted_text_is_clean(key: str, value) -> None:
    """Accepted values hold no control character, and no whitespace outside extra args' words / extra env's values."""
    for text in _strings(value):
        for c in text:
            cat = unicodedata.category(c)
            assert cat not in ("Cc", "Cf", "Cs", "Zl", "Zp"), f"{PREFIX}{key} accepted {c!r} in {text!r}"
            if key not in FREE_TEXT:
                assert not (c.isspace() or cat == "Zs"), f"{PREFIX}{key} accepted whitespace {c!r} in {text!r}"


def check(key: str, value) -> None:
    data = {PREFIX + key: value}
    if key in SECRET_KEYS and isinstance(value, str):
        value = data[PREFIX + key] = value + SECRET_VALUE
    try:
        deploy_entry(data)
        _accepted_text_is_clean(key, value)
    except SettingsError as exc:
        text = str(exc)
        assert text.startswith("host gpu-1: "), text
        assert PREFIX + key in text, f"the error does not name {PREFIX + key}: {text}"
        assert "remedy:" in text, text
        assert "Traceback (most recent call last)" not in text  # the marker itself: a value may hold the word (hypothesis drew one)
        if key in SECRET_KEYS:
            assert SECRET_VALUE not in text, text
    except FleetError as exc:
        # the plan's own error class (PlanError): one message, no traceback; never the renderer's, which names no
        # host, setting or remedy (a setting it cannot write must be refused by the settings)
        assert not isinstance(exc, RenderError), f"{PREFIX}{key} was accepted but cannot be rendered: {exc}"
    # Any other exception propagates and fails the property.


@pytest.mark.parametrize("key", KEYS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_value_of_a_setting_is_valid_or_one_clear_error_naming_it(key, data):
    check(key, data.draw(value_for(key), label=key))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.dictionaries(st.sampled_from(KEYS), VALUES, min_size=2, max_size=4))
def test_several_bad_settings_at_once_give_one_settings_error(values):
    data = {PREFIX + k: v for k, v in values.items()}
    try:
        deploy_entry(data)
    except SettingsError as exc:
        named = [k for k in values if PREFIX + k in str(exc)]
        assert named and "remedy:" in str(exc), str(exc)
    except FleetError as exc:
        assert not isinstance(exc, RenderError), f"accepted but cannot be rendered: {exc}"


@pytest.mark.parametrize("value", ADVERSARIAL_STRINGS)
@pytest.mark.parametrize("key", ["model", "service_name", "service_user", "base_dir", "data_dir", "served_model_name",
                                 "reasoning_parser", "version", "python_version", "bind_host", "advertise_address"])
def test_every_adversarial_string_in_every_name_and_path(key, value):
    check(key, value)


@pytest.mark.parametrize("name", ADVERSARIAL_STRINGS)
def test_every_adversarial_string_as_an_environment_name(name):
    """An environment name the settings accept is one the unit can carry (B1: 'A=B' passed and the render raised)."""
    check("extra_env", {name: "1"})
