"""Clusters in the fleet topology (vllm_fleet/fleet.py `clusters`): one model across several hosts, computed once."""

from __future__ import annotations

import pytest

from vllm_fleet.fleet import TopologyError, topology

KEY = "k" * 24
NODE = {"vllm_bind_host": "0.0.0.0", "vllm_api_key": KEY, "vllm_cluster": "minimax-pair", "vllm_cluster_ifname": "ens1f0"}


def hosts(*extra: dict, names=("a800-01", "a800-02", "a800-03")):
    return [(n, {**NODE, "vllm_cluster_rank": i, "vllm_cluster_address": f"10.0.0.{i + 1}", **e})
            for i, (n, e) in enumerate(zip(names, extra))]


def problems(entries) -> list[tuple[str, str]]:
    with pytest.raises(TopologyError) as e:
        topology(entries)
    return [(host, p.key) for host, p in e.value.problems]


def test_a_cluster_is_computed_once_in_rank_order():
    entries = hosts({}, {}, {})
    entries = [entries[2], entries[0], entries[1]]  # inventory order is not rank order
    topo = topology(entries)
    (c,) = topo.clusters
    assert c.name == "minimax-pair" and c.model == "minimax-m2"
    assert c.hosts == ("a800-01", "a800-02", "a800-03") and c.head.host == "a800-01"
    assert (c.head_address, c.port, c.layout, c.ifname) == ("10.0.0.1", 29501, "auto", "ens1f0")
    assert dict(c.host_ips) == {"a800-01": "10.0.0.1", "a800-02": "10.0.0.2", "a800-03": "10.0.0.3"}
    m = topo.member("a800-03")
    assert (m.cluster, m.rank, m.cluster_size, m.head_address, m.head_port) == ("minimax-pair", 2, 3, "10.0.0.1", 29501)
    assert topo.cluster_of("a800-02") is c


def test_the_head_address_falls_back_to_the_advertised_one():
    entries = [(n, {k: v for k, v in d.items() if k != "vllm_cluster_address"}) for n, d in hosts({}, {})]
    (c,) = topology(entries).clusters
    assert c.head_address == "a800-01" and c.host_ips == ()


def test_hosts_without_vllm_cluster_serve_alone():
    topo = topology([("solo", {})])
    assert topo.clusters == () and topo.cluster_of("solo") is None


@pytest.mark.parametrize("key,value", [("vllm_model", "tests/fixtures/tiny-minimax-m2"), ("vllm_version", "0.24.0"),
                                       ("vllm_torch_backend", "cu128"), ("vllm_max_model_len", 65536),
                                       ("vllm_gpus", [0, 1])])
def test_a_node_that_disagrees_with_the_head_is_named_with_the_setting(key, value):
    from pathlib import Path
    if key == "vllm_model":
        value = str(Path(__file__).resolve().parents[2] / value)
    assert (("a800-02", key) in problems(hosts({}, {key: value})))


def test_no_head():
    entries = hosts({}, {}, names=("w1", "w2"))
    entries = [(n, {**d, "vllm_cluster_rank": d["vllm_cluster_rank"] + 1}) for n, d in entries]
    found = problems(entries)
    assert ("w1", "vllm_cluster_rank") in found  # no rank 0
    assert ("w2", "vllm_cluster_rank") in found  # rank 2 of 2 nodes: a gap


def test_a_worker_listed_twice():
    assert ("a800-02", "vllm_cluster_rank") in problems(hosts({}, {"vllm_cluster_rank": 0}))
    same = hosts({}, {"vllm_cluster_address": "10.0.0.1"})
    assert ("a800-02", "vllm_cluster_address") in problems(same)


def test_a_missing_rank_and_a_cluster_of_one():
    assert problems(hosts({}, {"vllm_cluster_rank": None})) == [("a800-02", "vllm_cluster_rank")]
    assert problems(hosts({})) == [("a800-01", "vllm_cluster")]


def test_a_cluster_node_that_is_also_a_router_replica():
    entries = [(*e, {"all"}) for e in hosts({}, {})]
    entries.append(("router-01", {"vllm_api_key": KEY, "vllm_router_replicas": ["a800-01"]}, {"routers"}))
    found = problems(entries)
    assert found == [("a800-01", "vllm_cluster")]
    entries = [(n, d, {"routers", "gpu"} if n == "a800-02" else {"gpu"}) for n, d, _ in entries[:2]]
    assert ("a800-02", "vllm_cluster") in problems(entries)


def test_the_error_names_host_setting_value_and_remedy():
    with pytest.raises(TopologyError) as e:
        topology(hosts({}, {"vllm_torch_backend": "cu128"}))
    text = str(e.value)
    assert "host a800-02" in text and "vllm_torch_backend='cu128'" in text and "head a800-01" in text and "remedy:" in text


def test_a_deploy_of_a_cluster_node_stops_before_any_fact_with_one_clear_error():
    """The plan of a cluster exists, its deploy does not: deploy.py refuses a cluster node (naming the host, the
    setting and the remedy) before it reads a fact, instead of deploying each node as its own endpoint."""
    from vllm_fleet.hostops.abort import FleetAbort
    from tests.unit.fakerun import fake_run

    (head, head_data), peer = hosts({}, {})
    run = fake_run(head_data, lambda cls, args, kwargs: None, name=head, peers=(peer,))
    with pytest.raises(FleetAbort) as e:
        run.run_file("deploy.py")
    text = str(e.value)
    assert text.startswith("host a800-01: vllm_cluster='minimax-pair': ") and "not built yet" in text, text
    assert "remedy: plan it with `vllm-fleet plan --gpus <N>x<GPU> --nodes 2`" in text, text
    assert run.reads == [], run.reads  # nothing read, nothing changed
