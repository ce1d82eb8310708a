"""One model across several hosts on vLLM's own multi-node runtime (docs/multi-node.md).

Built so far: the settings section (settings.py), the fleet's cluster topology (vllm_fleet/fleet.py `Cluster`)
and the multi-node plan (vllm_fleet/planner/cluster.py). Not built yet: the per-node units and the deploy step.
"""
