"""pyinfra facts of the weights step."""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase

from vllm_fleet.layout import dist_info_glob
from vllm_fleet.weights import source as wplan


class FetchState(FactBase[dict]):
    """
    The fetch venv's huggingface_hub (and modelscope) and the download unit's state, in one command.

    The recorded verification (``fetch_weights.py check``) is not read here: preflight's snapshot read it
    in its round trip (``Snapshot.weights_check``) and `apply` gets it in the ``HostState``.

    + plan: the weights' FetchPlan

    .. code:: python

        host.get_fact(FetchState, plan=plan)  # {"hub": "2.4.0", "modelscope": None, "active": "inactive"}
    """

    def command(self, plan: wplan.FetchPlan) -> str:
        return (f"echo hub=$(ls -d {dist_info_glob(plan.venv, 'huggingface_hub')} 2>/dev/null | head -1); "
                f"echo ms=$(ls -d {dist_info_glob(plan.venv, 'modelscope')} 2>/dev/null | head -1); "
                f"echo active=$(systemctl is-active {shlex.quote(plan.unit)}.service 2>/dev/null)")

    def process(self, output: list[str]) -> dict:
        out: dict = {"hub": None, "modelscope": None, "active": ""}
        for line in output:
            key, _, value = line.partition("=")
            if key == "hub" and value:
                out["hub"] = value.rsplit("huggingface_hub-", 1)[-1].removesuffix(".dist-info")
            elif key == "ms" and value:
                out["modelscope"] = value.rsplit("modelscope-", 1)[-1].removesuffix(".dist-info")
            elif key == "active":
                out["active"] = value
        return out
