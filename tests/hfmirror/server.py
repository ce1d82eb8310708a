"""A Hugging Face-compatible mirror on 127.0.0.1 speaking what huggingface_hub calls.

Endpoints (read from huggingface_hub 2.4's hf_api.py / file_download.py):

- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}`` (``?blobs=true``):
  ``{"id", "sha", "siblings": [{"rfilename", "size", "blobId", "lfs": {"sha256", "size", "pointerSize"}}]}``
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (recursive listing, as ``list_repo_tree``)
- ``HEAD|GET /{repo}/resolve/{rev}/{file}``: ``X-Repo-Commit``, ``ETag`` (git blob sha1, or
  the sha256 for LFS files), ``X-Linked-Etag`` / ``X-Linked-Size`` for LFS files,
  ``Accept-Ranges``; ``Range: bytes=N-`` answers 206 with ``Content-Range``, unless an
  ``If-Range`` names another ETag (then 200 and the whole file, as RFC 9110 says).
- ``GET /wheels/``: a directory listing of a wheel folder (pip ``--find-links``).

Switches for fault tests: ``mode`` "ok" | "fail" (HTTP 500 on every hub call) | "down"
(the listening socket is closed: connection refused); ``rate`` (bytes/s per response,
0 = unthrottled: the file is sent with sendfile(2), so the mirror costs little CPU in benchmarks).
Faults: ``drop_after(n, times)``: each GET of a file sends at most ``n`` bytes of its body and then closes the
connection (a link dropped mid-body; ``times`` such GETs per file, None: every one); ``restart(down_s)``: every open
connection is cut, the listening socket closed, and after ``down_s`` seconds (connection refused meanwhile) the
mirror listens again on the same port (a mirror restart).
Counters: ``bytes_served`` per file (bytes handed to the socket), ``requests``, ``ranges`` (the
``Range`` / ``If-Range`` each file request carried).
"""

from __future__ import annotations

import html
import json
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tests.hfmirror.repo import REPO_ID, RepoFile, commit_of, manifest

CHUNK = 64 * 1024
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class Mirror:
    """One mirror serving one repo directory as `repo_id` (start with `start()`, stop with `stop()`)."""

    def __init__(self, repo_dir: Path, repo_id: str = REPO_ID, *, port: int = 0, wheels: Path | None = None) -> None:
        self.repo_dir = repo_dir
        self.repo_id = repo_id
        self.files: dict[str, RepoFile] = {f.name: f for f in manifest(repo_dir)}
        self.commit = commit_of(list(self.files.values()))
        self.wheels = wheels
        self.mode = "ok"
        self.rate = 0
        self.bytes_served: Counter[str] = Counter()
        self.requests: list[str] = []
        self.ranges: list[tuple[str, str, str]] = []  # (file, Range, If-Range) of every file request
        self.drop_bytes: int | None = None  # drop_after: body bytes one GET sends before the connection is closed
        self.drops_left: dict[str, int | None] = {}  # file -> GETs still to cut (None: every one)
        self.drops: Counter[str] = Counter()  # GETs cut per file
        self._conns: set[socket.socket] = set()  # open connections, cut by restart()
        self._lock = threading.Lock()
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def start(self) -> "Mirror":
        """Listen on 127.0.0.1 (the same port again after a `down`)."""
        mirror = self

        class Handler(self.handler_class()):
            owner = mirror

        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.mode = "ok"
        return self

    def handler_class(self) -> type:
        """The request handler this mirror speaks with (a subclass picks another API)."""
        return _Handler

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def drop_after(self, n: int | None, times: int | None = 1) -> None:
        """Cut each file's next `times` GETs (None: every GET) after `n` body bytes (None: no more cuts)."""
        with self._lock:
            self.drop_bytes = n
            self.drops_left = {name: times for name in self.files} if n is not None else {}

    def _take_drop(self, name: str) -> int | None:
        """The body bytes this GET of `name` may send before the connection is cut (None: no cut; a GET whose body is
        no longer than that is sent whole but still uses up one of `times`)."""
        with self._lock:
            if self.drop_bytes is None or name not in self.drops_left:
                return None
            left = self.drops_left[name]
            if left is not None:
                if left <= 0:
                    return None
                self.drops_left[name] = left - 1
            return self.drop_bytes

    def restart(self, down_s: float = 0.0) -> None:
        """A mirror restart: cut every open connection, stop listening, wait `down_s`, listen again on the same port."""
        self.mode = "down"
        self.stop()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        time.sleep(down_s)
        self.start()

    def set_mode(self, mode: str) -> None:
        """ok | fail | down (down closes the socket; ok after down listens again on the same port)."""
        if mode == "down":
            self.stop()
        elif self._server is None:
            self.start()
        self.mode = mode

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_served.clear()
            self.requests.clear()
            self.ranges.clear()

    def _info(self) -> dict:
        return {
            "_id": self.commit[:24], "id": self.repo_id, "modelId": self.repo_id, "sha": self.commit,
            "private": False, "gated": False, "disabled": False, "tags": [], "downloads": 0, "likes": 0,
            "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
            "siblings": [
                {"rfilename": f.name, "size": f.size, "blobId": f.blob_sha1,
                 **({"lfs": {"sha256": f.sha256, "size": f.size, "pointerSize": 134}} if f.lfs else {})}
                for f in self.files.values()
            ],
        }


    def _tree(self, sub: str) -> list[dict]:
        """The recursive tree listing below `sub` (files only: the tiny repo is flat)."""
        return [
            {"type": "file", "oid": f.blob_sha1, "size": f.size, "path": f.name,
             **({"lfs": {"oid": f.sha256, "size": f.size, "pointerSize": 134}} if f.lfs else {})}
            for f in self.files.values() if not sub or f.name.startswith(sub.rstrip("/") + "/")
        ]


class _Handler(BaseHTTPRequestHandler):
    owner: Mirror
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.owner._lock:
            self.owner._conns.add(self.connection)

    def finish(self) -> None:
        with self.owner._lock:
            self.owner._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None, *, head: bool = False) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, code: int, obj: dict, head: bool = False) -> None:
        self._send(code, json.dumps(obj).encode(), {"Content-Type": "application/json"}, head=head)

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        m = self.owner
        path = unquote(urlsplit(self.path).path)
        with m._lock:
            m.requests.append(f"{self.command} {path}")
        if path.startswith("/wheels"):
            return self._wheels(path, head)
        if m.mode == "fail":
            return self._json(500, {"error": "mirror told to fail (test switch)"}, head)
        repo = m.repo_id
        if path in (f"/api/models/{repo}",) or path.startswith(f"/api/models/{repo}/revision/"):
            rev = path.rsplit("/revision/", 1)[1] if "/revision/" in path else "main"
            if rev not in ("main", m.commit):
                return self._json(404, {"error": f"Invalid rev id: {rev}"}, head)
            return self._json(200, m._info(), head)
        tree = f"/api/models/{repo}/tree/"
        if path.startswith(tree):
            rev, _, sub = path[len(tree):].partition("/")
            if rev not in ("main", m.commit):
                return self._json(404, {"error": f"Invalid rev id: {rev}"}, head)
            return self._send(200, json.dumps(m._tree(sub)).encode(), {"Content-Type": "application/json"}, head=head)
        prefix = f"/{repo}/resolve/"
        if path.startswith(prefix):
            rev, _, name = path[len(prefix):].partition("/")
            if rev not in ("main", m.commit):
                return self._send(404, b"revision not found", {"X-Error-Code": "RevisionNotFound"}, head=head)
            f = m.files.get(name)
            if f is None:
                return self._send(404, b"entry not found", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": m.commit}, head=head)
            return self._file(f, head)
        return self._send(404, b"not found", {"X-Error-Code": "RepoNotFound"}, head=head)

    def _file(self, f: RepoFile, head: bool) -> None:
        m = self.owner
        etag = f'"{f.sha256 or f.blob_sha1}"'
        headers = {"X-Repo-Commit": m.commit, "ETag": etag, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if f.lfs:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(f.size)})
        start, end = 0, f.size - 1
        rng = _RANGE.match(self.headers.get("Range", ""))
        if_range = self.headers.get("If-Range", "")
        with m._lock:
            m.ranges.append((f.name, self.headers.get("Range", ""), if_range))
        if rng and if_range and if_range != etag:
            rng = None  # the client's copy is of other content: the whole file
        code = 200
        if rng:
            start = int(rng[1])
            end = int(rng[2]) if rng[2] else f.size - 1
            if start >= f.size:
                return self._send(416, b"", {**headers, "Content-Range": f"bytes */{f.size}"}, head=head)
            code = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        headers["Content-Length"] = str(end - start + 1)
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if head:
            return
        cut = m._take_drop(f.name)
        with (m.repo_dir / f.name).open("rb") as fh:
            fh.seek(start)
            left = end - start + 1
            if cut is not None and cut < left:
                with m._lock:
                    m.drops[f.name] += 1
                self._send_body(f, fh, start, cut)
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)  # the link drops mid-body
                except OSError:
                    pass
                return
            self._send_body(f, fh, start, left)

    def _send_body(self, f: RepoFile, fh, start: int, left: int) -> None:
        """Send `left` bytes of the open file from `start`: sendfile(2) when unthrottled, else chunks at `rate`."""
        m = self.owner
        if not m.rate:
            return self._sendfile(f, fh, start, left)
        while left > 0:
            if m.mode != "ok":
                self.close_connection = True
                return
            chunk = fh.read(min(CHUNK, left))
            try:
                self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError, OSError):
                return
            left -= len(chunk)
            with m._lock:
                m.bytes_served[f.name] += len(chunk)
            if m.rate:
                time.sleep(len(chunk) / m.rate)

    def _sendfile(self, f: RepoFile, fh, offset: int, left: int) -> None:
        """Send `left` bytes from `offset` with sendfile(2), counting them, stopping when the mode leaves "ok"."""
        m = self.owner
        while left > 0:
            if m.mode != "ok":
                self.close_connection = True
                return
            try:
                sent = self.connection.sendfile(fh, offset, min(left, 8 * 1024 * 1024))
            except OSError:  # reset, broken pipe, or cut by restart()
                return
            if not sent:
                return
            offset += sent
            left -= sent
            with m._lock:
                m.bytes_served[f.name] += sent

    def _wheels(self, path: str, head: bool) -> None:
        d = self.owner.wheels
        if d is None:
            return self._send(404, b"no wheels here", head=head)
        name = path[len("/wheels"):].strip("/")
        if not name:
            links = "".join(f'<a href="{html.escape(p.name)}">{html.escape(p.name)}</a><br>\n' for p in sorted(d.glob("*.whl")))
            return self._send(200, f"<html><body>\n{links}</body></html>\n".encode(), {"Content-Type": "text/html"}, head=head)
        p = d / name
        if "/" in name or not p.is_file():
            return self._send(404, b"no such wheel", head=head)
        data = p.read_bytes()
        self._send(200, data, {"Content-Type": "application/octet-stream"}, head=head)


if __name__ == "__main__":
    import argparse

    from tests.hfmirror.repo import build

    ap = argparse.ArgumentParser(description="serve the tiny test repo as a Hugging Face mirror on 127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--wheels", type=Path)
    a = ap.parse_args()
    srv = Mirror(build(), port=a.port, wheels=a.wheels).start()
    print(f"HF_ENDPOINT={srv.url}  repo={srv.repo_id}  commit={srv.commit}", flush=True)
    threading.Event().wait()
