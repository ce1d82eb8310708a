"""GPU catalog and the `Hardware` value the planner sizes against.

A `Hardware` is a list of GPUs (name, total memory in bytes as CUDA reports it,
compute capability). It is built either from a spec such as `4xA800-80G`,
`8xH200` or `2xH100-80G`, or from host facts (what `nvidia-smi` reports).

Catalog memory figures come from two kinds of source, recorded per entry:
"measured" (seen on real hardware: the seed log's A800 total, docs/seed.md; the
H200 total, docs/gpu-validation.md) and "nominal" (the vendor's capacity, binary
GiB; the CUDA-visible total is usually a little lower, so plans for nominal GPUs
are slightly optimistic).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Literal

from vllm_fleet.errors import FleetError

MiB = 1 << 20
GiB = 1 << 30

Source = Literal["measured", "nominal"]


class HardwareError(FleetError):
    """A GPU spec or GPU facts the planner cannot use."""


@dataclass(frozen=True)
class GpuModel:
    """One catalog entry: a GPU kind as the planner sees it."""

    key: str
    """Canonical spec name, e.g. `A800-80G`."""
    memory_bytes: int
    """Total device memory as CUDA reports it (what gpu_memory_utilization multiplies)."""
    compute_capability: tuple[int, int]
    memory_source: Source
    aliases: tuple[str, ...] = ()

    @property
    def fp8_native(self) -> bool:
        """FP8 tensor cores exist from compute capability 8.9 (Ada, Hopper, Blackwell)."""
        return self.compute_capability >= (8, 9)


# A800-80G: the seed log's vLLM error reports "79.25 GiB" total on an A800-SXM4-80GB.
# A100-80G is assumed to match (A800 is its export variant) but that is not measured: "nominal".
# H200: docs/gpu-validation.md, nvidia-smi memory.total 143771 MiB, which vLLM reported as 140.40 GiB.
_A800_80G = int(79.25 * GiB)
CATALOG: tuple[GpuModel, ...] = (
    GpuModel("A100-40G", 40 * GiB, (8, 0), "nominal", ("A100-SXM4-40GB", "A100-PCIE-40GB", "A100-40GB")),
    GpuModel("A100-80G", _A800_80G, (8, 0), "nominal", ("A100-SXM4-80GB", "A100-80GB-PCIE", "A100-80GB")),
    GpuModel("A800-40G", 40 * GiB, (8, 0), "nominal", ("A800-SXM4-40GB", "A800-PCIE-40GB", "A800-40GB")),
    GpuModel("A800-80G", _A800_80G, (8, 0), "measured", ("A800-SXM4-80GB", "A800-80GB-PCIE", "A800-80GB")),
    GpuModel("A10", 24 * GiB, (8, 6), "nominal", ("A10-24G",)),
    GpuModel("L40S", 48 * GiB, (8, 9), "nominal", ("L40S-48G",)),
    GpuModel("RTX4090", 24 * GiB, (8, 9), "nominal", ("RTX-4090", "GeForce-RTX-4090", "4090")),
    GpuModel("H100-80G", 80 * GiB, (9, 0), "nominal", ("H100", "H100-SXM5-80GB", "H100-80GB-HBM3", "H100-PCIE")),
    GpuModel("H800-80G", 80 * GiB, (9, 0), "nominal", ("H800", "H800-SXM5-80GB")),
    GpuModel("H200", 143771 * MiB, (9, 0), "measured", ("H200-141G", "H200-SXM-141GB", "H200-NVL")),
    GpuModel("B200", 180 * GiB, (10, 0), "nominal", ("B200-180G", "B200-SXM-180GB")),
)


def _norm(name: str) -> str:
    """Fold a GPU name for lookup: `NVIDIA A800-SXM4-80GB` -> `A800SXM480GB`."""
    name = name.upper().replace("NVIDIA", "").replace("GEFORCE", "")
    return re.sub(r"[^A-Z0-9]", "", name).replace("GB", "G")


_BY_NAME: dict[str, GpuModel] = {}
for _gpu in CATALOG:
    for _n in (_gpu.key, *_gpu.aliases):
        _BY_NAME[_norm(_n)] = _gpu


def lookup(name: str) -> GpuModel:
    """The catalog entry for a GPU name (spec form or `nvidia-smi` form)."""
    found = _BY_NAME.get(_norm(name))
    if found is None:
        keys = [g.key for g in CATALOG]
        close = difflib.get_close_matches(name.upper(), keys, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise HardwareError(
            f"unknown GPU {name!r}.{hint} Known: {', '.join(keys)}; "
            "or pass host facts (name, memory_total_mib, compute_cap) instead of a spec."
        )
    return found


@dataclass(frozen=True)
class Gpu:
    """One GPU of a host."""

    name: str
    memory_bytes: int
    compute_capability: tuple[int, int]

    @property
    def fp8_native(self) -> bool:
        """True where FP8 matmuls run natively (compute capability >= 8.9)."""
        return self.compute_capability >= (8, 9)


@dataclass(frozen=True)
class Hardware:
    """The GPUs a model is planned onto; all the planner needs to know about a host."""

    gpus: tuple[Gpu, ...]
    memory_source: Source = "measured"

    @property
    def count(self) -> int:
        """Number of GPUs."""
        return len(self.gpus)

    @property
    def min_memory_bytes(self) -> int:
        """Smallest GPU's total memory: vLLM sizes every rank like the smallest."""
        return min(g.memory_bytes for g in self.gpus)

    @property
    def min_compute_capability(self) -> tuple[int, int]:
        """Lowest compute capability among the GPUs."""
        return min(g.compute_capability for g in self.gpus)

    @property
    def names(self) -> list[str]:
        """Distinct GPU names, in order of first appearance."""
        return list(dict.fromkeys(g.name for g in self.gpus))

    def describe(self) -> str:
        """Human form, e.g. `4x A800-80G (79.25 GiB, sm80)`."""
        parts = []
        for name in self.names:
            same = [g for g in self.gpus if g.name == name]
            g = same[0]
            cc = f"sm{g.compute_capability[0]}{g.compute_capability[1]}"
            parts.append(f"{len(same)}x {name} ({g.memory_bytes / GiB:.2f} GiB, {cc})")
        return " + ".join(parts)

    @classmethod
    def from_facts(cls, facts: list[dict[str, object]]) -> "Hardware":
        """Build from host facts: dicts with `name`, `memory_total_mib`, `compute_cap` ("8.0")."""
        if not facts:
            raise HardwareError("the host reports no GPUs (nvidia-smi listed none).")
        gpus = []
        for i, fact in enumerate(facts):
            try:
                name = str(fact["name"])
                mib = int(str(fact["memory_total_mib"]))
                major, minor = (int(p) for p in str(fact["compute_cap"]).split("."))
            except (KeyError, ValueError) as exc:
                raise HardwareError(
                    f"GPU {i} facts {fact!r} are incomplete or malformed ({exc}); expected "
                    "name, memory_total_mib (integer) and compute_cap (like '8.0')."
                ) from exc
            gpus.append(Gpu(name, mib * MiB, (major, minor)))
        return cls(tuple(gpus), "measured")


_SPEC = re.compile(r"^\s*(?:(\d+)\s*[xX*]\s*)?([A-Za-z0-9][A-Za-z0-9 _-]*?)\s*$")


def parse_gpu_spec(spec: str) -> Hardware:
    """Parse `4xA800-80G`, `8xH200`, `2xH100-80G` or `H200` (one GPU) into a `Hardware`."""
    match = _SPEC.match(spec or "")
    if not match:
        raise HardwareError(f"cannot parse GPU spec {spec!r}; expected COUNTxMODEL, e.g. 4xA800-80G or 8xH200.")
    count = int(match.group(1) or 1)
    if count < 1:
        raise HardwareError(f"GPU spec {spec!r} asks for {count} GPUs; the count must be at least 1.")
    model = lookup(match.group(2))
    gpu = Gpu(model.key, model.memory_bytes, model.compute_capability)
    return Hardware((gpu,) * count, model.memory_source)
