"""Weights: the pure plan (vllm_fleet/weights/source.py) and the host program's worker against the local mirror.

The worker tests run fetch_weights.py in this process with the real
huggingface_hub against tests/hfmirror on 127.0.0.1 (a second or so each).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.hfmirror import repo
from tests.hfmirror.server import Mirror
from vllm_fleet.weights import source as weights
from vllm_fleet.settings import load_settings

from vllm_fleet.weights import hostprog as fw  # the host program (installed as fetch_weights.py), stdlib only

HF = {"kind": "hf", "repo": "MiniMaxAI/MiniMax-M2"}


def settings(**data):
    return load_settings({"vllm_model": "minimax-m2", **{f"vllm_{k}": v for k, v in data.items()}}, host="h")


def test_serve_path_is_the_snapshot_dir_never_a_cache_root():
    plan = weights.fetch_plan(settings(weights_sources=[HF], data_dir="/data/vllm"))
    assert plan.serve_path == "/data/vllm/models/MiniMaxAI/MiniMax-M2/main"  # one directory per revision
    pinned = weights.fetch_plan(settings(weights_sources=[{**HF, "revision": "c" * 40}], data_dir="/data/vllm"))
    assert pinned.serve_path == f"/data/vllm/models/MiniMaxAI/MiniMax-M2/{'c' * 40}"
    assert pinned.config["state_dir"] == f"/data/vllm/weights-state/MiniMaxAI--MiniMax-M2/{'c' * 40}"
    assert pinned.marker == pinned.config["marker"] == f"{pinned.config['state_dir']}/verified.json"
    assert pinned.config["keep_units"] == ["/etc/systemd/system/vllm.service", "/etc/vllm-fleet/vllm.service.prev"]
    with pytest.raises(ValueError, match="cache root"):
        weights.check_serve_path("/root/.cache/huggingface/hub/models--MiniMaxAI--MiniMax-M2")


def test_profile_revision_pins_sources_without_their_own():
    own = {**HF, "revision": "a" * 40}
    s = settings(weights_sources=[HF, own])
    got = weights.resolved_sources(s, "f" * 40)
    assert [x.revision for x in got] == ["f" * 40, "a" * 40]


def test_identity_ignores_the_endpoint_but_not_the_revision():
    a = weights.fetch_plan(settings(weights_sources=[{**HF, "endpoint": "https://hf-mirror.com"}]))
    b = weights.fetch_plan(settings(weights_sources=[{**HF, "endpoint": "http://127.0.0.1:1"}]))
    c = weights.fetch_plan(settings(weights_sources=[{**HF, "revision": "b" * 40}]))
    assert a.config["identity"] == b.config["identity"] != c.config["identity"]


def test_local_source_first_is_served_in_place():
    plan = weights.fetch_plan(settings(weights_sources=[{"kind": "local", "path": "/models/m2"}]))
    assert plan.serve_path == "/models/m2" and not plan.downloads


@pytest.mark.parametrize("bad", [{"kind": "hf"}, {"kind": "local", "path": "rel"}, {**HF, "endpoint": "https://u:p@x"},
                                 {"kind": "s3", "repo": "a/b"}])
def test_bad_sources_are_refused(bad):
    with pytest.raises(Exception, match="weights_sources"):
        settings(weights_sources=[bad])


def test_xet_off_by_default_and_token_never_in_the_unit_environment():
    s = settings(weights_sources=[HF], hf_token="hf_secret")
    plan = weights.fetch_plan(s)
    env = weights.unit_environment(s, plan)
    assert "HF_HUB_DISABLE_XET=1" in env and not any("secret" in e for e in env)
    assert "secret" not in json.dumps(plan.config)
    assert "HF_HUB_DISABLE_XET=1" not in weights.unit_environment(settings(weights_sources=[HF], hf_xet=True), plan)


def test_backoff_doubles_and_is_capped():
    assert fw.backoff_delays(5, 10, 30) == [10, 20, 30, 30]
    assert fw.backoff_delays(1, 10, 30) == []


def test_progress_line_has_bytes_rate_eta_and_files():
    line = fw.progress_line(12 * 2**20, 24 * 2**20, 3 * 2**20, 2, 6)
    assert line == "12.0/24.0 MiB (50.0%), 3.0 MiB/s, ETA 4 s, files 2/6"


# --- the worker against the mirror ---------------------------------------------------


@pytest.fixture(scope="module")
def mirror():
    m = Mirror(repo.build()).start()
    yield m
    m.stop()


def config(tmp_path, *endpoints, **kw):
    return {"identity": "t", "dest": str(tmp_path / "m"), "state_dir": str(tmp_path / "s"), "retries": 2,
            "backoff_s": 0.01, "workers": 2, "headroom_bytes": 0,
            "sources": [{"kind": "hf", "repo": repo.REPO_ID, "endpoint": e} for e in endpoints], **kw}


def run(cfg) -> int:
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    return fw.Worker(cfg, log=lambda m: None).run()


def test_download_verifies_records_state_and_cleans_leftovers(mirror, tmp_path):
    cfg = config(tmp_path, mirror.url)
    os.makedirs(cfg["dest"] + "/.cache/huggingface/download")
    Path(cfg["dest"], "stale.bin").write_bytes(b"x")
    mirror.reset_counters()
    assert run(cfg) == 0
    assert sum(mirror.bytes_served.values()) == mirror.total_bytes
    names = sorted(os.listdir(cfg["dest"]))
    assert names == sorted(f.name for f in repo.manifest(repo.build()))  # no .cache, no stale.bin
    state = fw.read_json(cfg["state_dir"] + "/state.json", {})
    assert state["complete"] and state["commit"] == mirror.commit
    assert fw.check_state(cfg, state)["complete"]
    mirror.reset_counters()
    assert run(cfg) == 0 and sum(mirror.bytes_served.values()) == 0  # nothing fetched twice


def test_truncated_file_is_detected_by_check_and_refetched(mirror, tmp_path):
    cfg = config(tmp_path, mirror.url)
    assert run(cfg) == 0
    shard = Path(cfg["dest"], "model-00003-of-00004.safetensors")
    shard.write_bytes(shard.read_bytes()[:1000])
    assert not fw.check_state(cfg, fw.read_json(cfg["state_dir"] + "/state.json", {}))["complete"]
    mirror.reset_counters()
    assert run(cfg) == 0
    assert dict(mirror.bytes_served) == {shard.name: shard.stat().st_size}


def test_failing_mirror_falls_back_to_the_next_source(mirror, tmp_path):
    bad = Mirror(repo.build()).start()
    bad.set_mode("fail")
    try:
        cfg = config(tmp_path, bad.url, mirror.url)
        assert run(cfg) == 0
        assert mirror.url in fw.read_json(cfg["state_dir"] + "/state.json", {})["source"]
        assert sum(bad.bytes_served.values()) == 0
    finally:
        bad.stop()


def test_every_source_down_fails_with_each_error(tmp_path):
    down = Mirror(repo.build()).start()
    down.set_mode("down")
    cfg = config(tmp_path, down.url)
    assert run(cfg) == 1
    status = fw.read_json(cfg["state_dir"] + "/status.json", {})
    assert status["phase"] == "failed" and "attempt 2" in status["error"]


def test_not_enough_disk_fails_before_fetching(mirror, tmp_path):
    cfg = config(tmp_path, mirror.url, headroom_bytes=2**62)
    mirror.reset_counters()
    assert run(cfg) == 4
    assert sum(mirror.bytes_served.values()) == 0
    assert "not enough disk" in fw.read_json(cfg["state_dir"] + "/status.json", {})["error"]


def test_a_second_worker_does_not_start(mirror, tmp_path):
    import fcntl

    cfg = config(tmp_path, mirror.url)
    os.makedirs(cfg["state_dir"])
    with open(cfg["state_dir"] + "/fetch.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        assert run(cfg) == 3


def test_check_reports_the_verified_bytes_still_on_disk_for_the_planning_disk_check(mirror, tmp_path):
    cfg = config(tmp_path, mirror.url)
    assert run(cfg) == 0
    state = fw.read_json(cfg["state_dir"] + "/state.json", {})
    total = sum(f.size for f in repo.manifest(repo.build()))
    got = fw.check_state(cfg, state)
    assert got["complete"] and got["identity"] == "t" and got["verified_bytes"] == total
    shard = Path(cfg["dest"], "model-00001-of-00004.safetensors")
    size = shard.stat().st_size
    shard.write_bytes(b"x" * size)  # same size, new inode/mtime: no longer counted as verified
    got = fw.check_state(cfg, state)
    assert not got["complete"] and got["verified_bytes"] == total - size
    assert fw.check_state({**cfg, "identity": "other"}, state)["verified_bytes"] == 0  # another model or revision


def test_the_snapshot_reads_the_weights_check_in_its_round_trip(mirror, tmp_path):
    """The HostSnapshot command with weights=(program, config) runs the real check here and parses it."""
    import subprocess

    from vllm_fleet.preflight.facts import HostSnapshot

    cfg = config(tmp_path, mirror.url)
    assert run(cfg) == 0
    cfg_path = tmp_path / "fetch.json"
    cfg_path.write_text(json.dumps(cfg))
    program = str(Path(fw.__file__))
    cmd = HostSnapshot().command([str(tmp_path)], weights=(program, str(cfg_path)))
    out = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, check=False).stdout.splitlines()
    snap = HostSnapshot().process(out)
    assert snap.weights_check["complete"] is True and snap.weights_check["verified_bytes"] > 0, snap.errors
    assert "weights-check" not in snap.errors
    # nothing installed yet on a fresh host: no section text, no error, None
    cmd = HostSnapshot().command([str(tmp_path)], weights=("/nonexistent/fetch_weights.py", str(cfg_path)))
    out = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, check=False).stdout.splitlines()
    snap = HostSnapshot().process(out)
    assert snap.weights_check is None and "weights-check" not in snap.errors
    # without weights= the command is unchanged (no section at all)
    assert "weights-check" not in HostSnapshot().command([str(tmp_path)])


def test_the_snapshot_check_of_an_older_fetch_program_still_names_its_identity(mirror, tmp_path):
    """A host whose fetch_weights.py predates `identity`/`verified_bytes` in its JSON (preflight runs before the update)."""
    import subprocess

    from vllm_fleet.preflight.facts import HostSnapshot
    from vllm_fleet.preflight.checks import weights_on_host

    cfg = config(tmp_path, mirror.url)
    assert run(cfg) == 0
    cfg_path = tmp_path / "fetch.json"
    cfg_path.write_text(json.dumps(cfg))
    old = tmp_path / "old_fetch.py"
    old.write_text("import json\nprint(json.dumps({'complete': True, 'commit': 'c', 'source': 's', 'problems': []}))\n")
    cmd = HostSnapshot().command([str(tmp_path)], weights=(str(old), str(cfg_path)))
    snap = HostSnapshot().process(subprocess.run(["sh", "-c", cmd], capture_output=True, text=True).stdout.splitlines())
    assert snap.weights_check["identity"] == "t"
    assert weights_on_host(snap.weights_check, "t", 10) == 10


# --- ModelScope: the plan, the listing, and the worker against tests/msmirror with the real client ---------


MS = {"kind": "modelscope", "repo": "MiniMax/MiniMax-M2"}


def test_modelscope_source_adds_its_client_and_keeps_its_cache_off_home():
    s = settings(weights_sources=[HF, MS], data_dir="/data/vllm")
    plan = weights.fetch_plan(s)
    assert plan.requirements == (weights.HF_HUB_REQUIREMENT, *weights.MODELSCOPE_REQUIREMENTS)
    env = weights.unit_environment(s, plan)
    assert "MODELSCOPE_CACHE=/data/vllm/cache/modelscope" in env and "HOME=/data/vllm/cache/modelscope-home" in env
    hf_only = weights.fetch_plan(settings(weights_sources=[HF]))
    assert hf_only.requirements == (weights.HF_HUB_REQUIREMENT,)
    assert not any(e.startswith(("MODELSCOPE_", "HOME=")) for e in weights.unit_environment(settings(weights_sources=[HF]), hf_only))


def test_modelscope_listing_keeps_files_with_size_and_sha256_and_refuses_a_file_without_one():
    sha = "ab" * 32
    got = fw.modelscope_listing([{"path": "b.safetensors", "size": 7, "sha256": sha.upper(), "type": "blob"},
                                 {"path": "sub", "size": 0, "type": "tree"},
                                 {"path": "a/config.json", "size": "3", "sha256": sha}], 1, "master")
    assert got == fw.Listing(1, "master", (fw.RemoteFile("a/config.json", 3, sha), fw.RemoteFile("b.safetensors", 7, sha)))
    with pytest.raises(fw.SourceError, match="no sha256 for 'x.bin'"):
        fw.modelscope_listing([{"path": "x.bin", "size": 1, "sha256": None}], 0, "master")


@pytest.fixture(scope="module")
def ms_mirror():
    from tests.msmirror.server import MsMirror

    m = MsMirror(repo.build()).start()
    yield m
    m.stop()


def ms_config(tmp_path, endpoint, **kw):
    return {**config(tmp_path, **kw), "sources": [{"kind": "modelscope", "repo": repo.REPO_ID, "endpoint": endpoint}]}


def test_modelscope_download_is_verified_recorded_and_not_repeated(ms_mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "mscache"))
    cfg = ms_config(tmp_path, ms_mirror.url)
    ms_mirror.reset_counters()
    assert run(cfg) == 0
    assert sum(ms_mirror.bytes_served.values()) == ms_mirror.total_bytes
    assert any("/repo/files" in r for r in ms_mirror.requests)
    want = {f.name: f for f in repo.manifest(repo.build())}
    assert sorted(os.listdir(cfg["dest"])) == sorted(want)
    state = fw.read_json(cfg["state_dir"] + "/state.json", {})
    assert state["complete"] and state["commit"] == "master" and ms_mirror.url in state["source"]
    shard = "model-00001-of-00004.safetensors"
    assert state["files"][shard]["sha256"] == want[shard].sha256
    ms_mirror.reset_counters()
    assert run(cfg) == 0 and sum(ms_mirror.bytes_served.values()) == 0
    p = Path(cfg["dest"], shard)
    p.write_bytes(p.read_bytes()[:-1] + b"\0")  # same size, other bytes: only the sha256 tells
    assert run({**cfg, "verify": "full"}) == 0
    assert dict(ms_mirror.bytes_served) == {shard: want[shard].size}
    assert fw.digest(str(p), "sha256") == want[shard].sha256


def test_hf_down_falls_back_to_modelscope(ms_mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "mscache"))
    down = Mirror(repo.build()).start()
    down.set_mode("down")
    cfg = ms_config(tmp_path, ms_mirror.url)
    cfg["sources"].insert(0, {"kind": "hf", "repo": repo.REPO_ID, "endpoint": down.url})
    assert run(cfg) == 0
    assert fw.read_json(cfg["state_dir"] + "/state.json", {})["source"] == f"modelscope:{repo.REPO_ID} at {ms_mirror.url}"


def test_the_fetch_env_file_is_a_secret_file_like_the_services():
    """The HF token goes through the one private path (managed_files, secret=True), never files.put + diff."""
    from vllm_fleet.hostops.operations import secret_file
    from vllm_fleet.layout import HostLayout
    from vllm_fleet.weights.step import fetch_env_file

    s = settings(weights_sources=[HF], hf_token="hf_secret_token_value")
    plan = weights.fetch_plan(s)
    f = fetch_env_file(s, plan)
    lay = HostLayout.of(s)
    assert f.secret and f.path == plan.env_path == lay.fetch_env_file == "/etc/vllm-fleet/vllm-fetch.env"
    assert (f.user, f.group, f.mode) == ("root", "root", "600") == (lambda g: (g.user, g.group, g.mode))(
        secret_file(lay.env_file, ""))
    assert f.data() == b"HF_TOKEN=hf_secret_token_value\n" and "hf_secret" not in repr(f)
    assert (plan.venv, plan.program, plan.config_path, plan.unit_path) == (
        lay.fetch_venv, lay.fetch_program, lay.fetch_config("MiniMaxAI/MiniMax-M2", None), lay.fetch_unit_path)
    assert plan.config["state_dir"] == lay.weights_revision_state("MiniMaxAI/MiniMax-M2", None)
    assert plan.serve_path == lay.model_revision("MiniMaxAI/MiniMax-M2", None)
