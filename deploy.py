"""The playbook: preflight -> service user -> python env -> weights -> service -> verify, then the router.

    pyinfra inventory/prod.py deploy.py          # converge every host
    pyinfra inventory/prod.py deploy.py --dry    # show the plan and diffs, change nothing

Settings are validated, the fleet (vllm_fleet/fleet.py: which hosts serve
which model, in what role) is computed once from every host of the inventory,
and preflight and the plan run on every host's real GPUs, while pyinfra plans,
before any operation runs on any host: bad input or a bad host ends the run
with one message and nothing changed.
"""

from pyinfra import host

from vllm_fleet.account import step as service_user
from vllm_fleet.preflight import step as preflight
from vllm_fleet.pyenv import step as python_env
from vllm_fleet.router import step as router
from vllm_fleet.service import step as service
from vllm_fleet.weights import step as weights
from vllm_fleet.hostops import fleet
from vllm_fleet.hostops.abort import abort
from vllm_fleet.hostops.facts import read_many
from vllm_fleet.errors import FleetError
from vllm_fleet.settings import load_settings

try:
    settings = load_settings(host.data.dict(), host=host.name)
    model = weights.source(settings)
except (FleetError, ValueError) as exc:
    abort(exc if isinstance(exc, FleetError) else FleetError(str(exc)))

# What spans hosts (which hosts serve which model, in what role): computed once per run from
# every host of the inventory. A host of the `routers` group runs a router (`route`); one only in that group
# serves no vLLM; a replica with a router in front of it is drained there before a restart (`behind`).
topology = fleet.topology()
cluster = topology.cluster_of(host.name)
if cluster is not None:  # the plan of a cluster is built (vllm-fleet plan --nodes N); its deploy is not yet
    abort(FleetError(
        f"host {host.name}: vllm_cluster={cluster.name!r}: deploying one model across several hosts is not built yet "
        f"(docs/multi-node.md: the planner and each rank's command are; the per-node units, start order and gate are "
        f"not), and deploying each node as its own endpoint would not be a cluster\n"
        f"    remedy: plan it with `vllm-fleet plan --gpus <N>x<GPU> --nodes {len(cluster.members)}`; to deploy now, unset "
        f"vllm_cluster and vllm_cluster_rank and serve one replica per host (a router in front: docs/router.md)"))
route = topology.route_on(host.name)
serves = topology.serves_vllm(host.name)
behind = topology.route_of(host.name) if serves else None
if serves:
    fleet.report(topology)

# Every fact the steps read while pyinfra plans, in one round trip (a no-op rerun costs about one command per host);
# each step then finds its value where it reads it (hostops.facts.read_once).
if serves:
    read_many(host, [*preflight.reads(settings, model), *service_user.reads(settings), *python_env.reads(settings),
                     *weights.reads(settings, model), *service.reads(settings), *router.reads(settings, route)])
else:
    read_many(host, router.reads(settings, route))

# Each step hands the next its typed value (vllm_fleet/handoff.py): nothing is probed, nothing recomputed.
if serves:
    state = preflight.run(settings, model)
    service_user.apply(settings)
    venv = python_env.apply(settings, state)
    fetched = weights.apply(settings, model, state)
    service.apply(settings, state, venv, fetched, behind)
if route is not None:
    router.apply(settings, route, serves)
