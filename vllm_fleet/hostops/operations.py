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
from pyinfra.api import FileUploadCommand, StringCommand, operation
from pyinfra.facts.server import Home

from vllm_fleet.layout import SECRET_MODE
from vllm_fleet.hostops.facts import (
    MISSING,
    FileState,
    FileStates,
    PathStates,
    SystemAccount,
    TreeDigests,
    read_once,
)


@dataclass(frozen=True)
class Dir:
    """A wanted directory."""

    path: str
    user: str
    group: str
    mode: str  # octal, e.g. "750"


@operation()
def directories(dirs: Sequence[Dir]):
    """
    Ensure several directories exist with the given owner and mode.

    + dirs: the wanted directories (parents first)

    .. code:: python

        directories(name="Ensure the service's directories", dirs=[Dir("/opt/x", "root", "root", "755")])
    """
    states = read_once(host, PathStates, paths=[d.path for d in dirs])
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
def system_account(account: str, home: str, shell: str = "/usr/sbin/nologin"):
    """
    Ensure a system user and its group of the same name exist, with that group and shell.

    + account: user and group name
    + home: home directory given at creation (not created here). An existing
      account keeps its home: several deployments (data dirs) may share the
      account, and the service gets HOME from its unit, not from passwd.
    + shell: login shell

    .. code:: python

        system_account(name="Ensure the vllm user", account="vllm", home="/var/lib/vllm-fleet")
    """
    acct = read_once(host, SystemAccount, account=account)
    n = shlex.quote(account)
    if acct.group is None:
        yield f"groupadd --system {n}"
    if acct.user is None:
        yield f"useradd --system --gid {n} --home-dir {shlex.quote(home)} --no-create-home --shell {shlex.quote(shell)} {n}"
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
    tree = read_once(host, TreeDigests, path=dest)
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


def secret_file(path: str, service_user: str, text: str) -> ManagedFile:
    """Every secret file on a host (the service's and the download unit's EnvironmentFile) is this:
    root:<service user>, mode `layout.SECRET_MODE` (0640), uploaded through the private directory,
    compared by sha256, never shown in a diff."""
    return ManagedFile(path, text, "root", service_user, SECRET_MODE, secret=True)


@operation()
def managed_files(files: Sequence[ManagedFile], states: Mapping[str, FileState | None] | None = None):
    """
    Ensure several files hold the given content, owner and mode, reading them all in one fact.

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
            temp = host.get_temp_filename(f.path)
            if f.secret:
                private = f"{read_once(host, Home, _sudo=False) or '/root'}/.vllm-fleet-upload"
                yield StringCommand("mkdir", "-p", "-m", "700", private, _sudo=False)
                yield StringCommand("chmod", "700", private, _sudo=False)
                temp = f"{private}/{hashlib.sha256(data).hexdigest()[:16]}"
            yield FileUploadCommand(BytesIO(data), f.path, remote_temp_filename=temp)
            have = None
        if have is None or (have.user, have.group, have.mode) != (f.user, f.group, f.mode):
            yield f"chown {q(f.user)}:{q(f.group)} {q(f.path)} && chmod {f.mode} {q(f.path)}"
            changed = True
    if not changed:
        host.noop(f"{len(files)} files are current")
