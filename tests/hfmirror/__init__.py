"""A local Hugging Face-compatible mirror for tests (127.0.0.1 only) and the tiny repo it serves."""
