#!/usr/bin/env python3
"""vllm-fleet-fetch: download a model's weights on the host, resumable byte by byte and verified.

Installed by vllm_fleet/weights/step.py as ``{base_dir}/fetch/fetch_weights.py`` and run
by the systemd unit ``{service_name}-fetch.service`` with the small venv
``{base_dir}/fetch/venv`` (huggingface_hub; modelscope when present). The
unit, not the SSH session, owns the download: a dropped deploy leaves it
running, and the next deploy attaches to it.

    python fetch_weights.py run   CONFIG   # the worker (what the unit runs)
    python3 fetch_weights.py check CONFIG  # JSON: is the recorded download complete and unchanged? (stdlib only)
    python3 fetch_weights.py prune CONFIG  # remove the toolkit's weights of revisions no unit uses (stdlib only)

CONFIG (JSON, written by the deploy, no secret in it; the HF token comes from
the unit's EnvironmentFile as HF_TOKEN):
``{"identity", "dest", "state_dir", "marker", "revisions_root", "states_root", "keep_units",
"sources": [{"kind", "repo", "endpoint", "revision", "path"}], "retries", "backoff_s", "backoff_max_s",
"workers", "headroom_bytes", "verify": "stat"|"full"}``

The worker: for each source in order (retrying each with exponential backoff)
lists the files of the pinned revision with their sizes and sha256 (LFS) or
git blob ids (huggingface_hub / modelscope_hub: listing, endpoint, auth
headers), checks the files already in ``dest`` (by the recorded stat, or by
hashing, in parallel, when the stat changed or ``verify`` is "full"),
hard-links files with the same digest from the toolkit's other revisions,
checks free disk for what is still to fetch (partials counted), and downloads
the rest itself with HTTP Range requests: each file goes to
``dest/.partial/NAME`` beside a small JSON naming the content it is for
(size, sha256 / blob id, ETag), so a killed, rebooted or disconnected run
continues every partial file from its last byte (``Range`` + ``If-Range``)
unless the file changed upstream; the digest is computed while the bytes
arrive, and a file reaches its final name (atomic rename) only verified.
At the end: leftovers removed, the verification state recorded, the
``marker`` written (the vLLM unit asserts it: it never starts on incomplete or
unverified weights), and the toolkit's other revisions that neither the unit
nor its last known good copy (``keep_units``) uses are removed. Progress goes
to ``{state_dir}/status.json`` every second: bytes of this model on disk,
rate over the last 10 s, ETA, files done/total; and ``changed``: whether this run changed any byte of the
revision's files (fetched, hard-linked or removed a file: a re-verify that finds every file good changes nothing,
and the deploy then does not restart vLLM for the weights).

Exit codes: 0 complete; 1 every source failed; 2 usage; 3 another worker holds the lock;
4 not enough disk.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional
from urllib.parse import quote_plus

STATE = "state.json"
STATUS = "status.json"
LOCK = "fetch.lock"
PARTIAL_DIR = ".partial"  # in dest: NAME (the bytes so far) + NAME.json (what content they are of)
HASH_CHUNK = 8 * 1024 * 1024
READ_BYTES = 256 * 1024  # one read into the reused buffer, one write, one hash update (a kill loses at most this)
TIMEOUT_S = 60.0  # a connection that sends nothing for this long is dropped and resumed
FILE_ATTEMPTS = 8  # tries in a row without a new byte of one file (each resumes) before the source attempt fails
FILE_BACKOFF_S = 1.0  # wait before the 2nd such try; doubled each time, at most FILE_BACKOFF_MAX_S (1+2+4+...: ~90 s)
FILE_BACKOFF_MAX_S = 30.0
RATE_WINDOW_S = 10.0
MODELSCOPE_ENDPOINT = "https://www.modelscope.cn"


# ------------------------------------------------------------------ pure --

@dataclass(frozen=True)
class RemoteFile:
    """One file of the revision as the source describes it."""

    name: str
    size: int
    sha256: Optional[str] = None  # LFS files
    blob_sha1: Optional[str] = None  # git blob id of small (non-LFS) files


@dataclass(frozen=True)
class Listing:
    """What one source says the pinned revision holds."""

    source_index: int
    commit: str
    files: tuple  # of RemoteFile

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class Stat:
    """What `os.stat` says of a file; a change means the file must be hashed again."""

    size: int
    mtime_ns: int
    ino: int


def file_stat(path: str) -> Optional[Stat]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return Stat(st.st_size, st.st_mtime_ns, st.st_ino)


def new_hasher(f: RemoteFile):
    """The hash the file's digest is checked with: sha256 (LFS), git blob sha1 (small files), or None."""
    if f.sha256:
        return hashlib.sha256()
    if f.blob_sha1:
        h = hashlib.sha1()
        h.update(b"blob %d\0" % f.size)
        return h
    return None


def hash_prefix(h, path: str, length: int, on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """Feed the first `length` bytes of `path` into `h`."""
    with open(path, "rb") as fh:
        left = length
        while left > 0:
            chunk = fh.read(min(HASH_CHUNK, left))
            if not chunk:
                raise OSError(f"{path} is shorter than {length} bytes")
            h.update(chunk)
            left -= len(chunk)
            on_bytes(len(chunk))


def digest(path: str, kind: str, on_bytes: Callable[[int], None] = lambda n: None) -> str:
    """sha256 of the file, or its git blob sha1 (kind "blob")."""
    size = os.path.getsize(path)
    h = new_hasher(RemoteFile("", size, sha256="-" if kind == "sha256" else None, blob_sha1="-" if kind == "blob" else None))
    hash_prefix(h, path, size, on_bytes)
    return h.hexdigest()


def digest_problem(f: RemoteFile, got: Optional[str]) -> Optional[str]:
    """None when `got` is the file's expected digest (or the source gives none), else what is wrong."""
    want = f.sha256 or f.blob_sha1
    if want is None or got == want:
        return None
    return f"{'sha256' if f.sha256 else 'git blob'} {(got or '')[:12]}... != {want[:12]}..."


def verify_file(path: str, f: RemoteFile, on_bytes: Callable[[int], None] = lambda n: None) -> Optional[str]:
    """None when the file has the source's size and digest, else what is wrong."""
    st = file_stat(path)
    if st is None:
        return "missing"
    if st.size != f.size:
        return f"size {st.size} != {f.size}"
    if not (f.sha256 or f.blob_sha1):
        return None
    return digest_problem(f, digest(path, "sha256" if f.sha256 else "blob", on_bytes))


def recorded_ok(state: dict, f: RemoteFile, st: Optional[Stat]) -> bool:
    """The state records this exact file (same digest) as verified, with the same stat now."""
    rec = (state.get("files") or {}).get(f.name)
    if not rec or st is None:
        return False
    return (rec.get("size") == f.size == st.size and rec.get("mtime_ns") == st.mtime_ns and rec.get("ino") == st.ino
            and rec.get("sha256") == f.sha256 and rec.get("blob_sha1") == f.blob_sha1)


def record(st: Stat, f: RemoteFile) -> dict:
    """What state.json keeps of one verified file."""
    return {**asdict(st), "sha256": f.sha256, "blob_sha1": f.blob_sha1}


# -- partial files ----------------------------------------------------------------

def partial_paths(dest: str, name: str) -> tuple:
    """(partial file, its JSON) of file `name` in dest."""
    part = os.path.join(dest, PARTIAL_DIR, name)
    return part, part + ".json"


def expected(f: RemoteFile) -> dict:
    """What a partial's JSON must name for its bytes to be continued: the content of the file as listed."""
    return {"size": f.size, "sha256": f.sha256, "blob_sha1": f.blob_sha1}


def resumable(dest: str, f: RemoteFile) -> int:
    """Bytes of f's partial a download continues from: 0 when there is none, or when it was begun for other content
    (the file changed upstream: another sha256 / size) or is longer than the file."""
    part, side = partial_paths(dest, f.name)
    try:
        size = os.path.getsize(part)
    except OSError:
        return 0
    if read_json(side, {}).get("expect") != expected(f) or size > f.size:
        return 0
    return size


def drop_partial(dest: str, name: str) -> None:
    for p in partial_paths(dest, name):
        try:
            os.remove(p)
        except OSError:
            pass


def stale_partials(dest: str, listing: Listing) -> list:
    """Names of partials in dest that no download will continue: of files the revision does not have, or begun for
    other content than the listing's."""
    root = os.path.join(dest, PARTIAL_DIR)
    by_name = {f.name: f for f in listing.files}
    out = []
    for d, _, names in os.walk(root):
        for n in names:
            if n.endswith(".json"):
                continue
            name = os.path.relpath(os.path.join(d, n), root)
            f = by_name.get(name)
            if f is None or resumable(dest, f) == 0:
                out.append(name)
    return sorted(out)


# -- the state the deploy reads ---------------------------------------------------

def check_state(config: dict, state: dict) -> dict:
    """Whether `state` records a complete download for `config`'s identity that the disk still matches (no hashing).

    Also ``verified_bytes``: the bytes of the recorded files (for this identity, complete or
    not) whose stat still matches what was verified, i.e. weights already on the disk that a
    download will keep, and ``partial_bytes``: the bytes of this revision's partial files a download
    continues (`partial_bytes`); the planning-time disk check subtracts both (vllm_fleet/preflight);
    and ``leftovers``: the toolkit's weights of other revisions, with what `prune` does with each.
    """
    problems = []
    verified = partial = 0
    if state.get("identity") == config["identity"]:
        for name, rec in (state.get("files") or {}).items():
            st = file_stat(os.path.join(config["dest"], name))
            if st is not None and (st.size, st.mtime_ns, st.ino) == (rec.get("size"), rec.get("mtime_ns"), rec.get("ino")):
                verified += st.size
        partial = partial_bytes(config["dest"])
    if state.get("identity") != config["identity"]:
        problems.append("no complete download recorded for this model and revision")
    elif not state.get("complete"):
        problems.append("the recorded download is not complete")
    else:
        for name, rec in sorted((state.get("files") or {}).items()):
            st = file_stat(os.path.join(config["dest"], name))
            if st is None:
                problems.append(f"{name} is missing")
            elif (st.size, st.mtime_ns, st.ino) != (rec.get("size"), rec.get("mtime_ns"), rec.get("ino")):
                problems.append(f"{name} changed since it was verified")
        if not os.path.isfile(os.path.join(config["dest"], "config.json")):
            problems.append("config.json is missing")
        if config.get("marker") and not os.path.isfile(config["marker"]):
            problems.append(f"{config['marker']} (complete and verified) is missing")
    if config.get("verify") == "full":
        problems.append("a full re-verification is asked for (vllm_weights_reverify)")
    return {"complete": not problems, "commit": state.get("commit"), "source": state.get("source"), "problems": problems,
            "identity": config["identity"], "verified_bytes": verified, "partial_bytes": partial,
            "leftovers": leftovers(config)}


def partial_bytes(dest: str) -> int:
    """Bytes in dest's partial files that a download can continue (no listing here: those whose JSON names the content
    and that are not longer than it; the worker drops partials of changed content before it fetches)."""
    root, total = os.path.join(dest, PARTIAL_DIR), 0
    for d, _, names in os.walk(root):
        for n in names:
            if n.endswith(".json"):
                continue
            part = os.path.join(d, n)
            want = (read_json(part + ".json", {}).get("expect") or {}).get("size")
            try:
                size = os.path.getsize(part)
            except OSError:
                continue
            if isinstance(want, int) and size <= want:
                total += size
    return total


# -- other revisions: what the units use, what is left over ------------------------

def revisions_in_use(unit_paths: list, root: str) -> Optional[dict]:
    """{revision directory name (or "" for `root` itself, the layout before per-revision directories): the unit file
    naming it} for the units that exist; None when one exists but cannot be read (then nothing may be removed)."""
    used: dict = {}
    pattern = re.compile(re.escape(root.rstrip("/")) + r'(?:/([^/\s"\']+))?/?(?=[\s"\']|$)', re.M)
    for path in unit_paths:
        try:
            with open(path) as fh:
                text = fh.read()
        except FileNotFoundError:
            continue
        except OSError:
            return None
        for m in pattern.finditer(text):
            used.setdefault(m.group(1) or "", path)
    return used


def _freed_bytes(paths) -> int:
    """Bytes removing these files frees: files with no other hard link (a revision shares unchanged files)."""
    total = 0
    for p in paths:
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if st.st_nlink <= 1:
            total += st.st_size
    return total


def _tree_files(d: str) -> list:
    return [os.path.join(a, n) for a, _, names in os.walk(d) for n in names]


def leftovers(config: dict) -> list:
    """The toolkit's weights of other revisions of this repo (those with a state directory under ``states_root``, and the
    files recorded by the layout before per-revision directories), each with ``remove`` and why: kept while the unit or
    its last known good copy (``keep_units``) serves from it."""
    root, states, own = config.get("revisions_root"), config.get("states_root"), os.path.basename(config["dest"].rstrip("/"))
    if not root or not states or not os.path.isdir(states) or os.path.normpath(config["dest"]) == os.path.normpath(root):
        return []  # (a config of the layout before per-revision directories prunes nothing)
    used = revisions_in_use(config.get("keep_units") or [], root)
    out = []

    def verdict(key: str) -> tuple:
        if used is None:
            return False, "kept: a unit file of keep_units cannot be read"
        if key in used:
            return False, f"kept: {used[key]} uses it"
        return True, "no unit and no last known good unit uses it"

    for key in sorted(os.listdir(states)):
        sd = os.path.join(states, key)
        if key == own or not os.path.isdir(sd):
            continue
        d = os.path.join(root, key)
        remove, why = verdict(key)
        out.append({"path": d, "state": sd, "bytes": _freed_bytes(_tree_files(d)), "remove": remove, "why": why})
    flat = read_json(os.path.join(states, STATE), {})
    names = [n for n in (flat.get("files") or {}) if os.path.isfile(os.path.join(root, n))]
    if names:
        remove, why = verdict("")
        out.append({"path": root, "state": os.path.join(states, STATE), "files": sorted(names),
                    "bytes": _freed_bytes(os.path.join(root, n) for n in names), "remove": remove, "why": why})
    return out


def prune(config: dict, log: Callable[[str], None]) -> list:
    """Remove the leftovers `leftovers` marks for removal (re-reading the unit files now); return all of them."""
    found = leftovers(config)
    for item in found:
        gib = item["bytes"] / 1024 ** 3
        if not item["remove"]:
            log(f"other revision {item['path']} ({gib:.2f} GiB of its own): {item['why']}")
            continue
        log(f"removing the weights of another revision {item['path']} ({gib:.2f} GiB): {item['why']}")
        if "files" in item:  # the layout before per-revision directories: only the files it recorded
            for n in item["files"]:
                try:
                    os.remove(os.path.join(item["path"], n))
                except OSError:
                    pass
            shutil.rmtree(os.path.join(item["path"], ".cache"), ignore_errors=True)
            for n in (STATE, STATUS, "fetch.json"):
                try:
                    os.remove(os.path.join(os.path.dirname(item["state"]), n))
                except OSError:
                    pass
        else:
            shutil.rmtree(item["path"], ignore_errors=True)
            shutil.rmtree(item["state"], ignore_errors=True)
    return found


def backoff_delays(retries: int, base: float, cap: float) -> list:
    """Seconds to wait before attempts 2..retries of one source: base, 2*base, 4*base, ... capped."""
    return [min(cap, base * 2 ** i) for i in range(max(0, retries - 1))]


def progress_line(done: int, total: int, rate: float, files_done: Optional[int] = None,
                  files_total: Optional[int] = None) -> str:
    """`12.0/24.0 MiB (50.0%), 3.0 MiB/s, ETA 4 s, files 2/6`."""
    mib = 1024 * 1024
    pct = 100.0 * done / total if total else 100.0
    eta = f"{(total - done) / rate:.0f} s" if rate > 0 and done < total else ("-" if done < total else "0 s")
    files = f", files {files_done}/{files_total}" if files_total is not None else ""
    return f"{done / mib:.1f}/{total / mib:.1f} MiB ({pct:.1f}%), {rate / mib:.1f} MiB/s, ETA {eta}{files}"


def read_json(path: str, default: dict) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return default


def write_json(path: str, obj: dict) -> None:
    """Atomically replace `path` (a reader never sees half a file)."""
    tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


# ------------------------------------------------------------------ transfer --

class SourceError(Exception):
    """A source did not answer, or answered wrongly."""


class DiskFull(Exception):
    """Not enough free disk for what is missing."""


def _request(url: str, headers: dict, start: int, etag: Optional[str], timeout: float):
    """GET `url` from byte `start` (``Range`` + ``If-Range`` when resuming). The token header is not forwarded when
    the hub redirects to its storage (a signed URL)."""
    req = urllib.request.Request(url)
    for k, v in headers.items():
        if k.lower() == "authorization":
            req.add_unredirected_header(k, v)
        else:
            req.add_header(k, v)
    if start:
        req.add_header("Range", f"bytes={start}-")
        if etag and not etag.startswith("W/"):
            req.add_header("If-Range", etag)
    return urllib.request.urlopen(req, timeout=timeout)


def _range_start(resp) -> Optional[int]:
    m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range") or "")
    return int(m.group(1)) if m else None


def http_fetch(url: str, headers: dict, f: RemoteFile, dest: str, on_bytes: Callable[[int, int], None],
               timeout: float = TIMEOUT_S) -> int:
    """Put one file into dest over HTTP, continuing its partial from its last byte; return the bytes received.

    The partial is continued only when its JSON names the listed content (size, sha256 / blob id) and the server
    answers the ``Range`` with a 206 from that byte (with ``If-Range``, a file whose ETag changed comes back whole,
    200, and starts over). The digest is computed as the bytes arrive (the partial's bytes first); only a verified file
    is renamed to its final name, so a served file is never half-written.

    + on_bytes: called with (bytes on disk of this file, bytes just received)
    """
    part, side = partial_paths(dest, f.name)
    os.makedirs(os.path.dirname(part), exist_ok=True)
    have = resumable(dest, f)
    if not have:
        drop_partial(dest, f.name)
    meta = read_json(side, {}) if have else {}
    h = new_hasher(f)
    if have and h is not None:
        hash_prefix(h, part, have)
    on_bytes(have, 0)
    got = 0
    if have < f.size:
        resp = _request(url, headers, have, meta.get("etag"), timeout)
        try:
            if have and (resp.status != 206 or _range_start(resp) != have):
                # The server sends the file whole (it changed, or ranges are not served): start over.
                if resp.status != 200:
                    resp.close()
                    resp = _request(url, headers, 0, None, timeout)
                have, h = 0, new_hasher(f)
                on_bytes(0, 0)
            etag = resp.headers.get("X-Linked-Etag") or resp.headers.get("ETag")
            write_json(side, {"expect": expected(f), "etag": etag})
            buf = bytearray(READ_BYTES)  # one buffer per transfer, reused: no allocation (and page faults) per read
            view = memoryview(buf)
            with open(part, "r+b" if have else "wb", buffering=0) as out:
                out.seek(have)
                out.truncate()
                while True:
                    # readinto: up to READ_BYTES into the reused buffer; the write and the hash release the GIL.
                    # A kill loses at most one buffer plus what the kernel held.
                    n = resp.readinto(view)
                    if not n:
                        break
                    chunk = view[:n]
                    rest = chunk
                    while rest:  # a raw write may be short
                        rest = rest[out.write(rest):]
                    if h is not None:
                        h.update(chunk)
                    have += n
                    got += n
                    on_bytes(have, n)
                    if have > f.size:
                        break
                out.flush()
                os.fsync(out.fileno())
        finally:
            resp.close()
        if have != f.size:
            if have > f.size:
                drop_partial(dest, f.name)
            raise SourceError(f"{f.name}: the transfer ended at byte {have} of {f.size}")
    problem = digest_problem(f, h.hexdigest() if h is not None else None)
    if problem is not None:
        drop_partial(dest, f.name)
        raise SourceError(f"{f.name} failed verification ({problem}); its partial is removed")
    final = os.path.join(dest, f.name)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    os.replace(part, final)
    drop_partial(dest, f.name)
    return got


def retryable(exc: BaseException) -> bool:
    """A failure of one file worth resuming at once: a dropped or timed-out connection, a 5xx, 408 or 429."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code in (408, 429)
    return isinstance(exc, (OSError, http.client.HTTPException, SourceError))


# ------------------------------------------------------------------ sources --

def list_files(src: dict, index: int, token: Optional[str]) -> Listing:
    """Ask one source for the revision's commit and files (sizes, sha256 / blob ids)."""
    kind = src["kind"]
    if kind == "hf":
        from huggingface_hub import HfApi

        info = HfApi(endpoint=src.get("endpoint") or None, token=token or False).model_info(
            src["repo"], revision=src.get("revision") or "main", files_metadata=True)
        files = tuple(RemoteFile(s.rfilename, int(s.lfs.size if s.lfs else s.size),
                                 s.lfs.sha256 if s.lfs else None, None if s.lfs else s.blob_id)
                      for s in info.siblings or [])
        return Listing(index, info.sha, files)
    if kind == "modelscope":
        return modelscope_listing(_modelscope_api(src).list_repo_files(
            src["repo"], "model", revision=src.get("revision") or MODELSCOPE_REVISION, recursive=True),
            index, src.get("revision") or MODELSCOPE_REVISION)
    if kind == "local":
        root = src["path"]
        if not os.path.isfile(os.path.join(root, "config.json")):
            raise SourceError(f"{root} holds no config.json")
        files = []
        for d, _, names in os.walk(root):
            for n in names:
                p = os.path.join(d, n)
                rel = os.path.relpath(p, root)
                if not rel.startswith("."):
                    files.append(RemoteFile(rel, os.path.getsize(p), digest(p, "sha256")))
        return Listing(index, "local", tuple(sorted(files, key=lambda f: f.name)))
    raise SourceError(f"unknown source kind {kind!r}")


MODELSCOPE_REVISION = "master"


def _modelscope_api(src: dict):
    """The ModelScope client for one source (optional: only installed when a ModelScope source is configured).

    modelscope 1.40's ``modelscope.hub.api`` is a shim over ``modelscope_hub`` (its required dependency)
    whose legacy ``get_model_files`` drops the Sha256 the hub lists; ``modelscope_hub.api.HubApi`` keeps it.
    The endpoint is passed explicitly (else MODELSCOPE_ENDPOINT / MODELSCOPE_DOMAIN / www.modelscope.cn).
    """
    from modelscope_hub.api import HubApi

    return HubApi(endpoint=src.get("endpoint") or None)


def modelscope_listing(items, index: int, revision: str) -> Listing:
    """A Listing from modelscope_hub's FileInfo entries (or dicts of the same fields): files only, with sizes and sha256.

    A file without a sha256 in the listing cannot be verified by digest; the hub lists one for every
    file, so its absence is an error rather than a silent size-only check.
    """
    files = []
    for i in items:
        get = (lambda k: i.get(k)) if isinstance(i, dict) else (lambda k: getattr(i, k, None))
        if (get("type") or "blob") == "tree":
            continue
        sha = (get("sha256") or "").lower() or None
        if not sha or len(sha) != 64:
            raise SourceError(f"the ModelScope listing gives no sha256 for {get('path')!r}: cannot verify it")
        files.append(RemoteFile(get("path"), int(get("size")), sha))
    return Listing(index, revision, tuple(sorted(files, key=lambda f: f.name)))


def modelscope_endpoint(src: dict) -> str:
    """The source's endpoint, else what modelscope_hub defaults to (MODELSCOPE_ENDPOINT / MODELSCOPE_DOMAIN)."""
    if src.get("endpoint"):
        return src["endpoint"].rstrip("/")
    if os.environ.get("MODELSCOPE_ENDPOINT"):
        return os.environ["MODELSCOPE_ENDPOINT"].rstrip("/")
    if os.environ.get("MODELSCOPE_DOMAIN"):
        return "https://" + os.environ["MODELSCOPE_DOMAIN"].strip("/")
    return MODELSCOPE_ENDPOINT


def file_url(src: dict, listing: Listing, f: RemoteFile) -> str:
    """Where the source serves one file of the revision: HF ``{endpoint}/{repo}/resolve/{commit}/{file}`` (huggingface_hub's
    ``hf_hub_url``, which knows HF_ENDPOINT); ModelScope ``{endpoint}/api/v1/models/{repo}/repo?Revision=&FilePath=``
    (modelscope_hub's ``get_download_url`` pattern)."""
    if src["kind"] == "hf":
        from huggingface_hub import hf_hub_url

        return hf_hub_url(src["repo"], f.name, revision=listing.commit, endpoint=src.get("endpoint") or None)
    return (f"{modelscope_endpoint(src)}/api/v1/models/{src['repo']}/repo"
            f"?Revision={quote_plus(listing.commit)}&FilePath={quote_plus(f.name)}")


def request_headers(src: dict, token: Optional[str]) -> dict:
    """HTTP headers of a file request: huggingface_hub's (user agent, ``Authorization`` from the token) for HF."""
    if src["kind"] == "hf":
        from huggingface_hub.utils import build_hf_headers

        return dict(build_hf_headers(token=token or False))
    return {"User-Agent": "vllm-fleet-fetch"}


def fetch_file(src: dict, listing: Listing, f: RemoteFile, dest: str, token: Optional[str],
               on_bytes: Callable[[int, int], None] = lambda have, n: None) -> int:
    """Put one file into dest from the source (hub sources: `http_fetch`, resuming its partial); return bytes received."""
    if src["kind"] in ("hf", "modelscope"):
        return http_fetch(file_url(src, listing, f), request_headers(src, token), f, dest, on_bytes)
    target = os.path.join(dest, f.name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copyfile(os.path.join(src["path"], f.name), target + ".incomplete")
    os.replace(target + ".incomplete", target)
    on_bytes(f.size, f.size)
    return f.size


# ------------------------------------------------------------------ worker --

@dataclass
class Progress:
    """Shared by the download threads and the status writer."""

    total: int = 0
    files_total: int = 0
    files_done: int = 0
    verified: int = 0  # bytes of files that are verified (kept, linked or fetched)
    partial: dict = field(default_factory=dict)  # name -> bytes on disk of its partial (resumable or in flight)
    fetched: int = 0  # bytes received in this run
    to_hash: int = 0
    hashed: int = 0
    phase: str = "starting"
    source: str = ""
    error: str = ""
    refetched_files: list = field(default_factory=list)
    changed_files: list = field(default_factory=list)  # files of dest whose bytes this run changed (fetched, linked, removed)
    unmarked: bool = False  # the marker was absent at the start: an earlier run began changing files and did not finish
    leftovers: list = field(default_factory=list)
    samples: list = field(default_factory=list)  # (time, bytes received)


class Worker:
    """One run of the download for one CONFIG (what the unit executes)."""

    def __init__(self, config: dict, *, sleep: Callable[[float], None] = time.sleep, log: Callable[[str], None] = None):
        self.c = config
        self.dest = config["dest"]
        self.state_dir = config["state_dir"]
        self.token = os.environ.get("HF_TOKEN") or None
        self.sleep = sleep
        self.log = log or (lambda m: print(m, flush=True))
        self.p = Progress()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # status ------------------------------------------------------------
    def done_bytes(self) -> int:
        """Bytes of this model's files on disk for this revision: verified files + the partials a download continues."""
        with self._lock:
            return self.p.verified + sum(self.p.partial.values())

    def status(self) -> dict:
        now, done = time.time(), self.done_bytes()
        with self._lock:
            fetched = self.p.fetched
            self.p.samples = [s for s in self.p.samples if now - s[0] <= RATE_WINDOW_S] + [(now, fetched)]
            t0, b0 = self.p.samples[0]
        rate = (fetched - b0) / (now - t0) if now > t0 else 0.0
        p = self.p
        eta = (p.total - done) / rate if rate > 0 and done < p.total else None
        line = progress_line(done, p.total, rate, p.files_done, p.files_total)
        if p.phase == "verifying" and p.to_hash:
            line = f"hashed {p.hashed / 1024 ** 2:.1f}/{p.to_hash / 1024 ** 2:.1f} MiB; " + line
        return {"phase": p.phase, "source": p.source, "error": p.error, "done": done, "total": p.total,
                "fetched": fetched, "rate": rate, "eta_s": eta, "files_done": p.files_done,
                "files_total": p.files_total, "line": line, "updated": now, "pid": os.getpid(),
                "changed": bool(p.changed_files) or p.unmarked, "changed_files": list(p.changed_files[:20]),
                "identity": self.c["identity"], "leftovers": p.leftovers}

    def _status_loop(self) -> None:
        while not self._stop.wait(1.0):
            write_json(os.path.join(self.state_dir, STATUS), self.status())

    def _phase(self, phase: str, error: str = "") -> None:
        self.p.phase, self.p.error = phase, error
        write_json(os.path.join(self.state_dir, STATUS), self.status())

    # the run -----------------------------------------------------------
    def run(self) -> int:
        os.makedirs(self.state_dir, exist_ok=True)
        lock = open(os.path.join(self.state_dir, LOCK), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.log("another fetch holds the lock; not starting a second download")
            return 3
        os.makedirs(self.dest, exist_ok=True)
        ticker = threading.Thread(target=self._status_loop, daemon=True)
        ticker.start()
        try:
            return self._run()
        finally:
            self._stop.set()
            ticker.join()
            write_json(os.path.join(self.state_dir, STATUS), self.status())

    def _run(self) -> int:
        errors = []
        for i, src in enumerate(self.c["sources"]):
            label = f"{src['kind']}:{src.get('repo') or src.get('path')}" + (f" at {src['endpoint']}" if src.get("endpoint") else "")
            delays = backoff_delays(int(self.c.get("retries", 5)), float(self.c.get("backoff_s", 10)), float(self.c.get("backoff_max_s", 300)))
            for attempt in range(len(delays) + 1):
                self.p.source = label
                self._phase("listing")
                try:
                    self._from(i, src)
                    self._phase("done")
                    self.log(f"complete from {label}: {self.status()['line']}")
                    return 0
                except DiskFull as exc:
                    self._phase("failed", str(exc))
                    self.log(str(exc))
                    return 4
                except Exception as exc:  # noqa: BLE001 - any failure of a source: retry, then the next one
                    msg = f"{label} attempt {attempt + 1}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    errors.append(msg)
                    self.log(msg)
                    if attempt < len(delays):
                        self._phase("retrying", msg)
                        self.sleep(delays[attempt])
        self._phase("failed", "every source failed: " + " | ".join(errors[-len(self.c['sources']) * 2:]))
        self.log(self.p.error)
        return 1

    def _write_state(self, listing: Listing, records: dict, complete: bool = False) -> None:
        state = {"identity": self.c["identity"], "commit": listing.commit, "complete": complete,
                 "source": self.p.source, "files": records}
        if complete:
            state["refetched_files"] = self.p.refetched_files
        write_json(os.path.join(self.state_dir, STATE), state)

    def _verify(self, listing: Listing, state: dict) -> tuple:
        """(keep, fetch, records): the files already verified (by the recorded stat, else hashed, in parallel) and the
        ones to fetch."""
        full = self.c.get("verify") == "full"
        keep, fetch, records = [], [], dict(state.get("files") or {})
        to_hash = []
        for f in listing.files:
            st = file_stat(os.path.join(self.dest, f.name))
            if st is not None and not full and recorded_ok(state, f, st):
                keep.append(f)
            elif st is not None and st.size == f.size:
                to_hash.append(f)
            else:
                if st is not None:
                    self.log(f"{f.name}: size {st.size} != {f.size}; fetching it again")
                    self.p.refetched_files.append(f.name)
                records.pop(f.name, None)
                fetch.append(f)
        self.p.to_hash, self.p.hashed = sum(f.size for f in to_hash), 0

        def hashed(n: int) -> None:
            with self._lock:
                self.p.hashed += n

        def check(f: RemoteFile) -> tuple:
            path = os.path.join(self.dest, f.name)
            return f, verify_file(path, f, hashed), file_stat(path)

        with ThreadPoolExecutor(max_workers=max(1, int(self.c.get("workers", 8)))) as pool:
            for f, problem, st in pool.map(check, to_hash):
                if problem is None:
                    records[f.name] = record(st, f)
                    keep.append(f)
                else:
                    self.log(f"{f.name}: {problem}; fetching it again")
                    self.p.refetched_files.append(f.name)
                    records.pop(f.name, None)
                    fetch.append(f)
        return keep, fetch, records

    def _link_from_other_revisions(self, fetch: list, records: dict) -> list:
        """Hard-link files whose recorded digest and stat match from the toolkit's other revisions of this repo (and the
        layout before per-revision directories); return the files still to fetch."""
        root, states = self.c.get("revisions_root"), self.c.get("states_root")
        if not root or not states or not os.path.isdir(states):
            return fetch
        own = os.path.basename(self.dest.rstrip("/"))
        others = [(os.path.join(root, k), os.path.join(states, k, STATE)) for k in sorted(os.listdir(states))
                  if k != own and os.path.isdir(os.path.join(states, k))] + [(root, os.path.join(states, STATE))]
        recorded = [(d, read_json(p, {}).get("files") or {}) for d, p in others]
        left = []
        for f in fetch:
            target = os.path.join(self.dest, f.name)
            for d, files in recorded:
                src = os.path.join(d, f.name)
                if not recorded_ok({"files": files}, f, file_stat(src)) or not (f.sha256 or f.blob_sha1):
                    continue
                try:
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    tmp = target + ".link"
                    if os.path.lexists(tmp):
                        os.remove(tmp)
                    os.link(src, tmp)
                    os.replace(tmp, target)
                except OSError as exc:
                    self.log(f"{f.name}: cannot link it from {d} ({exc}); fetching it")
                    continue
                self.log(f"{f.name}: same content in {d}; hard-linked, not fetched")
                records[f.name] = record(file_stat(target), f)
                self.p.changed_files.append(f.name)
                break
            else:
                left.append(f)
        return left

    def _from(self, index: int, src: dict) -> None:
        listing = list_files(src, index, self.token)
        if not any(f.name == "config.json" for f in listing.files):
            raise SourceError(f"revision {listing.commit} has no config.json: not a model vLLM can load")
        p = self.p
        p.total, p.files_total = listing.total_bytes, len(listing.files)
        state = read_json(os.path.join(self.state_dir, STATE), {})
        # The marker goes before any file changes and comes back once all are verified: absent now, an earlier run
        # (killed, restarted by the deploy) may have changed files that this run finds verified.
        p.unmarked = bool(self.c.get("marker")) and not os.path.isfile(self.c["marker"])
        self._phase("verifying")
        keep, fetch, records = self._verify(listing, state)
        fetch = self._link_from_other_revisions(fetch, records)
        for name in stale_partials(self.dest, listing):
            self.log(f"{name}: its partial is of other content (changed upstream) or of no file of the revision; removed")
            drop_partial(self.dest, name)
        with self._lock:
            p.verified = listing.total_bytes - sum(f.size for f in fetch)
            p.files_done = len(listing.files) - len(fetch)
            p.partial = {f.name: resumable(self.dest, f) for f in fetch}
        self._write_state(listing, records)
        need = sum(f.size for f in fetch) - sum(p.partial.values())
        free = shutil.disk_usage(self.dest).free
        headroom = int(self.c.get("headroom_bytes", 0))
        if fetch and free < need + headroom:
            gib = 1024 ** 3
            raise DiskFull(f"not enough disk for the weights: {self.dest} has {free / gib:.2f} GiB free, the {len(fetch)} files "
                           f"still to fetch need {need / gib:.2f} GiB (partials already on disk counted) + "
                           f"{headroom / gib:.2f} GiB headroom (from the file list of {p.source}); nothing was downloaded. "
                           f"Remedy: free space, point vllm_data_dir at a bigger disk, or lower vllm_disk_headroom_gib")
        if fetch and self.c.get("marker"):
            try:
                os.remove(self.c["marker"])  # the vLLM unit does not start on this revision until it is verified again
            except FileNotFoundError:
                pass
        self._phase("downloading")

        def on_bytes(name: str, have: int, n: int) -> None:
            with self._lock:
                p.partial[name] = have
                p.fetched += n

        def one(f: RemoteFile) -> None:
            # A dropped connection or a restarting mirror: resume from the partial's last byte, waiting
            # FILE_BACKOFF_S, 2x, 4x ... (capped); a try that brought bytes resets the count, so a flaky link that
            # keeps delivering never exhausts it, while a source that stays away fails after FILE_ATTEMPTS tries.
            fails = 0
            while True:
                before = resumable(self.dest, f)
                try:
                    fetch_file(src, listing, f, self.dest, self.token, lambda have, n: on_bytes(f.name, have, n))
                    break
                except Exception as exc:  # noqa: BLE001 - resumed when worth it, else the source attempt fails
                    fails = 1 if resumable(self.dest, f) > before else fails + 1
                    if fails >= FILE_ATTEMPTS or not retryable(exc):
                        raise
                    wait = min(FILE_BACKOFF_S * 2.0 ** (fails - 1), FILE_BACKOFF_MAX_S)
                    self.log(f"{f.name}: {type(exc).__name__}: {exc}; resuming it from byte "
                             f"{resumable(self.dest, f)} in {wait:.0f} s (try {fails + 1} of at most {FILE_ATTEMPTS} "
                             f"without progress)")
                    self.sleep(wait)
            st = file_stat(os.path.join(self.dest, f.name))
            with self._lock:
                records[f.name] = record(st, f)
                p.changed_files.append(f.name)
                p.partial.pop(f.name, None)
                p.verified += f.size
                p.files_done += 1
                self._write_state(listing, records)

        with ThreadPoolExecutor(max_workers=max(1, int(self.c.get("workers", 8)))) as pool:
            for fut in [pool.submit(one, f) for f in sorted(fetch, key=lambda f: -f.size)]:
                fut.result()
        self._clean(listing)
        self._write_state(listing, {f.name: records[f.name] for f in listing.files}, complete=True)
        if self.c.get("marker"):
            write_json(self.c["marker"], {"identity": self.c["identity"], "commit": listing.commit, "dest": self.dest,
                                          "files": len(listing.files), "bytes": listing.total_bytes,
                                          "source": p.source, "verified_at": time.time()})
        p.leftovers = prune(self.c, self.log)

    def _clean(self, listing: Listing) -> None:
        """Remove partial leftovers (ours, and huggingface_hub's .cache) and files the revision does not have."""
        shutil.rmtree(os.path.join(self.dest, ".cache"), ignore_errors=True)
        shutil.rmtree(os.path.join(self.dest, PARTIAL_DIR), ignore_errors=True)
        wanted = {f.name for f in listing.files}
        states = self.c.get("states_root")
        revisions = set(os.listdir(states)) if states and os.path.isdir(states) else set()
        for d, subdirs, names in os.walk(self.dest, topdown=True):
            if d == self.dest:  # never into the toolkit's revision directories (a config of the flat layout)
                subdirs[:] = [x for x in subdirs if x not in revisions]

            for n in names:
                rel = os.path.relpath(os.path.join(d, n), self.dest)
                if rel not in wanted:
                    self.log(f"removing {rel}: not part of revision {listing.commit}")
                    os.remove(os.path.join(d, n))
                    self.p.changed_files.append(rel)
        for d, _, _ in sorted(os.walk(self.dest), key=lambda x: -len(x[0])):
            if d != self.dest and os.path.relpath(d, self.dest).split(os.sep)[0] not in revisions and not os.listdir(d):
                os.rmdir(d)


def main(argv: list) -> int:
    if len(argv) != 3 or argv[1] not in ("run", "check", "prune"):
        print(__doc__.split("\n\n")[2], file=sys.stderr)
        return 2
    config = read_json(argv[2], {})
    if "identity" not in config:
        print(f"{argv[2]}: not a fetch config", file=sys.stderr)
        return 2
    if argv[1] == "check":
        print(json.dumps(check_state(config, read_json(os.path.join(config["state_dir"], STATE), {}))))
        return 0
    if argv[1] == "prune":
        prune(config, lambda m: print(m, flush=True))
        return 0
    return Worker(config).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
