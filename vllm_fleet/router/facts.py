"""pyinfra facts of the router step."""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase
from typing_extensions import override

from vllm_fleet.layout import dist_info_glob


class RouterState(FactBase[dict]):
    """
    The router venv's vllm-router version, the distribution's nginx (the front), and the states of the router,
    its front and its prober units, in one command.

    + venv: the router's venv
    + unit: the router unit (with .service)
    + prober: the replica prober's unit (with .service)
    + front: the front's unit (with .service)

    .. code:: python

        {"version": "0.1.17", "nginx": "1.22.1-9+deb12u11", "active": "active", "enabled": "enabled", ...}
    """

    @override
    def command(self, venv: str, unit: str, prober: str, front: str = "") -> str:
        q = shlex.quote
        units = "".join(f"echo {k}_active=$(systemctl is-active {q(u)} 2>/dev/null); "
                        f"echo {k}_enabled=$(systemctl is-enabled {q(u)} 2>/dev/null); "
                        for k, u in (("router", unit), ("prober", prober), ("front", front)) if u)
        return (f"echo version=$(ls -d {dist_info_glob(venv, 'vllm_router')} 2>/dev/null | head -1); "
                "echo nginx=$(dpkg-query -W -f '${db:Status-Status} ${Version}' nginx 2>/dev/null); " + units).rstrip("; ")

    @override
    def process(self, output: list[str]) -> dict:
        out = {"version": None, "nginx": None, "active": "", "enabled": "", "prober_active": "", "prober_enabled": "",
               "front_active": "", "front_enabled": ""}
        for line in output:
            key, _, value = line.partition("=")
            if key == "version":
                out["version"] = value.rsplit("vllm_router-", 1)[-1].removesuffix(".dist-info") if value else None
            elif key == "nginx":
                out["nginx"] = value.split(" ", 1)[1] if value.startswith("installed ") else None
            elif key in ("router_active", "router_enabled"):
                out[key.removeprefix("router_")] = value
            elif key in out:
                out[key] = value
        return out
