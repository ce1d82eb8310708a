"""The plan (pure): layout, memory, KV arithmetic and every vLLM flag, from settings and GPU facts."""
