"""The multi-node plan: one model over N identical nodes on vLLM's own multi-node runtime (pure).

`make_cluster_plan(model, nodes, options, ...)` plans the whole cluster as one `Plan` over every node's GPUs
(`make_plan`: the same layout rules, the same weights and overhead model, the same exact KV arithmetic of
vllm_fleet/planner/kv.py), then renders each node's argv and env. docs/multi-node.md explains the layouts.

Layouts (`ClusterLayout`):

- "pp": TP = the GPUs of one node, PP = the number of nodes (vLLM's advice: tensor parallel inside a node over
  NVLink, pipeline parallel across nodes, whose link is slower). Every rank runs the same argv plus
  ``--nnodes N --node-rank R --master-addr HEAD --master-port PORT``; ranks 1..N-1 add ``--headless`` (no API).
- "dp-ep" (MoE only): TP = 1, DP = every GPU, experts spread over all of them (--enable-expert-parallel).
  Each DP rank runs its own attention and holds its own KV cache for its own requests, so a request's whole
  context must fit one GPU's KV memory with ALL the layers and all the KV heads: DP+EP wins on throughput when
  the KV per token is small (MLA models: TP does not shrink it anyway), loses on context length where TP x PP
  shares the KV heads and layers out. Argv: ``--data-parallel-size N*G --data-parallel-size-local G
  --data-parallel-address HEAD --data-parallel-rpc-port PORT``; workers add ``--headless
  --data-parallel-start-rank R*G``.
- "auto": "pp" for a dense model; for a MoE model both are planned and DP+EP is chosen only when it is
  deployable and fits at least the context PP fits (the reasons say which and by how much).

Flags checked against the pinned vLLM 0.25.0 (vllm/engine/arg_utils.py; vllm_serve_flags.json): --nnodes,
--node-rank, --master-addr, --master-port, --headless, --data-parallel-size-local, --data-parallel-address,
--data-parallel-rpc-port, --data-parallel-start-rank. With --nnodes > 1 vLLM picks the "mp" executor itself
(config/parallel.py) and turns custom all-reduce off.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vllm_fleet.planner.hardware import Hardware, HardwareError, parse_gpu_spec
from vllm_fleet.planner.modelinfo import ModelInfoError, load_profile
from vllm_fleet.planner.plan import Flag, Plan, PlanError, PlanOptions, make_plan

ClusterLayout = Literal["auto", "pp", "dp-ep"]
DEFAULT_PORT = 29501
"""vLLM's own default --master-port (vllm/config/parallel.py ParallelConfig.master_port)."""
HEAD_PLACEHOLDER = "HEAD_ADDRESS"
"""The --master-addr `vllm-fleet plan` prints when no head address is given."""

_CLUSTER_SPEC = re.compile(r"^\s*(\d+)\s*[xX*]\s*(\d+\s*[xX*]\s*.+)$")


class ClusterError(PlanError):
    """Nodes the planner cannot plan one model across (mixed GPU kinds or counts, one node, bad spec)."""


@dataclass(frozen=True)
class Rank:
    """One node of the cluster: its rank, host, argv and env."""

    rank: int
    host: str
    argv: tuple[str, ...]
    env: dict[str, str]
    flags: tuple[Flag, ...]
    """The flags this rank adds to the cluster plan's, with their reasons."""

    @property
    def headless(self) -> bool:
        """A worker: no API server, it only runs its share of the model."""
        return self.rank > 0


@dataclass(frozen=True)
class ClusterPlan:
    """The plan of one cluster: the whole-cluster `Plan`, the layout kind, why, and each rank."""

    plan: Plan
    layout: Literal["pp", "dp-ep"]
    nodes: int
    gpus_per_node: int
    node_hardware: str
    head_address: str
    port: int
    reasons: tuple[str, ...]
    ranks: tuple[Rank, ...]

    @property
    def ok(self) -> bool:
        return self.plan.ok


def parse_cluster_spec(spec: str) -> tuple[int, Hardware]:
    """``2x4xA800-80G`` -> (2 nodes, each 4x A800-80G)."""
    m = _CLUSTER_SPEC.match(spec or "")
    if not m:
        raise ClusterError(f"cannot parse cluster spec {spec!r}; expected NODESxCOUNTxMODEL, e.g. 2x4xA800-80G.")
    try:
        return int(m.group(1)), parse_gpu_spec(m.group(2))
    except HardwareError as exc:
        raise ClusterError(str(exc)) from exc


def check_nodes(nodes: Sequence[tuple[str, Hardware]]) -> Hardware:
    """The GPUs of one node when every node has the same GPUs (kind, memory, count); else one ClusterError naming
    every node that differs from the head's."""
    if len(nodes) < 2:
        raise ClusterError(f"a cluster needs at least 2 nodes; got {len(nodes)}. Serve one host without vllm_cluster.")
    head_name, head = nodes[0]
    differ = [(n, hw) for n, hw in nodes[1:] if hw.gpus != head.gpus]
    if len({g for g in head.gpus}) > 1:
        differ.insert(0, (head_name, head))
    if differ:
        lines = "; ".join(f"{n}: {hw.describe()}" for n, hw in differ)
        raise ClusterError(
            f"the nodes' GPUs differ (head {head_name}: {head.describe()}; {lines}): vLLM gives every rank the same "
            "share of the model and sizes every GPU like the smallest, so mixed GPU kinds or counts waste or break it. "
            "Remedy: use nodes with identical GPUs, or select the same number of the same kind on each (vllm_gpus).")
    return head


def _whole(node: Hardware, n: int) -> Hardware:
    return Hardware(node.gpus * n, node.memory_source)


def _candidate(model, node: Hardware, n: int, options: PlanOptions, kind: str) -> Plan:
    g = node.count
    if kind == "pp":
        opts = replace_options(options, tensor_parallel_size=g, pipeline_parallel_size=n, data_parallel_size=1)
    else:
        opts = replace_options(options, tensor_parallel_size=1, pipeline_parallel_size=1, data_parallel_size=n * g,
                               enable_expert_parallel=True)
    return make_plan(model, _whole(node, n), opts)


def replace_options(options: PlanOptions, **changes) -> PlanOptions:
    """``options`` with the layout fields replaced (validated again)."""
    return PlanOptions(**{**options.model_dump(), **changes})


def make_cluster_plan(model: str | Path, nodes: Sequence[tuple[str, Hardware]], options: PlanOptions | None = None, *,
                      layout: ClusterLayout = "auto", head_address: str = HEAD_PLACEHOLDER, port: int = DEFAULT_PORT,
                      host_ips: dict[str, str] | None = None, ifname: str | None = None) -> ClusterPlan:
    """Plan ``model`` across ``nodes`` ((host, its GPUs), in rank order: the head first).

    + layout: "pp", "dp-ep" (MoE only) or "auto" (module docstring)
    + head_address, port: where the head listens for the other ranks (--master-addr/--master-port, or the DP
      address/RPC port)
    + host_ips: host -> its IP on the cluster network (VLLM_HOST_IP of that rank)
    + ifname: the interface NCCL and Gloo use between nodes (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME)
    """
    options = options or PlanOptions()
    node = check_nodes(nodes)
    n, g = len(nodes), node.count
    try:
        moe = load_profile(model).arch.moe is not None
    except ModelInfoError as exc:
        raise PlanError(str(exc)) from exc
    if layout == "dp-ep" and not moe:
        raise ClusterError(f"vllm_cluster_layout = \"dp-ep\" needs a MoE model; {model} is dense. Remedy: use \"pp\" or \"auto\".")
    reasons: list[str] = []
    pp = _candidate(model, node, n, options, "pp") if layout != "dp-ep" else None
    dp = _candidate(model, node, n, options, "dp-ep") if moe and layout != "pp" else None
    if pp is not None:
        reasons.append(f"PP: TP={g} inside each node (NVLink), PP={n} across the nodes (one activation hand-off per "
                       f"stage over the network instead of an all-reduce per layer); KV per GPU "
                       f"{pp.kv_cache_bytes_per_token_per_gpu:,} bytes/token, the longest context that fits "
                       f"{pp.max_model_len_that_fits:,}" + ("" if pp.ok else f" (not deployable: {', '.join(e.code for e in pp.errors)})"))
    if dp is not None:
        reasons.append(f"DP+EP: TP=1, DP={n * g} attention replicas, experts spread over all {n * g} GPUs; each GPU "
                       f"caches all its layers and KV heads for its own requests: KV per GPU "
                       f"{dp.kv_cache_bytes_per_token_per_gpu:,} bytes/token, the longest context that fits "
                       f"{dp.max_model_len_that_fits:,}" + ("" if dp.ok else f" (not deployable: {', '.join(e.code for e in dp.errors)})"))
    if pp is None:
        chosen, kind = dp, "dp-ep"
        reasons.append("chosen: DP+EP (vllm_cluster_layout = \"dp-ep\")")
    elif dp is None:
        chosen, kind = pp, "pp"
        reasons.append("chosen: PP (" + ("dense model: no experts to spread" if not moe else "vllm_cluster_layout = \"pp\"") + ")")
    elif dp.ok and (not pp.ok or dp.max_model_len_that_fits >= pp.max_model_len_that_fits):
        chosen, kind = dp, "dp-ep"
        reasons.append("chosen: DP+EP: it fits at least the context PP fits, and independent attention replicas "
                       "with all-to-all expert traffic scale throughput better than a pipeline")
    else:
        chosen, kind = pp, "pp"
        reasons.append("chosen: PP: DP+EP " + ("is not deployable" if not dp.ok else
                       f"fits only {dp.max_model_len_that_fits:,} tokens of context where PP fits "
                       f"{pp.max_model_len_that_fits:,} (each DP rank must hold a whole request's KV alone)"))
    assert chosen is not None
    if chosen.layout.world_size != n * g:
        raise ClusterError(f"the layout uses {chosen.layout.world_size} GPUs; the {n} nodes have {n * g}: every GPU "
                           "of every node must be used. Remedy: leave the layout sizes to the cluster plan.")
    ranks = tuple(_rank(chosen, kind, r, host, n, g, head_address, port, (host_ips or {}).get(host), ifname)
                  for r, (host, _) in enumerate(nodes))
    return ClusterPlan(chosen, kind, n, g, node.describe(), head_address, port, tuple(reasons), ranks)


def _rank(plan: Plan, kind: str, rank: int, host: str, n: int, g: int, head: str, port: int,
          host_ip: str | None, ifname: str | None) -> Rank:
    if kind == "pp":
        flags = [Flag("--nnodes", str(n), "nodes the model spans (vLLM's multiprocessing multi-node runtime)"),
                 Flag("--node-rank", str(rank), "this node's rank: 0 serves the API, the others run headless"),
                 Flag("--master-addr", head, "the head node's address: every rank joins torch.distributed there"),
                 Flag("--master-port", str(port), "the head's rendezvous port (vllm_cluster_port)")]
    else:
        flags = [Flag("--data-parallel-size-local", str(g), "DP ranks (GPUs) on this node"),
                 Flag("--data-parallel-address", head, "the head node's address: DP ranks coordinate there"),
                 Flag("--data-parallel-rpc-port", str(port), "the head's DP coordination port (vllm_cluster_port)")]
        if rank:
            flags.append(Flag("--data-parallel-start-rank", str(rank * g), "the first global DP rank of this node"))
    if rank:
        flags.append(Flag("--headless", None, "a worker: no API server; the head serves clients"))
    argv = [*plan.argv, *(w for f in flags for w in f.argv())]
    env = dict(plan.env)
    if ifname:
        env["NCCL_SOCKET_IFNAME"] = ifname
        env["GLOO_SOCKET_IFNAME"] = ifname
    if host_ip:
        env["VLLM_HOST_IP"] = host_ip
    return Rank(rank, host, tuple(argv), env, tuple(flags))


def env_reasons() -> dict[str, str]:
    """Why each variable a cluster adds to a rank's env is there."""
    return {
        "NCCL_SOCKET_IFNAME": "vllm_cluster_ifname: NCCL's bootstrap and socket transport use the private network's "
                              "interface (left alone, it may pick docker0 or a public NIC and hang in ncclCommInitRank)",
        "GLOO_SOCKET_IFNAME": "vllm_cluster_ifname: torch.distributed's Gloo groups use the same interface",
        "VLLM_HOST_IP": "vllm_cluster_address: the IP this node announces to the others",
    }
