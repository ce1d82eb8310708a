"""An example production fleet: copy, then edit host names and overrides.

Every key is documented in group_data/all.py; anything set here overrides it
for one host. Group-wide overrides for this file's hosts go in
group_data/prod.py. Export the API key before running:

    export VLLM_FLEET_API_KEY=$(openssl rand -hex 24)   # once; keep it in your secret store
    pyinfra inventory/prod.py deploy.py --dry
    pyinfra inventory/prod.py deploy.py
"""

gpu_hosts = [
    # The seed's machine: 4x A800-SXM4-80GB, MiniMax-M2 at TP=4 (the planner picks the
    # longest context that fits; the seed found 158560 by crashing).
    ("a800-01.example.internal", {
        "ssh_user": "ubuntu",
        "_sudo": True,
    }),
    # Same kind of box, but GPUs 0 and 2 are used by someone else: serve on the other four
    # of eight, like the seed's CUDA_VISIBLE_DEVICES=1,3,4,5.
    ("a800-02.example.internal", {
        "ssh_user": "ubuntu",
        "_sudo": True,
        "vllm_gpus": [1, 3, 4, 5],
        "vllm_port": 8200,
    }),
    # An H200 box reachable by other machines: a non-loopback bind needs the API key.
    ("h200-01.example.internal", {
        "ssh_user": "ubuntu",
        "_sudo": True,
        "vllm_bind_host": "0.0.0.0",
        "vllm_max_model_len": 196608,
    }),
]
