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
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            parts = _partials(cfg["dest"])
            if len(parts) == SHARDS and all(MIB <= n for n in parts.values()):
                break
            time.sleep(0.05)
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
