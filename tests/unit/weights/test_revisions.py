"""Per-revision weights, the verified marker, honest progress, the disk check and the parallel re-verify (issue 15
items 4, 5, 7; issue 13 item 3), with the fetch program's worker in this process against tests/hfmirror."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.hfmirror import repo
from tests.hfmirror.server import Mirror
from vllm_fleet.weights import hostprog as fw

SHARD = "model-00003-of-00004.safetensors"


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """Revision A (the tiny repo) and B: the same but one shard changed (another sha256, another commit)."""
    a = repo.build()
    b = tmp_path_factory.mktemp("rev-b") / "repo"
    shutil.copytree(a, b)
    data = bytearray((b / SHARD).read_bytes())
    data[-1] ^= 0xFF
    (b / SHARD).write_bytes(bytes(data))
    return a, b


@pytest.fixture()
def mirrors(repos):
    ma, mb = Mirror(repos[0]).start(), Mirror(repos[1]).start()
    yield ma, mb
    ma.stop()
    mb.stop()


def cfg(root: Path, mirror: Mirror, rev: str, **kw) -> dict:
    """A config as vllm_fleet/weights/source.py writes it: dest models/Org/Name/REV, state weights-state/Org--Name/REV."""
    models, states = root / "models" / "Org" / "Name", root / "weights-state" / "Org--Name"
    return {"identity": f"id-{rev}", "dest": str(models / rev), "state_dir": str(states / rev),
            "marker": str(states / rev / "verified.json"), "revisions_root": str(models), "states_root": str(states),
            "keep_units": [str(root / "vllm.service"), str(root / "vllm.service.prev")], "retries": 1,
            "backoff_s": 0, "workers": 4, "headroom_bytes": 0,
            "sources": [{"kind": "hf", "repo": repo.REPO_ID, "endpoint": mirror.url, "revision": mirror.commit}], **kw}


def run(c: dict, logs: list | None = None) -> int:
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    return fw.Worker(c, log=(logs.append if logs is not None else lambda m: None)).run()


def unit(root: Path, name: str, serve: str | None) -> None:
    path = root / name
    if serve is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(f"[Service]\nExecStart=/opt/v/bin/vllm serve {serve} --port 8100\n")


def test_a_revision_change_fetches_only_what_changed_into_a_new_dir_and_leaves_the_old_one(tmp_path, mirrors, repos):
    ma, mb = mirrors
    a, b = cfg(tmp_path, ma, "rev-a"), cfg(tmp_path, mb, "rev-b")
    assert run(a) == 0 and Path(a["marker"]).is_file()
    before = {n: fw.digest(os.path.join(a["dest"], n), "sha256") for n in os.listdir(a["dest"])}
    unit(tmp_path, "vllm.service", a["dest"])  # the running unit serves A
    unit(tmp_path, "vllm.service.prev", a["dest"])  # and A is the last known good
    logs: list = []
    assert run(b, logs) == 0
    shard_b = next(f for f in repo.manifest(repos[1]) if f.name == SHARD)
    assert dict(mb.bytes_served) == {SHARD: shard_b.size}  # the rest is hard-linked from A, not fetched
    assert any("hard-linked" in m for m in logs)
    after = {n: fw.digest(os.path.join(a["dest"], n), "sha256") for n in os.listdir(a["dest"])}
    assert after == before  # A's files are untouched: the rollback target serves what it served
    assert fw.digest(os.path.join(b["dest"], SHARD), "sha256") == shard_b.sha256
    assert os.stat(os.path.join(a["dest"], "config.json")).st_ino == os.stat(os.path.join(b["dest"], "config.json")).st_ino
    assert Path(a["marker"]).is_file() and Path(b["marker"]).is_file()
    assert os.path.isdir(a["dest"])  # A is kept: the unit and its last known good copy use it
    assert fw.check_state(b, fw.read_json(b["state_dir"] + "/state.json", {}))["leftovers"][0]["why"].startswith("kept:")


def test_pruning_never_removes_the_revision_the_unit_or_the_last_known_good_uses(tmp_path, mirrors):
    ma, mb = mirrors
    a, b = cfg(tmp_path, ma, "rev-a"), cfg(tmp_path, mb, "rev-b")
    assert run(a) == 0
    unit(tmp_path, "vllm.service", a["dest"])
    assert run(b) == 0 and os.path.isdir(a["dest"])  # the fetch of B prunes at its end: A is in use
    unit(tmp_path, "vllm.service", b["dest"])
    unit(tmp_path, "vllm.service.prev", a["dest"])  # the gate's rollback target is A
    assert [x["remove"] for x in fw.prune(b, lambda m: None)] == [False] and os.path.isdir(a["dest"])
    unit(tmp_path, "vllm.service.prev", None)
    (tmp_path / "vllm.service.prev").mkdir()  # a unit file that cannot be read (root reads any mode): remove nothing
    assert fw.revisions_in_use(b["keep_units"], b["revisions_root"]) is None
    assert all(not x["remove"] for x in fw.prune(b, lambda m: None)) and os.path.isdir(a["dest"])
    (tmp_path / "vllm.service.prev").rmdir()
    unit(tmp_path, "vllm.service.prev", b["dest"])  # the new revision passed its gate: A is unused now
    found = fw.check_state(b, {})["leftovers"]
    assert [(x["path"], x["remove"]) for x in found] == [(a["dest"], True)]
    assert found[0]["bytes"] < sum(f.size for f in repo.manifest(repo.build()))  # hard-linked files free nothing
    fw.prune(b, lambda m: None)
    assert not os.path.exists(a["dest"]) and not os.path.exists(a["state_dir"])
    assert fw.check_state(b, fw.read_json(b["state_dir"] + "/state.json", {}))["complete"]  # B unharmed


def test_the_layout_before_per_revision_dirs_is_linked_from_and_kept_while_a_unit_serves_it(tmp_path, mirrors):
    ma, _ = mirrors
    flat = cfg(tmp_path, ma, "x")
    models, states = Path(flat["revisions_root"]), Path(flat["states_root"])
    old = {**flat, "dest": str(models), "state_dir": str(states), "marker": ""}
    assert run(old) == 0  # what an older deploy left: files in models/Org/Name, state in weights-state/Org--Name
    unit(tmp_path, "vllm.service", str(models))
    ma.reset_counters()
    new = cfg(tmp_path, ma, "rev-a")
    assert run(new) == 0 and sum(ma.bytes_served.values()) == 0  # every file hard-linked from the old layout
    assert (models / "config.json").is_file()  # kept: the unit serves it
    unit(tmp_path, "vllm.service", new["dest"])
    unit(tmp_path, "vllm.service.prev", new["dest"])
    fw.prune(new, lambda m: None)
    assert not (models / "config.json").exists() and not (states / "state.json").exists()
    assert fw.check_state(new, fw.read_json(new["state_dir"] + "/state.json", {}))["complete"]


def test_the_marker_goes_before_a_file_changes_and_comes_back_only_when_all_are_verified(tmp_path, mirrors):
    ma, _ = mirrors
    c = cfg(tmp_path, ma, "rev-a")
    assert run(c) == 0
    marker = Path(c["marker"])
    assert json.loads(marker.read_text())["identity"] == c["identity"]
    shard = Path(c["dest"], SHARD)
    shard.write_bytes(shard.read_bytes()[:100])  # damaged: the next run must fetch it again
    assert not fw.check_state(c, fw.read_json(c["state_dir"] + "/state.json", {}))["complete"]
    ma.rate = 2 * 1024 * 1024
    seen = []
    t = threading.Thread(target=lambda: seen.append(run(c)))
    t.start()
    deadline = time.monotonic() + 10
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not marker.exists()  # removed while the file is being fetched: vLLM's AssertPathExists fails
    t.join()
    ma.rate = 0
    assert seen == [0] and marker.is_file()
    marker.unlink()  # a check never calls a revision complete without its marker
    assert "verified.json (complete and verified) is missing" in " ".join(
        fw.check_state(c, fw.read_json(c["state_dir"] + "/state.json", {}))["problems"])


def test_progress_counts_the_bytes_on_disk_of_this_revision_and_the_disk_check_the_partials(tmp_path, mirrors, monkeypatch):
    ma, _ = mirrors
    c = cfg(tmp_path, ma, "rev-a")
    files = {f.name: f for f in repo.manifest(repo.build())}
    total = sum(f.size for f in files.values())
    shards = sorted(n for n in files if n.endswith(".safetensors"))
    for n in shards:  # every shard half on disk from a run that was killed
        part, side = fw.partial_paths(c["dest"], n)
        os.makedirs(os.path.dirname(part), exist_ok=True)
        Path(part).write_bytes((repo.build() / n).read_bytes()[: files[n].size // 2])
        Path(side).write_text(json.dumps({"expect": fw.expected(fw.RemoteFile(n, files[n].size, files[n].sha256)),
                                          "etag": None}))
    # leftovers of another program (huggingface_hub's) are not counted as this model's bytes
    os.makedirs(c["dest"] + "/.cache/huggingface/download")
    Path(c["dest"], ".cache/huggingface/download/x.incomplete").write_bytes(b"\0" * 5_000_000)
    half = sum(files[n].size // 2 for n in shards)
    w = fw.Worker(c, log=lambda m: None)
    real = fw.shutil.disk_usage
    # free disk: enough for what is still to fetch, not for the whole files: the check counts the partials
    monkeypatch.setattr(fw.shutil, "disk_usage", lambda p: real(p)._replace(free=total - half + 1024))
    statuses = []
    orig = w._phase

    def phase(name, error=""):
        orig(name, error)
        if name == "downloading":
            statuses.append(w.status())

    w._phase = phase
    assert w.run() == 0
    s = statuses[0]
    assert s["done"] == half and s["total"] == total  # on disk: the partials, nothing else
    assert (s["files_done"], s["files_total"]) == (0, len(files))  # no file is complete yet
    assert s["line"].startswith(f"{half / 2**20:.1f}/{total / 2**20:.1f} MiB") and f"files 0/{len(files)}" in s["line"]
    assert sum(ma.bytes_served.values()) == total - half  # and only the other halves came over the wire
    end = w.status()
    assert end["done"] == total and end["files_done"] == len(files) and end["eta_s"] is None


def test_not_enough_disk_counts_the_partials_and_says_so(tmp_path, mirrors, monkeypatch):
    ma, _ = mirrors
    c = cfg(tmp_path, ma, "rev-a")
    real = fw.shutil.disk_usage
    monkeypatch.setattr(fw.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    assert run(c) == 4 and sum(ma.bytes_served.values()) == 0
    assert "partials already on disk counted" in fw.read_json(c["state_dir"] + "/status.json", {})["error"]


def test_a_full_reverify_hashes_files_in_parallel(tmp_path, mirrors, monkeypatch):
    ma, _ = mirrors
    c = cfg(tmp_path, ma, "rev-a")
    assert run(c) == 0
    active, peak, lock = [0], [0], threading.Lock()
    real = fw.verify_file

    def slow_verify(path, f, on_bytes=lambda n: None):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        try:
            return real(path, f, on_bytes)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(fw, "verify_file", slow_verify)
    ma.reset_counters()
    assert run({**c, "verify": "full"}) == 0
    assert peak[0] == c["workers"]  # four files hashed at once (6 files, 4 workers)
    assert sum(ma.bytes_served.values()) == 0
