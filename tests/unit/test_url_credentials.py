"""Credentials in URLs are refused, and never shown, wherever a setting holds a URL (issue 14, item 5).

A URL with ``user:password@`` (or a token as the user over http(s)) would stand in commands that run
as root (``ps`` shows them), in pyinfra's output at -vv and in the unit file; the settings refuse it
and the error itself masks the credentials (`errors.mask_credentials`).
"""

from __future__ import annotations

import pytest

from vllm_fleet.errors import SettingsError, mask_credentials, url_credentials
from vllm_fleet.settings import load_settings

PASSWORD = "hunter2-s3cr3t"
BASE = {"vllm_model": "tests/fixtures/tiny-minimax-m2"}
CRED = f"https://deploy:{PASSWORD}@pypi.example.internal/simple"
TOKEN_AS_USER = f"https://{PASSWORD}@pypi.example.internal/simple"


@pytest.mark.parametrize("key,value", [
    ("vllm_index_url", CRED),
    ("vllm_index_url", TOKEN_AS_USER),
    ("vllm_torch_index_url", CRED),
    ("vllm_nightly_index_url", CRED),
    ("vllm_extra_index_urls", [CRED]),
    ("vllm_find_links", [TOKEN_AS_USER]),
    ("vllm_extra_args", [f"--some-url={CRED}"]),
    ("vllm_extra_env", {"HF_ENDPOINT": f"https://mirror:{PASSWORD}@hf.example.internal"}),
    ("vllm_weights_sources", [{"kind": "hf", "repo": "Org/Name", "endpoint": f"https://u:{PASSWORD}@hf.example.internal"}]),
])
def test_a_url_with_credentials_is_refused_and_the_error_masks_them(key, value):
    with pytest.raises(SettingsError) as err:
        load_settings({**BASE, key: value}, host="gpu-1")
    text = str(err.value)
    assert text.startswith(f"host gpu-1: {key}=") and PASSWORD not in text, text
    assert "***@" in text


def test_source_url_with_credentials_is_refused_but_an_ssh_account_is_not():
    src = {**BASE, "vllm_channel": "source"}
    with pytest.raises(SettingsError) as err:
        load_settings({**src, "vllm_source_url": f"git+https://x-access-token:{PASSWORD}@github.com/vllm-project/vllm"})
    assert PASSWORD not in str(err.value) and "vllm_source_url" in str(err.value)
    assert load_settings({**src, "vllm_source_url": "ssh://git@github.com/vllm-project/vllm"}).source_url.startswith("ssh://git@")


def test_mask_and_detect():
    assert mask_credentials(f"see {CRED} and http://a@b/") == "see https://***@pypi.example.internal/simple and http://***@b/"
    assert url_credentials(CRED) and url_credentials(TOKEN_AS_USER) and url_credentials(f"ssh://git:{PASSWORD}@h/x")
    assert not url_credentials("ssh://git@github.com/x") and not url_credentials("https://pypi.org/simple")
    assert not url_credentials("user@example.com")  # no scheme: not a URL


# -- credentials in a URL's query string (B5): the same refusal and masking as user:password@ ---------------

QUERY = [f"?token={PASSWORD}", f"?x=1&api_key={PASSWORD}", f"?APIKEY={PASSWORD}", f"?Access_Token={PASSWORD}",
         f"?password={PASSWORD}&b=2", f"?secret={PASSWORD}", f"?sig={PASSWORD}", f"?X-Amz-Signature={PASSWORD}",
         f"?key={PASSWORD}", f"?hf_token={PASSWORD}", f"#access_token={PASSWORD}"]


@pytest.mark.parametrize("query", QUERY)
@pytest.mark.parametrize("key,make", [
    ("vllm_index_url", lambda q: f"https://pypi.example/simple{q}"),
    ("vllm_extra_index_urls", lambda q: [f"https://pypi.example/simple{q}"]),
    ("vllm_find_links", lambda q: [f"https://wheels.example/{q}"]),
    ("vllm_extra_args", lambda q: ["--some-url", f"https://x.example/{q}"]),
    ("vllm_extra_env", lambda q: {"HF_ENDPOINT": f"https://mirror.example/{q}"}),
    ("vllm_weights_sources", lambda q: [{"kind": "hf", "repo": "Org/Name", "endpoint": f"https://mirror.example/{q}"}]),
])
def test_a_secret_in_a_url_query_is_refused_and_masked(key, make, query):
    with pytest.raises(SettingsError) as err:
        load_settings({**BASE, key: make(query)}, host="gpu-1")
    text = str(err.value)
    assert text.startswith(f"host gpu-1: {key}=") and PASSWORD not in text, text
    assert "=***" in text and "remedy:" in text


def test_the_weights_endpoint_remedy_names_the_token_setting():
    with pytest.raises(SettingsError) as err:
        load_settings({**BASE, "vllm_weights_sources": [{"kind": "hf", "repo": "Org/Name",
                                                         "endpoint": f"https://mirror.example/?token={PASSWORD}"}]})
    remedy = str(err.value).split("remedy:", 1)[1]
    assert "VLLM_FLEET_HF_TOKEN" in remedy and "vllm_hf_token" in remedy


@pytest.mark.parametrize("url", ["https://pypi.example/simple?page=2", "https://h.example/?tokens_left=3&keyword=x",
                                 "https://h.example/?token=", "https://h.example/a?monkey=1", "https://pypi.org/simple"])
def test_a_query_without_a_secret_passes(url):
    assert not url_credentials(url)
    assert load_settings({**BASE, "vllm_index_url": url}).index_url == url


def test_mask_a_query_secret():
    assert mask_credentials(f"see https://h.example/s?a=1&Token={PASSWORD}&b=2 now") == \
        "see https://h.example/s?a=1&Token=***&b=2 now"
    assert mask_credentials("key=value outside a URL") == "key=value outside a URL"
