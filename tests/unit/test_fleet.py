"""The fleet topology (vllm_fleet/fleet.py): every host's part, from inventory-like (name, data) pairs."""

from __future__ import annotations

from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from vllm_fleet.errors import SettingsError
from vllm_fleet.fleet import Member, Topology, TopologyError, topology
from vllm_fleet.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "tests/fixtures/tiny-minimax-m2")
KEY = "k" * 24
PUBLIC = {"vllm_bind_host": "0.0.0.0", "vllm_api_key": KEY}

# Two models on three hosts, in this (inventory) order: the middle one serves the tiny model.
HOSTS = [
    ("a800-01.example.internal", {"ssh_user": "ubuntu", **PUBLIC}),
    ("tiny-01", {"ssh_hostname": "10.0.0.7", "vllm_model": TINY, "vllm_port": 8101, **PUBLIC}),
    ("a800-02.example.internal", {"vllm_port": 8200, "vllm_advertise_address": "10.0.0.2", **PUBLIC}),
]


def test_members_come_in_inventory_order_with_their_model_address_and_port():
    topo = topology(HOSTS)
    assert [m.host for m in topo] == [name for name, _ in HOSTS] and len(topo) == 3
    assert topo.member("a800-01.example.internal") == Member(
        host="a800-01.example.internal", model="minimax-m2", address="a800-01.example.internal",
        address_from="inventory host name", port=8100, bind_host="0.0.0.0")
    tiny = topo.member("tiny-01")
    assert (tiny.model, tiny.address, tiny.address_from, tiny.url) == ("tiny-minimax-m2", "10.0.0.7", "ssh_hostname", "http://10.0.0.7:8101")
    assert topo.member("a800-02.example.internal").endpoint == "10.0.0.2:8200"


def test_models_and_their_replicas():
    topo = topology(HOSTS)
    assert topo.models() == ("minimax-m2", "tiny-minimax-m2")
    assert [m.host for m in topo.replicas("minimax-m2")] == ["a800-01.example.internal", "a800-02.example.internal"]
    assert [m.host for m in topo.members_of("tiny-minimax-m2")] == ["tiny-01"]
    assert topo.replicas("nobody-serves-this") == () and topo.members_of("nobody-serves-this") == ()
    assert all(m.role == "replica" for m in topo)


def test_a_member_has_no_cluster_router_or_scrape_job_until_those_capabilities_set_them():
    m = topology(HOSTS).member("tiny-01")
    assert (m.cluster, m.rank, m.cluster_size, m.head_address, m.head_port, m.router, m.scrape_job) == (None,) * 7
    with pytest.raises(FrozenInstanceError):
        m.port = 1  # type: ignore[misc]


def test_the_served_model_name_is_what_clients_send():
    topo = topology([("a", {"vllm_served_model_name": "MiniMax-M2"}), ("b", {"vllm_served_model_name": "MiniMax-M2"})])
    assert topo.models() == ("MiniMax-M2",) and len(topo.replicas("MiniMax-M2")) == 2


def test_one_checkpoint_under_two_served_names_is_two_models():
    topo = topology([("a", {}), ("b", {"vllm_served_model_name": "minimax-m2-long"})])
    assert topo.models() == ("minimax-m2", "minimax-m2-long")


def test_plan_lines():
    topo = topology(HOSTS + [("local-01", {}), ("@docker/fleet-x", {"vllm_bind_host": "0.0.0.0", "vllm_api_key": KEY, "vllm_port": 8300})])
    assert topo.describe("a800-02.example.internal") == "fleet: replica 2 of 4 of minimax-m2 at 10.0.0.2:8200"
    assert topo.describe("tiny-01") == "fleet: replica 1 of 1 of tiny-minimax-m2 at 10.0.0.7:8101"
    assert topo.describe("local-01") == "fleet: replica 3 of 4 of minimax-m2 on 127.0.0.1:8100, this host only (vllm_bind_host is loopback)"
    assert topo.describe("@docker/fleet-x") == ("fleet: replica 4 of 4 of minimax-m2 on port 8300, at no address other hosts know "
                                               "(set vllm_advertise_address)")
    with pytest.raises(KeyError, match="not-a-host is not a host of this fleet"):
        topo.describe("not-a-host")


@pytest.mark.parametrize("name,data,address,source", [
    ("h", {"vllm_advertise_address": "gpu01.lan", "ssh_hostname": "10.0.0.1", **PUBLIC}, "gpu01.lan", "vllm_advertise_address"),
    ("h", {"vllm_bind_host": "10.0.0.9", "vllm_api_key": KEY, "ssh_hostname": "10.0.0.1"}, "10.0.0.9", "vllm_bind_host"),
    ("h", {"ssh_hostname": "10.0.0.1", **PUBLIC}, "10.0.0.1", "ssh_hostname"),
    ("h.example", PUBLIC, "h.example", "inventory host name"),
    ("@docker/fleet-a", PUBLIC, None, ""),
    ("@local", {}, None, ""),
    ("@docker/fleet-a", {"vllm_advertise_address": "127.0.0.1"}, "127.0.0.1", "vllm_advertise_address"),
])
def test_the_address_other_hosts_use(name, data, address, source):
    m = topology([(name, data)]).member(name)
    assert (m.address, m.address_from) == (address, source)


def test_an_ipv6_address_is_bracketed_in_the_url():
    m = topology([("h", {"vllm_bind_host": "::", "vllm_api_key": KEY, "vllm_advertise_address": "fd00::7"})]).member("h")
    assert m.url == "http://[fd00::7]:8100" and not m.local_only


def test_two_models_under_one_served_name_name_the_host_setting_and_remedy():
    with pytest.raises(TopologyError) as exc:
        topology([("a", {}), ("b", {"vllm_model": TINY, "vllm_served_model_name": "minimax-m2"})])
    text = str(exc.value)
    assert text.startswith("host b: vllm_served_model_name='minimax-m2': ")
    assert "the name host a serves vllm_model 'minimax-m2' as" in text
    assert "remedy: give one of them another vllm_served_model_name, or the same vllm_model" in text


def test_two_hosts_at_one_endpoint_name_both_and_the_remedy():
    data = {"vllm_advertise_address": "10.0.0.5", **PUBLIC}
    with pytest.raises(TopologyError) as exc:
        topology([("a", data), ("b", {"ssh_hostname": "10.0.0.5", **PUBLIC})])
    text = str(exc.value)
    assert text.startswith("host b: vllm_advertise_address=None: ")
    assert "host b (10.0.0.5 from ssh_hostname) and host a (10.0.0.5 from vllm_advertise_address) are both reached at 10.0.0.5:8100" in text
    assert "remedy: set vllm_advertise_address on each" in text


def test_host_names_compare_without_case_and_another_port_is_another_endpoint():
    with pytest.raises(TopologyError, match="both reached at"):
        topology([("GPU01.lan", PUBLIC), ("b", {"ssh_hostname": "gpu01.LAN", **PUBLIC})])
    assert len(topology([("gpu01.lan", PUBLIC), ("b", {"ssh_hostname": "gpu01.lan", "vllm_port": 8101, **PUBLIC})])) == 2


def test_loopback_hosts_behind_one_ssh_address_are_no_clash_unless_they_advertise_it():
    # Containers reached through port forwards of one address: their vLLMs are not there for other hosts.
    local = [("c1", {"ssh_hostname": "127.0.0.1", "ssh_port": 2222}), ("c2", {"ssh_hostname": "127.0.0.1", "ssh_port": 2223})]
    assert [m.local_only for m in topology(local)] == [True, True]
    advertised = [(n, {**d, "vllm_advertise_address": "127.0.0.1"}) for n, d in local]
    with pytest.raises(TopologyError, match="both reached at 127.0.0.1:8100"):
        topology(advertised)


def test_every_problem_is_reported_at_once():
    with pytest.raises(TopologyError) as exc:
        topology([("a", {"vllm_advertise_address": "10.0.0.5", **PUBLIC}),
                  ("b", {"vllm_advertise_address": "10.0.0.5", "vllm_model": TINY, "vllm_served_model_name": "minimax-m2", **PUBLIC})])
    assert str(exc.value).startswith("fleet: 2 problems across hosts, nothing was changed:\n  - host b: vllm_served_model_name=")
    assert len(exc.value.problems) == 2


def test_bad_settings_of_any_host_name_that_host():
    with pytest.raises(SettingsError, match="^host b: vllm_port=70000"):
        topology([("a", {}), ("b", {"vllm_port": 70000})])


def test_an_empty_inventory_is_an_empty_fleet():
    assert topology([]) == Topology() and topology([]).models() == ()


# -- the setting --

@pytest.mark.parametrize("value,words", [
    ("http://10.0.0.5", "neither an IP address nor a host name"),
    ("10.0.0.5:8100", "neither an IP address nor a host name"),
    ("gpu 01", "holds whitespace"),
    ("-gpu01", "neither an IP address nor a host name"),
    ("0.0.0.0", "is a wildcard"),
    ("::", "is a wildcard"),
])
def test_advertise_address_must_be_an_address_others_can_connect_to(value, words):
    with pytest.raises(SettingsError) as exc:
        load_settings({"vllm_advertise_address": value, **PUBLIC}, host="gpu01")
    assert f"vllm_advertise_address={value!r}" in str(exc.value) and words in str(exc.value) and "remedy:" in str(exc.value)


def test_advertise_address_must_agree_with_the_bind_host():
    with pytest.raises(SettingsError, match="vllm_advertise_address='10.0.0.5': is advertised to other hosts, but vLLM listens on 127.0.0.1"):
        load_settings({"vllm_advertise_address": "10.0.0.5"})
    with pytest.raises(SettingsError, match="vllm_advertise_address='gpu01.lan': is advertised"):
        load_settings({"vllm_advertise_address": "gpu01.lan"})
    with pytest.raises(SettingsError, match="is not the address vLLM listens on \\(vllm_bind_host = 10.0.0.9\\)"):
        load_settings({"vllm_advertise_address": "10.0.0.5", "vllm_bind_host": "10.0.0.9", "vllm_api_key": KEY})
    # what agrees: loopback on a loopback bind (hosts sharing one network), a name or any address on a wildcard bind
    assert load_settings({"vllm_advertise_address": "127.0.0.1"}).advertise_address == "127.0.0.1"
    assert load_settings({"vllm_advertise_address": "localhost"}).advertise_address == "localhost"
    assert load_settings({"vllm_advertise_address": "gpu01.lan", **PUBLIC}).advertise_address == "gpu01.lan"
    assert load_settings({"vllm_advertise_address": "gpu01.lan", "vllm_bind_host": "10.0.0.9", "vllm_api_key": KEY})
    assert load_settings({}).advertise_address is None
