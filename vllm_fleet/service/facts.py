"""pyinfra facts of the service step."""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase
from typing_extensions import override

from vllm_fleet.service.devices import DEVICES_SCRIPT, HostDevices, parse_devices


class CompanionUnits(FactBase[dict]):
    """
    Returns ``{unit: (ActiveState, UnitFileState)}`` for the given units, in one command ("" for an unknown unit).

    .. code:: python

        {"vllm-watchdog.service": ("active", "enabled")}
    """

    @override
    def command(self, units: list[str] | tuple[str, ...] = ()) -> str:
        q = shlex.quote
        return "; ".join(f"echo {q(u)} $(systemctl is-active {q(u)} 2>/dev/null) $(systemctl is-enabled {q(u)} 2>/dev/null)"
                         for u in units) or "true"

    @override
    def process(self, output: list[str]) -> dict:
        found = {}
        for line in output:
            words = line.split()
            if words:
                found[words[0]] = (words[1] if len(words) > 1 else "", words[2] if len(words) > 2 else "")
        return found


class NvidiaDevices(FactBase[HostDevices]):
    """
    Returns nvidia-modprobe's path, whether nvidia-persistenced.service exists, and whether /dev/infiniband and
    /dev/gdrdrv exist (one command).

    .. code:: python

        HostDevices(nvidia_modprobe="/usr/bin/nvidia-modprobe", persistenced=True, infiniband=False, gdrdrv=False)
    """

    @override
    def command(self) -> str:
        return DEVICES_SCRIPT

    @override
    def process(self, output: list[str]) -> HostDevices:
        return parse_devices(output)
