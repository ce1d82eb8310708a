"""The `vllm` command line of the vLLM TEST DOUBLE."""
