"""Operations that read their whole target in one fact (see vllm_fleet/hostops/facts.py).

pyinfra 3.10 runs an operation's function twice in a run (while planning, to see whether it changes
anything, unless ``-y``; and again to execute it) and caches no fact: the facts here are read through
`read_once`, so each is read once per run, as it was before the run (what ``--dry`` showed).

Each compares the host's state with the wanted state and yields only the
commands that close the gap, or `host.noop`: a converged host costs one
command per operation, not one per path.
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pyinfra import host
from pyinfra.api import FileUploadCommand, QuoteString, StringCommand, operation
from pyinfra.facts.server import Home

from vllm_fleet.layout import ACCOUNT_COMMENT, SECRET_GROUP, SECRET_MODE, SECRET_USER, HostLayout, staged_path
from vllm_fleet.hostops.facts import (
    MISSING,
    FileState,
    FileStates,
    PathStates,
    Read,
    SystemAccount,
    TreeDigests,
    read,
    read_once,
)


@dataclass(frozen=True)
class Dir:
    """A wanted directory."""

    path: str
    user: str
    group: str
    mode: str  # octal, e.g. "750"


def directories_read(dirs: Sequence[Dir]) -> Read:
    """What `directories` reads of the host (for a step's ``reads``)."""
    return Read.of(PathStates, paths=[d.path for d in dirs])


def account_read(account: str) -> Read:
    """What `system_account` reads of the host."""
    return Read.of(SystemAccount, account=account)


def tree_read(dest: str) -> Read:
    """What `mirror_dir` reads of the host."""
    return Read.of(TreeDigests, path=dest)


@operation()
def directories(dirs: Sequence[Dir]):
    """
    Ensure several directories exist with the given owner and mode.

    + dirs: the wanted directories (parents first)

    .. code:: python

        directories(name="Ensure the service's directories", dirs=[Dir("/opt/x", "root", "root", "755")])
    """
    states = read(host, directories_read(dirs))
    changed = False
    for d in dirs:
        st = states.get(d.path)
        q = shlex.quote(d.path)
        if st is None or st.kind == MISSING:
            yield f"mkdir -p {q}"
            st = None
        elif st.kind != "directory":
            raise OSError(f"{d.path} exists and is a {st.kind}, not a directory; move it away")
        if st is None or (st.user, st.group) != (d.user, d.group):
            yield f"chown {shlex.quote(d.user)}:{shlex.quote(d.group)} {q}"
            changed = True
        if st is None or st.mode != d.mode:
            yield f"chmod {d.mode} {q}"
            changed = True
    if not changed:
        host.noop(f"{len(dirs)} directories are as wanted")


@operation()
def system_account(account: str, home: str, shell: str = "/usr/sbin/nologin", comment: str = ACCOUNT_COMMENT):
    """
    Ensure a system user and its group of the same name exist, with that group and shell.

    + account: user and group name
    + home: home directory given at creation (not created here). An existing
      account keeps its home: several deployments (data dirs) may share the
      account, and the service gets HOME from its unit, not from passwd.
    + shell: login shell
    + comment: GECOS comment given at creation: the toolkit's mark (preflight tells its own account by it)

    .. code:: python

        system_account(name="Ensure the vllm user", account="vllm", home="/var/lib/vllm-fleet")
    """
    acct = read(host, account_read(account))
    n = shlex.quote(account)
    if acct.group is None:
        yield f"groupadd --system {n}"
    if acct.user is None:
        yield (f"useradd --system --gid {n} --home-dir {shlex.quote(home)} --no-create-home --shell {shlex.quote(shell)} "
               f"--comment {shlex.quote(comment)} {n}")
        return
    _, _, _, gid, _, _, cur_shell = (list(acct.user) + [""] * 7)[:7]
    fixes = []
    if acct.group is not None and gid != acct.group[2]:
        fixes.append(f"--gid {n}")
    if cur_shell != shell:
        fixes.append(f"--shell {shlex.quote(shell)}")
    if fixes:
        yield f"usermod {' '.join(fixes)} {n}"
    elif acct.group is not None:
        host.noop(f"user {account} exists")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@operation()
def mirror_dir(src: str, dest: str, user: str, group: str, mode: str = "640", dir_mode: str = "750"):
    """
    Make ``dest`` on the host hold exactly the files of the local directory ``src``.

    Files are compared by sha256 (read in one command); changed or missing
    files are uploaded, extra files removed, owners and modes fixed.

    + src: local directory
    + dest: remote directory
    + user, group: owner of everything below ``dest``
    + mode, dir_mode: modes of files and directories

    .. code:: python

        mirror_dir(name="Ensure the model files", src="tests/fixtures/tiny", dest="/var/lib/x/tiny",
                   user="vllm", group="vllm")
    """
    root = Path(src)
    local = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
    tree = read(host, tree_read(dest))
    remote = tree or {}
    q = shlex.quote
    changed = False
    dirs = sorted({str(Path(rel).parent) for rel in local} - {"."})
    if tree is None:
        yield f"mkdir -p {q(dest)} && chown {q(user)}:{q(group)} {q(dest)} && chmod {dir_mode} {q(dest)}"
        changed = True
    for d in dirs:
        if not any(rel.startswith(d + "/") for rel in remote):
            yield f"mkdir -p {q(dest + '/' + d)} && chown {q(user)}:{q(group)} {q(dest + '/' + d)} && chmod {dir_mode} {q(dest + '/' + d)}"
    for rel, path in local.items():
        target = f"{dest}/{rel}"
        have = remote.get(rel)
        if have is None or have.sha256 != _sha256(path):
            yield FileUploadCommand(str(path), target, remote_temp_filename=host.get_temp_filename(target))
            have = None
            changed = True
        if have is None or (have.user, have.group, have.mode) != (user, group, mode):
            yield f"chown {q(user)}:{q(group)} {q(target)} && chmod {mode} {q(target)}"
            changed = True
    for rel in sorted(set(remote) - set(local)):
        yield f"rm -f {q(dest + '/' + rel)}"
        changed = True
    if not changed:
        host.noop(f"{dest} holds the {len(local)} files of {src}")


@dataclass(frozen=True)
class ManagedFile:
    """A wanted file: its content (text, or a local path to copy), owner and mode.

    ``secret`` files are compared by sha256 only and uploaded through a
    directory only the login user can enter: their content is never printed,
    diffed, or left readable in /tmp (pyinfra's SSH + sudo upload goes through
    a temp file of the login user).
    """

    path: str
    content: str | Path
    user: str
    group: str
    mode: str
    secret: bool = False

    def data(self) -> bytes:
        return self.content.read_bytes() if isinstance(self.content, Path) else self.content.encode()

    def __repr__(self) -> str:  # never show a secret's content in pyinfra's debug output
        return f"ManagedFile({self.path!r}, {'<secret>' if self.secret else '...'}, {self.user}:{self.group} {self.mode})"


def secret_file(path: str, text: str) -> ManagedFile:
    """Every secret file on a host (the service's and the download unit's EnvironmentFile) is this:
    root:root, mode `layout.SECRET_MODE` (0600; systemd reads an EnvironmentFile as root), uploaded through
    the private directory, compared by sha256, never shown in a diff."""
    return ManagedFile(path, text, SECRET_USER, SECRET_GROUP, SECRET_MODE, secret=True)


def login_home() -> str:
    """The SSH login user's home on the current host (read without sudo; /root when it reads as nothing)."""
    return read_once(host, Home, _sudo=False) or "/root"


def upload_dir() -> str:
    """The current host's staging directory of secret uploads (`HostLayout.upload_dir` of the login user's home)."""
    return HostLayout.upload_dir(login_home())


def _mode(mode: str) -> str:
    """An octal mode for chmod (3 or 4 digits), refused otherwise: it is formatted into a command."""
    if not (mode.isdigit() and 3 <= len(mode) <= 4 and set(mode) <= set("01234567")):
        raise ValueError(f"mode {mode!r} is not an octal mode such as 640")
    return mode


@operation()
def managed_files(files: Sequence[ManagedFile], states: Mapping[str, FileState | None] | None = None):
    """
    Ensure several files hold the given content, owner and mode, reading them all in one fact.

    A file whose content changes is replaced atomically: an empty root-only (0600) file is made at
    `layout.staged_path` (same directory), the upload writes into it, it gets its owner and mode, then
    ``mv`` renames it over the file. An interrupted upload never leaves a truncated unit or an empty env
    file in place, and no byte of a secret is ever in a file others can read.

    + files: the wanted files
    + states: the ``FileStates`` fact already read by the caller for these paths (and maybe more), so that
      several ``managed_files`` of one step cost one round trip (pyinfra does not cache facts); None: read here

    .. code:: python

        managed_files(name="Ensure the unit and env file", files=[ManagedFile("/etc/x.conf", "a=1\\n", "root", "root", "644")])

        states = host.get_fact(FileStates, paths=[f.path for f in unit + env])
        managed_files(name="Ensure the unit", files=unit, states=states)
        managed_files(name="Ensure the env file", files=env, states=states)
    """
    if states is None:
        states = read_once(host, FileStates, paths=sorted({f.path for f in files}))
    else:
        unread = sorted(f.path for f in files if f.path not in states)
        if unread:
            raise ValueError(f"managed_files: states were read without {', '.join(unread)}")
    q = shlex.quote
    changed = False
    for f in files:
        data = f.data()
        have = states.get(f.path)
        if have is None or have.sha256 != hashlib.sha256(data).hexdigest():
            staged = staged_path(f.path)
            temp = host.get_temp_filename(f.path)
            if f.secret:
                private = upload_dir()
                yield StringCommand("mkdir", "-p", "-m", "700", QuoteString(private), _sudo=False)
                yield StringCommand("chmod", "700", QuoteString(private), _sudo=False)
                temp = f"{private}/{hashlib.sha256(data).hexdigest()[:16]}"
            yield f"rm -f {q(staged)} && (umask 077 && : > {q(staged)})"
            yield FileUploadCommand(BytesIO(data), staged, remote_temp_filename=temp)
            yield f"chown {q(f.user)}:{q(f.group)} {q(staged)} && chmod {_mode(f.mode)} {q(staged)} && mv -f {q(staged)} {q(f.path)}"
            changed = True
        elif (have.user, have.group, have.mode) != (f.user, f.group, f.mode):
            yield f"chown {q(f.user)}:{q(f.group)} {q(f.path)} && chmod {_mode(f.mode)} {q(f.path)}"
            changed = True
    if not changed:
        host.noop(f"{len(files)} files are current")


def restart_on_change(unit: str, what: str, changed):
    """Reload systemd, enable and restart ``unit`` when ``changed()`` says so (an ``_if`` callable, e.g.
    `vllm_fleet.handoff.any_changed` of the operations that wrote its files); ``what`` names them in the
    operation's name.

    .. code:: python

        restart_on_change("vllm-watchdog.service", "its program, config or unit", any_changed(programs, units))
    """
    from pyinfra.operations import server

    q = shlex.quote(unit)
    return server.shell(name=f"Reload systemd and restart {unit} ({what} changed)",
                        commands=["systemctl daemon-reload", f"systemctl enable -- {q}", f"systemctl restart -- {q}"], _if=changed)


@operation()
def unit_running(unit: str, seen: tuple[str, str]):
    """
    Ensure a unit is enabled and active.

    + unit: the unit, with its suffix
    + seen: (ActiveState, UnitFileState) as read before the run (a run that changed the unit's files restarted it
      just before: then these commands change nothing)

    .. code:: python

        unit_running(name="Ensure vllm-watchdog.service runs", unit="vllm-watchdog.service", seen=("active", "enabled"))
    """
    active, enabled = seen
    if enabled != "enabled":
        yield StringCommand("systemctl", "enable", "--", QuoteString(unit))
    if active != "active":
        yield StringCommand("systemctl", "start", "--", QuoteString(unit))
    if enabled == "enabled" and active == "active":
        host.noop(f"{unit} is enabled and running")
