"""Implementation of the vLLM TEST DOUBLE: flags, model checks, logs, faults, HTTP server."""
