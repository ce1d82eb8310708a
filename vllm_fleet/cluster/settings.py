"""The cluster's settings section (pure: pydantic only): a host that is one node of a model served across several
hosts by vLLM's own multi-node runtime (docs/multi-node.md). Composed into `vllm_fleet.settings.Settings`.

A cluster is declared by giving its hosts one `vllm_cluster` name (naturally in the group_data file of an inventory
group holding them) and each host its `vllm_cluster_rank` (0: the head, which serves the API; 1..N-1: headless
workers). The fleet (vllm_fleet/fleet.py) checks the members agree and computes each cluster once.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

CLUSTER_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
IFNAME = re.compile(r"[A-Za-z0-9_.:-]{1,15}(,[A-Za-z0-9_.:-]{1,15})*|\^?=?[A-Za-z0-9_.:-]{1,15}")
"""A Linux interface name (at most 15 characters), a comma list of them, or NCCL's ^ (exclude) / = (exact) prefix."""


class ClusterSection(BaseModel):
    """The node settings of a host that serves a model together with other hosts (ignored unless vllm_cluster is set)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    cluster: str | None = Field(None, description="name of the multi-node cluster this host is a node of (one model across several hosts); None = this host serves alone")
    cluster_rank: int | None = Field(None, ge=0, le=63, description="this host's node rank in its cluster: 0 = the head (serves the API), 1..N-1 = headless workers")
    cluster_port: int = Field(29501, ge=1024, le=65535, description="rendezvous port on the head (vLLM's --master-port, or --data-parallel-rpc-port for DP+EP) every worker connects to")
    cluster_address: str | None = Field(None, description="this host's IP on the private cluster network: VLLM_HOST_IP, and the head's is --master-addr; None = vllm_advertise_address or the inventory address")
    cluster_ifname: str | None = Field(None, description="network interface NCCL and Gloo use between nodes (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME), e.g. \"ens1f0\"; None = their own choice, which may be the wrong one")
    cluster_layout: Literal["auto", "pp", "dp-ep"] = Field("auto", description="how the model spans the nodes: pp (TP inside a node, PP across nodes), dp-ep (data-parallel attention + expert parallel, MoE only), auto = the planner's choice")

    @field_validator("cluster")
    @classmethod
    def _cluster(cls, v: str | None) -> str | None:
        if v is not None and not CLUSTER_NAME.fullmatch(v):
            raise ValueError("is not a cluster name (lower-case letters, digits, _ . -, up to 63)|use a short name such as \"minimax-pair\"")
        return v

    @field_validator("cluster_address")
    @classmethod
    def _cluster_address(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            address = ipaddress.ip_address(v)
        except ValueError:
            raise ValueError("is not an IP address|use this host's address on the private network the nodes share") from None
        if address.is_unspecified or address.is_loopback:
            raise ValueError("is no address other nodes reach|use this host's address on the private network the nodes share")
        return v

    @field_validator("cluster_ifname")
    @classmethod
    def _cluster_ifname(cls, v: str | None) -> str | None:
        if v is not None and not IFNAME.fullmatch(v):
            raise ValueError("is not a network interface name|use the interface of the private network, as `ip -br addr` lists it")
        return v
