"""Facts about many paths in one round trip (docs/design.md: "few round trips").

pyinfra's own `files.directory` / `files.sync` read one fact per path (two
per synced file); a no-op rerun then costs a command per path. These facts
read every path the toolkit manages in one command each, and the operations
in vllm_fleet/hostops/operations.py compare against them.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from pyinfra.api import FactBase

MEMO_ATTRIBUTE = "_vllm_fleet_fact_memo"

MISSING = "missing"


def cgroup_peers_script(pid: str) -> str:
    """Shell that prints the PIDs in the cgroup of process ``pid`` (a number, or a shell expansion such as "$pid"),
    one per line: those whose cgroup line equals its own (cgroup v2's ``0::`` line, else v1's ``name=systemd`` one).
    No cgroupfs path is assumed: a v1 host mounts one tree per controller, a container's sits elsewhere."""
    return (f'cg=$(grep -m1 "^0::/" /proc/{pid}/cgroup || grep -m1 ":name=systemd:/" /proc/{pid}/cgroup); '
            'for f in /proc/[0-9]*/cgroup; do grep -qxF -- "$cg" "$f" 2>/dev/null && { p=${f#/proc/}; echo "${p%/cgroup}"; }; done')


@dataclass(frozen=True)
class PathState:
    """What `stat` says of one path."""

    kind: str  # "directory", "regular file", "symbolic link", ... (stat %F), or "missing"
    user: str | None = None
    group: str | None = None
    mode: str | None = None  # octal, as stat %a prints it ("750")


def parse_path_states(lines: Sequence[str]) -> dict[str, PathState]:
    """Parse `path|kind|user|group|mode` lines (`path|missing` for absent paths).

    Split from the right: the fields after the path never hold a ``|``, a path may (settings refuse only
    what a unit file or a line-based fact cannot carry: control characters)."""
    out: dict[str, PathState] = {}
    for line in lines:
        if line.endswith("|" + MISSING):
            out[line[: -len(MISSING) - 1]] = PathState(MISSING)
            continue
        parts = line.rsplit("|", 4)
        if len(parts) == 5:
            out[parts[0]] = PathState(parts[1], parts[2], parts[3], parts[4])
    return out


class PathStates(FactBase[dict]):
    """
    Type, owner and mode of several paths, in one command.

    + paths: absolute paths (no newline in them)

    .. code:: python

        host.get_fact(PathStates, paths=["/opt/vllm-fleet", "/etc/vllm-fleet"])
        # {"/opt/vllm-fleet": PathState("directory", "root", "root", "755"), ...}
    """

    def command(self, paths: Sequence[str]) -> str:
        quoted = " ".join(shlex.quote(p) for p in paths)
        return (f"for p in {quoted}; do stat -c '%n|%F|%U|%G|%a' \"$p\" 2>/dev/null "
                f"|| echo \"$p|{MISSING}\"; done")

    def process(self, output: list[str]) -> dict[str, PathState]:
        return parse_path_states(output)


@dataclass(frozen=True)
class Account:
    """A user and its primary group as getent reports them (None: absent)."""

    user: tuple[str, ...] | None  # passwd fields: name, x, uid, gid, gecos, home, shell
    group: tuple[str, ...] | None  # group fields: name, x, gid, members


def parse_account(lines: Sequence[str]) -> Account:
    user = group = None
    for line in lines:
        tag, _, rest = line.partition(" ")
        if tag == "passwd" and rest:
            user = tuple(rest.split(":"))
        elif tag == "group" and rest:
            group = tuple(rest.split(":"))
    return Account(user, group)


class SystemAccount(FactBase[Account]):
    """
    A user and the group of the same name, in one command.

    + account: the user (and group) name

    .. code:: python

        host.get_fact(SystemAccount, account="vllm")
    """

    def command(self, account: str) -> str:
        n = shlex.quote(account)
        return (f"echo \"passwd $(getent passwd {n})\"; echo \"group $(getent group {n})\"")

    def process(self, output: list[str]) -> Account:
        return parse_account(output)


@dataclass(frozen=True)
class TreeFile:
    """One regular file below a directory: its sha256, owner and mode."""

    sha256: str
    user: str
    group: str
    mode: str


def parse_tree(lines: Sequence[str]) -> dict[str, TreeFile] | None:
    """Parse `sha256 user group mode relpath` lines; None when the directory is absent."""
    if lines and lines[0] == MISSING:
        return None
    out = {}
    for line in lines:
        parts = line.split(" ", 4)
        if len(parts) == 5:
            out[parts[4]] = TreeFile(*parts[:4])
    return out


class TreeDigests(FactBase[dict]):
    """
    Every regular file below a directory with its sha256, owner and mode, in one command.

    + path: the directory

    .. code:: python

        host.get_fact(TreeDigests, path="/var/lib/vllm-fleet/models/tiny")
        # {"config.json": TreeFile(sha256=..., user="vllm", group="vllm", mode="640"), ...}
    """

    def command(self, path: str) -> str:
        p = shlex.quote(path)
        return (f"test -d {p} || {{ echo {MISSING}; exit 0; }}; cd {p} && "
                "find . -type f -printf '%P\\n' | while IFS= read -r f; do "
                "printf '%s %s\\n' \"$(sha256sum \"$f\" | cut -d' ' -f1) $(stat -c '%U %G %a' \"$f\")\" \"$f\"; done")

    def process(self, output: list[str]) -> dict[str, TreeFile] | None:
        return parse_tree(output)


@dataclass(frozen=True)
class FileState:
    """A regular file's sha256, owner and mode."""

    sha256: str
    user: str
    group: str
    mode: str


def parse_file_states(lines: Sequence[str]) -> dict[str, FileState | None]:
    """Parse `path|sha256 user group mode` lines (`path|missing` for absent files); split at the last ``|``
    (a path may hold one, the fields after it never do)."""
    out: dict[str, FileState | None] = {}
    for line in lines:
        path, _, rest = line.rpartition("|")
        parts = rest.split(" ")
        if rest == MISSING:
            out[path] = None
        elif len(parts) == 4:
            out[path] = FileState(*parts)
    return out


class FileStates(FactBase[dict]):
    """
    sha256, owner and mode of several files, in one command (None for an absent file).

    + paths: absolute paths of regular files (no newline in them)

    .. code:: python

        host.get_fact(FileStates, paths=["/etc/systemd/system/vllm.service", "/etc/vllm-fleet/vllm.env"])
    """

    def command(self, paths: Sequence[str]) -> str:
        quoted = " ".join(shlex.quote(p) for p in paths)
        return (f"for p in {quoted}; do if [ -f \"$p\" ]; then printf '%s|%s %s\\n' \"$p\" "
                f"\"$(sha256sum \"$p\" | cut -d' ' -f1)\" \"$(stat -c '%U %G %a' \"$p\")\"; "
                f"else echo \"$p|{MISSING}\"; fi; done")

    def process(self, output: list[str]) -> dict[str, FileState | None]:
        return parse_file_states(output)


def read_once(host, fact: type[FactBase], *args, **kwargs):
    """``host.get_fact(fact, *args, **kwargs)``, read once per run: the value is kept on the run's State (pyinfra 3.10
    reads a fact again on every call), keyed by (host, fact class, arguments).

    For the facts of our operations (pyinfra runs an operation's function twice in a run: to plan, unless ``-y``,
    and to execute) and for facts several steps need with the same arguments where handing the value on would
    couple the steps (the login user's home for secret uploads). In a step, prefer reading a fact once and
    passing the value on.

    .. code:: python

        read_once(host, Home, _sudo=False)
    """
    run = host.state
    memo = vars(run).get(MEMO_ATTRIBUTE) if run is not None else None
    if memo is None:
        memo = {}
        if run is not None:
            setattr(run, MEMO_ATTRIBUTE, memo)
    key = (host.name, fact, repr(args), repr(sorted(kwargs.items())))
    if key not in memo:
        memo[key] = host.get_fact(fact, *args, **kwargs)
    return memo[key]
