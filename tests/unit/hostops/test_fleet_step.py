"""The run's fleet topology (vllm_fleet/hostops/fleet.py) with real in-process pyinfra Inventory and State objects.

pyinfra runs deploy.py once per active host; the topology must be built once per
run, from every host of the inventory (a --limit run too), and kept on the run's
State, not in a module global. No host is connected: the builder reads host data only.
"""

from __future__ import annotations

import logging
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from pyinfra.api import Config, Inventory, State
from pyinfra.api.exceptions import PyinfraError
from pyinfra.context import ctx_host, ctx_inventory, ctx_state

from vllm_fleet import fleet as fleet_model
from vllm_fleet.hostops import fleet

ROOT = Path(__file__).resolve().parents[3]
TINY = str(ROOT / "tests/fixtures/tiny-minimax-m2")
KEY = "k" * 24
PUBLIC = {"vllm_bind_host": "0.0.0.0", "vllm_api_key": KEY}
HOSTS = [
    ("a800-01.example.internal", {"ssh_user": "ubuntu", **PUBLIC}),
    ("tiny-01", {"ssh_hostname": "10.0.0.7", "vllm_model": TINY, "vllm_port": 8101, **PUBLIC}),
    ("a800-02.example.internal", {"vllm_port": 8200, **PUBLIC}),
]
NAMES = [name for name, _ in HOSTS]


def _run(hosts=HOSTS, limit: list[str] | None = None, all_data: dict | None = None) -> State:
    """A pyinfra run's State over an in-process Inventory, as the CLI makes them (limit: --limit).

    The hosts in the limit are activated as `pyinfra.api.connect.connect_all` does once
    they connect (here without connecting: nothing here runs a command).
    """
    inventory = Inventory((list(hosts), all_data or {}))
    state = State(check_for_changes=False)
    state.init(inventory, Config(), initial_limit=[inventory.get_host(n) for n in limit] if limit else None)
    for host in inventory:
        if state.is_host_in_limit(host):
            state.activate_host(host)
    return state


def _for_each_active_host(state: State, callback) -> dict[str, object]:
    """Call ``callback`` as pyinfra calls deploy code: once per active host, with the run's context set."""
    out = {}
    with ctx_state.use(state), ctx_inventory.use(state.inventory):
        for host in state.inventory.get_active_hosts():
            with ctx_host.use(host):
                out[host.name] = callback()
    return out


@pytest.fixture(autouse=True)
def _context_restored():
    """pyinfra's ``ctx_*.use`` does not restore the old value when the block raises: put it back for the next test."""
    saved = [(ctx, ctx.get()) for ctx in (ctx_state, ctx_inventory, ctx_host)]
    yield
    for ctx, value in saved:
        ctx.set(value)


@pytest.fixture()
def builds(monkeypatch) -> list[list[str]]:
    """Every build of a topology: the host names it was given."""
    calls: list[list[str]] = []
    real = fleet_model.topology

    def counted(hosts):
        hosts = list(hosts)
        calls.append([entry[0] for entry in hosts])
        return real(hosts)

    monkeypatch.setattr(fleet_model, "topology", counted)
    return calls


def test_one_topology_per_run_for_every_host(builds):
    state = _run()
    seen = _for_each_active_host(state, fleet.topology)
    assert builds == [NAMES]
    topo = next(iter(seen.values()))
    assert set(seen) == set(NAMES) and all(t is topo for t in seen.values())
    assert [m.host for m in topo] == NAMES  # inventory order, whatever order pyinfra visits the hosts in
    assert topo.models() == ("minimax-m2", "tiny-minimax-m2")
    assert _for_each_active_host(state, fleet.topology) == seen and len(builds) == 1  # kept on the State


def test_a_new_run_builds_its_own(builds):
    first = _for_each_active_host(_run(), fleet.topology)
    second = _for_each_active_host(_run(HOSTS[:2]), fleet.topology)
    assert len(builds) == 2 and len(next(iter(first.values()))) == 3 and len(next(iter(second.values()))) == 2


def test_a_limited_run_still_sees_every_host(builds):
    state = _run(limit=["tiny-01"])
    assert [h.name for h in state.inventory.get_active_hosts()] == ["tiny-01"]
    seen = _for_each_active_host(state, fleet.topology)
    assert list(seen) == ["tiny-01"] and builds == [NAMES]
    assert [m.host for m in seen["tiny-01"].replicas("minimax-m2")] == ["a800-01.example.internal", "a800-02.example.internal"]


def test_each_host_counts_with_its_merged_data():
    seen = _for_each_active_host(_run([HOSTS[0], HOSTS[2]], all_data={"vllm_served_model_name": "MiniMax-M2"}), fleet.topology)
    topo = seen["a800-01.example.internal"]
    assert topo.models() == ("MiniMax-M2",) and [m.port for m in topo] == [8100, 8200]


def test_a_bad_fleet_ends_the_run_once_with_the_message(builds):
    hosts = [HOSTS[0], ("b", {"vllm_model": TINY, "vllm_served_model_name": "minimax-m2", **PUBLIC})]
    state = _run(hosts)
    with ctx_state.use(state), ctx_inventory.use(state.inventory):
        for name in ("b", "a800-01.example.internal"):
            with ctx_host.use(state.inventory.get_host(name)), pytest.raises(PyinfraError) as exc:
                fleet.topology()
            assert str(exc.value).startswith("host b: vllm_served_model_name='minimax-m2': serves vllm_model")
    assert len(builds) == 1


def test_bad_settings_of_a_host_left_out_by_limit_say_why_it_counts():
    state = _run([HOSTS[0], ("b", {"vllm_port": 70000})], limit=["a800-01.example.internal"])
    with pytest.raises(PyinfraError) as exc:
        _for_each_active_host(state, fleet.topology)
    assert str(exc.value).startswith("host b: vllm_port=70000")
    assert "hosts a --limit leaves out too" in str(exc.value)


def test_outside_a_pyinfra_run_it_says_so():
    with pytest.raises(RuntimeError, match="inside a pyinfra run"):
        fleet.topology()


def test_report_logs_the_hosts_plan_line(caplog):
    state = _run()
    with caplog.at_level(logging.INFO, logger="pyinfra"):
        _for_each_active_host(state, lambda: fleet.report(fleet.topology()))
    lines = sorted(r.getMessage() for r in caplog.records if "fleet:" in r.getMessage())
    assert len(lines) == 3
    assert any(line.endswith("fleet: replica 2 of 2 of minimax-m2 at a800-02.example.internal:8200") and "a800-02" in line
               for line in lines), lines


# -- deploy.py: the topology is computed once and handed on; the steps run as before --

STEPS = {
    "vllm_fleet.weights.step": ("source", "reads", "apply"),
    "vllm_fleet.preflight.step": ("reads", "run"),
    "vllm_fleet.account.step": ("reads", "apply"),
    "vllm_fleet.pyenv.step": ("reads", "apply"),
    "vllm_fleet.service.step": ("reads", "apply"),
    "vllm_fleet.router.step": ("reads",),
    "vllm_fleet.hostops.facts": ("read_many",),
}


def test_deploy_py_gets_the_fleet_once_and_every_step_runs_as_before(monkeypatch, builds, caplog):
    steps: list[tuple[str, str, str]] = []
    for module, names in STEPS.items():
        __import__(module)
        for fn in names:
            def record(*args, _where=(module, fn), **kwargs):
                steps.append((ctx_host.get().name, *_where))
                return {"source": SimpleNamespace(serve_path="/m"), "reads": []}.get(_where[1])
            monkeypatch.setattr(sys.modules[module], fn, record)
    state = _run()
    with caplog.at_level(logging.INFO, logger="pyinfra"):
        globals_by_host = _for_each_active_host(state, lambda: runpy.run_path(str(ROOT / "deploy.py")))
    assert builds == [NAMES]
    for name, g in globals_by_host.items():
        assert g["serves"] and g["route"] is None and g["behind"] is None  # no `routers` group: replicas only
        assert [s[1:] for s in steps if s[0] == name] == [
            ("vllm_fleet.weights.step", "source"),
            # every step's facts, declared and then read in one round trip, before the first step runs
            ("vllm_fleet.preflight.step", "reads"), ("vllm_fleet.account.step", "reads"), ("vllm_fleet.pyenv.step", "reads"),
            ("vllm_fleet.weights.step", "reads"), ("vllm_fleet.service.step", "reads"), ("vllm_fleet.router.step", "reads"),
            ("vllm_fleet.hostops.facts", "read_many"),
            ("vllm_fleet.preflight.step", "run"), ("vllm_fleet.account.step", "apply"),
            ("vllm_fleet.pyenv.step", "apply"), ("vllm_fleet.weights.step", "apply"), ("vllm_fleet.service.step", "apply")]
    assert len({id(g["topology"]) for g in globals_by_host.values()}) == 1
    assert sum("fleet: replica" in r.getMessage() for r in caplog.records) == 3


# -- the repository's inventories, loaded by pyinfra's CLI loader (group_data included) --
# In a child process: importing pyinfra_cli monkey-patches the whole process with gevent.

_CLI_RUN = """
import json, sys
from pyinfra.api import Config, State
from pyinfra.context import ctx_host, ctx_inventory, ctx_state
from pyinfra_cli.inventory import make_inventory
from vllm_fleet.hostops import fleet

root, runs = sys.argv[1], json.loads(sys.argv[2])
out = {}
for inventory_file, limit in runs:
    state = State(check_for_changes=False)
    ctx_state.set(state)
    inventory = make_inventory(inventory_file, cwd=root)
    ctx_inventory.set(inventory)
    state.init(inventory, Config(), initial_limit=[inventory.get_host(n) for n in limit] or None)
    seen = out[inventory_file] = {}
    for host in inventory:
        if state.is_host_in_limit(host):
            with ctx_host.use(host):
                topo = fleet.topology()
                seen[host.name] = {"describe": topo.describe(host.name), "id": id(topo),
                                   "members": [[m.host, m.model, m.address, m.port, m.local_only] for m in topo]}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, dict]:
    """Per inventory file, per host in the limit: its plan line, the Topology's id and members (one child for all)."""
    import json
    import os
    import subprocess

    wheelhouse = tmp_path_factory.mktemp("wheelhouse")
    (wheelhouse / "vllm-0.0.0-py3-none-any.whl").write_bytes(b"")  # group_data/ci.py's wheelhouse must hold a wheel
    env = {**os.environ, "VLLM_FLEET_CI_WHEELHOUSE": str(wheelhouse),
           "VLLM_FLEET_API_KEY": KEY}  # prod's h200-01 listens on 0.0.0.0: it needs the key
    runs = [["inventory/prod.py", []], ["inventory/ci.py", ["fleet-c"]]]
    proc = subprocess.run([sys.executable, "-c", _CLI_RUN, str(ROOT), json.dumps(runs)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_the_example_production_fleet(cli_runs):
    seen = cli_runs["inventory/prod.py"]
    assert len({host["id"] for host in seen.values()}) == 1
    assert seen["a800-01.example.internal"]["members"] == [
        ["a800-01.example.internal", "minimax-m2", "a800-01.example.internal", 8100, True],
        ["a800-02.example.internal", "minimax-m2", "a800-02.example.internal", 8200, True],
        ["h200-01.example.internal", "minimax-m2", "h200-01.example.internal", 8100, False]]
    assert seen["a800-02.example.internal"]["describe"] == (
        "fleet: replica 2 of 3 of minimax-m2 on 127.0.0.1:8200, this host only (vllm_bind_host is loopback)")
    assert seen["h200-01.example.internal"]["describe"] == "fleet: replica 3 of 3 of minimax-m2 at h200-01.example.internal:8100"


def test_the_ci_fleet_limited_to_one_host(cli_runs):
    seen = cli_runs["inventory/ci.py"]
    assert list(seen) == ["fleet-c"]
    assert seen["fleet-c"]["members"] == [["@docker/fleet-a", "tiny-minimax-m2", None, 8101, True],
                                          ["@docker/fleet-b", "tiny-minimax-m2", None, 8102, True],
                                          ["fleet-c", "tiny-minimax-m2", "127.0.0.1", 8103, True]]
    assert seen["fleet-c"]["describe"] == "fleet: replica 3 of 3 of tiny-minimax-m2 on 127.0.0.1:8103, this host only (vllm_bind_host is loopback)"
