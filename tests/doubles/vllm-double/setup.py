"""Build hook of the vLLM TEST DOUBLE: the wheel's version is set at build time.

`VLLM_DOUBLE_VERSION=0.26.0 uv build --wheel` builds `vllm-0.26.0-py3-none-any.whl`;
unset, the version is the toolkit's pinned 0.25.0.
"""

import os
import re

from setuptools import setup

DEFAULT_VERSION = "0.25.0"
VERSION = os.environ.get("VLLM_DOUBLE_VERSION", "").strip() or DEFAULT_VERSION
if not re.fullmatch(r"\d+(\.\d+)*([a-z0-9.+-]*)", VERSION):
    raise SystemExit(f"VLLM_DOUBLE_VERSION={VERSION!r} is not a version such as 0.25.0")

setup(version=VERSION)
