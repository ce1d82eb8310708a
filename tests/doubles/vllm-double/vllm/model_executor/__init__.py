"""TEST DOUBLE: the part of `vllm.model_executor` vllm-fleet's verify step reads (the model registry)."""
