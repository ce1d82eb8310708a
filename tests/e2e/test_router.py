"""One endpoint for the fleet (issue 16): vllm-router on fleet-a in front of the three CI replicas.

The real router (vllm-router 0.1.17 from the wheelhouse, in its own venv, under real systemd), the real pyinfra
CLI, the vLLM TEST DOUBLE as each replica. The hosts share the control machine's network namespace, so every
replica listens on 127.0.0.1 at its own port and is advertised as 127.0.0.1 (vllm_advertise_address).

- the deploy installs the router behind its key-checking front (the distribution's nginx, its master root with
  three capabilities, its worker www-data) and
  it routes: clients send the router's key (vllm_router_api_key), the replicas get theirs (vllm_api_key), a request
  without the router's key, with a wrong one or with the replicas' key is refused at the front (401), vllm-router's
  admin endpoints are not on the client port (404), a second run changes nothing;
- a rolling restart of every replica under a steady request stream through the router: each replica is taken
  out of rotation first and put back after its gate, and no request fails; the same in batches of 2; a change
  whose first replica fails its gate: that replica is rolled back and put back, the others are not touched;
- a killed replica, a hung replica, a restart of the router itself: what a client sees, measured.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.e2e.harness import PYINFRA, REPO, Result, changed_ops, host_exec

KEY = "sk-e2e-router-" + secrets.token_hex(8)  # the replicas' key (vllm_api_key)
ROUTER_KEY = "sk-e2e-clients-" + secrets.token_hex(8)  # the key clients send to the router (vllm_router_api_key)
ROUTER_PORT, METRICS_PORT, INTERNAL_PORT = 18000, 18001, 18002
ROUTER = f"http://127.0.0.1:{ROUTER_PORT}"
HOSTS = ["@docker/fleet-a", "@docker/fleet-b", "fleet-c"]
MODEL = "tiny-minimax-m2"
REQUEST_S = 0.3
PROBE_S = 2  # the router host's completion probes: every 2 s, 2 s deadline, 2 misses take a replica out


@pytest.fixture(scope="module")
def inventory(tmp_path_factory) -> Path:
    """inventory/ci.py's hosts, advertised on the shared loopback, plus a `routers` group holding fleet-a. The
    file is named ci.py (pyinfra's group of the file's name: group_data/ci.py applies as for inventory/ci.py)."""
    path = tmp_path_factory.mktemp("router-inventory") / "ci.py"
    path.write_text(f'''import os, runpy
_ci = runpy.run_path({str(REPO / "inventory" / "ci.py")!r})
_roll = os.environ.get("VLLM_FLEET_E2E_ROLL", "")  # a new value changes every replica's unit: a rolling restart
# each completion stays in flight {REQUEST_S} s in the double (as decoding would); the double ends at once on SIGTERM
_lo = {{"vllm_advertise_address": "127.0.0.1", "vllm_rolling_batch": int(os.environ.get("VLLM_FLEET_E2E_BATCH", "1")),
        "vllm_extra_env": {{"VLLM_DOUBLE_REQUEST_SECONDS": "{REQUEST_S}", "E2E_ROLL": _roll}}}}
docker_hosts = [(name, {{**data, **_lo}}) for name, data in _ci["docker_hosts"]]
ssh_hosts = [(name, {{**data, **_lo}}) for name, data in _ci["ssh_hosts"]]
routers = [] if os.environ.get("VLLM_FLEET_E2E_NO_ROUTERS") else [
    ("@docker/fleet-a", {{"vllm_router_port": {ROUTER_PORT}, "vllm_router_metrics_port": {METRICS_PORT},
                         "vllm_router_internal_port": {INTERNAL_PORT}, "vllm_router_health_interval_s": 2, "vllm_router_probe_interval_s": {PROBE_S},
                         "vllm_router_probe_deadline_s": {PROBE_S}, "vllm_router_probe_misses": 2}})]
''')
    return path


def deploy(inventory: Path, *args: str, env: dict | None = None, check: bool = True) -> Result:
    proc = subprocess.run([str(PYINFRA), "-y", str(inventory), "deploy.py", *args], cwd=REPO, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=1200,
                          env={**__import__("os").environ, "VLLM_FLEET_API_KEY": KEY,
                               "VLLM_FLEET_ROUTER_API_KEY": ROUTER_KEY, **(env or {})})
    result = Result(proc.returncode, proc.stdout, proc.stderr, proc.stdout + proc.stderr)
    assert proc.returncode == 0 or not check, result.output[-6000:]
    return result


def chat(key: str | None = ROUTER_KEY, timeout: float = 30) -> tuple[int, str]:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{ROUTER}/v1/chat/completions", body, headers),
                                    timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:
        return 0, repr(exc)


ROUTER_UNITS = ("vllm-router-front.service", "vllm-router-prober.service", "vllm-router.service")


@pytest.fixture(scope="module")
def routed(test_hosts, inventory):
    started = time.time()
    yield deploy(inventory), started
    # leave the hosts as the other tests expect them: no router, front or prober on fleet-a
    units = " ".join(ROUTER_UNITS)
    host_exec("fleet-a", f"systemctl disable --now {units}; cd /etc/systemd/system && rm -f {units}; "
                         "rm -rf /opt/vllm-fleet/router /etc/vllm-fleet/vllm-router.env /etc/vllm-fleet/vllm-router-front.conf; "
                         "systemctl daemon-reload; systemctl reset-failed")


def _get(url: str, key: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def test_the_router_fronts_every_replica_and_checks_the_clients_key(routed, inventory):
    routed, started = routed
    assert ("router: http://127.0.0.1:18000 (checks the clients' key) -> http://127.0.0.1:8101, http://127.0.0.1:8102, "
            "http://127.0.0.1:8103") in routed.output, routed.output[-4000:]
    for unit in ROUTER_UNITS:
        assert host_exec("fleet-a", ["systemctl", "is-active", unit]).stdout.strip() == "active", unit
    workers = json.loads(_get(f"http://127.0.0.1:{INTERNAL_PORT}/workers")[1])["workers"]  # vllm-router, loopback
    assert sorted(w["url"] for w in workers) == [f"http://127.0.0.1:{p}" for p in (8101, 8102, 8103)]
    answers = [chat() for _ in range(12)]
    assert all(code == 200 for code, _ in answers), answers
    # refused at the front: no key, a wrong one, the replicas' own key (clients hold the router's)
    refused = {k: chat(key=k) for k in (None, "sk-wrong-key-123", KEY)}
    assert {k: c for k, (c, _) in refused.items()} == {None: 401, "sk-wrong-key-123": 401, KEY: 401}, refused
    assert json.loads(refused[None][1]) == {"error": "Unauthorized"}
    # vllm-router's admin endpoints are not on the client port, with or without the key
    assert _get(f"{ROUTER}/workers", ROUTER_KEY)[0] == 404
    req = urllib.request.Request(f"{ROUTER}/remove_worker?url=http://127.0.0.1:8101", method="POST",
                                 headers={"Authorization": f"Bearer {ROUTER_KEY}"})
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=10)
    assert exc.value.code == 404
    assert _get(f"{ROUTER}/health")[0] == 200 and _get(f"{ROUTER}/v1/models", ROUTER_KEY)[0] == 200
    shown = host_exec("fleet-a", ["systemctl", "show", "-p", "DynamicUser,ActiveState", "vllm-router.service"]).stdout
    assert "DynamicUser=yes" in shown, shown
    # the front: nginx's master as root with CAP_CHOWN, CAP_SETGID and CAP_SETUID only; its worker as www-data
    main = host_exec("fleet-a", ["systemctl", "show", "-p", "MainPID", "--value", "vllm-router-front.service"]).stdout.strip()
    procs = host_exec("fleet-a", f"grep -E '^(Uid|CapBnd):' /proc/{main}/status; for c in $(cat /proc/{main}/task/*/children); "
                                 "do grep -E '^(Uid|CapEff):' /proc/$c/status; done").stdout.split("\n")
    assert procs[0].split()[1:] == ["0", "0", "0", "0"] and procs[1].split()[1] == "00000000000000c1", procs
    assert procs[2].split()[1:] == ["33", "33", "33", "33"] and procs[3].split()[1] == "0000000000000000", procs
    # the distribution's nginx.service, which the package install started, is not left running
    assert host_exec("fleet-a", "systemctl is-enabled nginx.service; systemctl is-active nginx.service"
                     ).stdout.split() == ["disabled", "inactive"]
    conf = host_exec("fleet-a", ["stat", "-c", "%U:%G %a", "/etc/vllm-fleet/vllm-router-front.conf"]).stdout.strip()
    assert conf == "root:root 600", conf
    journal = host_exec("fleet-a", ["journalctl", "-u", "vllm-router.service", "-u", "vllm-router-front.service",
                                    "--since", f"@{int(started) - 1}", "--no-pager", "-o", "cat"]).stdout
    assert "vllm_router_rs" in journal, journal[-2000:]  # this module's lines: the router's own log
    assert KEY not in journal and ROUTER_KEY not in journal and "\x1b[" not in journal, journal[-2000:]
    assert KEY not in routed.output and ROUTER_KEY not in routed.output
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as resp:
        assert "vllm_router_" in resp.read().decode()
    again = deploy(inventory)
    assert changed_ops(again) == {h: 0 for h in HOSTS}, again.output[-4000:]
    # vllm-fleet status: the router's replicas, in rotation and healthy (issue 16 item 4)
    status = subprocess.run([str(PYINFRA.parent / "vllm-fleet"), "status", str(inventory), "--json", "--limit", "fleet-a"],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "VLLM_FLEET_API_KEY": KEY, "VLLM_FLEET_ROUTER_API_KEY": ROUTER_KEY})
    row = json.loads(status.stdout.splitlines()[0])
    assert [(u["url"], u["in_rotation"], u["healthy"]) for u in row["router"]["upstreams"]] == [
        (f"http://127.0.0.1:{p}", True, True) for p in (8101, 8102, 8103)], status.stdout


@contextmanager
def under_load(clients: int = 2) -> Iterator[tuple[dict, list]]:
    """``clients`` threads sending requests through the router without pause while the block runs; yields
    ({"n": requests sent so far}, [(time, status, text) of each failed one])."""
    done, failures, stop = {"n": 0}, [], threading.Event()

    def stream() -> None:
        while not stop.is_set():
            code, text = chat()
            done["n"] += 1
            if code != 200:
                failures.append((time.monotonic(), code, text[:200]))

    workers = [threading.Thread(target=stream, daemon=True) for _ in range(clients)]
    for w in workers:
        w.start()
    try:
        yield done, failures
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=60)


def _roll_under_load(inventory: Path, env: dict) -> tuple[Result, int, list]:
    """A rolling restart of every replica (a new E2E_ROLL in each unit) while two clients send requests through
    the router without pause; (the deploy's result, requests sent during it, the failed ones)."""
    with under_load() as (done, failures):
        time.sleep(1)
        before = done["n"]
        rolled = deploy(inventory, env={"VLLM_FLEET_E2E_ROLL": secrets.token_hex(4), **env})
        sent = done["n"] - before
        time.sleep(2)
    return rolled, sent, failures


def test_a_rolling_restart_of_every_replica_fails_no_request(routed, inventory):
    rolled, sent, failures = _roll_under_load(inventory, {})
    # the control, after: the same roll by a deploy that knows no router (no `routers` group), so nothing drains
    # (after, because the failures it causes open the router's circuit breakers for a while)
    undrained, sent_undrained, failed_undrained = _roll_under_load(inventory, {"VLLM_FLEET_E2E_NO_ROUTERS": "1"})
    assert "router: drained" not in undrained.output
    out = rolled.output
    for h in HOSTS:
        assert re.search(rf"\[{re.escape(h)}\] +router: drained at @docker/fleet-a", out), (h, out[-6000:])
        assert re.search(rf"\[{re.escape(h)}\] +router: back in rotation at @docker/fleet-a", out), (h, out[-6000:])
    assert out.count("router: drained at @docker/fleet-a") == 3 and out.count("router: back in rotation") == 3, out[-6000:]
    drained = re.findall(r"router: drained at \S+ \(out of rotation; (\S+) s until idle\)", out)
    print(f"\nrolling restart of 3 replicas, 2 clients without pause through the router, {REQUEST_S} s per request: "
          f"without a drain {len(failed_undrained)} of {sent_undrained} failed {sorted({c for _, c, _ in failed_undrained})}; "
          f"drained {len(failures)} of {sent} failed; waits until idle after each drain: {drained} s")
    assert sent_undrained > 20 and sent > 20, (sent_undrained, sent)
    assert failed_undrained, "the control roll (no drain) failed no request: this test could not tell a drain from none"
    assert failures == [], (len(failures), failures[:5])


def test_a_rolling_restart_in_batches_of_two_fails_no_request(routed, inventory):
    """vllm_rolling_batch = 2: two replicas are drained and restarted together (pyinfra's _parallel batch; pyinfra
    picks the order), then the third; the stream through the router fails no request."""
    _settle()
    rolled, sent, failures = _roll_under_load(inventory, {"VLLM_FLEET_E2E_BATCH": "2"})
    events = re.findall(r"\[(\S+)\] +router: (drained|back in rotation) at ", rolled.output)
    print("\nrolling restart in batches of 2: " + "; ".join(f"{h} {what}" for h, what in events))
    assert sorted(events) == sorted([(h, w) for h in HOSTS for w in ("drained", "back in rotation")]), events
    # the first batch: two drained before either is back; the second: drained once both are back
    kinds = [w for _, w in events]
    assert kinds[:2] == ["drained", "drained"] and kinds[2:4] == ["back in rotation"] * 2, events
    assert {h for h, _ in events[:2]} == {h for h, _ in events[2:4]} and kinds[4:] == ["drained", "back in rotation"], events
    print(f"rolling restart in batches of 2: {len(failures)} of {sent} failed")
    assert sent > 20 and failures == [], (sent, failures[:5])


FAULT = "/etc/vllm-fleet-test/engine-fault"  # the vLLM double's engine crashes at start with the named fault
CONTAINERS = {"@docker/fleet-a": "fleet-a", "@docker/fleet-b": "fleet-b", "fleet-c": "fleet-c"}


def test_a_failed_gate_behind_the_router_rolls_back_puts_the_replica_back_and_stops_the_roll(routed, inventory):
    """Every replica runs --enforce-eager; the next version drops it and every engine crashes at start (the double's
    CUDA-graph illegal-memory fault, the seed log's crash): the first replica of the roll
    is drained, fails its gate, is rolled back to the previous unit and put back in rotation; the roll stops there,
    the other replicas keep running untouched, and the stream through the router fails no request."""
    eager = deploy(inventory, "--data", "vllm_enforce_eager=True")  # the version to roll back to: no CUDA graphs
    assert eager.output.count("router: back in rotation") == 3, eager.output[-6000:]
    _settle()
    pids = {h: host_exec(c, ["systemctl", "show", "-p", "MainPID", "--value", "vllm.service"]).stdout.strip()
            for h, c in CONTAINERS.items()}
    for c in CONTAINERS.values():
        assert host_exec(c, f"mkdir -p {Path(FAULT).parent} && echo illegal_memory > {FAULT}").returncode == 0
    try:
        with under_load() as (done, failures):
            time.sleep(1)
            before = done["n"]
            failed = deploy(inventory, env={"VLLM_FLEET_E2E_ROLL": secrets.token_hex(4)}, check=False)
            sent = done["n"] - before
            time.sleep(2)
    finally:
        for c in CONTAINERS.values():
            host_exec(c, f"rm -f {FAULT}")
    out = failed.output
    assert failed.returncode != 0, out[-6000:]
    events = re.findall(r"\[(\S+)\] +router: (drained|back in rotation) at ", out)
    culprit = events[0][0] if events else None
    print(f"\nfailed gate behind the router: {events}; {len(failures)} of {sent} requests failed")
    assert events == [(culprit, "drained"), (culprit, "back in rotation")], (events, out[-6000:])
    assert re.search(rf"\[{re.escape(culprit)}\].*rolled back: the previous version is running and healthy", out), out[-6000:]
    assert f"rolling deploy halted after {culprit} failed its health gate" in out, out[-6000:]
    for h, c in CONTAINERS.items():
        pid = host_exec(c, ["systemctl", "show", "-p", "MainPID", "--value", "vllm.service"]).stdout.strip()
        assert (pid != pids[h]) == (h == culprit), (h, pid, pids[h])  # only the culprit was restarted (and rolled back)
    assert sent > 20 and failures == [], (sent, failures[:5])
    # every replica is left serving (the culprit on its previous unit, the others untouched) for the tests after this
    # one; the rerun after a fix, which gates the rolled-back and the halted hosts, is test_service's


def _settle() -> None:
    """Wait until 20 requests in a row pass: the earlier tests' restarts left no open circuit at the router."""
    deadline, streak = time.monotonic() + 120, 0
    while streak < 20:
        assert time.monotonic() < deadline, "the router did not settle: " + chat()[1][:200]
        streak = streak + 1 if chat()[0] == 200 else 0


def test_what_a_client_sees_when_the_router_itself_restarts(routed, inventory):
    """A change of the router (its venv, config or unit: an upgrade) restarts vllm-router. Measured under load: the
    requests it holds and those that arrive before it listens again get 502 from the front, within the restart;
    docs/router.md gives the figures. The front and the replicas are not restarted."""
    _settle()
    with under_load() as (done, failures):
        time.sleep(2)
        t0 = time.monotonic()
        host_exec("fleet-a", ["systemctl", "restart", "vllm-router.service"])
        while chat()[0] != 200:
            assert time.monotonic() - t0 < 60, "the router did not come back"
            time.sleep(0.05)
        back = time.monotonic() - t0
        time.sleep(3)
    codes = sorted({c for _, c, _ in failures})
    window = [round(f[0] - t0, 2) for f in failures]
    print(f"\nvllm-router restarted under load (2 clients): answering again after {back:.2f} s; {len(failures)} of "
          f"{done['n']} requests failed {codes}, from {min(window, default=0)} to {max(window, default=0)} s after the restart")
    assert set(codes) <= {502}, failures[:5]  # the front answers for the router: no hang, no reset connection
    assert all(w <= back + 0.5 for w in window), (window, back)  # nothing fails once it answers again
    assert done["n"] > 20


def test_a_replica_killed_under_load_costs_at_most_its_requests_in_flight(routed, inventory):
    """SIGKILL of every process of fleet-b's vLLM while two clients send through the router: the requests in flight
    on it and the few the router sends it before its circuit opens fail, all within a second; then traffic goes to
    the others, and systemd brings it back."""
    _settle()
    with under_load() as (done, failures):
        time.sleep(3)
        killed = time.monotonic()
        host_exec("fleet-b", ["systemctl", "kill", "-s", "SIGKILL", "vllm.service"])
        time.sleep(12)
    late = [f for f in failures if f[0] - killed > 1.0]
    print(f"\nfleet-b SIGKILLed under load: {len(failures)} of {done['n']} requests failed {[c for _, c, _ in failures]}, "
          f"at {[round(f[0] - killed, 2) for f in failures]} s after the kill")
    # the two in flight on it, and what the router sent it before its circuit opened: all in the first second
    assert len(failures) <= 5 and late == [], failures
    assert done["n"] > 30
    deadline = time.monotonic() + 60
    while host_exec("fleet-b", ["systemctl", "is-active", "vllm.service"]).stdout.strip() != "active":
        assert time.monotonic() < deadline, "systemd did not restart fleet-b's vLLM"
        time.sleep(1)


def _in_rotation() -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{INTERNAL_PORT}/workers", timeout=10) as resp:
        return {w["url"] for w in json.load(resp)["workers"]}


def _engine_pid(container: str) -> int:
    out = host_exec(container, "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null | "
                               "grep -q '^/opt/vllm-fleet/venvs/.*vllm.test_double.engine' && echo ${p#/proc/}; done").stdout
    pids = out.split()
    assert len(pids) == 1, out
    return int(pids[0])


def test_a_hung_replica_is_taken_out_of_rotation_and_put_back(routed, inventory):
    """fleet-b's engine SIGSTOPped under load (its /health stays 200): the router host's prober takes it out within
    its 2 misses; only the requests stuck on it fail; after SIGCONT its next answered probe puts it back."""
    b = "http://127.0.0.1:8102"
    deadline = time.monotonic() + 60
    while b not in _in_rotation():
        assert time.monotonic() < deadline, _in_rotation()
        time.sleep(1)
    engine = _engine_pid("fleet-b")
    with under_load() as (done, failures):
        time.sleep(2)
        host_exec("fleet-b", ["kill", "-STOP", str(engine)])
        hung = time.monotonic()
        try:
            while b in _in_rotation():
                assert time.monotonic() - hung < 4 * PROBE_S + 10, "the hung replica stayed in rotation"
                time.sleep(0.2)
            out_after = time.monotonic() - hung
            time.sleep(5)
            sent_while_out = done["n"]
        finally:
            host_exec("fleet-b", ["kill", "-CONT", str(engine)])
        resumed = time.monotonic()
        while b not in _in_rotation():
            assert time.monotonic() - resumed < 3 * PROBE_S + 10, "the replica did not come back"
            time.sleep(0.2)
        back_after = time.monotonic() - resumed
        time.sleep(2)
    journal = host_exec("fleet-a", ["journalctl", "-u", "vllm-router-prober.service", "--no-pager", "-o", "cat", "-n", "50"]).stdout
    print(f"\nfleet-b hung (SIGSTOP) under load: out of rotation after {out_after:.1f} s, back {back_after:.1f} s after "
          f"SIGCONT; {len(failures)} of {done['n']} requests failed {[c for _, c, _ in failures]}")
    assert "out of rotation" in journal and "back in rotation" in journal, journal
    assert KEY not in journal
    assert len(failures) <= 2, failures  # the clients' requests stuck on it when it hung (2 clients)
    assert sent_while_out > 10 and done["n"] > sent_while_out
