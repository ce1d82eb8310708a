"""TEST DOUBLE of `vllm.model_executor.models`: only `ModelRegistry.get_supported_archs()`.

Real vLLM's registry answers the same call (vllm/model_executor/models/registry.py);
the double's answer is the architectures its `serve` accepts.
"""

from __future__ import annotations

from vllm.test_double.model import SUPPORTED_ARCHITECTURES


class _ModelRegistry:
    """The double's model registry: the architectures `vllm serve` accepts."""

    @staticmethod
    def get_supported_archs() -> list:
        """Architecture names, as real vLLM's `ModelRegistry.get_supported_archs()` returns them."""
        return list(SUPPORTED_ARCHITECTURES)


ModelRegistry = _ModelRegistry()

__all__ = ["ModelRegistry"]
