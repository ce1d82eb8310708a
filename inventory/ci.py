"""The test hosts: systemd containers made by `python tests/hosts.py up` (see tests/README.md).

- fleet-a: reached with docker exec; emulated 4x A800-SXM4-80GB, driver 570 / CUDA 12.8.
- fleet-b: reached with docker exec; emulated 2x H200, driver 580 / CUDA 13.0.
- fleet-c: reached over real SSH (paramiko) as the unprivileged `deploy` user with
  passwordless sudo, on 127.0.0.1:2222; emulated 4x A800 with GPU 1 partly held by
  another process.

The hosts share the loopback (--network host), so each gets its own vLLM port.
"""

import os
from pathlib import Path

_state = Path(os.environ.get("VLLM_FLEET_TEST_STATE", Path(__file__).resolve().parent.parent / ".cache" / "testhosts"))

docker_hosts = [
    ("@docker/fleet-a", {"vllm_port": 8101, "vllm_gpus": [0, 1, 2, 3]}),
    ("@docker/fleet-b", {"vllm_port": 8102}),
]

ssh_hosts = [
    (
        "fleet-c",
        {
            "ssh_hostname": "127.0.0.1",
            "ssh_port": 2222,
            "ssh_user": "deploy",
            "ssh_key": str(_state / "ssh" / "id_ed25519"),
            "ssh_known_hosts_file": str(_state / "ssh" / "known_hosts"),
            "_sudo": True,
            "vllm_port": 8103,
            "vllm_gpus": [0, 2],
        },
    ),
]
