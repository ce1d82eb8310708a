"""The project is self-contained: no file of it names a path outside the repository.

Facts learned elsewhere (GPU runs, the seed's deployment log, a build machine's notes)
belong in the project's own docs and fixtures (docs/seed.md, docs/gpu-validation.md,
tests/README.md, tests/gpu/wheels.txt), not in a pointer to a file a user of the
project does not have. This walks every file git tracks, plus new files git would add
(untracked and not ignored), skips binary ones, and fails naming file:line for each
reference to such a path.

A hit that is legitimate (a path on a deployed or seed host, quoted as data) is
allowed only by an entry of ALLOWED: the file, the exact text around the hit, and
the reason. Add one there rather than weakening a pattern.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()

# (pattern, what it points at). Case-sensitive: the project's own docs are lower-case
# files under docs/ (docs/design.md), the outside notes were upper-case top-level files.
PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\.\./shared\b", "a directory beside the checkout"),
    (r"/work/", "the build machine's workspace (absolute path of a checkout)"),
    (r"\bshared/gpu\b", "the GPU notes folder outside the repository"),
    (r"\bshared/seed\b", "the seed folder outside the repository"),
    (r"\bseed/\d{3}_[0-9a-f]+", "the seed log's file outside the repository (use docs/seed.md)"),
    (r"\bNOTES\.md\b", "GPU notes outside the repository (use docs/gpu-validation.md)"),
    (r"\bTESTING\.md\b", "testing notes outside the repository (use tests/README.md)"),
    (r"\bDESIGN\.md\b", "design notes outside the repository (use docs/design.md)"),
    (r"\bKINDS\.md\b", "the device machines' notes, not part of the project"),
    (r"/opt/wheels\b", "a wheel cache that only some machines have"),
    (r"/root/", "a home directory of some machine"),
    (r"/home/", "a home directory of some machine"),
)


@dataclass(frozen=True)
class Allowed:
    """One legitimate hit: files (glob), the exact text that must cover the hit, and why."""

    files: str
    text: str
    reason: str


ALLOWED: tuple[Allowed, ...] = (
    Allowed("tests/fixtures/vllm-logs/seed_invalid_repo.log",
            "'/home/1/.cache/huggingface/hub/models--MiniMaxAI--MiniMax-M2'",
            "verbatim seed log: the HF cache root on the seed's host that vLLM rejected"),
    Allowed("tests/fixtures/vllm-logs/seed_remote_code.log",
            "/home/cjl/.cache/huggingface/hub/models--MiniMaxAI--MiniMax-M2/snapshots/",
            "verbatim seed log: the snapshot directory on the seed's host"),
    Allowed("tests/unit/service/test_doctor.py",
            "/home/1/.cache/huggingface/hub/models--MiniMaxAI--MiniMax-M2/snapshots/<commit>",
            "the doctor's remedy for the seed fixture above: a path on the seed's host"),
    Allowed("tests/unit/weights/test_weights.py",
            "/root/.cache/huggingface/hub/models--MiniMaxAI--MiniMax-M2",
            "an HF cache root on a deployed host, which the weights role must refuse to serve"),
    Allowed("vllm_fleet/pyenv/settings.py", "/root/.netrc on the host",
            "remedy text: the credentials file on the deployed host (uv and pip read it as root)"),
    Allowed("docs/python-env.md", "`/root/.netrc` on the host",
            "the credentials file on the deployed host (uv and pip read it as root)"),
    Allowed("tests/unit/pyenv/test_stack.py", '"/root/.netrc"',
            "asserts the remedy names the credentials file on the deployed host"),
    Allowed("tests/unit/planner/test_plan.py", '"NOTES.md" not in reason and "KINDS.md" not in reason',
            "asserts that the plan's reasons do not name these outside files"),
)


def _files() -> list[str]:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the self-containment check needs `git ls-files`")
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True, timeout=60,
    ).stdout
    return sorted({name for name in out.decode("utf-8", "surrogateescape").split("\0") if name})


def _text(path: Path) -> str | None:
    """The file's text, or None for binary files (a NUL byte in the first 8 KiB) and missing ones."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None  # deleted in the work tree but still in the index, or a submodule
    if b"\0" in data[:8192]:
        return None
    return data.decode("utf-8", "replace")


def _allowed(name: str, line: str, match: re.Match[str]) -> bool:
    for entry in ALLOWED:
        if not fnmatch.fnmatchcase(name, entry.files):
            continue
        start = line.find(entry.text)
        while start >= 0:
            if start <= match.start() and match.end() <= start + len(entry.text):
                return True
            start = line.find(entry.text, start + 1)
    return False


def outside_references(files: list[str]) -> list[str]:
    """'file:line: what (pattern): the line' for every hit not in ALLOWED."""
    compiled = [(re.compile(p), p, why) for p, why in PATTERNS]
    hits = []
    for name in files:
        if name == THIS:  # this file names every pattern and the allowed texts
            continue
        text = _text(ROOT / name)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            found = [f"{why} ({pattern})" for regex, pattern, why in compiled
                     if any(not _allowed(name, line, m) for m in regex.finditer(line))]
            if found:
                hits.append(f"{name}:{number}: {'; '.join(found)}: {line.strip()[:160]}")
    return hits


def test_no_file_names_a_path_outside_the_repository() -> None:
    hits = outside_references(_files())
    assert not hits, (
        f"{len(hits)} reference(s) to paths outside the repository; write the fact into the "
        "project's own docs/fixtures and point there (or, for a host path quoted as data, add an "
        "ALLOWED entry with its reason):\n" + "\n".join(hits)
    )


def test_every_allowed_entry_is_still_used() -> None:
    # A stale entry would silently allow a future hit at that place: drop it when its text is gone.
    files = _files()
    unused = []
    for entry in ALLOWED:
        matching = [n for n in files if fnmatch.fnmatchcase(n, entry.files)]
        if not any(entry.text in (_text(ROOT / n) or "") for n in matching):
            unused.append(f"{entry.files}: {entry.text!r} ({entry.reason})")
    assert not unused, "ALLOWED entries that match nothing any more:\n" + "\n".join(unused)


@pytest.mark.parametrize(("line", "found"), [
    ("see `../shared/seed` for the log", True),
    ("rootdir: /work/main", True),
    ("the 24 wheels of ../shared/gpu/wheels.txt", True),
    ("Measured (NOTES.md, H200)", True),
    ("recipe: TESTING.md", True),
    ("DESIGN.md: few round trips", True),
    ("torch wheel from /opt/wheels, or PyPI", True),
    ("ProtectHome=yes hides /home/ and /root/", True),
    ("the log `seed/000_f062d323eba90327.txt`", True),
    ("shared_experts = 2; n_shared_experts", False),
    ("see docs/design.md and docs/gpu-validation.md", False),
    ("/opt/vllm-fleet/venvs/vllm-0.25.0/bin/vllm", False),
    ("libsystemd-shared libapparmor1", False),
])
def test_patterns(line: str, found: bool) -> None:
    assert any(re.search(p, line) for p, _ in PATTERNS) is found
