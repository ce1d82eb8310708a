"""Weights from an HF-compatible mirror on a real systemd container host (fleet-b), with faults.

The mirror (tests/hfmirror) runs in this process on 127.0.0.1; the hosts share
the loopback (--network host), so the host's huggingface_hub reaches it. The
host's fetch venv installs huggingface_hub from the mirror's /wheels/ (no index).
Everything uses its own data dir, unit name and port, so other e2e tests on
the same containers do not collide.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.harness import changed_ops, host_exec, run_pyinfra
from tests.hfmirror import repo, wheels
from tests.hfmirror.server import Mirror

HOST = "@docker/fleet-b"
DATA = "/srv/weights-test"
UNIT = "vllm-wtest-fetch"
DEST = f"{DATA}/models/{repo.REPO_ID}/main"  # one directory per revision (none pinned: main)
STATE = f"{DATA}/weights-state/{repo.REPO_ID.replace('/', '--')}/main"


@pytest.fixture(scope="module")
def mirrors(test_hosts):
    """Two mirrors of the same repo: the primary and the fallback."""
    d, w = repo.build(), wheels.build()
    primary, fallback = Mirror(d, wheels=w).start(), Mirror(d, wheels=w).start()
    host_exec(HOST, f"systemctl stop {UNIT} 2>/dev/null; rm -rf {DATA}")
    yield primary, fallback
    primary.stop()
    fallback.stop()
    # The kill test leaves the fetch unit failed: clear it so the host is not left degraded.
    host_exec(HOST, f"systemctl stop {UNIT} 2>/dev/null; systemctl reset-failed {UNIT} 2>/dev/null; rm -rf {DATA}")


def deploy(mirror: Mirror, *extra: str, sources: list[dict] | None = None, data: str = DATA, check: bool = True,
           host: str = HOST):
    srcs = sources or [{"kind": "hf", "repo": repo.REPO_ID, "endpoint": mirror.url}]
    args = ["--limit", host, "tests/e2e/deploy_weights.py",
            "--data", "vllm_port=18960", "--data", f"vllm_data_dir={data}", "--data", "vllm_service_name=vllm-wtest",
            "--data", f"vllm_weights_sources={json.dumps(srcs)}",
            "--data", f'vllm_find_links=["{mirror.url}/wheels/"]', "--data", "vllm_no_index=true",
            "--data", "vllm_weights_workers=2", "--data", "vllm_weights_retries=2", "--data", "vllm_weights_backoff_s=0.5",
            "--data", "vllm_disk_headroom_gib=0", *extra]
    return run_pyinfra(args, check=check, timeout=300)


def status() -> dict:
    out = host_exec(HOST, f"cat {STATE}/status.json").stdout
    return json.loads(out) if out.strip() else {}


def shard_bytes(m: Mirror) -> int:
    return sum(v for k, v in m.bytes_served.items() if k.endswith(".safetensors"))


def test_not_enough_disk_is_a_clear_error_before_any_download(mirrors):
    """On fleet-c (SSH): docker cp, which the docker connector uploads with, cannot write into a tmpfs mounted in a container."""
    primary, _ = mirrors
    small = "/srv/weights-small"
    mount = host_exec("fleet-c", f"mkdir -p {small} && (mountpoint -q {small} || mount -t tmpfs -o size=8m tmpfs {small})")
    assert mount.returncode == 0, mount.stderr
    try:
        primary.reset_counters()
        r = deploy(primary, "--data", "vllm_port=18961", data=small, check=False, host="fleet-c")
        assert r.returncode != 0
        assert "not enough disk for the weights" in r.output and "nothing was downloaded" in r.output
        assert shard_bytes(primary) == 0, primary.bytes_served
    finally:
        # The failed download unit must not stay behind (the session checks every host for failed units).
        host_exec("fleet-c", f"systemctl stop {UNIT}; systemctl reset-failed {UNIT} 2>/dev/null; umount {small}; rm -rf {small}")


def test_kill_the_unit_while_every_shard_is_partial_and_rerun_resumes_each_from_its_last_byte(mirrors, capsys):
    primary, _ = mirrors
    primary.reset_counters()
    primary.rate = 1024 * 1024  # bytes/s per response; 4 workers: every shard in flight at once
    t0 = time.monotonic()
    r = deploy(primary, "--data", "vllm_weights_wait=false", "--data", "vllm_weights_workers=4")
    assert time.monotonic() - t0 < 60 and r.returncode == 0
    shards = {f.name: f.size for f in repo.manifest(repo.build()) if f.name.endswith(".safetensors")}
    deadline = time.monotonic() + 60
    while True:
        parts = host_exec(HOST, f"cd {DEST}/.partial 2>/dev/null && stat -c '%n %s' *.safetensors").stdout.split()
        sizes = dict(zip(parts[::2], map(int, parts[1::2])))
        if len(sizes) == len(shards) and all(512 * 1024 <= v for v in sizes.values()):
            break
        assert time.monotonic() < deadline, sizes
        time.sleep(0.2)
    host_exec(HOST, f"systemctl kill -s KILL {UNIT}")
    time.sleep(1)
    first = dict(primary.bytes_served)
    assert all(0 < first[n] < shards[n] for n in shards), first
    primary.rate = 0
    primary.reset_counters()
    r = deploy(primary)
    twice = {n: first.get(n, 0) + primary.bytes_served.get(n, 0) - size for n, size in shards.items()}
    with capsys.disabled():
        print(f"\n[weights] killed with every shard partial {first}; bytes served twice per shard: {twice}")
    assert "weights: complete" in r.output
    assert all(0 <= v <= 1024 * 1024 for v in twice.values()), twice
    check = host_exec(HOST, f"python3 /opt/vllm-fleet/fetch/fetch_weights.py check {STATE}/fetch.json")
    assert json.loads(check.stdout)["complete"] is True
    assert host_exec(HOST, f"test -f {DEST}/config.json && test ! -e {DEST}/.partial && test -f {STATE}/verified.json").returncode == 0


def test_the_wait_restarts_a_unit_killed_under_it_and_finishes(mirrors):
    """Issue 15 item 6: the deploy's wait notices the dead unit within seconds and restarts it (it resumes)."""
    import threading

    primary, _ = mirrors
    host_exec(HOST, f"rm -rf {DEST} {STATE}")
    primary.reset_counters()
    primary.rate = 1024 * 1024
    killer = threading.Timer(8.0, lambda: host_exec(HOST, f"systemctl kill -s KILL {UNIT}"))
    killer.start()
    try:
        r = deploy(primary)
    finally:
        killer.cancel()
        primary.rate = 0
    assert "died without finishing" in r.output and "restarting it (1 of 3)" in r.output, r.output[-3000:]
    assert "weights: complete and verified" in r.output


def test_second_run_downloads_nothing_and_changes_nothing(mirrors):
    primary, _ = mirrors
    primary.reset_counters()
    r = deploy(primary)
    assert set(changed_ops(r).values()) == {0}, [ln for ln in r.output.splitlines() if "Starting operation" in ln or "Success" in ln]
    assert sum(primary.bytes_served.values()) == 0


def test_corrupted_shard_is_detected_and_refetched(mirrors):
    primary, _ = mirrors
    shard = f"{DEST}/model-00002-of-00004.safetensors"
    host_exec(HOST, f"printf 'garbage' | dd of={shard} bs=1 seek=4096 conv=notrunc status=none")
    primary.reset_counters()
    r = deploy(primary)
    assert changed_ops(r)[HOST] > 0
    assert dict(primary.bytes_served) == {"model-00002-of-00004.safetensors": repo.SHARD_BYTES + 104}
    state = json.loads(host_exec(HOST, f"cat {STATE}/state.json").stdout)
    assert state["complete"] and state["refetched_files"] == ["model-00002-of-00004.safetensors"]
    got = host_exec(HOST, f"sha256sum {shard}").stdout.split()[0]
    want = {f.name: f.sha256 for f in repo.manifest(repo.build())}["model-00002-of-00004.safetensors"]
    assert got == want


def test_mirror_down_falls_back_to_the_next_source(mirrors):
    primary, fallback = mirrors
    host_exec(HOST, f"rm -rf {DEST} {STATE}")
    primary.set_mode("down")
    try:
        fallback.reset_counters()
        sources = [{"kind": "hf", "repo": repo.REPO_ID, "endpoint": primary.url},
                   {"kind": "hf", "repo": repo.REPO_ID, "endpoint": fallback.url}]
        r = deploy(fallback, sources=sources)
        assert f"from hf:{repo.REPO_ID} at {fallback.url}" in r.output, r.output[-3000:]
        assert sum(fallback.bytes_served.values()) == fallback.total_bytes
        state = json.loads(host_exec(HOST, f"cat {STATE}/state.json").stdout)
        assert state["complete"] and fallback.url in state["source"]
    finally:
        primary.set_mode("ok")


def test_a_revision_change_fetches_into_a_new_dir_and_keeps_the_old_one(mirrors):
    """Issue 13 item 3: weights are stored per revision; the revision the deploy moves away from stays for rollback
    while a unit (or its last known good copy) names it. Here no vLLM unit exists: the old one is reported, then removed."""
    primary, _ = mirrors
    r = deploy(primary)  # main, complete
    pinned = [{"kind": "hf", "repo": repo.REPO_ID, "endpoint": primary.url, "revision": primary.commit}]
    primary.reset_counters()
    r = deploy(primary, sources=pinned)
    new = f"{DATA}/models/{repo.REPO_ID}/{primary.commit}"
    assert host_exec(HOST, f"test -f {new}/config.json").returncode == 0
    assert sum(primary.bytes_served.values()) == 0  # same content: hard-linked from main, not fetched
    assert host_exec(HOST, f"test -e {DEST}").returncode != 0  # no unit names main here: the toolkit's leftover, removed
    assert "weights: complete and verified" in r.output
