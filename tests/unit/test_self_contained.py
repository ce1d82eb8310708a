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

# (pattern, what it points at). Case-sensitive: the project's own docs are lower-case
# files under docs/ (docs/design.md), the outside notes were upper-case top-level files.

def _path(*parts: str) -> str:
    """An absolute path from its parts. This file spells every outside path it looks for in parts,
    so that it names none itself: it is checked like every other file of the project."""
    return "/" + "/".join(parts)


def _md(name: str) -> str:
    """A markdown file's name from its stem (spelled apart for the same reason)."""
    return name + ".md"


UP = ".." + "/"  # the directory that holds the checkout

PATTERNS: tuple[tuple[str, str], ...] = (
    (re.escape(UP + "shared") + r"\b", "a directory beside the checkout"),
    (re.escape(_path("work")) + "/", "the build machine's workspace (absolute path of a checkout)"),
    (r"\b" + re.escape("shared" + "/" + "gpu") + r"\b", "the GPU notes folder outside the repository"),
    (r"\b" + re.escape("shared" + "/" + "seed") + r"\b", "the seed folder outside the repository"),
    (r"\bseed/\d{3}_[0-9a-f]+", "the seed log's file outside the repository (use docs/seed.md)"),
    (r"\bNOTES\.md\b", "GPU notes outside the repository (use docs/gpu-validation.md)"),
    (r"\bTESTING\.md\b", "testing notes outside the repository (use tests/README.md)"),
    (r"\bDESIGN\.md\b", "design notes outside the repository (use docs/design.md)"),
    (r"\bKINDS\.md\b", "the device machines' notes, not part of the project"),
    (re.escape(_path("opt", "wheels")) + r"\b", "a wheel cache that only some machines have"),
    (re.escape(_path("opt", "torch")) + r"\b", "the GPU machine's image's torch venv, which only that machine has"),
    (re.escape(_path("root")) + "/", "a home directory of some machine"),
    (re.escape(_path("home")) + "/", "a home directory of some machine"),
)

HF_CACHE = ".cache/huggingface/hub/models--MiniMaxAI--MiniMax-M2"  # relative: no outside path by itself


@dataclass(frozen=True)
class Allowed:
    """One legitimate hit: files (glob), the exact text that must cover the hit, and why."""

    files: str
    text: str
    reason: str


ALLOWED: tuple[Allowed, ...] = (
    Allowed("tests/fixtures/vllm-logs/seed_invalid_repo.log",
            f"'{_path('home', '1', HF_CACHE)}'",
            "verbatim seed log: the HF cache root on the seed's host that vLLM rejected"),
    Allowed("tests/fixtures/vllm-logs/seed_remote_code.log",
            _path("home", "cjl", HF_CACHE, "snapshots") + "/",
            "verbatim seed log: the snapshot directory on the seed's host"),
    Allowed("tests/unit/service/test_doctor.py",
            _path("home", "1", HF_CACHE, "snapshots", "<commit>"),
            "the doctor's remedy for the seed fixture above: a path on the seed's host"),
    Allowed("tests/unit/weights/test_weights.py",
            _path("root", HF_CACHE),
            "an HF cache root on a deployed host, which the weights role must refuse to serve"),
    Allowed("vllm_fleet/pyenv/settings.py", _path("root", ".netrc") + " on the host",
            "remedy text: the credentials file on the deployed host (uv and pip read it as root)"),
    Allowed("docs/python-env.md", f"`{_path('root', '.netrc')}` on the host",
            "the credentials file on the deployed host (uv and pip read it as root)"),
    Allowed("tests/unit/pyenv/test_stack.py", f'"{_path("root", ".netrc")}"',
            "asserts the remedy names the credentials file on the deployed host"),
    Allowed("tests/gpu/systemd/device.sh", "${VLLM_FLEET_GPU_TORCH_PY:-" + _path("opt", "torch", ".venv", "bin", "python3") + "}",
            "the default of a setting, for the one machine this script runs on (the GPU machine, whose image has torch "
            "there); elsewhere VLLM_FLEET_GPU_TORCH_PY names it, and prepare/measure stop with that name when it is absent"),
    Allowed("tests/gpu/results/*", _path("opt", "torch", ".venv") + "/",
            "verbatim logs of the GPU machine's runs: tracebacks and warnings from its image's torch venv"),
    Allowed("tests/fixtures/vllm-logs/torch_illegal_memory_access.log", _path("opt", "torch", ".venv", "lib") + "/",
            "a verbatim traceback from the GPU machine, where torch is in its image's venv"),
    Allowed("tests/unit/planner/test_plan.py", f'"{_md("NOTES")}" not in reason and "{_md("KINDS")}" not in reason',
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
    (f"see `{UP}shared/{'seed'}` for the log", True),
    (f"rootdir: {_path('work', 'main')}", True),
    (f"the 24 wheels of {UP}shared/{'gpu'}/wheels.txt", True),
    (f"Measured ({_md('NOTES')}, H200)", True),
    (f"recipe: {_md('TESTING')}", True),
    (f"{_md('DESIGN')}: few round trips", True),
    (f"torch wheel from {_path('opt', 'wheels')}, or PyPI", True),
    (f"TORCH_PY={_path('opt', 'torch', '.venv', 'bin', 'python3')}", True),
    ("/opt/torchserve-like/x", False),
    (f"ProtectHome=yes hides {_path('home')}/ and {_path('root')}/", True),
    (f"the log `seed/{'000_0123abcd'}.txt`", True),
    ("shared_experts = 2; n_shared_experts", False),
    ("see docs/design.md and docs/gpu-validation.md", False),
    ("/opt/vllm-fleet/venvs/vllm-0.25.0/bin/vllm", False),
    ("libsystemd-shared libapparmor1", False),
])
def test_patterns(line: str, found: bool) -> None:
    assert any(re.search(p, line) for p, _ in PATTERNS) is found
