"""The routes of a fleet (vllm_fleet/fleet.py `routes`): which replicas a router fronts, at which URLs, and the one
clear error for each fleet a router cannot serve (issue 16, items 1, 5, 6)."""

from __future__ import annotations

import pytest

from vllm_fleet.fleet import TopologyError, topology
from vllm_fleet.router import render

TINY = "tests/fixtures/tiny-minimax-m2"
KEY = "sk-fleet-0123456789abcdef"
PUBLIC = {"vllm_bind_host": "0.0.0.0", "vllm_api_key": KEY}
GW = {"vllm_api_key": KEY}  # the router host holds the replicas' key for its prober


def _fleet(*hosts):
    return topology([(name, data, groups) for name, data, groups in hosts])


def test_no_routers_group_no_route_and_every_host_serves():
    t = _fleet(("a", PUBLIC, ("gpus",)), ("b", PUBLIC, ("gpus",)))
    assert t.routes == () and t.router_only == () and all(t.serves_vllm(h) for h in ("a", "b"))
    assert t.route_of("a") is None and t.route_on("a") is None


def test_a_router_only_host_fronts_every_replica_of_the_one_model():
    t = _fleet(("gw", GW, ("routers",)), ("a", PUBLIC, ("gpus",)), ("b", {**PUBLIC, "vllm_port": 8200}, ("gpus",)))
    assert t.router_only == ("gw",) and not t.serves_vllm("gw") and [m.host for m in t.members] == ["a", "b"]
    r = t.route_on("gw")
    assert r.model == "minimax-m2" and [url for _, url in r.upstreams] == ["http://a:8100", "http://b:8200"]
    assert t.route_of("b") is r and r.upstream_url("b") == "http://b:8200" and r.url == "http://127.0.0.1:8000"
    assert render.config(r)["worker_urls"] == ["http://a:8100", "http://b:8200"] and render.config(r)["policy"] == "cache_aware"


def test_a_router_on_a_replica_reaches_that_replica_on_loopback():
    t = _fleet(("a", {"vllm_port": 8101, "vllm_api_key": KEY}, ("gpus", "routers")), ("b", {**PUBLIC, "vllm_port": 8102}, ("gpus",)))
    assert t.serves_vllm("a") and [url for _, url in t.route_on("a").upstreams] == ["http://127.0.0.1:8101", "http://b:8102"]


def test_loopback_replicas_with_an_advertised_address_share_one_network():
    """The CI hosts: containers on the host network, each vLLM on 127.0.0.1, advertised as 127.0.0.1."""
    lo = {"vllm_advertise_address": "127.0.0.1"}
    t = _fleet(("a", {**lo, "vllm_port": 8101}, ("ci", "routers")), ("b", {**lo, "vllm_port": 8102}, ("ci",)))
    assert [url for _, url in t.route_on("a").upstreams] == ["http://127.0.0.1:8101", "http://127.0.0.1:8102"]


@pytest.mark.parametrize("hosts, words", [
    ([("gw", GW, ("routers",))], ["host gw: vllm_router_model", "the fleet serves 0 models"]),
    ([("gw", {**GW, "vllm_router_model": "other"}, ("routers",)), ("a", PUBLIC, ("g",))],
     ["host gw: vllm_router_model='other'", "no host of the fleet serves this model", "remedy:"]),
    ([("gw", {**GW, "vllm_router_replicas": ["a", "z"]}, ("routers",)), ("a", PUBLIC, ("g",))],
     ["host gw: vllm_router_replicas", "z is no host of the fleet that serves vLLM"]),
    ([("gw", {**GW, "vllm_router_model": "minimax-m2", "vllm_router_replicas": ["t"]}, ("routers",)),
      ("a", PUBLIC, ("g",)), ("t", {**PUBLIC, "vllm_model": TINY, "vllm_port": 8101}, ("g",))],
     ["host gw: vllm_router_replicas", "t serves 'tiny-minimax-m2', not 'minimax-m2'"]),
    ([("gw", GW, ("routers",)), ("a", {}, ("g",))],
     ["host gw: vllm_advertise_address", "cannot reach replica a", "loopback: that host only"]),
    ([("gw", GW, ("routers",)), ("a", PUBLIC, ("g",)), ("b", {**PUBLIC, "vllm_api_key": KEY + "x"}, ("g",))],
     ["host gw: vllm_api_key='<secret>'", "different API keys", "sends every replica the same Authorization header"]),
    ([("gw", {"vllm_router_bind_host": "10.0.0.5"}, ("routers",)), ("a", PUBLIC, ("g",))],
     ["host gw: vllm_router_api_key=None", "is missing while the router listens on 10.0.0.5",
      "remedy: set vllm_router_api_key (or this host's vllm_api_key)"]),
    ([("gw", GW, ("routers",)), ("a", {**PUBLIC, "vllm_api_key": "sk-dollar$and\"quote;"}, ("g",))],
     ["host gw: vllm_api_key='<secret>'", "is no bearer token", "openssl rand -hex 24"]),
    ([("gw", GW, ("routers",)), ("a", {**PUBLIC, "vllm_rolling_batch": 2}, ("g",)), ("b", {**PUBLIC, "vllm_port": 8200}, ("g",))],
     ["host gw: vllm_rolling_batch=2", "would drain all 2 replicas behind this router at once", "at most 1"]),
    ([("a", {"vllm_port": 8000}, ("g", "routers"))], ["host a: vllm_router_port=8000", "is also this host's vllm_port"]),
    ([("a", {"vllm_router_metrics_port": 8000}, ("g", "routers"))],
     ["host a: vllm_router_metrics_port=8000", "is also this host's vllm_router_port"]),
    ([("a", {"vllm_router_internal_port": 8100}, ("g", "routers"))],
     ["host a: vllm_router_internal_port=8100", "is also this host's vllm_port"]),
])
def test_a_fleet_the_router_cannot_serve_names_host_setting_and_remedy(hosts, words):
    with pytest.raises(TopologyError) as exc:
        _fleet(*hosts)
    text = str(exc.value)
    for w in words:
        assert w in text, (w, text)
    assert KEY not in text


def test_the_router_key_is_a_bearer_token_and_never_shown():
    from vllm_fleet.errors import SettingsError

    with pytest.raises(SettingsError) as exc:
        _fleet(("gw", {"vllm_router_api_key": "short$"}, ("routers",)), ("a", PUBLIC, ("g",)))
    assert "vllm_router_api_key='***'" in str(exc.value) and "short$" not in str(exc.value)


def test_clients_send_the_router_key_and_the_replicas_get_theirs():
    """The front checks the router host's key (vllm_router_api_key, else its vllm_api_key) and sends the replicas'
    key in its place; a router beyond loopback is fine with a key; the front config holds both, nothing else does."""
    from vllm_fleet.settings import Settings

    client = "sk-router-clients-0123456789"
    t = _fleet(("gw", {"vllm_router_bind_host": "10.0.0.5", "vllm_router_api_key": client}, ("routers",)),
               ("a", PUBLIC, ("g",)))
    r = t.route_on("gw")
    assert r.client_key.get_secret_value() == client and r.upstream_key.get_secret_value() == KEY
    assert r.url == "http://10.0.0.5:8000" and r.admin_url == "http://127.0.0.1:8002"
    assert client not in repr(r) and KEY not in repr(r)
    conf = render.front_config(Settings(), r)
    assert f'"Bearer {client}" 1;' in conf and f'proxy_set_header Authorization "Bearer {KEY}";' in conf
    assert "listen 10.0.0.5:8000" in conf and "server 127.0.0.1:8002" in conf
    cfg = render.config(r)
    assert (cfg["host"], cfg["port"]) == ("127.0.0.1", 8002)
    for text in (render.config_text(r), render.unit(Settings(), r), render.front_unit(Settings(), r)):
        assert client not in text and KEY not in text
    # no key on the router host (loopback only): the front checks nothing and passes the client's header on
    t = _fleet(("gw", {}, ("routers",)), ("a", PUBLIC, ("g",)))
    conf = render.front_config(Settings(), t.route_on("gw"))
    assert "map $http_authorization" not in conf and "proxy_set_header Authorization" not in conf


def test_the_router_unit_is_hardened_and_runs_the_pinned_venv():
    from vllm_fleet.settings import Settings

    t = _fleet(("gw", GW, ("routers",)), ("a", PUBLIC, ("g",)))
    text = render.unit(Settings(), t.route_on("gw"))
    for line in ("DynamicUser=yes", "ProtectSystem=strict", "NoNewPrivileges=yes", "CapabilityBoundingSet=\n",
                 "Restart=always", "ExecStart=/opt/vllm-fleet/router/venv-0.1.17/bin/python "
                 "/opt/vllm-fleet/router/vllm-fleet-router /opt/vllm-fleet/router/vllm-router.json"):
        assert line in text, line
    assert KEY not in text and KEY not in render.config_text(t.route_on("gw"))
    front = render.front_unit(Settings(), t.route_on("gw"))
    for line in ("ProtectSystem=strict", "NoNewPrivileges=yes", "CapabilityBoundingSet=CAP_SETUID CAP_SETGID CAP_CHOWN\n",
                 "ExecStart=/usr/sbin/nginx -e stderr -c /etc/vllm-fleet/vllm-router-front.conf"):
        assert line in front, line
    assert "user www-data;" in render.front_config(Settings(), t.route_on("gw"))


def test_the_launcher_refuses_an_unknown_config_key():
    from vllm_fleet.router import hostprog

    assert hostprog.router_args({"port": 1, "policy": "round_robin"}) == {"port": 1, "policy": "round_robin"}
    with pytest.raises(SystemExit, match="unknown config keys"):
        hostprog.router_args({"prot": 1})


def test_the_launcher_strips_the_routers_colour_codes_from_what_reaches_the_journal():
    """vllm-router colours its log lines even when its output is no terminal (measured: NO_COLOR does not stop it);
    the launcher relays the router child's output without the codes."""
    import io

    from vllm_fleet.router import hostprog

    src = io.BytesIO(b"\x1b[2m2026-12-04\x1b[0m \x1b[32m INFO\x1b[0m Router ready\n\x1b[31mERROR\x1b[0m x\nlast")
    dst = io.BytesIO()
    hostprog.relay(src, dst)
    assert dst.getvalue() == b"2026-12-04  INFO Router ready\nERROR x\nlast"


def test_status_shows_each_replica_in_rotation_or_drained():
    from vllm_fleet.cli import status

    t = _fleet(("gw", GW, ("routers",)), ("a", PUBLIC, ("g",)), ("b", {**PUBLIC, "vllm_port": 8200}, ("g",)))
    answer = '{"workers": [{"url": "http://a:8100", "is_healthy": true}], "total": 1}'
    row = {"role": "router", "router": status.router_row(t.route_on("gw"), answer)}
    assert [(u["host"], u["in_rotation"], u["healthy"]) for u in row["router"]["upstreams"]] == [
        ("a", True, True), ("b", False, None)]
    lines = status.router_lines({"gw": row})
    assert lines[0] == "router on gw at http://127.0.0.1:8000 for minimax-m2 (policy cache_aware):"
    assert lines[2].startswith("  b http://b:8200: OUT OF ROTATION (no rolling change: taken out by the prober") \
        and not status.healthy(row)
    down = {"role": "router", "router": status.router_row(t.route_on("gw"), '{"error": "Connection refused"}')}
    assert "does not answer (Connection refused)" in status.router_lines({"gw": down})[0] and not status.healthy(down)


def test_status_says_which_replica_a_rolling_change_is_on(tmp_path):
    """The drain's record on the router host (router_rolling_dir), read by the same host command status runs."""
    import json
    import subprocess
    import urllib.parse

    from vllm_fleet.cli import status

    t = _fleet(("gw", GW, ("routers",)), ("a", PUBLIC, ("g",)), ("b", {**PUBLIC, "vllm_port": 8200}, ("g",)))
    (tmp_path / urllib.parse.quote("http://b:8200", safe="")).write_text('{"host": "b"} 1764820800\n')
    out = subprocess.run(["sh", "-c", status.router_status_command("http://127.0.0.1:9", str(tmp_path))],
                         capture_output=True, text=True, check=True).stdout
    answer = json.loads(out)
    assert answer["rolling"] == {"http://b:8200": [{"host": "b"}, 1764820800]} and "error" in answer
    answer = {"workers": [{"url": "http://a:8100", "is_healthy": True}], "rolling": answer["rolling"]}
    row = {"role": "router", "router": status.router_row(t.route_on("gw"), json.dumps(answer))}
    lines = status.router_lines({"gw": row})
    assert lines[1] == "  a http://a:8100: in rotation, healthy"
    assert lines[2].startswith("  b http://b:8200: OUT OF ROTATION: a rolling change is on it (drained at "), lines
    assert row["router"]["upstreams"][1]["rolling_since"] == 1764820800


def _prober(misses=2):
    from vllm_fleet.router.hostprog_prober import Config, Prober

    return Prober(Config("http://127.0.0.1:8000", ["http://a:1", "http://b:2"], "m", "/etc/x.env", 1, 2, misses))


def test_the_prober_takes_a_hung_replica_out_after_its_misses_and_puts_it_back_on_its_answer():
    p, calls = _prober(), []
    router = lambda action, up: calls.append((action, up)) or (200, "ok")  # noqa: E731
    every = {"http://a:1", "http://b:2"}
    assert p.round({"http://a:1": True, "http://b:2": False}, every, router) == [] and calls == []  # 1 miss of 2
    lines = p.round({"http://a:1": True, "http://b:2": False}, every, router)
    assert calls == [("remove_worker", "http://b:2")] and "out of rotation" in lines[0]
    p.round({"http://a:1": True, "http://b:2": False}, every - {"http://b:2"}, router)  # still hung: nothing more
    assert calls == [("remove_worker", "http://b:2")]
    lines = p.round({"http://a:1": True, "http://b:2": True}, every - {"http://b:2"}, router)
    assert calls[-1] == ("add_worker", "http://b:2") and "back in rotation" in lines[0] and p.removed == set()


def test_the_prober_leaves_a_drained_replica_to_the_deploy_and_ignores_refused_probes():
    p, calls = _prober(misses=1), []
    router = lambda action, up: calls.append((action, up)) or (200, "ok")  # noqa: E731
    # a rolling change drained b (no longer listed) and restarts it: its misses take nothing out, its answer adds nothing
    p.round({"http://b:2": False}, {"http://a:1"}, router)
    p.round({"http://b:2": True}, {"http://a:1"}, router)
    # a 4xx (key refused) is not counted; the router not answering (listed None) changes nothing
    p.round({"http://a:1": None}, {"http://a:1"}, router)
    p.round({"http://a:1": False}, None, router)
    assert calls == []


def test_the_prober_counts_the_router_taking_a_replica_back_that_is_already_there_as_back():
    p = _prober(misses=1)
    p.round({"http://b:2": False}, {"http://a:1", "http://b:2"}, lambda a, u: (200, "removed"))
    assert p.removed == {"http://b:2"}
    p.round({"http://b:2": True}, {"http://a:1", "http://b:2"}, lambda a, u: (400, "Worker http://b:2 already exists"))
    assert p.removed == set()


def test_the_prober_reads_the_key_from_the_env_file_only(tmp_path):
    from vllm_fleet.router.hostprog_prober import read_key

    f = tmp_path / "r.env"
    f.write_text('# x\nVLLM_API_KEY="sk-a\\"b"\n')
    assert read_key(str(f)) == 'sk-a"b' and read_key(str(tmp_path / "absent")) is None
