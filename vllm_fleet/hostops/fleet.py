"""The fleet topology of the current pyinfra run, for deploy.py and the steps (vllm_fleet/fleet.py is the logic).

    from vllm_fleet.hostops import fleet
    topo = fleet.topology()             # every host of the inventory, computed once per run
    member = topo.member(host.name)     # this host's part
    fleet.report(topo)                  # "fleet: replica 2 of 3 of minimax-m2 at a800-02:8200"

pyinfra runs deploy.py once per host; the first call builds the Topology from
`pyinfra.context.inventory` (all its hosts: a --limit run selects hosts to
change, not the fleet they belong to) and keeps it on the run's
`pyinfra.context.state`, so every other host gets the same object. A bad fleet
ends the run while pyinfra plans (`abort`), on whichever host asks first.
"""

from __future__ import annotations

from pyinfra import host as current_host
from pyinfra import logger
from pyinfra.context import ctx_inventory, ctx_state

from vllm_fleet import fleet as fleet_model
from vllm_fleet.errors import FleetError, SettingsError
from vllm_fleet.hostops.abort import abort

_ON_STATE = "_vllm_fleet_topology"
"""The attribute of pyinfra's State that holds this run's Topology (or the FleetError that stopped it)."""


def topology() -> fleet_model.Topology:
    """The Topology of every host of the run's inventory, built on the first call of the run.

    Ends the run (`abort`) when a host's settings are bad or the hosts make no fleet;
    the error is kept too, so later calls end the same way without rebuilding.
    """
    state, inventory = ctx_state.get(), ctx_inventory.get()
    if state is None or inventory is None:
        raise RuntimeError("vllm_fleet.hostops.fleet.topology() runs inside a pyinfra run (no state or inventory is set)")
    known = getattr(state, _ON_STATE, None)
    if known is None:
        try:
            known = fleet_model.topology([(h.name, h.data.dict(), tuple(h.groups)) for h in inventory])
        except SettingsError as exc:
            known = FleetError(f"{exc}\n    (the fleet is every host of the inventory, "
                               "hosts a --limit leaves out too: each must have valid settings)")
        except FleetError as exc:
            known = exc
        setattr(state, _ON_STATE, known)
    if isinstance(known, FleetError):
        abort(known)
    return known


def report(topo: fleet_model.Topology) -> None:
    """Log the current host's plan line of the fleet (`Topology.describe`)."""
    logger.info(f"{current_host.print_prefix}{topo.describe(current_host.name)}")
