"""The fleet: what spans hosts, computed once from every host of the inventory (pure).

deploy.py runs once per host with that host's data; a router in front of the
replicas of a model, one model across several hosts (vLLM's multi-node
runtime) and Prometheus scraping every replica need to know the other hosts.
`topology` builds that knowledge once, from each host's validated settings,
and the steps receive it as typed data: a `Topology` of `Member`s, one per
host of the inventory, in inventory order.

    topo = topology([("a800-01", data_1), ("a800-02", data_2), ("h200-01", data_3)])
    topo.models()                  # ("minimax-m2",)
    topo.replicas("minimax-m2")    # the members serving it, in inventory order
    topo.member("a800-02").url     # "http://a800-02:8200"

A capability that spans hosts (router, cluster, monitoring) reads the Topology
in its own folder; the fields it needs on a Member are added here, left None
where it does not apply. No other step changes.

The address other hosts use for a member's endpoint, first that applies:
`vllm_advertise_address`; `vllm_bind_host` when it is one specific address
(vLLM answers only there); the inventory's `ssh_hostname`; the inventory host
name, unless it names a connector (`@docker/fleet-a`, `@local`): then the
address is unknown (None) until vllm_advertise_address says it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import SecretStr

from vllm_fleet.errors import FleetError, Problem
from vllm_fleet.layout import HostLayout
from vllm_fleet.router.settings import BEARER_TOKEN
from vllm_fleet.settings import Settings, load_settings

Role = Literal["replica"]
"""What a member is to its model: a vLLM server of its own ("replica"). Routers are `Route`s, not members."""

ADVERTISE = "vllm_advertise_address"
BIND = "vllm_bind_host"
SSH_HOSTNAME = "ssh_hostname"
INVENTORY_NAME = "inventory host name"


@dataclass(frozen=True)
class Member:
    """One host of the fleet: the vLLM endpoint it serves and its role.

    + host: the inventory host name (as pyinfra names it: "@docker/fleet-a", "a800-01.example.internal")
    + model: the served model name: what clients send as "model", what a router routes by
    + address: where other hosts reach its vLLM; None when unknown (a connector host without
      ssh_hostname or vllm_advertise_address)
    + address_from: the setting the address came from (ADVERTISE, BIND, SSH_HOSTNAME,
      INVENTORY_NAME), "" when there is none
    + port: vllm_port
    + bind_host: vllm_bind_host, the address vLLM listens on
    + role: "replica"

    Fields of the issues to come, None until they set them:

    + cluster, rank, cluster_size, head_address, head_port: one model across several hosts
      (vLLM's multi-node runtime): the cluster's name, this host's rank 0..N-1, N, and where
      rank 0 listens for the others
    + router: the host name of the router in front of this replica
    + scrape_job: the Prometheus job that scrapes this replica's /metrics
    """

    host: str
    model: str
    address: str | None
    address_from: str
    port: int
    bind_host: str
    role: Role = "replica"
    cluster: str | None = None
    rank: int | None = None
    cluster_size: int | None = None
    head_address: str | None = None
    head_port: int | None = None
    router: str | None = None
    scrape_job: str | None = None

    @property
    def local_only(self) -> bool:
        """vLLM listens on a loopback address: only the host itself reaches the endpoint."""
        return ipaddress.ip_address(self.bind_host).is_loopback

    @property
    def endpoint(self) -> str | None:
        """``address:port`` (an IPv6 address in brackets), None when the address is unknown."""
        if self.address is None:
            return None
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    @property
    def url(self) -> str | None:
        """The base URL of the OpenAI-compatible API, for other hosts: ``http://address:port``."""
        return None if self.endpoint is None else f"http://{self.endpoint}"


ROUTERS_GROUP = "routers"
"""The inventory group whose hosts run a router (vllm_fleet/router/): a host only in it serves no vLLM."""


@dataclass(frozen=True)
class Route:
    """A router in front of the replicas of one model (vllm_fleet/router/, docs/router.md).

    + router: the inventory host name of the host that runs it
    + model: the served model name it routes
    + bind_host, port, metrics_port: where it listens (vllm_router_*)
    + policy: vllm_router_policy
    + upstreams: (replica member, the URL the router reaches it at), in inventory order
    + internal_port: vllm-router's own port, on loopback, behind the front (nginx) that listens on bind_host:port
    + client_key: what clients must send (the router host's vllm_router_api_key, else its vllm_api_key); None: the
      front checks nothing and passes the client's Authorization through (loopback only)
    + rolling_dir: on the router host, the record of replicas a rolling change drained (HostLayout.router_rolling_dir)
    + upstream_key: the key of the replicas behind it (one for all: vllm-router sends every replica the same
      header), which the front puts in place of the client's; the prober's completions carry it too
    """

    router: str
    model: str
    bind_host: str
    port: int
    metrics_port: int
    policy: str
    health_interval_s: int
    upstreams: tuple[tuple[Member, str], ...]
    internal_port: int = 8002
    rolling_dir: str = ""
    client_key: SecretStr | None = field(default=None, repr=False)
    upstream_key: SecretStr | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """Where clients reach the router: its front, on this host (``local_url`` of its bind address)."""
        return local_url(self.bind_host, self.port)

    @property
    def admin_url(self) -> str:
        """vllm-router itself, on the router host's loopback: /workers, /add_worker, /remove_worker (no key)."""
        return local_url("127.0.0.1", self.internal_port)

    def upstream_url(self, host: str) -> str | None:
        """The URL the router reaches replica ``host`` at; None when that host is not behind it."""
        return next((url for m, url in self.upstreams if m.host == host), None)


CLUSTER = "vllm_cluster"
CLUSTER_RANK = "vllm_cluster_rank"
CLUSTER_AGREE: tuple[str, ...] = (
    "model", "version", "torch_backend", "torch_version", "weights_sources", "cluster_port", "cluster_layout",
    "cluster_ifname", "served_model_name", "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
    "enable_expert_parallel", "max_model_len", "gpu_memory_utilization", "kv_cache_memory_bytes", "kv_cache_dtype",
    "block_size", "max_num_seqs", "max_num_batched_tokens", "enforce_eager", "reasoning_parser",
    "cudagraph_piecewise", "nvlink_multicast", "flashinfer_sampler", "extra_args")
"""Settings every node of a cluster must share (without vllm_): vLLM builds one engine config from every rank's
argv and the ranks load the same model shard layout, so one venv (vLLM, torch, backend), one model and revision
(vllm_weights_sources), one layout and one set of serve options. vllm_gpus is compared by count (GPUs per node)."""


@dataclass(frozen=True)
class Cluster:
    """One model served across several hosts by vLLM's multi-node runtime (docs/multi-node.md), computed once.

    + name: vllm_cluster
    + model: the served model name
    + members: the nodes in rank order (members[0] is the head, rank 0: it serves the API)
    + head_address: where the workers reach the head (its vllm_cluster_address, else its advertised address)
    + port: vllm_cluster_port, the head's rendezvous port
    + layout: vllm_cluster_layout
    + ifname: vllm_cluster_ifname (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME), None = NCCL's and Gloo's own choice
    + host_ips: host -> its vllm_cluster_address (VLLM_HOST_IP), for the hosts that set one
    """

    name: str
    model: str
    members: tuple[Member, ...]
    head_address: str
    port: int
    layout: str
    ifname: str | None
    host_ips: tuple[tuple[str, str], ...] = ()

    @property
    def head(self) -> Member:
        return self.members[0]

    @property
    def workers(self) -> tuple[Member, ...]:
        return self.members[1:]

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(m.host for m in self.members)


@dataclass(frozen=True)
class Topology:
    """Every member of the fleet, in inventory order (including hosts a --limit leaves out).

    + members: the hosts that serve vLLM
    + routes: the routers (hosts of the `routers` group), each in front of its model's replicas
    + router_only: hosts that only run a router (in `routers` and in no other group): no vLLM step runs there
    + clusters: the multi-node clusters (hosts with vllm_cluster), each computed once, in order of their head
    """

    members: tuple[Member, ...] = field(default_factory=tuple)
    routes: tuple[Route, ...] = field(default_factory=tuple)
    router_only: tuple[str, ...] = field(default_factory=tuple)
    clusters: tuple[Cluster, ...] = field(default_factory=tuple)

    def cluster_of(self, host: str) -> Cluster | None:
        """The cluster ``host`` is a node of; None when it serves alone."""
        return next((c for c in self.clusters if host in c.hosts), None)

    def __iter__(self) -> Iterator[Member]:
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)

    def models(self) -> tuple[str, ...]:
        """The served model names, in the order their first member comes in the inventory."""
        return tuple(dict.fromkeys(m.model for m in self.members))

    def members_of(self, model: str) -> tuple[Member, ...]:
        """Every member serving ``model`` (any role), in inventory order; () for a model nobody serves."""
        return tuple(m for m in self.members if m.model == model)

    def replicas(self, model: str) -> tuple[Member, ...]:
        """The members of ``model`` that are vLLM servers of their own, in inventory order."""
        return tuple(m for m in self.members_of(model) if m.role == "replica")

    def serves_vllm(self, host: str) -> bool:
        return host not in self.router_only

    def route_on(self, host: str) -> Route | None:
        """The route whose router runs on ``host``; None when it runs none."""
        return next((r for r in self.routes if r.router == host), None)

    def route_of(self, host: str) -> Route | None:
        """The route ``host`` is a replica behind; None when no router is in front of it."""
        return next((r for r in self.routes if r.upstream_url(host) is not None), None)

    def member(self, host: str) -> Member:
        """The member of the inventory host named ``host``; KeyError when the fleet has no such host."""
        for m in self.members:
            if m.host == host:
                return m
        raise KeyError(f"{host} is not a host of this fleet ({', '.join(m.host for m in self.members)})")

    def describe(self, host: str) -> str:
        """One plan line for ``host``: "fleet: replica 2 of 3 of minimax-m2 at a800-02:8200"."""
        m = self.member(host)
        peers = tuple(p for p in self.members_of(m.model) if p.role == m.role)  # the replicas, for a replica
        where = (f"on {m.bind_host}:{m.port}, this host only (vllm_bind_host is loopback)" if m.local_only
                 else f"at {m.endpoint}" if m.endpoint
                 else f"on port {m.port}, at no address other hosts know (set {ADVERTISE})")
        return f"fleet: {m.role} {peers.index(m) + 1} of {len(peers)} of {m.model} {where}"


class TopologyError(FleetError):
    """The hosts together make no fleet (one served name for two models, one endpoint for two hosts)."""

    def __init__(self, problems: list[tuple[str, Problem]]):
        self.problems = problems
        if len(problems) == 1:
            host, p = problems[0]
            super().__init__(f"host {host}: {p.render()}")
        else:
            lines = "\n".join(f"  - host {host}: {p.render()}" for host, p in problems)
            super().__init__(f"fleet: {len(problems)} problems across hosts, nothing was changed:\n{lines}")


def topology(hosts: Iterable[tuple]) -> Topology:
    """The fleet of ``hosts``: (inventory host name, merged host data[, the host's inventory groups]) tuples, in
    inventory order.

    Each host's data is validated with `load_settings` (a `SettingsError` names the
    host). Raises `TopologyError` when two hosts serve different models (vllm_model)
    under one served name, two hosts are reached at the same address and port, or a
    router (a host of the `routers` group) cannot serve its route (`routes`).
    """
    members: list[Member] = []
    routers: list[tuple[str, Settings]] = []
    router_only: list[str] = []
    models: dict[str, tuple[str, str]] = {}  # served name -> (first host, its vllm_model)
    endpoints: dict[tuple[str, int], Member] = {}
    problems: list[tuple[str, Problem]] = []
    peers: dict[str, Settings] = {}
    for entry in hosts:
        name, data = entry[0], entry[1]
        groups = set(entry[2]) - {"all"} if len(entry) > 2 else set()
        settings = load_settings(data, host=name)
        if ROUTERS_GROUP in groups:
            routers.append((name, settings))
            if groups == {ROUTERS_GROUP}:
                router_only.append(name)
                continue
        peers[name] = settings
        m = member(name, data, settings)
        first = models.setdefault(m.model, (name, settings.model))
        if first[1] != settings.model:
            problems.append((name, Problem(
                "vllm_served_model_name", settings.served_model_name,
                f"serves vllm_model {settings.model!r} as {m.model!r}, the name host {first[0]} serves vllm_model {first[1]!r} as: "
                "clients and a router could not tell the two models apart",
                f"give one of them another vllm_served_model_name, or the same vllm_model")))
        key = _endpoint_key(m)
        if key is not None:
            other = endpoints.setdefault(key, m)
            if other is not m:
                problems.append((name, Problem(
                    ADVERTISE, data.get(ADVERTISE),
                    f"host {name} ({m.address} from {m.address_from}) and host {other.host} ({other.address} from "
                    f"{other.address_from}) are both reached at {m.endpoint}",
                    f"set {ADVERTISE} on each to the address other hosts reach it at, or give one another vllm_port")))
        members.append(m)
    if problems:
        raise TopologyError(problems)
    found, problems = routes(tuple(members), routers, peers)
    if problems:
        raise TopologyError(problems)
    found_clusters, problems = clusters(tuple(members), peers, {n for n, _ in routers}, found)
    if problems:
        raise TopologyError(problems)
    by_host = {m.host: m for c in found_clusters for m in c.members}
    members = [by_host.get(m.host, m) for m in members]
    return Topology(tuple(members), found, tuple(router_only), found_clusters)


def clusters(members: tuple[Member, ...], peers: Mapping[str, Settings], router_hosts: set[str],
             found_routes: tuple[Route, ...]) -> tuple[tuple[Cluster, ...], list[tuple[str, Problem]]]:
    """Each cluster (hosts with one vllm_cluster), its members in rank order with their cluster fields set, and
    what makes one impossible, one problem per host and setting: a node without vllm_cluster_rank; two nodes with
    one rank (a worker listed twice) or one address; no rank 0 (no head); ranks with a gap; a cluster of one
    node; a head no worker can reach; a node that disagrees with the head on a setting of `CLUSTER_AGREE` or on
    the number of vllm_gpus; a node that is also a router host or a router's replica."""
    problems: list[tuple[str, Problem]] = []
    groups: dict[str, list[Member]] = {}
    for m in members:
        name = peers[m.host].cluster
        if name is not None:
            groups.setdefault(name, []).append(m)
    behind_router = {m.host: r.router for r in found_routes for m, _ in r.upstreams}
    out: list[Cluster] = []
    for name, nodes in groups.items():
        bad = False
        by_rank: dict[int, Member] = {}
        addresses: dict[str, str] = {}
        for m in nodes:
            s = peers[m.host]
            if s.cluster_rank is None:
                problems.append((m.host, Problem(CLUSTER_RANK, None, f"is missing: host {m.host} is a node of cluster {name!r}",
                                                 "give each node its rank: 0 for the head (it serves the API), 1..N-1 for the workers")))
                bad = True
                continue
            other = by_rank.setdefault(s.cluster_rank, m)
            if other is not m:
                problems.append((m.host, Problem(CLUSTER_RANK, s.cluster_rank,
                                                 f"is also the rank of host {other.host} in cluster {name!r}: a node listed twice",
                                                 f"give each node of {name!r} its own rank, 0..{len(nodes) - 1}")))
                bad = True
            address = s.cluster_address or m.address
            if address is not None:
                first = addresses.setdefault(address.rstrip(".").lower(), m.host)
                if first != m.host:
                    problems.append((m.host, Problem("vllm_cluster_address", s.cluster_address,
                                                     f"host {m.host} and host {first} are both reached at {address}: one machine listed twice in cluster {name!r}",
                                                     "list each machine once, or set vllm_cluster_address on each to its own IP")))
                    bad = True
            if m.host in router_hosts:
                problems.append((m.host, Problem(CLUSTER, name, "is set on a host of the `routers` group: a cluster node runs no router",
                                                 "run the router on a host outside the cluster, or remove this host from `routers`")))
                bad = True
            elif m.host in behind_router:
                problems.append((m.host, Problem(CLUSTER, name,
                                                 f"is set on a replica of the router on {behind_router[m.host]}: a router in front of a cluster is not built yet "
                                                 "(a worker serves no API at all)",
                                                 f"set vllm_router_replicas on {behind_router[m.host]} to hosts outside the cluster, or serve the cluster without a router")))
                bad = True
        if len(nodes) < 2:
            problems.append((nodes[0].host, Problem(CLUSTER, name, "names a cluster of one node",
                                                    "give the other nodes the same vllm_cluster, or unset it on a host that serves alone")))
            continue
        if 0 not in by_rank and not any(peers[m.host].cluster_rank is None for m in nodes):
            problems.append((nodes[0].host, Problem(CLUSTER_RANK, peers[nodes[0].host].cluster_rank,
                                                    f"cluster {name!r} has no head: no node has rank 0",
                                                    "give the node that serves the API vllm_cluster_rank = 0")))
            bad = True
        for rank, m in sorted(by_rank.items()):
            if rank >= len(nodes):
                problems.append((m.host, Problem(CLUSTER_RANK, rank, f"is beyond the {len(nodes)} nodes of cluster {name!r}: ranks must be 0..{len(nodes) - 1}",
                                                 f"number the nodes of {name!r} 0..{len(nodes) - 1} without gaps")))
                bad = True
        head = by_rank.get(0)
        if head is None or bad:
            continue
        hs = peers[head.host]
        for m in nodes:
            if m is head:
                continue
            s = peers[m.host]
            for key in CLUSTER_AGREE:
                if getattr(s, key) != getattr(hs, key):
                    problems.append((m.host, Problem("vllm_" + key, getattr(s, key),
                                                     f"differs from the head {head.host}'s ({getattr(hs, key)!r}) in cluster {name!r}: every "
                                                     "rank must run the same vLLM, torch, model, revision and layout",
                                                     f"set vllm_{key} for the whole cluster (in its group's group_data), not per host")))
            if (None if s.gpus is None else len(s.gpus)) != (None if hs.gpus is None else len(hs.gpus)):
                problems.append((m.host, Problem("vllm_gpus", s.gpus,
                                                 f"gives this node {'all its' if s.gpus is None else len(s.gpus)} GPUs where the head {head.host} uses "
                                                 f"{'all its' if hs.gpus is None else len(hs.gpus)}: every node must bring the same number",
                                                 "select the same number of GPUs on every node (vllm_gpus), or none on any")))
        head_address = hs.cluster_address or head.address
        if head_address is None:
            problems.append((head.host, Problem("vllm_cluster_address", None,
                                                f"is missing: the workers of cluster {name!r} have no address to reach its head at",
                                                "set vllm_cluster_address on the head to its IP on the private cluster network")))
            continue
        ordered = tuple(sorted(nodes, key=lambda m: peers[m.host].cluster_rank))
        set_fields = tuple(replace(m, cluster=name, rank=peers[m.host].cluster_rank, cluster_size=len(nodes),
                                   head_address=head_address, head_port=hs.cluster_port) for m in ordered)
        ips = tuple((m.host, peers[m.host].cluster_address) for m in ordered if peers[m.host].cluster_address)
        out.append(Cluster(name, head.model, set_fields, head_address, hs.cluster_port, hs.cluster_layout,
                           hs.cluster_ifname, ips))
    return tuple(out), problems


def routes(members: tuple[Member, ...], routers: list[tuple[str, Settings]],
           peers: Mapping[str, Settings]) -> tuple[tuple[Route, ...], list[tuple[str, Problem]]]:
    """The route of each router host, and what makes one impossible (each problem names the router host, the
    setting and the remedy): no replica serves its model; a listed replica is no host of the fleet or serves
    another model; a replica the router cannot reach; replicas with different API keys (vllm-router 0.1.17 sends
    every replica the header the front gives it); a key that is no bearer token; a router beyond loopback
    without a key for clients; a rolling batch that would drain every replica at once; a port the host's vLLM,
    the router's metrics, vllm-router behind the front or another router on the host already uses."""
    out: list[Route] = []
    problems: list[tuple[str, Problem]] = []
    served = tuple(dict.fromkeys(m.model for m in members))
    by_host = {m.host: m for m in members}
    for name, s in routers:
        model = s.router_model
        if model is None:
            if len(served) != 1:
                problems.append((name, Problem(
                    "vllm_router_model", None,
                    f"the fleet serves {len(served)} models ({', '.join(served) or 'none'}): which one does this router route?",
                    "set vllm_router_model to the served model name of its replicas")))
                continue
            model = served[0]
        if s.router_replicas is not None:
            chosen = []
            for h in s.router_replicas:
                m = by_host.get(h)
                if m is None:
                    problems.append((name, Problem("vllm_router_replicas", s.router_replicas,
                                                   f"{h} is no host of the fleet that serves vLLM",
                                                   "list inventory host names of replicas")))
                elif m.model != model:
                    problems.append((name, Problem("vllm_router_replicas", s.router_replicas,
                                                   f"{h} serves {m.model!r}, not {model!r}",
                                                   "list only replicas of the routed model, or set vllm_router_model")))
                else:
                    chosen.append(m)
        else:
            chosen = [m for m in members if m.model == model]
        if not chosen:
            problems.append((name, Problem("vllm_router_model", model, "no host of the fleet serves this model",
                                           "give the router replicas: hosts serving it, or another vllm_router_model")))
            continue
        upstreams = []
        for m in chosen:
            url = _reach(name, m)
            if url is None:
                problems.append((name, Problem(
                    ADVERTISE, None,
                    f"the router cannot reach replica {m.host}: its vLLM listens on {m.bind_host} "
                    f"({'loopback: that host only' if m.local_only else 'at no address the fleet knows'})",
                    f"on {m.host}, set vllm_bind_host to an address the router reaches and {ADVERTISE}, or run the "
                    f"router on {m.host}")))
            else:
                upstreams.append((m, url))
        replica_keys = {_secret(peers[m.host].api_key) for m in chosen}
        if len(replica_keys) > 1:
            problems.append((name, Problem(
                "vllm_api_key", "<secret>",
                f"the replicas behind this router ({', '.join(m.host for m in chosen)}) have different API keys: "
                "vllm-router sends every replica the same Authorization header",
                "give every replica of the model the same vllm_api_key (VLLM_FLEET_API_KEY)")))
        upstream_key = next(iter(replica_keys)) if len(replica_keys) == 1 else None
        client = s.router_api_key if s.router_api_key is not None else s.api_key
        if client is None and not ipaddress.ip_address(s.router_bind_host).is_loopback:
            problems.append((name, Problem(
                "vllm_router_api_key", None,
                f"is missing while the router listens on {s.router_bind_host}, reachable from other machines",
                "set vllm_router_api_key (or this host's vllm_api_key), or vllm_router_bind_host = \"127.0.0.1\"")))
        for setting, key in (("vllm_router_api_key" if s.router_api_key is not None else "vllm_api_key", _secret(client)),
                             ("vllm_api_key", upstream_key)):
            if key is not None and not BEARER_TOKEN.fullmatch(key):
                problems.append((name, Problem(
                    setting, "<secret>",
                    "is no bearer token (RFC 6750: letters, digits, - . _ ~ + /, = at the end): the router's front "
                    "checks and sends keys as `Authorization: Bearer KEY`",
                    "use a random key such as `openssl rand -hex 24`")))
                break
        batch = max(peers[m.host].rolling_batch for m in chosen)
        if len(chosen) > 1 and batch >= len(chosen):
            problems.append((name, Problem(
                "vllm_rolling_batch", batch,
                f"would drain all {len(chosen)} replicas behind this router at once: a rolling change would stop the service",
                f"set vllm_rolling_batch to at most {len(chosen) - 1}")))
        mine = by_host.get(name)
        taken: dict[int, str] = {}
        for setting, port in (("vllm_port", mine.port if mine is not None else None),
                              ("vllm_router_port", s.router_port), ("vllm_router_metrics_port", s.router_metrics_port),
                              ("vllm_router_internal_port", s.router_internal_port)):
            if port is None:
                continue
            if port in taken:
                problems.append((name, Problem(setting, port, f"is also this host's {taken[port]}",
                                               f"give {setting.removeprefix('vllm_').replace('_', ' ')} a port of its own")))
            else:
                taken[port] = setting
        out.append(Route(name, model, s.router_bind_host, s.router_port, s.router_metrics_port, s.router_policy,
                         s.router_health_interval_s, tuple(upstreams), s.router_internal_port,
                         HostLayout.of(s).router_rolling_dir, client, SecretStr(upstream_key) if upstream_key is not None else None))
    return tuple(out), problems


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def local_url(bind_host: str, port: int) -> str:
    """``http://ADDR:PORT`` a program on the host itself reaches a server bound to ``bind_host`` at: loopback when it
    binds every address, the address itself otherwise (IPv6 in brackets)."""
    addr = ("127.0.0.1" if bind_host == "0.0.0.0" else "[::1]" if bind_host == "::"
            else f"[{bind_host}]" if ":" in bind_host else bind_host)
    return f"http://{addr}:{port}"


def _reach(router: str, m: Member) -> str | None:
    """The URL a router on host ``router`` reaches replica ``m`` at: its own loopback when the router runs on the
    replica's host (or the replica is loopback-bound and advertised: test hosts sharing one network namespace);
    else its advertised endpoint; None when there is none."""
    if m.host == router:
        return local_url(m.bind_host, m.port)
    if m.local_only and m.address_from != ADVERTISE:
        return None
    return m.url


def member(name: str, data: Mapping[str, Any], settings: Settings) -> Member:
    """The member for one host: its served model name, endpoint and role (no cluster, router or scrape job yet)."""
    address, source = advertised_address(name, data, settings)
    return Member(host=name, model=served_name(settings), address=address, address_from=source,
                  port=settings.port, bind_host=settings.bind_host)


def served_name(settings: Settings) -> str:
    """The name clients send as "model", decided as the plan decides it (planner.plan.served_model_name)."""
    from vllm_fleet.planner.modelinfo import load_profile
    from vllm_fleet.planner.plan import served_model_name

    return served_model_name(load_profile(settings.model), settings.served_model_name)


def advertised_address(name: str, data: Mapping[str, Any], settings: Settings) -> tuple[str | None, str]:
    """(the address other hosts use for this host's vLLM, the setting it came from); module docstring: the order."""
    if settings.advertise_address is not None:
        return settings.advertise_address, ADVERTISE
    bind = ipaddress.ip_address(settings.bind_host)
    if not bind.is_unspecified and not bind.is_loopback:
        return settings.bind_host, BIND
    ssh_hostname = data.get(SSH_HOSTNAME)
    if isinstance(ssh_hostname, str) and ssh_hostname:
        return ssh_hostname, SSH_HOSTNAME
    if not name.startswith("@"):
        return name, INVENTORY_NAME
    return None, ""


def _endpoint_key(m: Member) -> tuple[str, int] | None:
    """What makes two members one endpoint to other hosts; None for none to compare.

    A host name compares without case. A derived address of a loopback-bound member
    names no endpoint (its vLLM is not there for other hosts), an advertised one does.
    """
    if m.address is None or (m.local_only and m.address_from != ADVERTISE):
        return None
    address = m.address.rstrip(".").lower()
    try:
        address = str(ipaddress.ip_address(address))
    except ValueError:
        pass
    return address, m.port
