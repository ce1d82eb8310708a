"""Facts about many paths in one round trip (docs/design.md: "few round trips").

pyinfra's own `files.directory` / `files.sync` read one fact per path (two
per synced file); a no-op rerun then costs a command per path. These facts
read every path the toolkit manages in one command each, and the operations
in vllm_fleet/hostops/operations.py compare against them.
"""

from __future__ import annotations

import secrets
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pyinfra.api import FactBase

MEMO_ATTRIBUTE = "_vllm_fleet_fact_memo"

MISSING = "missing"


def cgroup_peers_script(pid: str) -> str:
    """Shell that prints the PIDs in the cgroup of process ``pid`` (a number, or a shell expansion such as "$pid"),
    one per line: those whose cgroup line equals its own (cgroup v2's ``0::`` line, else v1's ``name=systemd`` one).
    No cgroupfs path is assumed: a v1 host mounts one tree per controller, a container's sits elsewhere."""
    return (f'cg=$(grep -m1 "^0::/" /proc/{pid}/cgroup || grep -m1 ":name=systemd:/" /proc/{pid}/cgroup); '
            # one grep over every process's cgroup file (not one per process): the files holding that line
            'if [ -n "$cg" ]; then grep -lxF -- "$cg" /proc/[0-9]*/cgroup 2>/dev/null | sed -e "s|^/proc/||" -e "s|/cgroup\\$||"; fi')


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


@dataclass(frozen=True)
class Read:
    """One fact read as `read_once` makes it: the fact class and its arguments (``_sudo`` and the other
    connector arguments included). `Read.of` builds it as ``host.get_fact`` is called."""

    fact: type[FactBase]
    args: tuple = ()
    kwargs: tuple = ()  # sorted (name, value) pairs

    @classmethod
    def of(cls, fact: type[FactBase], *args, **kwargs) -> "Read":
        return cls(fact, args, tuple(sorted(kwargs.items())))


def _memo(host) -> dict:
    run = host.state
    memo = vars(run).get(MEMO_ATTRIBUTE) if run is not None else None
    if memo is None:
        memo = {}
        if run is not None:
            setattr(run, MEMO_ATTRIBUTE, memo)
    return memo


def _key(host, fact: type[FactBase], args: tuple, kwargs: dict) -> tuple:
    return (host.name, fact, repr(args), repr(sorted(kwargs.items())))


def read_once(host, fact: type[FactBase], *args, **kwargs):
    """``host.get_fact(fact, *args, **kwargs)``, read once per run: the value is kept on the run's State (pyinfra 3.10
    reads a fact again on every call), keyed by (host, fact class, arguments). A value `read_many` read ahead
    is taken from there.

    For the facts of our operations (pyinfra runs an operation's function twice in a run: to plan, unless ``-y``,
    and to execute) and for every fact a step reads while pyinfra plans (so the deploy can read them all ahead in
    one round trip, `read_many`).

    .. code:: python

        read_once(host, Home, _sudo=False)
    """
    memo = _memo(host)
    key = _key(host, fact, args, kwargs)
    if key not in memo:
        memo[key] = host.get_fact(fact, *args, **kwargs)
    return memo[key]


def read(host, r: Read):
    """`read_once` of a `Read` (the step that declared it in its ``reads`` reads it so: the keys match)."""
    return read_once(host, r.fact, *r.args, **dict(r.kwargs))


def _batch_script(commands: Sequence[str], nonce: str) -> str:
    """One shell script running each command in its own subshell (an ``exit`` ends only that one), each output
    between a begin line and an end line carrying its exit status. The end line starts on a line of its own:
    ``printf '\\n...'`` ends an unterminated last line, and `split_batch` drops the empty line it adds otherwise."""
    parts = []
    for i, command in enumerate(commands):
        parts.append(f"echo '<<{nonce} {i}>>'\n(\n{command}\n)\nprintf '\\n<<{nonce} {i} rc %s>>\\n' \"$?\"")
    return "\n".join(parts)


def split_batch(lines: Sequence[str], count: int, nonce: str) -> dict[int, tuple[int, list[str]]]:
    """{index: (exit status, output lines)} of `_batch_script`'s output; a command whose end line is missing (the
    connection broke, the output was cut) is left out."""
    out: dict[int, tuple[int, list[str]]] = {}
    current: int | None = None
    buf: list[str] = []
    for line in lines:
        if line.startswith(f"<<{nonce} ") and line.endswith(">>"):
            words = line[len(nonce) + 3:-2].split(" ")
            if len(words) == 1 and words[0].isdigit():
                current, buf = int(words[0]), []
                continue
            if current is not None and len(words) == 3 and words[0] == str(current) and words[1] == "rc":
                if buf and buf[-1] == "":
                    buf.pop()
                out[current] = (int(words[2]) if words[2].isdigit() else -1, buf)
                current, buf = None, []
                continue
        if current is not None:
            buf.append(line)
    return {i: v for i, v in out.items() if i < count}


def read_many(host, reads: Iterable[Read]) -> int:
    """Read every fact of ``reads`` not yet read in this run, in one command per set of connector arguments
    (``_sudo``, ...), and keep each value where `read_once` finds it. Returns the number of commands sent.

    Each fact's own ``command`` runs in a subshell and its output goes to its own ``process`` (or ``default``
    when empty), as ``host.get_fact`` would do. A fact that exits non-zero, cannot be parsed, or whose binary is absent,
    or that needs a precondition or another shell is not kept: `read_once` reads it again on its own, and pyinfra
    reports its error there, as before. A pyinfra deploy reads facts while it plans, before any operation runs,
    so reading them all at its start gives each step the value it would have read.

    .. code:: python

        read_many(host, [Read.of(SystemAccount, account="vllm"), Read.of(PathStates, paths=["/opt/vllm-fleet"])])
    """
    from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS
    from pyinfra.api.command import StringCommand
    from pyinfra.api.facts import _MISSING_COMMAND_MARKER, _handle_fact_kwargs, _make_command  # pinned pyinfra (pyproject.toml)

    state, memo = host.state, _memo(host)
    groups: dict[str, list[tuple[tuple, FactBase, str]]] = {}
    connector: dict[str, dict] = {}
    seen = set()
    for r in reads:
        kwargs = dict(r.kwargs)
        key = _key(host, r.fact, r.args, kwargs)
        if key in memo or key in seen:
            continue
        fact = r.fact()
        if fact.shell_executable or fact.check_preconditions(state, host):
            continue
        fact_kwargs, global_kwargs = _handle_fact_kwargs(state, host, r.fact, list(r.args), kwargs)
        command = _make_command(fact.command, dict(fact_kwargs))
        if isinstance(command, StringCommand):
            command = command.get_raw_value()
        needs = _make_command(fact.requires_command, dict(fact_kwargs))
        if needs:  # as pyinfra guards it: the marker alone says the binary is absent
            command = (f"if command -v {shlex.quote(str(needs))} >/dev/null 2>&1; then ( {command}\n); "
                       f"else echo {shlex.quote(_MISSING_COMMAND_MARKER)}; fi")
        executor = {k: v for k, v in global_kwargs.items() if k in CONNECTOR_ARGUMENT_KEYS}
        group = repr(sorted(executor.items()))
        connector[group] = executor
        groups.setdefault(group, []).append((key, fact, str(command)))
        seen.add(key)
    if groups and not host.connected:
        host.connect(reason="to read the deploy's facts", raise_exceptions=True)
    sent = 0
    for group, items in groups.items():
        nonce = f"vf-{secrets.token_hex(6)}"
        script = _batch_script([c for _, _, c in items], nonce)
        try:
            ok, output = host.run_shell_command(StringCommand(script), print_output=state.print_fact_output,
                                                print_input=state.print_fact_input, **connector[group])
        except Exception:  # noqa: BLE001 - a broken read is read again, alone, where pyinfra reports it
            continue
        finally:
            sent += 1
        if not ok:
            continue
        for i, (rc, lines) in split_batch(output.stdout_lines, len(items), nonce).items():
            key, fact, _ = items[i]
            if rc != 0 or lines == [_MISSING_COMMAND_MARKER]:
                continue
            try:
                memo[key] = fact.process(lines) if lines else fact.default()
            except Exception:  # noqa: BLE001 - as above
                continue
    return sent
