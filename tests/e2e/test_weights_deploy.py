"""The full deploy.py with an HF source, on one host (fleet-c, real SSH + sudo), with the vLLM test double.

Weights come from the local HF-compatible mirror (tests/hfmirror, on 127.0.0.1,
shared with the hosts through --network host) through the fetch unit; the
service (vllm_fleet/service/step.py) must start on exactly the snapshot directory and
pass its health gate. Isolated from the other e2e tests on the same host by its
own data dir, service name and port. The data dir is a tmpfs sized so that it
holds the weights once but not twice: the rerun proves that the planning-time
disk check subtracts weights already verified on the host.

Tests run in file order and share the host's state.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request

import pytest

from tests.e2e.harness import changed_ops, host_exec, run_pyinfra
from tests.hfmirror import repo, wheels
from tests.hfmirror.server import Mirror

pytestmark = pytest.mark.e2e

HOST = "fleet-c"
DATA = "/srv/wfull"
SERVICE = "vllm-wfull"
PORT = 18970
DEST = f"{DATA}/models/{repo.REPO_ID}/main"  # one directory per revision (none pinned: main)
STATE = f"{DATA}/weights-state/{repo.REPO_ID.replace('/', '--')}/main"
MARKER = f"/opt/vllm-fleet/state/{SERVICE}.weights-pending"
KEY = "sk-wfull-" + secrets.token_hex(8)
SERVED = "tiny-minimax-m2"
PROPS = "MainPID,NRestarts,ActiveEnterTimestampMonotonic,ActiveState"
MIB = 1024 * 1024
FAULT = "/etc/vllm-fleet-test/engine-fault"
TIMES: dict[str, float] = {}


def _planned_weights_bytes() -> int:
    """What the planner says the CI model's weights take (what preflight asks free disk for)."""
    from vllm_fleet.planner.hardware import Hardware
    from vllm_fleet.planner.plan import make_plan
    from vllm_fleet.settings import load_settings

    s = load_settings({"vllm_model": "tests/fixtures/tiny-minimax-m2", "vllm_gpu_memory_utilization": 0.5})
    hw = Hardware.from_facts([{"name": "NVIDIA A800-SXM4-80GB", "memory_total_mib": 81920, "compute_cap": "8.0"}] * 2)
    return make_plan(s.model, hw, s.plan_options(DEST)).weights_bytes


def _clean() -> None:
    host_exec(HOST, f"systemctl stop {SERVICE}.service {SERVICE}-fetch.service 2>/dev/null; "
                    f"systemctl disable {SERVICE}.service 2>/dev/null; "
                    f"systemctl reset-failed {SERVICE}.service {SERVICE}-fetch.service 2>/dev/null; "
                    f"rm -f /etc/systemd/system/{SERVICE}.service /etc/systemd/system/{SERVICE}-fetch.service "
                    f"/etc/vllm-fleet/{SERVICE}.* /etc/vllm-fleet/{SERVICE}-fetch.env /etc/vllm-fleet/{SERVICE}.service.prev "
                    f"/opt/vllm-fleet/state/{SERVICE}.* {MARKER}; systemctl daemon-reload; "
                    f"umount {DATA} 2>/dev/null; rm -rf {DATA}; "
                    # service_user.py makes the shared `vllm` account's home our data dir: give it back
                    f"usermod -d /var/lib/vllm-fleet vllm 2>/dev/null; true")


@pytest.fixture(scope="module")
def mirror(test_hosts):
    m = Mirror(repo.build(), wheels=wheels.build()).start()
    _clean()
    size_kib = (m.total_bytes + 3 * MIB) // 1024
    mount = host_exec(HOST, f"mkdir -p {DATA} && mount -t tmpfs -o size={size_kib}k tmpfs {DATA}")
    assert mount.returncode == 0, mount.stderr
    yield m
    m.stop()
    _clean()
    print(f"\n[weights-deploy] timings: {json.dumps({k: round(v, 1) for k, v in TIMES.items()})}")


def deploy(m: Mirror, label: str, *extra: str, check: bool = True, env: dict[str, str] | None = None, yes: bool = True):
    srcs = [{"kind": "hf", "repo": repo.REPO_ID, "endpoint": m.url}]
    args = ["--limit", HOST, "deploy.py",
            "--data", f"vllm_port={PORT}", "--data", f"vllm_data_dir={DATA}", "--data", f"vllm_service_name={SERVICE}",
            "--data", f"vllm_weights_sources={json.dumps(srcs)}",
            "--data", f'vllm_find_links=["{m.url}/wheels/"]', "--data", "vllm_no_index=true",
            "--data", "vllm_weights_workers=2", "--data", "vllm_weights_retries=2", "--data", "vllm_weights_backoff_s=0.5",
            "--data", "vllm_disk_headroom_gib=0", *extra]
    wait_no_fault()
    t0 = time.monotonic()
    r = run_pyinfra(args, env=env or {"VLLM_FLEET_API_KEY": KEY}, check=check, timeout=400, yes=yes)
    TIMES[label] = time.monotonic() - t0
    return r


def changed_names(r) -> list[str]:
    """The operations that reported Success (a change) on the host, for assertion messages."""
    out, last = [], ""
    for line in r.output.splitlines():
        if "Starting operation" in line:
            last = line.split("Starting operation:", 1)[-1].strip()
        elif f"[{HOST}]" in line and line.strip().endswith("Success"):
            out.append(last)
    return out


def wait_no_fault(timeout: float = 300) -> None:
    """Other e2e tests (test_service.py) inject engine faults host-wide through FAULT; do not deploy into one."""
    deadline = time.monotonic() + timeout
    while host_exec(HOST, f"test -s {FAULT}").returncode == 0:
        assert time.monotonic() < deadline, f"{FAULT} on {HOST} stayed set by another test for {timeout} s"
        time.sleep(2)


def props() -> dict[str, str]:
    out = host_exec(HOST, ["systemctl", "show", f"{SERVICE}.service", "-p", PROPS]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def shard_bytes(m: Mirror) -> int:
    return sum(v for k, v in m.bytes_served.items() if k.endswith(".safetensors"))


def free_bytes() -> int:
    return int(host_exec(HOST, f"df -B1 --output=avail {DATA} | tail -1").stdout.strip())


def models(key: str = KEY) -> list[str]:
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}/v1/models", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return [item["id"] for item in json.load(r)["data"]]


def serving_argv() -> list[str]:
    pid = props()["MainPID"]
    return host_exec(HOST, f"tr '\\0' '\\n' < /proc/{pid}/cmdline").stdout.splitlines()


def wait_download_done(timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        out = host_exec(HOST, f"cat {STATE}/status.json 2>/dev/null; echo; systemctl is-active {SERVICE}-fetch.service").stdout
        lines = [ln for ln in out.splitlines() if ln.strip()]
        status = json.loads("".join(lines[:-1]) or "{}") if len(lines) > 1 else {}
        if status.get("phase") == "done" and lines[-1] != "active":
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.5)


def test_full_deploy_fetches_and_serves_exactly_the_snapshot_dir(mirror):
    mirror.reset_counters()
    r = deploy(mirror, "first deploy")
    assert "weights: complete" in r.output, r.output[-4000:]
    shards = sum(f.size for f in repo.manifest(repo.build()) if f.name.endswith(".safetensors"))
    assert shard_bytes(mirror) == shards  # every shard fetched once, through the download unit
    plan_lines = [ln for ln in r.output.splitlines() if "plan: vllm serve " in ln]
    assert plan_lines and all(f"vllm serve {DEST} " in ln and "models--" not in ln for ln in plan_lines), plan_lines
    assert f"--served-model-name {SERVED}" in plan_lines[0]
    assert "gate verdict: PASSED" in r.output, r.output[-4000:]
    assert host_exec(HOST, f"test -f {DEST}/config.json && test ! -e {DEST}/.cache").returncode == 0
    p = props()
    assert p["ActiveState"] == "active"
    argv = serving_argv()
    assert argv[argv.index("serve") + 1] == DEST, argv  # the process serves that exact path
    assert models() == [SERVED]
    assert "ExecStart=" in (unit := host_exec(HOST, f"cat /etc/systemd/system/{SERVICE}.service").stdout)
    assert f" serve {DEST} " in unit


def test_rerun_changes_and_restarts_nothing_on_a_disk_that_cannot_hold_the_weights_twice(mirror):
    planned = _planned_weights_bytes()
    free = free_bytes()
    # Precondition that makes this test able to fail: demanding the planned weights again would not fit.
    assert free < planned, (free, planned)
    before = props()
    mirror.reset_counters()
    r = deploy(mirror, "no-op rerun")
    assert changed_ops(r) == {HOST: 0}, changed_names(r)
    assert "are complete and verified on the host; the disk check asks 0.00 GiB" in r.output, r.output[-3000:]
    assert "gate verdict" not in r.output
    assert sum(mirror.bytes_served.values()) == 0
    assert props() == before
    assert models() == [SERVED]


def test_no_wait_never_restarts_on_incomplete_weights_then_restarts_once_complete(mirror):
    """A unit change together with a fresh download and vllm_weights_wait=False: held back, then done on the next run."""
    before = props()
    host_exec(HOST, f"rm -rf {DEST} {STATE}/state.json {STATE}/status.json")
    mirror.reset_counters()
    mirror.rate = 1 * MIB  # per response: ~12 s for the shards with 2 workers
    try:
        r = deploy(mirror, "no-wait deploy during download", "--data", "vllm_weights_wait=false", "--data", "vllm_restart_sec=3")
        assert f"service: {SERVICE}.service is not (re)started: the weights in {DEST} are still downloading" in r.output, \
            r.output[-4000:]
        assert "gate verdict" not in r.output
        assert "RestartSec=3" in host_exec(HOST, f"cat /etc/systemd/system/{SERVICE}.service").stdout  # unit changed
        assert props()["MainPID"] == before["MainPID"] and props()["NRestarts"] == before["NRestarts"]
        assert host_exec(HOST, f"test -e {MARKER}").returncode == 0
        status = wait_download_done()
        assert status["done"] == status["total"]
    finally:
        mirror.rate = 0
    mirror.reset_counters()
    r = deploy(mirror, "no-wait deploy after download", "--data", "vllm_weights_wait=false", "--data", "vllm_restart_sec=3")
    assert "is not (re)started" not in r.output
    assert "gate verdict: PASSED" in r.output, r.output[-4000:]
    assert sum(mirror.bytes_served.values()) == 0
    assert props()["MainPID"] != before["MainPID"]
    assert host_exec(HOST, f"test -e {MARKER}").returncode != 0
    assert models() == [SERVED]
    argv = serving_argv()
    assert argv[argv.index("serve") + 1] == DEST


def test_no_wait_redownload_without_a_unit_change_restarts_on_the_next_run(mirror):
    """The weights change under a running service (unit unchanged): not restarted on partial files, restarted after."""
    before = props()
    host_exec(HOST, f"rm -rf {DEST} {STATE}/state.json {STATE}/status.json")
    mirror.rate = 1 * MIB
    try:
        r = deploy(mirror, "no-wait redownload", "--data", "vllm_weights_wait=false", "--data", "vllm_restart_sec=3")
        assert "is not (re)started" in r.output and "gate verdict" not in r.output
        assert props()["MainPID"] == before["MainPID"]
        wait_download_done()
        check = json.loads(host_exec(HOST, f"python3 /opt/vllm-fleet/fetch/fetch_weights.py check {STATE}/fetch.json").stdout)
        assert check["complete"], (check, host_exec(HOST, f"df -B1 {DATA}; du -ab {DATA} | sort -n | tail -15").stdout)
    finally:
        mirror.rate = 0
    r = deploy(mirror, "rerun after redownload", "--data", "vllm_restart_sec=3")
    assert "gate verdict: PASSED" in r.output, r.output[-4000:]
    assert props()["MainPID"] != before["MainPID"]
    again = deploy(mirror, "final no-op rerun", "--data", "vllm_restart_sec=3")
    assert changed_ops(again) == {HOST: 0}, changed_names(again)
    assert models() == [SERVED]


def test_the_hf_token_and_the_key_never_leak_and_stay_root_only(mirror):
    """Issue 14, item 5: with an HF token set, -vvv and --dry --diff (token change) print neither secret; both env
    files are root:root 0600 with no staged leftover; the token is in no argv, journal, unit or config."""
    token, other = "hf_wfull_" + secrets.token_hex(10), "hf_wfull_" + secrets.token_hex(10)
    env = {"VLLM_FLEET_API_KEY": KEY, "VLLM_FLEET_HF_TOKEN": token}
    outputs = {
        "-vvv": deploy(mirror, "secrets -vvv", "-vvv", env=env).output,
        "--dry --diff -vvv (token change)": deploy(mirror, "secrets dry diff", "--dry", "--diff", "-vvv",
                                                   env={**env, "VLLM_FLEET_HF_TOKEN": other}, yes=False).output,
    }
    assert "EnvironmentFile" in outputs["--dry --diff -vvv (token change)"]
    for name, text in outputs.items():
        for secret in (KEY, token, other):
            assert secret not in text, f"a secret is in the pyinfra output of {name}"
    for path, holds in ((f"/etc/vllm-fleet/{SERVICE}.env", KEY), (f"/etc/vllm-fleet/{SERVICE}-fetch.env", token)):
        assert host_exec(HOST, ["stat", "-c", "%U:%G %a", path]).stdout.strip() == "root:root 600", path
        assert holds in host_exec(HOST, ["cat", path]).stdout  # the scan below can see it where it is
    staged = host_exec(HOST, ["sh", "-c", "ls -a /etc/vllm-fleet /etc/systemd/system | grep -c vllm-fleet-new; true"])
    assert staged.stdout.strip() == "0"
    places = {
        "ps argv": ["ps", "-eo", "args"],
        "journal": ["journalctl", "--no-pager", "-o", "cat"],
        "units": ["sh", "-c", f"cat /etc/systemd/system/{SERVICE}.service /etc/systemd/system/{SERVICE}-fetch.service"],
        "configs and state": ["sh", "-c", f"cat /etc/vllm-fleet/{SERVICE}.gate.json {STATE}/*.json /opt/vllm-fleet/state/{SERVICE}.*"],
        "gate log mode": ["stat", "-c", "%a", f"/opt/vllm-fleet/state/{SERVICE}.gate.log"],
    }
    for name, cmd in places.items():
        out = host_exec(HOST, cmd).stdout
        assert token not in out and KEY not in out, f"a secret is in {name} on {HOST}"
    assert host_exec(HOST, places["gate log mode"]).stdout.strip() == "600"


def test_the_service_never_starts_on_a_revision_that_is_not_verified(mirror):
    """Issue 15 item 7: the unit asserts the fetch program's marker (a reboot mid-download starts nothing)."""
    unit = host_exec(HOST, f"cat /etc/systemd/system/{SERVICE}.service").stdout
    assert f"AssertPathExists={STATE}/verified.json" in unit
    host_exec(HOST, f"mv {STATE}/verified.json {STATE}/verified.json.away")
    try:
        r = host_exec(HOST, f"systemctl restart {SERVICE}.service")
        assert r.returncode != 0  # the assertion fails the start: vLLM is not run on these files
        assert host_exec(HOST, f"systemctl is-active {SERVICE}.service").stdout.strip() != "active"
    finally:
        host_exec(HOST, f"mv {STATE}/verified.json.away {STATE}/verified.json; systemctl restart {SERVICE}.service")


def test_uninstall_removes_both_env_files(mirror):
    """Issue 14, item 5: uninstall removes the service's and the download unit's secrets. Last in this module:
    it removes what the tests above read."""
    r = run_pyinfra(["--limit", HOST, "uninstall.py", "--data", f"vllm_service_name={SERVICE}", "--data",
                     f"vllm_data_dir={DATA}"], timeout=400)
    assert r.returncode == 0
    left = host_exec(HOST, ["sh", "-c", f"ls -a /etc/vllm-fleet | grep -- '{SERVICE}' ; true"]).stdout.split()
    assert not [f for f in left if f.endswith(("env", "env.prev", "vllm-fleet-new", ".tmp"))], left
