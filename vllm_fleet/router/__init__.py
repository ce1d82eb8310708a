"""The router: one endpoint per model in front of its replicas (vllm-router), and the drain a rolling change uses."""
