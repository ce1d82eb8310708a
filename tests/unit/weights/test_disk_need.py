"""The planning-time disk check asks for what is still to fetch: total - verified files - bytes already in this
revision's partial files (issue 15 item 4), read by ``fetch_weights.py check`` without hashing."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.unit.preflight.test_preflight import _disk_settings, _small_data_disk
from vllm_fleet.preflight.checks import GIB, check_disk, weights_on_host
from vllm_fleet.weights import hostprog as fw

MIB = 1024 * 1024


def _config(tmp_path: Path) -> dict:
    return {"identity": "abc", "dest": str(tmp_path / "m" / "rev"), "state_dir": str(tmp_path / "s" / "rev"),
            "marker": str(tmp_path / "s" / "rev" / "verified.json")}


def _partial(dest: str, name: str, have: int, size: int, sha: str = "1" * 64) -> None:
    part, side = fw.partial_paths(dest, name)
    os.makedirs(os.path.dirname(part), exist_ok=True)
    Path(part).write_bytes(b"\0" * have)
    Path(side).write_text(json.dumps({"expect": {"size": size, "sha256": sha, "blob_sha1": None}, "etag": '"x"'}))


def test_check_counts_the_bytes_of_this_revisions_partials(tmp_path):
    cfg = _config(tmp_path)
    os.makedirs(cfg["dest"])
    Path(cfg["dest"], "a.safetensors").write_bytes(b"a" * MIB)
    st = fw.file_stat(os.path.join(cfg["dest"], "a.safetensors"))
    state = {"identity": "abc", "complete": False,
             "files": {"a.safetensors": fw.record(st, fw.RemoteFile("a.safetensors", MIB, "2" * 64))}}
    _partial(cfg["dest"], "b.safetensors", 3 * MIB, 8 * MIB)
    _partial(cfg["dest"], "sub/c.safetensors", MIB, 8 * MIB)
    _partial(cfg["dest"], "d.safetensors", 2 * MIB, MIB)  # longer than its file: not continued, not counted
    Path(fw.partial_paths(cfg["dest"], "e.safetensors")[0]).write_bytes(b"\0" * MIB)  # no JSON: not continued
    out = fw.check_state(cfg, state)
    assert (out["verified_bytes"], out["partial_bytes"]) == (MIB, 4 * MIB)
    assert fw.check_state(cfg, {**state, "identity": "other"})["partial_bytes"] == 0  # another download's record


def test_the_disk_check_asks_total_minus_verified_minus_partials():
    total = 100 * GIB
    check = {"complete": False, "identity": "abc", "verified_bytes": 30 * GIB, "partial_bytes": 40 * GIB}
    present = weights_on_host(check, "abc", total)
    assert present == 70 * GIB  # 30 GiB still to fetch
    assert check_disk(_disk_settings(), _small_data_disk(55), total, present_bytes=present) == []  # 30 + 20 headroom
    problems = check_disk(_disk_settings(), _small_data_disk(45), total, present_bytes=present)
    assert len(problems) == 1 and "need 30.0 GiB + 20 GiB headroom" in problems[0]
    assert weights_on_host({**check, "partial_bytes": 90 * GIB}, "abc", total) == total  # never more than the total
