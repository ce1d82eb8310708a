"""The wheelhouse manifest's digests are cached across runs, keyed by (absolute path, size, mtime_ns)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from vllm_fleet.pyenv import wheeldigest
from vllm_fleet.pyenv.wheeldigest import cache_file, local_manifest


@pytest.fixture
def house(tmp_path: Path) -> Path:
    d = tmp_path / "wheelhouse"
    d.mkdir()
    (d / "a-1.0-py3-none-any.whl").write_bytes(b"wheel a")
    (d / "b-2.0-py3-none-any.whl").write_bytes(b"wheel b")
    (d / "notes.txt").write_text("not a wheel")
    return d


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """The names of the files hashed (every read of a wheel's bytes goes through sha256_of)."""
    seen: list[str] = []
    real = wheeldigest.sha256_of

    def counting(path: Path) -> str:
        seen.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(wheeldigest, "sha256_of", counting)
    return seen


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_manifest_lists_every_wheel_with_sha256_and_size(house, tmp_path, hashed):
    got = local_manifest(house, cache=tmp_path / "c" / "wheel-digests.json")
    assert got == {"a-1.0-py3-none-any.whl": {"sha256": _sha(b"wheel a"), "size": 7},
                   "b-2.0-py3-none-any.whl": {"sha256": _sha(b"wheel b"), "size": 7}}
    assert sorted(hashed) == ["a-1.0-py3-none-any.whl", "b-2.0-py3-none-any.whl"]


def test_second_call_hashes_nothing(house, tmp_path, hashed):
    cache = tmp_path / "c" / "wheel-digests.json"
    first = local_manifest(house, cache=cache)
    hashed.clear()
    assert local_manifest(house, cache=cache) == first
    assert hashed == []
    data = json.loads(cache.read_text())
    assert set(data["wheels"]) == {str((house / n).resolve()) for n in first}


def test_a_touched_wheel_is_rehashed(house, tmp_path, hashed):
    cache = tmp_path / "wheel-digests.json"
    local_manifest(house, cache=cache)
    hashed.clear()
    wheel = house / "a-1.0-py3-none-any.whl"
    st = wheel.stat()
    os.utime(wheel, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert local_manifest(house, cache=cache)["a-1.0-py3-none-any.whl"]["sha256"] == _sha(b"wheel a")
    assert hashed == ["a-1.0-py3-none-any.whl"]
    hashed.clear()
    wheel.write_bytes(b"wheel a, rebuilt")  # new content, new size and mtime
    assert local_manifest(house, cache=cache)["a-1.0-py3-none-any.whl"] == {"sha256": _sha(b"wheel a, rebuilt"), "size": 16}
    assert hashed == ["a-1.0-py3-none-any.whl"]


def test_a_removed_wheel_leaves_the_manifest_and_the_cache(house, tmp_path):
    cache = tmp_path / "wheel-digests.json"
    local_manifest(house, cache=cache)
    (house / "b-2.0-py3-none-any.whl").unlink()
    assert list(local_manifest(house, cache=cache)) == ["a-1.0-py3-none-any.whl"]
    assert [Path(k).name for k in json.loads(cache.read_text())["wheels"]] == ["a-1.0-py3-none-any.whl"]


@pytest.mark.parametrize("content", ["{not json", "[]", '{"version": 1, "wheels": []}', '{"version": 99, "wheels": {}}',
                                     '{"version": 1, "wheels": {"X": {"size": "7"}}}'])
def test_a_corrupted_cache_is_ignored_and_rewritten(house, tmp_path, hashed, content):
    cache = tmp_path / "wheel-digests.json"
    cache.write_text(content)
    got = local_manifest(house, cache=cache)
    assert got["b-2.0-py3-none-any.whl"]["sha256"] == _sha(b"wheel b") and len(hashed) == 2
    hashed.clear()
    assert local_manifest(house, cache=cache) == got and hashed == []  # rewritten well-formed


def test_a_cache_entry_with_a_wrong_digest_for_the_same_stamp_is_trusted_only_by_stamp(house, tmp_path):
    """The stamp is the contract: an entry is reused while (path, size, mtime_ns) match."""
    cache = tmp_path / "wheel-digests.json"
    local_manifest(house, cache=cache)
    data = json.loads(cache.read_text())
    key = str((house / "a-1.0-py3-none-any.whl").resolve())
    data["wheels"][key]["sha256"] = "0" * 64
    cache.write_text(json.dumps(data))
    assert local_manifest(house, cache=cache)["a-1.0-py3-none-any.whl"]["sha256"] == "0" * 64


def test_a_missing_or_unwritable_cache_only_costs_a_rehash(house, tmp_path, hashed):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = blocker / "sub" / "wheel-digests.json"  # its parent cannot be created
    assert len(local_manifest(house, cache=cache)) == 2
    assert len(local_manifest(house, cache=cache)) == 2 and len(hashed) == 4


def test_cache_file_location(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_FLEET_CACHE", str(tmp_path / "fleet"))
    assert cache_file() == tmp_path / "fleet" / "wheel-digests.json"
    monkeypatch.delenv("VLLM_FLEET_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_file() == tmp_path / "xdg" / "vllm-fleet" / "wheel-digests.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert cache_file() == tmp_path / "h" / ".cache" / "vllm-fleet" / "wheel-digests.json"
