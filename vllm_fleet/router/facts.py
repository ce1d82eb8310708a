"""pyinfra facts of the router step."""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase
from typing_extensions import override


class RouterState(FactBase[dict]):
    """
    The router venv's vllm-router version and the router unit's state, in one command.

    + venv: the router's venv
    + unit: the router unit (with .service)
    + prober: the replica prober's unit (with .service)

    .. code:: python

        {"version": "0.1.17", "active": "active", "enabled": "enabled"}
    """

    @override
    def command(self, venv: str, unit: str, prober: str) -> str:
        q = shlex.quote
        return (f"echo version=$(ls -d {q(venv)}/lib/python3*/site-packages/vllm_router-*.dist-info 2>/dev/null | head -1); "
                f"echo active=$(systemctl is-active {q(unit)} 2>/dev/null); "
                f"echo enabled=$(systemctl is-enabled {q(unit)} 2>/dev/null); "
                f"echo prober_active=$(systemctl is-active {q(prober)} 2>/dev/null); "
                f"echo prober_enabled=$(systemctl is-enabled {q(prober)} 2>/dev/null)")

    @override
    def process(self, output: list[str]) -> dict:
        out = {"version": None, "active": "", "enabled": "", "prober_active": "", "prober_enabled": ""}
        for line in output:
            key, _, value = line.partition("=")
            if key == "version" and value:
                out["version"] = value.rsplit("vllm_router-", 1)[-1].removesuffix(".dist-info")
            elif key in ("active", "enabled", "prober_active", "prober_enabled"):
                out[key] = value
        return out
