"""Generate a tiny model repo of several safetensors shards (tens of MB), cached by content key.

    python -m tests.hfmirror.repo          # build (or reuse) it; prints its directory

The repo holds the tiny MiniMax-M2-architecture config of tests/fixtures
(config.json, tokenizer files), a `model.safetensors.index.json` and
`SHARDS` valid safetensors files of random uint8 tensors (seeded: the same
bytes on every machine). `manifest(repo_dir)` gives what a hub knows of each
file: size, git blob sha1 and, for LFS files (the shards), sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "tiny-minimax-m2"
CACHE = Path(os.environ.get("VLLM_FLEET_CACHE", Path.home() / ".cache" / "vllm-fleet"))
REPO_ID = "fleet-test/tiny-minimax-m2-shards"
SHARDS = 4
SHARD_BYTES = 6 * 1024 * 1024
SEED = 5
LFS_SUFFIXES = (".safetensors", ".bin", ".pt")


@dataclass(frozen=True)
class RepoFile:
    """One file of the repo as a hub describes it."""

    name: str
    size: int
    blob_sha1: str  # git blob id (of the file, or of its LFS pointer for LFS files)
    sha256: str | None  # LFS files only

    @property
    def lfs(self) -> bool:
        return self.sha256 is not None


def _safetensors_header(size: int, name: str) -> bytes:
    """The safetensors header of one uint8 tensor of `size` bytes."""
    header = json.dumps({name: {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


def _safetensors(tensor_bytes: bytes, name: str) -> bytes:
    return _safetensors_header(len(tensor_bytes), name) + tensor_bytes


def _key() -> str:
    h = hashlib.sha256(repr((SHARDS, SHARD_BYTES, SEED, 1)).encode())
    for p in sorted(FIXTURE.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:12]


def build(shards: int = SHARDS, shard_bytes: int = SHARD_BYTES, cache: Path | None = None) -> Path:
    """Write the repo once into the cache (atomic rename); return its directory.

    + cache: where (default: VLLM_FLEET_CACHE or ~/.cache/vllm-fleet); the benchmark's large repo goes elsewhere
    """
    cache = cache or CACHE
    out = cache / f"hfmirror-repo-{_key()}-{shards}x{shard_bytes}"
    if out.is_dir():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(FIXTURE, tmp)
    rng = random.Random(SEED)
    weight_map = {}
    for i in range(1, shards + 1):
        fname = f"model-{i:05d}-of-{shards:05d}.safetensors"
        tensor = f"model.layers.{i - 1}.weight"
        if shard_bytes <= 64 * 1024 * 1024:
            (tmp / fname).write_bytes(_safetensors(rng.randbytes(shard_bytes), tensor))
        else:  # large shards (benchmarks): random blocks written as they are made, not held in memory
            block = 16 * 1024 * 1024
            with (tmp / fname).open("wb") as out_fh:
                out_fh.write(_safetensors_header(shard_bytes, tensor))
                for _ in range(shard_bytes // block):
                    out_fh.write(rng.randbytes(block))
                out_fh.write(rng.randbytes(shard_bytes % block))
        weight_map[tensor] = fname
    index = {"metadata": {"total_size": shards * shard_bytes}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cache.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob with these bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The text git stores for an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def manifest(repo_dir: Path) -> list[RepoFile]:
    """What a hub reports for every file of `repo_dir` (sorted by name)."""
    out = []
    for p in sorted(q for q in repo_dir.rglob("*") if q.is_file()):
        name = p.relative_to(repo_dir).as_posix()
        if name.endswith(LFS_SUFFIXES):
            h, size = hashlib.sha256(), 0
            with p.open("rb") as fh:
                for chunk in iter(lambda: fh.read(8 * 1024 * 1024), b""):
                    h.update(chunk)
                    size += len(chunk)
            sha = h.hexdigest()
            out.append(RepoFile(name, size, git_blob_sha1(lfs_pointer(sha, size)), sha))
        else:
            data = p.read_bytes()
            out.append(RepoFile(name, len(data), git_blob_sha1(data), None))
    return out


def commit_of(files: list[RepoFile]) -> str:
    """A stable 40-hex commit id for this content."""
    return hashlib.sha1(json.dumps([(f.name, f.blob_sha1) for f in files]).encode()).hexdigest()


if __name__ == "__main__":
    print(build())
