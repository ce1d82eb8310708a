"""The sha256 manifest of a wheelhouse on the control machine, cached across runs (pure: no pyinfra).

Hashing a 218 MB wheelhouse on every deploy costs seconds; the digests are kept in
``wheel-digests.json`` under the toolkit's cache directory (`cache_file`: ``$VLLM_FLEET_CACHE``,
else ``$XDG_CACHE_HOME/vllm-fleet``, else ``~/.cache/vllm-fleet``), never in the wheelhouse itself
(it may be read-only). An entry is keyed by the wheel's absolute path and stamped with its size and
mtime_ns: a wheel whose stamp changed is hashed again. A missing, unreadable or corrupted cache file
is ignored (everything is hashed), and a cache that cannot be written only costs the next run a rehash.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

CACHE_NAME = "wheel-digests.json"
VERSION = 1


def cache_file() -> Path:
    """Where the digests are kept on the control machine."""
    if os.environ.get("VLLM_FLEET_CACHE"):
        base = Path(os.environ["VLLM_FLEET_CACHE"])
    elif os.environ.get("XDG_CACHE_HOME"):
        base = Path(os.environ["XDG_CACHE_HOME"]) / "vllm-fleet"
    else:
        base = Path.home() / ".cache" / "vllm-fleet"
    return base / CACHE_NAME


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load(path: Path) -> dict[str, dict]:
    """The cached entries ({abs path: {size, mtime_ns, sha256}}); {} for anything but a well-formed file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("wheels"), dict):
        return {}
    return {k: v for k, v in data["wheels"].items()
            if isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("mtime_ns"), int)
            and isinstance(v.get("sha256"), str) and len(v["sha256"]) == 64}


def _store(path: Path, wheels: dict[str, dict]) -> None:
    """Write the cache atomically (a temp file renamed over it); a failure is not an error."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".wheel-digests.", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump({"version": VERSION, "wheels": wheels}, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def local_manifest(directory: str | Path, cache: Path | None = None) -> dict[str, dict[str, object]]:
    """sha256 and size of every wheel in `directory` ({file name: {"sha256", "size"}}), hashing only the wheels
    whose (absolute path, size, mtime_ns) is not in the cache.

    + cache: the cache file (default `cache_file()`)
    """
    cache = cache if cache is not None else cache_file()
    root = Path(directory).resolve()
    known = _load(cache)
    fresh = dict(known)
    out: dict[str, dict[str, object]] = {}
    for wheel in sorted(root.glob("*.whl")):
        st = wheel.stat()
        key = str(wheel)
        entry = known.get(key)
        if entry is None or (entry["size"], entry["mtime_ns"]) != (st.st_size, st.st_mtime_ns):
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_of(wheel)}
            fresh[key] = entry
        out[wheel.name] = {"sha256": entry["sha256"], "size": st.st_size}
    for key in [k for k in fresh if Path(k).parent == root and Path(k).name not in out]:
        del fresh[key]  # wheels gone from this wheelhouse
    if fresh != known:
        _store(cache, fresh)
    return out
