"""Entry points of the vLLM TEST DOUBLE (mirrors vllm.entrypoints's layout)."""
