"""Byte-level resume (issue 15 item 1): the fetch program, run as the unit runs it (a subprocess), SIGKILLed while every
shard is partial, then run again: the mirror counts the bytes it served twice.

Against tests/hfmirror (an HF mirror with an endpoint; the HF endpoint itself through HF_ENDPOINT, as huggingface_hub
reads it) and tests/msmirror (ModelScope) on 127.0.0.1, throttled so that the kill lands mid-file. A few seconds each.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hfmirror import repo
from tests.hfmirror.server import Mirror
from tests.msmirror.server import MsMirror
from vllm_fleet.weights import hostprog as fw

PROGRAM = Path(fw.__file__)
SHARDS, SHARD_BYTES = 4, 8 * 1024 * 1024
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory):
    return repo.build(SHARDS, SHARD_BYTES, cache=tmp_path_factory.mktemp("repo"))


def _config(tmp_path: Path, src: dict) -> Path:
    cfg = {"identity": "resume", "dest": str(tmp_path / "m" / "rev"), "state_dir": str(tmp_path / "s" / "rev"),
           "marker": str(tmp_path / "s" / "rev" / "verified.json"), "retries": 1, "backoff_s": 0, "workers": SHARDS,
           "headroom_bytes": 0, "sources": [src]}
    path = tmp_path / "fetch.json"
    path.write_text(json.dumps(cfg))
    return path


def _partials(dest: str) -> dict:
    root = Path(dest, fw.PARTIAL_DIR)
    return {p.name: p.stat().st_size for p in root.glob("*.safetensors")} if root.is_dir() else {}


def _wait_every_shard_partial(dest: str, timeout_s: float = 30) -> None:
    """Until every shard has at least 1 MiB on disk (a partial of each), or ``timeout_s``: the moment to cut in."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        parts = _partials(dest)
        if len(parts) == SHARDS and all(MIB <= n for n in parts.values()):
            return
        time.sleep(0.05)


MIRRORS = {
    "hf-mirror": (Mirror, lambda url: ({"kind": "hf", "repo": repo.REPO_ID, "endpoint": url}, {})),
    "hf-endpoint": (Mirror, lambda url: ({"kind": "hf", "repo": repo.REPO_ID}, {"HF_ENDPOINT": url})),
    "modelscope": (MsMirror, lambda url: ({"kind": "modelscope", "repo": repo.REPO_ID, "endpoint": url}, {})),
}


@pytest.mark.parametrize("kind", sorted(MIRRORS))
def test_a_kill_while_every_shard_is_partial_refetches_at_most_1_mib_per_file(repo_dir, tmp_path, kind):
    cls, make = MIRRORS[kind]
    mirror = cls(repo_dir).start()
    try:
        src, extra_env = make(mirror.url)
        cfg_path = _config(tmp_path, src)
        cfg = json.loads(cfg_path.read_text())
        env = {**os.environ, "HF_HUB_DISABLE_XET": "1", "MODELSCOPE_CACHE": str(tmp_path / "ms"), **extra_env}
        mirror.rate = 3 * MIB  # per response: four shards of 8 MiB take ~3 s
        proc = subprocess.Popen([sys.executable, str(PROGRAM), "run", str(cfg_path)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_every_shard_partial(cfg["dest"])
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        parts = _partials(cfg["dest"])
        shard_size = {f.name: f.size for f in repo.manifest(repo_dir) if f.name.endswith(".safetensors")}
        assert len(parts) == SHARDS and all(0 < parts[n] < shard_size[n] for n in parts), parts  # every shard partial
        assert not Path(cfg["marker"]).exists()
        first = dict(mirror.bytes_served)

        mirror.rate = 0
        mirror.reset_counters()
        done = subprocess.run([sys.executable, str(PROGRAM), "run", str(cfg_path)], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        second = dict(mirror.bytes_served)
        for name, size in shard_size.items():
            twice = first.get(name, 0) + second.get(name, 0) - size
            assert 0 <= twice <= MIB, (name, twice)
            assert fw.digest(os.path.join(cfg["dest"], name), "sha256") == next(
                f.sha256 for f in repo.manifest(repo_dir) if f.name == name)
        resumed = [r for r in mirror.ranges if r[0] in shard_size]
        assert {r[0] for r in resumed if r[1].startswith("bytes=") and r[1] != "bytes=0-"} == set(shard_size), resumed
        if kind != "modelscope":  # the HF mirror's ETag is the sha256: If-Range carries it
            assert all(r[2].strip('"') in {f.sha256 for f in repo.manifest(repo_dir)} for r in resumed)
        assert Path(cfg["marker"]).is_file() and not Path(cfg["dest"], fw.PARTIAL_DIR).exists()
        print(f"{kind}: partial at the kill {sorted(v // 1024 for v in parts.values())} KiB; served twice "
              f"{[first.get(n, 0) + second.get(n, 0) - s for n, s in shard_size.items()]} bytes")
    finally:
        mirror.stop()


def test_a_partial_of_a_file_that_changed_upstream_starts_over(repo_dir, tmp_path):
    """The partial's JSON names the content it is of; another sha256 in the listing (the file changed) drops it."""
    mirror = Mirror(repo_dir).start()
    try:
        cfg = json.loads(_config(tmp_path, {"kind": "hf", "repo": repo.REPO_ID, "endpoint": mirror.url}).read_text())
        name = "model-00001-of-00004.safetensors"
        f = next(x for x in repo.manifest(repo_dir) if x.name == name)
        part, side = fw.partial_paths(cfg["dest"], name)
        os.makedirs(os.path.dirname(part))
        Path(part).write_bytes(b"\0" * (2 * MIB))  # bytes of an older version of the file
        Path(side).write_text(json.dumps({"expect": {"size": f.size, "sha256": "0" * 64, "blob_sha1": None},
                                          "etag": '"' + "0" * 64 + '"'}))
        other = "model-00002-of-00004.safetensors"
        g = next(x for x in repo.manifest(repo_dir) if x.name == other)
        opart, oside = fw.partial_paths(cfg["dest"], other)
        Path(opart).write_bytes((repo_dir / other).read_bytes()[:MIB])  # a good partial, but the server's ETag moved
        Path(oside).write_text(json.dumps({"expect": fw.expected(fw.RemoteFile(other, g.size, g.sha256)),
                                           "etag": '"an-older-etag"'}))
        os.environ["HF_HUB_DISABLE_XET"] = "1"
        assert fw.Worker(cfg, log=lambda m: None).run() == 0
        assert mirror.bytes_served[name] == f.size  # whole again: the old bytes were not continued
        assert mirror.bytes_served[other] == g.size  # If-Range with the old ETag: the server sent it whole (200)
        assert (name, "", "") in mirror.ranges and (other, f"bytes={MIB}-", '"an-older-etag"') in mirror.ranges
        assert fw.digest(os.path.join(cfg["dest"], name), "sha256") == f.sha256
    finally:
        mirror.stop()


def _shards(repo_dir: Path) -> dict:
    return {f.name: f for f in repo.manifest(repo_dir) if f.name.endswith(".safetensors")}


def _assert_complete_and_served_once(mirror: Mirror, repo_dir: Path, cfg: dict) -> list:
    """Every file verified in dest, the marker written, no partial left; bytes served twice per shard (each <= 1 MiB)."""
    twice = []
    for name, f in _shards(repo_dir).items():
        extra = mirror.bytes_served[name] - f.size
        assert 0 <= extra <= MIB, (name, extra)
        twice.append(extra)
        assert fw.digest(os.path.join(cfg["dest"], name), "sha256") == f.sha256
    for f in repo.manifest(repo_dir):
        assert os.path.getsize(os.path.join(cfg["dest"], f.name)) == f.size
    assert Path(cfg["marker"]).is_file() and not Path(cfg["dest"], fw.PARTIAL_DIR).exists()
    return twice


def test_connections_dropped_mid_body_of_every_shard_resume_each_from_its_last_byte(repo_dir, tmp_path):
    """Every GET of a shard is cut after 2 MiB of body (a flaky link): each 8 MiB shard takes 5 connections, all four
    shards partial at each cut. The program keeps resuming a file while each try brings bytes (bounded backoff), in one
    source attempt (retries = 1): it ends complete and verified, with nothing served twice beyond a read buffer."""
    mirror = Mirror(repo_dir).start()
    try:
        cfg_path = _config(tmp_path, {"kind": "hf", "repo": repo.REPO_ID, "endpoint": mirror.url})
        cfg = json.loads(cfg_path.read_text())
        mirror.drop_after(2 * MIB, times=None)
        env = {**os.environ, "HF_HUB_DISABLE_XET": "1"}
        done = subprocess.run([sys.executable, str(PROGRAM), "run", str(cfg_path)], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        shards = _shards(repo_dir)
        for n, f in shards.items():  # cut at 2, 4, 6 and 8 MiB (8 MiB + 104 bytes each); resumed from each cut
            cuts = list(range(2 * MIB, f.size, 2 * MIB))
            assert mirror.drops[n] == len(cuts) == 4, dict(mirror.drops)
            assert [r[1] for r in mirror.ranges if r[0] == n] == [""] + [f"bytes={c}-" for c in cuts], mirror.ranges
            assert all(r[2] == f'"{f.sha256}"' for r in mirror.ranges if r[0] == n and r[1]), mirror.ranges
        twice = _assert_complete_and_served_once(mirror, repo_dir, cfg)
        print(f"dropped mid-body: served twice {twice} bytes")
    finally:
        mirror.stop()


def test_a_mirror_restart_mid_download_resumes_every_partial(repo_dir, tmp_path):
    """The mirror restarts (every connection cut, connection refused for 5 s, then the same port again) while every
    shard is partial: the program retries with backoff instead of giving up, and continues each partial."""
    mirror = Mirror(repo_dir).start()
    try:
        cfg_path = _config(tmp_path, {"kind": "hf", "repo": repo.REPO_ID, "endpoint": mirror.url})
        cfg = json.loads(cfg_path.read_text())
        env = {**os.environ, "HF_HUB_DISABLE_XET": "1"}
        mirror.rate = 3 * MIB
        proc = subprocess.Popen([sys.executable, str(PROGRAM), "run", str(cfg_path)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            _wait_every_shard_partial(cfg["dest"])
            port = mirror.port
            mirror.restart(down_s=5.0)
            assert mirror.port == port
            parts = _partials(cfg["dest"])
            assert len(parts) == SHARDS and all(0 < v < SHARD_BYTES for v in parts.values()), parts
            mirror.rate = 0
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, out
        for n in _shards(repo_dir):
            resumed = [r for r in mirror.ranges if r[0] == n and r[1] not in ("", "bytes=0-")]
            assert resumed and all(r[2] for r in resumed), mirror.ranges  # Range + If-Range after the restart
        twice = _assert_complete_and_served_once(mirror, repo_dir, cfg)
        print(f"mirror restart: partial at the restart {sorted(v // 1024 for v in parts.values())} KiB; "
              f"served twice {twice} bytes")
    finally:
        mirror.stop()
