"""A ModelScope-compatible stand-in on 127.0.0.1 speaking what the `modelscope` client calls.

Endpoints (read from modelscope 1.40.2, which delegates its hub calls to
modelscope-hub 0.5.1: ``_legacy_api.py`` list_repo_files / get_download_url,
``_download.py``):

- ``GET /api/v1/models/{repo}/repo/files?Revision=&Recursive=``: ``{"Code": 200, "Success": true,
  "Data": {"Files": [{"Path", "Name", "Size", "Sha256", "Type": "blob", "Revision"}]}}``
- ``HEAD|GET /api/v1/models/{repo}/repo?Revision={rev}&FilePath={file}``: the file, with
  ``Accept-Ranges`` and ``Range: bytes=N-[M]`` answered 206 + ``Content-Range`` (the client
  resumes and splits large files into ranged streams).
- ``GET /wheels/``: the fetch venv's wheels (pip ``--find-links``), as the HF mirror.

Unknown paths answer 404 and are recorded in ``requests`` (what the client asked, for the tests).
The revision is ``master`` or the repo's commit id (tests/hfmirror/repo.py commit_of).
"""

from __future__ import annotations

import threading
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from tests.hfmirror.repo import REPO_ID
from tests.hfmirror.server import Mirror, _Handler

REVISION = "master"


class MsMirror(Mirror):
    """The tiny repo as a ModelScope hub (same switches and counters as the HF `Mirror`)."""

    def handler_class(self) -> type:
        """Speak ModelScope's hub API instead of Hugging Face's."""
        return _MsHandler

    def files_listing(self) -> dict:
        """The body of ``repo/files``: every file with its size and sha256."""
        return {"Code": 200, "Success": True, "Message": "success", "RequestId": "fleet-test",
                "Data": {"Files": [
                    {"Path": f.name, "Name": f.name.rsplit("/", 1)[-1], "Size": f.size, "Type": "blob",
                     "Sha256": _sha256(self.repo_dir / f.name, f.sha256), "Revision": self.commit,
                     "IsLFS": f.lfs, "Mode": "33188"}
                    for f in self.files.values()]}}


def _sha256(path: Path, known: str | None) -> str:
    if known:
        return known
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


class _MsHandler(_Handler):
    owner: MsMirror

    def _route(self, head: bool) -> None:
        m = self.owner
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        with m._lock:
            m.requests.append(f"{self.command} {self.path}")
        if path.startswith("/wheels"):
            return self._wheels(path, head)
        if m.mode == "fail":
            return self._json(500, {"Code": 500, "Success": False, "Message": "stand-in told to fail (test switch)"}, head)
        base = f"/api/v1/models/{m.repo_id}"
        rev = (query.get("Revision") or [REVISION])[0]
        if path in (f"{base}/repo/files", f"{base}/repo"):
            if rev not in (REVISION, m.commit):
                return self._json(404, {"Code": 10010205001, "Success": False, "Message": f"revision {rev} not found"}, head)
            if path.endswith("/files"):
                return self._json(200, m.files_listing(), head)
            name = (query.get("FilePath") or [""])[0]
            f = m.files.get(name)
            if f is None:
                return self._json(404, {"Code": 10010205001, "Success": False, "Message": f"file {name} not found"}, head)
            return self._file(f, head)
        return self._json(404, {"Code": 404, "Success": False, "Message": f"not served by the stand-in: {path}"}, head)


if __name__ == "__main__":
    import argparse

    from tests.hfmirror.repo import build

    ap = argparse.ArgumentParser(description="serve the tiny test repo as a ModelScope hub on 127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--wheels", type=Path)
    a = ap.parse_args()
    srv = MsMirror(build(), REPO_ID, port=a.port, wheels=a.wheels).start()
    print(f"endpoint={srv.url}  repo={srv.repo_id}  revision={REVISION}", flush=True)
    threading.Event().wait()
