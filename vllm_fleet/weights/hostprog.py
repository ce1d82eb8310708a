#!/usr/bin/env python3
"""vllm-fleet-fetch: download a model's weights on the host, resumable and verified.

Installed by vllm_fleet/weights/step.py as ``{base_dir}/fetch/fetch_weights.py`` and run
by the systemd unit ``{service_name}-fetch.service`` with the small venv
``{base_dir}/fetch/venv`` (huggingface_hub; modelscope when present). The
unit, not the SSH session, owns the download: a dropped deploy leaves it
running, and the next deploy attaches to it.

    python fetch_weights.py run   CONFIG   # the worker (what the unit runs)
    python3 fetch_weights.py check CONFIG  # JSON: is the recorded download complete and unchanged? (stdlib only)

CONFIG (JSON, written by the deploy, no secret in it; the HF token comes from
the unit's EnvironmentFile as HF_TOKEN):
``{"identity", "dest", "state_dir", "sources": [{"kind", "repo", "endpoint",
"revision", "path"}], "retries", "backoff_s", "backoff_max_s", "workers",
"headroom_bytes", "verify": "stat"|"full"}``

The worker: for each source in order (retrying each with exponential backoff)
lists the files of the pinned revision with their sizes and sha256 (LFS) or
git blob ids, checks the files already in ``dest`` (by the recorded stat, or
by hashing when the stat changed or ``verify`` is "full"), checks free disk
for what is missing before fetching anything, downloads the missing or bad
files with huggingface_hub (resuming ``.incomplete`` partials with Range
requests), verifies each downloaded file, removes partial leftovers and files
the revision does not have, and records the verification state. Progress
goes to ``{state_dir}/status.json`` every second.

Exit codes: 0 complete; 1 every source failed; 2 usage; 3 another worker holds the lock;
4 not enough disk.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

STATE = "state.json"
STATUS = "status.json"
LOCK = "fetch.lock"
HASH_CHUNK = 8 * 1024 * 1024


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


def digest(path: str, kind: str) -> str:
    """sha256 of the file, or its git blob sha1 (kind "blob")."""
    h = hashlib.sha256() if kind == "sha256" else hashlib.sha1()
    if kind == "blob":
        h.update(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: str, f: RemoteFile) -> Optional[str]:
    """None when the file has the source's size and digest, else what is wrong."""
    st = file_stat(path)
    if st is None:
        return "missing"
    if st.size != f.size:
        return f"size {st.size} != {f.size}"
    if f.sha256:
        got = digest(path, "sha256")
        return None if got == f.sha256 else f"sha256 {got[:12]}... != {f.sha256[:12]}..."
    if f.blob_sha1:
        got = digest(path, "blob")
        return None if got == f.blob_sha1 else f"git blob {got[:12]}... != {f.blob_sha1[:12]}..."
    return None


def recorded_ok(state: dict, f: RemoteFile, st: Optional[Stat]) -> bool:
    """The state records this exact file (same digest) as verified, with the same stat now."""
    rec = (state.get("files") or {}).get(f.name)
    if not rec or st is None:
        return False
    return (rec.get("size") == f.size == st.size and rec.get("mtime_ns") == st.mtime_ns and rec.get("ino") == st.ino
            and rec.get("sha256") == f.sha256 and rec.get("blob_sha1") == f.blob_sha1)


def check_state(config: dict, state: dict) -> dict:
    """Whether `state` records a complete download for `config`'s identity that the disk still matches (no hashing).

    Also ``verified_bytes``: the bytes of the recorded files (for this identity, complete or
    not) whose stat still matches what was verified, i.e. weights already on the disk that a
    download will keep; the planning-time disk check subtracts them (vllm_fleet/preflight/step.py).
    """
    problems = []
    verified = 0
    if state.get("identity") == config["identity"]:
        for name, rec in (state.get("files") or {}).items():
            st = file_stat(os.path.join(config["dest"], name))
            if st is not None and (st.size, st.mtime_ns, st.ino) == (rec.get("size"), rec.get("mtime_ns"), rec.get("ino")):
                verified += st.size
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
    if config.get("verify") == "full":
        problems.append("a full re-verification is asked for (vllm_weights_reverify)")
    return {"complete": not problems, "commit": state.get("commit"), "source": state.get("source"), "problems": problems,
            "identity": config["identity"], "verified_bytes": verified}


def backoff_delays(retries: int, base: float, cap: float) -> list:
    """Seconds to wait before attempts 2..retries of one source: base, 2*base, 4*base, ... capped."""
    return [min(cap, base * 2 ** i) for i in range(max(0, retries - 1))]


def progress_line(done: int, total: int, rate: float) -> str:
    """`12.0/24.0 MiB (50.0%), 3.0 MiB/s, ETA 4 s`."""
    mib = 1024 * 1024
    pct = 100.0 * done / total if total else 100.0
    eta = f"{(total - done) / rate:.0f} s" if rate > 0 and done < total else ("-" if done < total else "0 s")
    return f"{done / mib:.1f}/{total / mib:.1f} MiB ({pct:.1f}%), {rate / mib:.1f} MiB/s, ETA {eta}"


def partial_bytes(dest: str) -> int:
    """Bytes in `.incomplete` files under dest (huggingface_hub's under .cache/huggingface, modelscope's beside the file)."""
    total = 0
    for d, _, names in os.walk(dest):
        for n in names:
            if n.endswith(".incomplete"):
                try:
                    total += os.path.getsize(os.path.join(d, n))
                except OSError:
                    pass
    return total


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


# ------------------------------------------------------------------ sources --

class SourceError(Exception):
    """A source did not answer, or answered wrongly."""


class DiskFull(Exception):
    """Not enough free disk for what is missing."""


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


def fetch_file(src: dict, listing: Listing, f: RemoteFile, dest: str, token: Optional[str], force: bool) -> None:
    """Put one file into dest from the source (huggingface_hub resumes a `.incomplete` partial)."""
    kind = src["kind"]
    if kind == "hf":
        from huggingface_hub import hf_hub_download

        hf_hub_download(src["repo"], f.name, revision=listing.commit, local_dir=dest,
                        endpoint=src.get("endpoint") or None, token=token or False, force_download=force)
    elif kind == "modelscope":
        # The client resumes `<file>.incomplete` in dest with Range requests and checks size + sha256 itself;
        # the worker verifies again against the listing either way.
        _modelscope_api(src).download_file(src["repo"], "model", f.name, revision=listing.commit, local_dir=dest,
                                           force=force, expected_sha256=f.sha256, file_size=f.size)
    else:
        target = os.path.join(dest, f.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(src["path"], f.name), target + ".incomplete")
        os.replace(target + ".incomplete", target)


# ------------------------------------------------------------------ worker --

@dataclass
class Progress:
    """Shared by the download threads and the status writer."""

    total: int = 0
    verified: int = 0  # bytes of files that are verified (kept or fetched)
    phase: str = "starting"
    source: str = ""
    error: str = ""
    refetched_files: list = field(default_factory=list)
    samples: list = field(default_factory=list)  # (time, bytes done)


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
        self._stop = threading.Event()

    # status ------------------------------------------------------------
    def done_bytes(self) -> int:
        return self.p.verified + partial_bytes(self.dest)

    def status(self) -> dict:
        now, done = time.time(), self.done_bytes()
        self.p.samples = [s for s in self.p.samples if now - s[0] <= 10.0] + [(now, done)]
        t0, b0 = self.p.samples[0]
        rate = (done - b0) / (now - t0) if now > t0 else 0.0
        return {"phase": self.p.phase, "source": self.p.source, "error": self.p.error, "done": done,
                "total": self.p.total, "rate": rate, "line": progress_line(done, self.p.total, rate),
                "updated": now, "pid": os.getpid(), "identity": self.c["identity"]}

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
                    self.log(f"complete from {label}")
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

    def _from(self, index: int, src: dict) -> None:
        listing = list_files(src, index, self.token)
        if not any(f.name == "config.json" for f in listing.files):
            raise SourceError(f"revision {listing.commit} has no config.json: not a model vLLM can load")
        self.p.total = listing.total_bytes
        state_path = os.path.join(self.state_dir, STATE)
        state = read_json(state_path, {})
        if state.get("commit") != listing.commit:
            state = {"files": {k: v for k, v in (state.get("files") or {}).items()}}
        full = self.c.get("verify") == "full"
        self._phase("verifying")
        keep, fetch, bad = [], [], set()
        records = dict(state.get("files") or {})
        for f in listing.files:
            path = os.path.join(self.dest, f.name)
            st = file_stat(path)
            if st is not None and not full and recorded_ok(state, f, st):
                keep.append(f)
                continue
            problem = verify_file(path, f) if st is not None else "missing"
            if problem is None:
                st = file_stat(path)
                records[f.name] = {**asdict(st), "sha256": f.sha256, "blob_sha1": f.blob_sha1}
                keep.append(f)
            else:
                if st is not None:
                    self.log(f"{f.name}: {problem}; fetching it again")
                    self.p.refetched_files.append(f.name)
                    os.remove(path)
                    bad.add(f.name)
                records.pop(f.name, None)
                fetch.append(f)
        self.p.verified = sum(f.size for f in keep)
        write_json(state_path, {"identity": self.c["identity"], "commit": listing.commit, "complete": False,
                                "source": self.p.source, "files": records})
        need = sum(f.size for f in fetch) - partial_bytes(self.dest)
        free = shutil.disk_usage(self.dest).free
        headroom = int(self.c.get("headroom_bytes", 0))
        if fetch and free < need + headroom:
            gib = 1024 ** 3
            raise DiskFull(f"not enough disk for the weights: {self.dest} has {free / gib:.2f} GiB free, the {len(fetch)} files "
                           f"still missing need {need / gib:.2f} GiB + {headroom / gib:.2f} GiB headroom (from the file list of "
                           f"{self.p.source}); nothing was downloaded. Remedy: free space, point vllm_data_dir at a bigger "
                           f"disk, or lower vllm_disk_headroom_gib")
        self._phase("downloading")
        lock = threading.Lock()

        def one(f: RemoteFile) -> None:
            fetch_file(src, listing, f, self.dest, self.token, force=f.name in bad)
            path = os.path.join(self.dest, f.name)
            problem = verify_file(path, f)
            if problem is not None:
                os.remove(path)
                raise SourceError(f"{f.name} from {self.p.source} failed verification ({problem}); removed")
            st = file_stat(path)
            with lock:
                records[f.name] = {**asdict(st), "sha256": f.sha256, "blob_sha1": f.blob_sha1}
                self.p.verified += f.size
                write_json(state_path, {"identity": self.c["identity"], "commit": listing.commit, "complete": False,
                                        "source": self.p.source, "files": records})

        with ThreadPoolExecutor(max_workers=max(1, int(self.c.get("workers", 8)))) as pool:
            for fut in [pool.submit(one, f) for f in sorted(fetch, key=lambda f: -f.size)]:
                fut.result()
        self._clean(listing)
        write_json(state_path, {"identity": self.c["identity"], "commit": listing.commit, "complete": True,
                                "source": self.p.source, "files": {f.name: records[f.name] for f in listing.files},
                                "refetched_files": self.p.refetched_files})

    def _clean(self, listing: Listing) -> None:
        """Remove partial leftovers (huggingface_hub's .cache) and files the revision does not have."""
        shutil.rmtree(os.path.join(self.dest, ".cache"), ignore_errors=True)
        wanted = {f.name for f in listing.files}
        for d, _, names in os.walk(self.dest, topdown=False):
            for n in names:
                rel = os.path.relpath(os.path.join(d, n), self.dest)
                if rel not in wanted:
                    self.log(f"removing {rel}: not part of revision {listing.commit}")
                    os.remove(os.path.join(d, n))
            if d != self.dest and not os.listdir(d):
                os.rmdir(d)


def main(argv: list) -> int:
    if len(argv) != 3 or argv[1] not in ("run", "check"):
        print(__doc__.split("\n\n")[2], file=sys.stderr)
        return 2
    config = read_json(argv[2], {})
    if "identity" not in config:
        print(f"{argv[2]}: not a fetch config", file=sys.stderr)
        return 2
    if argv[1] == "check":
        print(json.dumps(check_state(config, read_json(os.path.join(config["state_dir"], STATE), {}))))
        return 0
    return Worker(config).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
