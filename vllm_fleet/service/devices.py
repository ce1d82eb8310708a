"""The host's NVIDIA helpers and RDMA device nodes the unit depends on (pure: the script and its parser).

Read by the fact ``vllm_fleet.service.facts.NvidiaDevices`` (one command), used by
``vllm_fleet.service.render``: nvidia-modprobe goes into the device-node unit, nvidia-persistenced is
ordered before the service, /dev/infiniband and /dev/gdrdrv are added to the unit's DeviceAllow.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The command: one line per thing found (POSIX sh; exit 0 whatever is missing).
DEVICES_SCRIPT = ("command -v nvidia-modprobe || true; "
                  "for d in /dev/infiniband /dev/gdrdrv; do test -e $d && echo $d; done; "
                  "systemctl list-unit-files --no-legend nvidia-persistenced.service 2>/dev/null "
                  "| grep -q nvidia-persistenced && echo nvidia-persistenced.service; true")
#: Where NVIDIA's packages and the .run installer put nvidia-modprobe (assumed when no host was asked).
NVIDIA_MODPROBE = "/usr/bin/nvidia-modprobe"


@dataclass(frozen=True)
class HostDevices:
    """``nvidia_modprobe``: its path (None: not installed); ``persistenced``: nvidia-persistenced.service exists;
    ``infiniband`` / ``gdrdrv``: /dev/infiniband and /dev/gdrdrv exist (NCCL over InfiniBand, GPUDirect RDMA)."""

    nvidia_modprobe: str | None = NVIDIA_MODPROBE
    persistenced: bool = False
    infiniband: bool = False
    gdrdrv: bool = False


def parse_devices(lines: list[str]) -> HostDevices:
    """HostDevices from the lines DEVICES_SCRIPT prints."""
    words = [line.strip() for line in lines if line.strip()]
    modprobe = next((w for w in words if w.startswith("/") and w.endswith("/nvidia-modprobe")), None)
    return HostDevices(nvidia_modprobe=modprobe, persistenced="nvidia-persistenced.service" in words,
                       infiniband="/dev/infiniband" in words, gdrdrv="/dev/gdrdrv" in words)
