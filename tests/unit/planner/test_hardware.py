"""GPU catalog, spec parsing and host facts (vllm_fleet.planner.hardware)."""

from __future__ import annotations

import pytest

from vllm_fleet.planner.hardware import GiB, MiB, Hardware, HardwareError, lookup, parse_gpu_spec


def test_seed_a800_spec() -> None:
    hw = parse_gpu_spec("4xA800-80G")
    assert hw.count == 4
    assert hw.min_memory_bytes == int(79.25 * GiB)  # what vLLM reported in the seed log
    assert hw.min_compute_capability == (8, 0)
    assert not hw.gpus[0].fp8_native
    assert hw.memory_source == "measured"


@pytest.mark.parametrize(("spec", "count", "name", "cc"), [
    ("8xH200", 8, "H200", (9, 0)),
    ("2xH100-80G", 2, "H100-80G", (9, 0)),
    ("H200", 1, "H200", (9, 0)),
    ("2 x L40S", 2, "L40S", (8, 9)),
    ("8xB200", 8, "B200", (10, 0)),
    ("1xRTX4090", 1, "RTX4090", (8, 9)),
    ("4xA10", 4, "A10", (8, 6)),
])
def test_specs(spec: str, count: int, name: str, cc: tuple[int, int]) -> None:
    hw = parse_gpu_spec(spec)
    assert (hw.count, hw.names, hw.min_compute_capability) == (count, [name], cc)
    assert hw.gpus[0].fp8_native is (cc >= (8, 9))


def test_h200_memory_is_the_measured_total() -> None:
    assert parse_gpu_spec("8xH200").min_memory_bytes == 143_771 * MiB


def test_nvidia_smi_names_resolve() -> None:
    assert lookup("NVIDIA A800-SXM4-80GB").key == "A800-80G"
    assert lookup("NVIDIA H200").key == "H200"
    assert lookup("NVIDIA GeForce RTX 4090").key == "RTX4090"


def test_from_facts() -> None:
    facts = [{"name": "NVIDIA A800-SXM4-80GB", "memory_total_mib": 81920, "compute_cap": "8.0"}] * 2
    hw = Hardware.from_facts(facts)
    assert hw.count == 2
    assert hw.min_memory_bytes == 81920 * MiB
    assert hw.min_compute_capability == (8, 0)


def test_mixed_facts_size_by_smallest() -> None:
    hw = Hardware.from_facts([
        {"name": "NVIDIA H200", "memory_total_mib": "143771", "compute_cap": "9.0"},
        {"name": "NVIDIA H100 80GB HBM3", "memory_total_mib": "81559", "compute_cap": "9.0"},
    ])
    assert hw.min_memory_bytes == 81559 * MiB
    assert len(hw.names) == 2


@pytest.mark.parametrize(("spec", "match"), [
    ("4xA900", "unknown GPU 'A900'"),
    ("4xH20O", "Did you mean H200"),
    ("0xH200", "at least 1"),
    ("", "cannot parse GPU spec"),
    ("4x", "unknown GPU '4x'"),
])
def test_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(HardwareError, match=match):
        parse_gpu_spec(spec)


@pytest.mark.parametrize("facts", [
    [],
    [{"name": "NVIDIA H200", "memory_total_mib": "lots", "compute_cap": "9.0"}],
    [{"name": "NVIDIA H200", "compute_cap": "9.0"}],
])
def test_bad_facts(facts: list[dict[str, object]]) -> None:
    with pytest.raises(HardwareError):
        Hardware.from_facts(facts)
