"""Weights from a ModelScope source on a real systemd container host (fleet-b), with the real `modelscope` client.

The ModelScope stand-in (tests/msmirror) runs in this process on 127.0.0.1 and serves the
same tiny repo as the HF mirror, plus the fetch venv's wheels with modelscope in them
(the venv gets modelscope only because a source is of kind "modelscope"). Own data dir,
base dir (so the fetch venv is not the one the HF tests use), unit name and port: other
e2e runs on the same containers do not collide.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.harness import changed_ops, host_exec, run_pyinfra
from tests.hfmirror import repo, wheels
from tests.hfmirror.server import Mirror
from tests.msmirror.server import MsMirror

HOST = "@docker/fleet-b"
DATA = "/srv/ms-test"
BASE = "/opt/vllm-fleet-mstest"
UNIT = "vllm-mstest-fetch"
DEST = f"{DATA}/models/{repo.REPO_ID}/main"  # one directory per revision (none pinned: main)
STATE = f"{DATA}/weights-state/{repo.REPO_ID.replace('/', '--')}/main"


def _clean() -> None:
    host_exec(HOST, f"systemctl stop {UNIT} 2>/dev/null; systemctl reset-failed {UNIT} 2>/dev/null; "
                    f"rm -rf {DATA} {BASE} /etc/systemd/system/{UNIT}.service /etc/vllm-fleet/{UNIT}.env; systemctl daemon-reload")


@pytest.fixture(scope="module")
def ms(test_hosts):
    m = MsMirror(repo.build(), wheels=wheels.build(modelscope=True)).start()
    _clean()
    yield m
    m.stop()
    _clean()


def deploy(ms: MsMirror, sources: list[dict]):
    return run_pyinfra(
        ["--limit", HOST, "tests/e2e/deploy_weights.py",
         "--data", "vllm_port=18970", "--data", f"vllm_data_dir={DATA}", "--data", f"vllm_base_dir={BASE}",
         "--data", "vllm_service_name=vllm-mstest", "--data", f"vllm_weights_sources={json.dumps(sources)}",
         "--data", f'vllm_find_links=["{ms.url}/wheels/"]', "--data", "vllm_no_index=true",
         "--data", "vllm_weights_workers=2", "--data", "vllm_weights_retries=2", "--data", "vllm_weights_backoff_s=0.5",
         "--data", "vllm_disk_headroom_gib=0"], timeout=300)


def test_modelscope_download_verified_then_rerun_fetches_nothing_and_hf_down_falls_back(ms):
    src = {"kind": "modelscope", "repo": repo.REPO_ID, "endpoint": ms.url}
    ms.reset_counters()
    r = deploy(ms, [src])
    assert "weights: complete" in r.output, r.output[-3000:]
    assert sum(ms.bytes_served.values()) == ms.total_bytes
    state = json.loads(host_exec(HOST, f"cat {STATE}/state.json").stdout)
    want = {f.name: f for f in repo.manifest(repo.build())}
    assert state["complete"] and set(state["files"]) == set(want) and ms.url in state["source"]
    sums = dict(reversed(ln.split()) for ln in host_exec(HOST, f"cd {DEST} && sha256sum *").stdout.splitlines())
    assert {n: sums.get(n) for n in want} == {n: f.sha256 or __import__("hashlib").sha256((repo.build() / n).read_bytes()).hexdigest()
                                              for n, f in want.items()}
    assert host_exec(HOST, f"ls -d {BASE}/fetch/venv/lib/python3*/site-packages/modelscope-1.40.2.dist-info").returncode == 0

    ms.reset_counters()
    r = deploy(ms, [src])
    changed_changes = changed_ops(r)  # checked against the results table
    lines = r.output.splitlines()
    # Only the weights step: the service user is shared with the other e2e runs on this host, which may touch it.
    weights_changed = [lines[i - 1] for i, ln in enumerate(lines) if ln.strip() == "[@docker/fleet-b] Success"
                       and "Weights |" in lines[i - 1]]
    assert changed_changes and weights_changed == [], weights_changed
    assert sum(ms.bytes_served.values()) == 0

    host_exec(HOST, f"rm -rf {DEST} {STATE}")
    down = Mirror(repo.build()).start()
    down.set_mode("down")
    ms.reset_counters()
    r = deploy(ms, [{"kind": "hf", "repo": repo.REPO_ID, "endpoint": down.url}, src])
    assert f"from modelscope:{repo.REPO_ID} at {ms.url}" in r.output
    assert sum(ms.bytes_served.values()) == ms.total_bytes
    assert json.loads(host_exec(HOST, f"cat {STATE}/state.json").stdout)["complete"]
