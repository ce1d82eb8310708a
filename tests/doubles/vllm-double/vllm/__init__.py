"""TEST DOUBLE of the vLLM serving engine, for vllm-fleet CI. NOT vLLM.

This package is installed under the distribution name `vllm` only so that a
deploy running `install vllm==X` against a local wheelhouse gets something it
can start. It loads no model and needs no GPU: `vllm serve MODEL ...` parses
the serve flags vllm-fleet renders, checks MODEL/config.json, prints
vLLM-like startup lines and answers the OpenAI routes with canned text. It can
be told to fail the ways real vLLM fails (see vllm.test_double.faults).
It lives in the vllm-fleet repository under tests/doubles/ and never ships.
"""

from __future__ import annotations

IS_TEST_DOUBLE = True
DEFAULT_VERSION = "0.25.0"


def _installed_version() -> str:
    """The version this wheel was built with, or the default when run from source."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution
    except ImportError:  # pragma: no cover - Python < 3.8
        return DEFAULT_VERSION
    try:
        dist = distribution("vllm")
    except PackageNotFoundError:
        return DEFAULT_VERSION
    # Only trust the metadata when it belongs to this very package (not a real vLLM elsewhere on the path).
    files = dist.files or []
    if any(str(f).replace("\\", "/") == "vllm/test_double/__init__.py" for f in files):
        return dist.version
    return DEFAULT_VERSION


__version__ = _installed_version()
