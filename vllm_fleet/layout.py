"""Every path vllm-fleet uses on a host, in one value: ``HostLayout.of(settings)``.

Pure (no pyinfra). The steps, the renderers, ``vllm-fleet render``/``status``,
uninstall and the JSON configs handed to the host programs take their paths
from here; nothing else formats a host path. ``SERVICE`` is the service name
(``vllm_service_name``), ``BASE`` is ``vllm_base_dir`` (/opt/vllm-fleet),
``DATA`` is ``vllm_data_dir`` (/var/lib/vllm-fleet).

FILES

    /etc/systemd/system/SERVICE.service    the vLLM unit                              (service)
    /etc/systemd/system/SERVICE-fetch.service  the weights download unit          (weights)
    /etc/systemd/system/SERVICE-watchdog.service  the completion watchdog         (service)
    /etc/systemd/system/SERVICE-devices.service   loads nvidia-uvm, makes the device nodes before SERVICE starts (service)
    /etc/vllm-fleet/                        root:USER 0750                             (account)
        SERVICE.env                         the service's secrets (API key, HF token), root:root 0600
        SERVICE-fetch.env                   the download unit's HF token, root:root 0600
        SERVICE.gate.json                   the health gate's config (no secret)
        SERVICE.watchdog.json               the watchdog's and GPU reaper's config (no secret)
        SERVICE.service.prev, SERVICE.env.prev   last known good unit/env file (the gate's rollback)
    BASE/                                   root:root 0755                             (account)
        bin/vllm-fleet-gate                 the health gate (vllm_fleet/service/hostprog.py)
        bin/vllm-fleet-venv                 the venv builder (vllm_fleet/pyenv/hostprog.py)
        bin/vllm-fleet-watchdog             watchdog + GPU reaper (vllm_fleet/service/hostprog_watchdog.py)
        state/SERVICE.gate.json, .gate.log  the gate's last verdict and its log
        state/SERVICE.weights-pending       marker: restart held back for incomplete weights
        venvs/vllm-VERSION-BACKEND          one venv per vLLM version + torch backend (kept for rollback)
        uv/                                 bootstrap venv holding uv (bin/uv, bin/pip)
        cache/uv/                           uv's cache (same filesystem as the venvs: hard links)
        wheelhouse/                         wheels pushed from vllm_wheelhouse (air-gapped hosts), MANIFEST.json last
        src/VENV-NAME/                      source channel: the checkout a venv is installed from
        fetch/fetch_weights.py, fetch/venv  the download worker (vllm_fleet/weights/hostprog.py) + its venv
    DATA/                                   USER:USER 0750, the service's home           (account)
        models/ORG/NAME/REV                 the weights vLLM serves, one directory per revision (kept for rollback)
        models/NAME                         a model directory mirrored from the control machine
        weights-state/ORG--NAME/REV/        fetch.json (config), state.json, status.json, fetch.lock,
                                            verified.json (complete + verified: the vLLM unit asserts it)
        cache/                              XDG_CACHE_HOME and the service's HOME (writable); vllm/ (VLLM_CACHE_ROOT),
                                            huggingface/ (HF_HOME), triton/, torchinductor/, nv/ (CUDA_CACHE_PATH),
                                            .cache/flashinfer (FLASHINFER_WORKSPACE_BASE), modelscope/, modelscope-home/
    LOGIN_HOME/.vllm-fleet-upload/          0700, the SSH login user's: where a secret file's upload is staged before
                                            sudo copies it (`upload_dir`; pyinfra removes each file after copying it)

In a venv (``venv_bin``, ``dist_info_glob``): VENV/bin/PROGRAM, VENV/lib/python3*/site-packages/DIST-*.dist-info.

Every file the deploy writes is replaced atomically: uploaded to ``.NAME.vllm-fleet-new`` in the
same directory (created 0600 root before the upload), owned and moded, then renamed over NAME
(`staged_path`); the gate copies through ``NAME.tmp``. An interrupted write leaves only those.

What uninstall removes is `HostLayout.uninstall_targets` (one list, with the
reason each path kept is kept).
"""

from __future__ import annotations

import posixpath
import re
import shlex
import string
from dataclasses import dataclass

CONFIG_DIR = "/etc/vllm-fleet"
UNIT_DIR = "/etc/systemd/system"
#: Owner, group and mode of every secret file (EnvironmentFiles): root:root 0600. systemd reads an
#: EnvironmentFile as root and hands the values to the service's environment; nobody else reads the file.
SECRET_USER = "root"
SECRET_GROUP = "root"
SECRET_MODE = "600"
GATE_PROGRAM = "vllm-fleet-gate"
VENV_PROGRAM = "vllm-fleet-venv"
WATCHDOG_PROGRAM = "vllm-fleet-watchdog"
FETCH_PROGRAM = "fetch_weights.py"
#: The wheelhouse's list of wheels (name -> size, sha256), written last by the push; the venv program reads it.
WHEELHOUSE_MANIFEST = "MANIFEST.json"
#: The download's live progress in its revision's state directory, written by the fetch program.
WEIGHTS_STATUS = "status.json"
#: The directory, in the SSH login user's home, through which secret files are uploaded (0700).
UPLOAD_DIR = ".vllm-fleet-upload"
#: The service's environment variables that point into the cache dir (HostLayout.runtime_env): variable -> the
#: HostLayout property it holds. The render sets them; vllm_extra_env may not (the units let vLLM write only there).
RUNTIME_ENV = {
    "HOME": "runtime_home",
    "XDG_CACHE_HOME": "cache_dir",
    "CUDA_CACHE_PATH": "cuda_cache",
    "FLASHINFER_WORKSPACE_BASE": "cache_dir",
    "VLLM_CACHE_ROOT": "vllm_cache",
    "HF_HOME": "hf_home",
    "TRITON_CACHE_DIR": "triton_cache",
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor_cache",
}


def staged_path(path: str) -> str:
    """Where a new version of ``path`` is written before it is renamed over it: same directory (so the rename is
    atomic), a hidden name no unit or program reads."""
    head, _, name = path.rpartition("/")
    return f"{head}/.{name}.vllm-fleet-new"


def write_leftovers(path: str) -> list[str]:
    """What an interrupted write of ``path`` can leave: the deploy's staged upload and the gate's copy (``.tmp``)."""
    return [staged_path(path), f"{path}.tmp"]


def venv_bin(venv: str, program: str) -> str:
    """An executable of a venv on the host: ``VENV/bin/PROGRAM`` (python, pip, uv, vllm)."""
    return f"{venv.rstrip('/')}/bin/{program}"


def dist_info_glob(venv: str, dist: str) -> str:
    """A shell word matching the installed ``DIST-VERSION.dist-info`` directory of distribution ``dist`` in a venv
    (``VENV/lib/python3*/site-packages/DIST-*.dist-info``): every part quoted, the wildcards not."""
    pattern = f"{venv.rstrip('/')}/lib/python3*/site-packages/{dist}-*.dist-info"
    return "*".join(shlex.quote(part) for part in pattern.split("*"))


# -- what marks the toolkit's own units and account on a host ----------------------------------
#: In the first lines of every unit the toolkit renders (vllm.service.j2, vllm-fetch.service.j2): a unit file
#: of the service's name without it is someone else's (preflight's ownership check).
UNIT_MARK = "rendered by vllm-fleet"
#: The GECOS comment of the service user the toolkit creates (useradd --comment).
ACCOUNT_COMMENT = "vllm-fleet service user"
#: Where systemd finds system units, searched for a unit of the service's name.
UNIT_SEARCH_PATH = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
                    "/lib/systemd/system", "/usr/lib/systemd/system")

# -- which host directories the toolkit may own -----------------------------------------------
#: The operating system's trees: never a toolkit directory, nor anything under them. The account step
#: chowns and chmods base_dir and data_dir, so one of these would change a system directory (/tmp's
#: sticky bit included). /home and /root: the units run with ProtectHome=yes, which hides them.
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/lost+found", "/proc",
                "/run", "/sbin", "/snap", "/sys", "/tmp", "/usr", "/var/tmp", "/var/log", "/var/run", "/var/lock",
                "/var/spool", "/var/mail", "/var/backups", "/var/crash", "/var/cache/apt", "/var/lib/apt",
                "/var/lib/dpkg", "/var/lib/systemd", "/var/lib/dbus", "/var/lib/polkit-1", "/var/lib/private",
                "/var/lib/sudo", "/var/lib/ucf", "/var/lib/pam", "/var/lib/docker", "/var/lib/containerd",
                "/var/lib/nvidia", "/home", "/root")
#: Shared parents: a toolkit directory goes below one (/opt/vllm-fleet), never is one.
SHARED_PARENTS = ("/opt", "/srv", "/var", "/var/lib", "/var/opt", "/var/cache", "/var/local", "/mnt", "/media", "/data")


def toolkit_dir_problem(path: str) -> str | None:
    """Why ``path`` cannot be a directory the toolkit owns on the host (base_dir, data_dir), or None.

    Allowed: an absolute, normalized path of at least two components outside the system trees
    (SYSTEM_TREES, and /home, hidden from the units by ProtectHome), not a shared parent itself
    (SHARED_PARENTS): /opt/vllm-fleet, /var/lib/vllm-fleet, /srv/vllm, /data/vllm, /mnt/nvme0/vllm.
    The text is ``problem|remedy``.
    """
    fix = "use a directory of its own such as /opt/vllm-fleet (base_dir) or /var/lib/vllm-fleet, /data/vllm (data_dir)"
    if not path.startswith("/") or ".." in path.split("/"):
        return f"must be an absolute path without ..|{fix}"
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        return f"holds a control character (newline, tab, ...), which no unit file or host listing can carry|{fix}"
    norm = "/" + posixpath.normpath(path).lstrip("/")
    if norm in ("/", "/."):
        return f"is the root directory, which the toolkit would chown|{fix}"
    for tree in SYSTEM_TREES:
        if norm == tree or norm.startswith(tree + "/"):
            if tree in ("/home", "/root"):
                return (f"is under {tree}, which the service units hide (ProtectHome=yes): vLLM could not read it|"
                        f"{fix}, outside /home and /root")
            return f"is {'' if norm == tree else 'under '}{tree}, a system directory the toolkit would chown and chmod|{fix}"
    if norm in SHARED_PARENTS or norm.count("/") < 2:
        return f"is {norm}, a directory other software shares; the toolkit would chown and chmod it|{fix}, below it"
    return None


#: Trees the units hide from vLLM and the download worker (ProtectHome=yes, PrivateTmp=yes) or that hold no files.
#: What a venv directory's path may hold (base_dir holds the venvs). pip and uv write each entry-point script of a
#: venv (bin/pip, bin/vllm, ...) with the interpreter's path in its first line, and where that path is long or holds
#: a space, as a ``/bin/sh`` trampoline with the path in double quotes: ``$``, a backtick, ``\`` or ``"`` there
#: would be run by that shell (measured: base_dir ``/srv/x$(touch${IFS}M)`` made ``bin/pip`` run ``touch M``).
VENV_PATH_CHARACTERS = frozenset(string.ascii_letters + string.digits + "/._-+@,:=~")


def venv_dir_problem(path: str) -> str | None:
    """Why ``path`` (base_dir) cannot hold venvs, beyond `toolkit_dir_problem`, or None. ``problem|remedy``."""
    bad = sorted(set(path) - VENV_PATH_CHARACTERS)
    if bad:
        shown = " ".join(repr(c) for c in bad)
        return (f"holds {shown}: the venvs under it get entry-point scripts whose /bin/sh trampoline carries this path "
                f"in double quotes, where a shell would expand it|use letters, digits and / . _ - + @ , : = ~ only, "
                f"e.g. /opt/vllm-fleet")
    return None


HIDDEN_TREES = ("/home", "/root", "/run/user", "/tmp", "/var/tmp", "/proc", "/sys", "/dev")


def served_dir_problem(path: str) -> str | None:
    """Why the service could not read a model directory ``path`` on the host (a local weights source), or None.

    The text is ``problem|remedy``.
    """
    norm = "/" + posixpath.normpath(path).lstrip("/")
    for tree in HIDDEN_TREES:
        if norm == tree or norm.startswith(tree + "/"):
            return (f"is under {tree}, which the service units hide from vLLM (ProtectHome=yes, PrivateTmp=yes)|"
                    "move the model to a directory such as /srv/models/NAME or under vllm_data_dir, and point path at it")
    return None


#: The revision directory name when no revision is pinned (the hub's default branch).
DEFAULT_REVISION = "main"
#: The file of a revision's state directory that says "complete and verified" (written by the fetch program).
VERIFIED_MARKER = "verified.json"


def revision_key(revision: str | None) -> str:
    """The directory name of one revision: the revision with anything but ``[A-Za-z0-9._-]`` as ``-``
    (``refs/pr/1`` -> ``refs-pr-1``); ``main`` when none is pinned."""
    key = re.sub(r"[^A-Za-z0-9._-]", "-", revision or DEFAULT_REVISION).strip(".")
    return key or DEFAULT_REVISION


@dataclass(frozen=True)
class Target:
    """One path uninstall deals with: removed (a file or a directory), or kept and why."""

    path: str
    kind: str  # "file" or "directory"
    remove: bool
    why: str


@dataclass(frozen=True)
class HostLayout:
    """The paths of one service's deployment on a host (see the module doc for the tree)."""

    service: str
    user: str
    base_dir: str
    data_dir: str
    config_dir: str = CONFIG_DIR
    unit_dir: str = UNIT_DIR

    @classmethod
    def of(cls, settings) -> HostLayout:
        """The layout for validated Settings (service_name, service_user, base_dir, data_dir)."""
        return cls(settings.service_name, settings.service_user, settings.base_dir, settings.data_dir)

    # -- systemd units and /etc/vllm-fleet -------------------------------------------------
    @property
    def unit_name(self) -> str:
        return f"{self.service}.service"

    @property
    def unit_path(self) -> str:
        return f"{self.unit_dir}/{self.unit_name}"

    @property
    def env_file(self) -> str:
        """The service's EnvironmentFile (secrets)."""
        return f"{self.config_dir}/{self.service}.env"

    def prev(self, path: str) -> str:
        """The gate's last-known-good copy of a unit or env file (``<config_dir>/<basename>.prev``)."""
        return f"{self.config_dir}/{path.rsplit('/', 1)[-1]}.prev"

    @property
    def gate_config(self) -> str:
        return f"{self.config_dir}/{self.service}.gate.json"

    @property
    def watchdog_config(self) -> str:
        """The watchdog's and GPU reaper's JSON config (no secret: they read the key from env_file)."""
        return f"{self.config_dir}/{self.service}.watchdog.json"

    @property
    def watchdog_unit(self) -> str:
        """The watchdog unit's name, without .service."""
        return f"{self.service}-watchdog"

    @property
    def watchdog_unit_path(self) -> str:
        return f"{self.unit_dir}/{self.watchdog_unit}.service"

    @property
    def devices_unit(self) -> str:
        """The oneshot unit that ensures the NVIDIA device nodes, without .service."""
        return f"{self.service}-devices"

    @property
    def devices_unit_path(self) -> str:
        return f"{self.unit_dir}/{self.devices_unit}.service"

    @property
    def gate_unit(self) -> str:
        """The transient unit the gate worker runs as (vllm_fleet/service/hostprog.py `apply`), with .service."""
        return f"vllm-fleet-gate-{self.service}.service"

    @property
    def units(self) -> tuple[str, ...]:
        """Every unit name the toolkit uses for this service, without .service: the service, its download, watchdog
        and device-node units, the gate's transient unit, and on a router host the router, its prober and its front.
        Each is written (or, the gate's, started) by the deploy and removed by uninstall, so a unit of one of these
        names that the toolkit did not render is someone else's (preflight's ownership check)."""
        return (self.service, self.fetch_unit, self.watchdog_unit, self.devices_unit, self.gate_unit.removesuffix(".service"),
                self.router_unit, self.prober_unit, self.front_unit)

    # -- base_dir: programs, state, venvs, tools ------------------------------------------
    @property
    def bin_dir(self) -> str:
        return f"{self.base_dir}/bin"

    @property
    def gate_program(self) -> str:
        return f"{self.bin_dir}/{GATE_PROGRAM}"

    @property
    def venv_program(self) -> str:
        return f"{self.bin_dir}/{VENV_PROGRAM}"

    @property
    def watchdog_program(self) -> str:
        return f"{self.bin_dir}/{WATCHDOG_PROGRAM}"

    @property
    def state_dir(self) -> str:
        """Gate results and markers."""
        return f"{self.base_dir}/state"

    @property
    def gate_state(self) -> str:
        return f"{self.state_dir}/{self.service}.gate.json"

    @property
    def gate_log(self) -> str:
        return f"{self.state_dir}/{self.service}.gate.log"

    @property
    def weights_pending(self) -> str:
        """Marker: a run held the restart back because the weights were incomplete; the next gate clears it."""
        return f"{self.state_dir}/{self.service}.weights-pending"

    @property
    def venvs_dir(self) -> str:
        return f"{self.base_dir}/venvs"

    def venv(self, name: str) -> str:
        return f"{self.venvs_dir}/{name}"

    @property
    def uv_dir(self) -> str:
        return f"{self.base_dir}/uv"

    @property
    def uv(self) -> str:
        return venv_bin(self.uv_dir, "uv")

    @property
    def uv_pip(self) -> str:
        """The bootstrap venv's pip (it installs uv there)."""
        return venv_bin(self.uv_dir, "pip")

    @property
    def tool_cache_dir(self) -> str:
        """Caches of the toolkit's own tools, below base_dir."""
        return f"{self.base_dir}/cache"

    @property
    def uv_cache(self) -> str:
        return f"{self.tool_cache_dir}/uv"

    @property
    def wheelhouse_dir(self) -> str:
        return f"{self.base_dir}/wheelhouse"

    @property
    def wheelhouse_manifest(self) -> str:
        return f"{self.wheelhouse_dir}/{WHEELHOUSE_MANIFEST}"

    @property
    def src_dir(self) -> str:
        return f"{self.base_dir}/src"

    def source_checkout(self, venv_name: str) -> str:
        """The git checkout a source-channel venv is installed from (editable), one per venv."""
        return f"{self.src_dir}/{venv_name}"

    def venv_state_paths(self) -> dict[str, object]:
        """What the venv program's `state` reads (vllm_fleet/pyenv/hostprog.py); ``units``: the live unit and the
        gate's last known good copy, whose venvs are never pruned."""
        return {"venvs_dir": self.venvs_dir, "uv": self.uv, "program": self.venv_program,
                "wheelhouse_dir": self.wheelhouse_dir, "units": [self.unit_path, self.prev(self.unit_path)]}

    # -- the weights download ---------------------------------------------------------------
    # -- the router (vllm_fleet/router/): a host of the `routers` group ----------------------
    @property
    def router_unit(self) -> str:
        """The router unit's name, without .service."""
        return f"{self.service}-router"

    @property
    def router_unit_path(self) -> str:
        return f"{self.unit_dir}/{self.router_unit}.service"

    @property
    def router_dir(self) -> str:
        """The router's venvs and its launcher (root:root 0755; the router runs as a DynamicUser)."""
        return f"{self.base_dir}/router"

    def router_venv(self, version: str) -> str:
        return f"{self.router_dir}/venv-{version}"

    @property
    def router_program(self) -> str:
        return f"{self.router_dir}/vllm-fleet-router"

    @property
    def prober_unit(self) -> str:
        """The router prober's unit name, without .service."""
        return f"{self.service}-router-prober"

    @property
    def prober_unit_path(self) -> str:
        return f"{self.unit_dir}/{self.prober_unit}.service"

    @property
    def prober_program(self) -> str:
        return f"{self.router_dir}/vllm-fleet-router-prober"

    @property
    def prober_config(self) -> str:
        return f"{self.router_dir}/{self.service}-router-prober.json"

    @property
    def router_env_file(self) -> str:
        """The prober's EnvironmentFile: the replicas' API key (root 0600)."""
        return f"{self.config_dir}/{self.service}-router.env"

    @property
    def router_config(self) -> str:
        """The router's JSON config: upstreams, policy, ports (no secret: the front holds the keys). Beside its
        venv, not in config_dir: the router's DynamicUser cannot enter /etc/vllm-fleet (root:<service user> 0750)."""
        return f"{self.router_dir}/{self.service}-router.json"

    @property
    def router_rolling_dir(self) -> str:
        """On the router host: one file per replica a rolling change has drained (taken out of rotation) and not
        yet put back, holding its host name and since when: what `vllm-fleet status` shows."""
        return f"{self.state_dir}/{self.service}-router-rolling"

    @property
    def front_unit(self) -> str:
        """The router's key-checking front (nginx), without .service."""
        return f"{self.service}-router-front"

    @property
    def front_unit_path(self) -> str:
        return f"{self.unit_dir}/{self.front_unit}.service"

    @property
    def front_config(self) -> str:
        """The front's nginx config: it holds the clients' key and the replicas' key (root 0600, written as a
        secret); systemd hands it to the front's DynamicUser as a credential (LoadCredential)."""
        return f"{self.config_dir}/{self.front_unit}.conf"

    @property
    def fetch_dir(self) -> str:
        return f"{self.base_dir}/fetch"

    @property
    def fetch_program(self) -> str:
        return f"{self.fetch_dir}/{FETCH_PROGRAM}"

    @property
    def fetch_venv(self) -> str:
        return f"{self.fetch_dir}/venv"

    @property
    def fetch_python(self) -> str:
        return venv_bin(self.fetch_venv, "python")

    @property
    def fetch_unit(self) -> str:
        """The download unit's name, without .service."""
        return f"{self.service}-fetch"

    @property
    def fetch_unit_path(self) -> str:
        return f"{self.unit_dir}/{self.fetch_unit}.service"

    @property
    def fetch_env_file(self) -> str:
        """The download unit's EnvironmentFile (the HF token)."""
        return f"{self.config_dir}/{self.fetch_unit}.env"

    @property
    def weights_state_dir(self) -> str:
        return f"{self.data_dir}/weights-state"

    def weights_state(self, model: str) -> str:
        """The download's state directory for repo ``Org/Name`` (``Org--Name``)."""
        return f"{self.weights_state_dir}/{model.replace('/', '--')}"

    def weights_revision_state(self, model: str, revision: str | None) -> str:
        """The download's state directory for one revision of repo ``Org/Name`` (``Org--Name/REV``)."""
        return f"{self.weights_state(model)}/{revision_key(revision)}"

    def fetch_config(self, model: str, revision: str | None) -> str:
        """The JSON the download worker reads for one revision (no secret)."""
        return f"{self.weights_revision_state(model, revision)}/fetch.json"

    def weights_status(self, model: str, revision: str | None) -> str:
        """The download's live progress (JSON) for one revision, written by the fetch program."""
        return f"{self.weights_revision_state(model, revision)}/{WEIGHTS_STATUS}"

    def weights_verified(self, model: str, revision: str | None) -> str:
        """The marker the fetch program writes once every file of the revision is verified (the vLLM unit asserts it)."""
        return f"{self.weights_revision_state(model, revision)}/{VERIFIED_MARKER}"

    def weights_marker_of(self, serve_path: str) -> str | None:
        """The verified marker of the revision directory `serve_path` (``models/ORG/NAME/REV``), None for any other path
        (a mirrored ``models/NAME``, a directory served in place)."""
        prefix = self.models_dir + "/"
        parts = serve_path[len(prefix):].split("/") if serve_path.startswith(prefix) else []
        if len(parts) != 3 or not all(parts):
            return None
        return f"{self.weights_state_dir}/{parts[0]}--{parts[1]}/{parts[2]}/{VERIFIED_MARKER}"

    # -- data_dir: home, models, caches -----------------------------------------------------
    @property
    def home(self) -> str:
        return self.data_dir

    @property
    def models_dir(self) -> str:
        return f"{self.data_dir}/models"

    def model(self, name: str) -> str:
        """Where a model named ``name`` is: a directory's name (mirrored, served from here), or repo ``Org/Name``
        (the root of its revision directories, `model_revision`)."""
        return f"{self.models_dir}/{name}"

    def model_revision(self, name: str, revision: str | None) -> str:
        """The snapshot directory of repo ``Org/Name`` at one revision: what `vllm serve` gets. Each revision has its
        own, so a deploy that changes the revision leaves the previous one's files for rollback."""
        return f"{self.model(name)}/{revision_key(revision)}"

    @property
    def cache_dir(self) -> str:
        """XDG_CACHE_HOME of the service; every runtime cache is below it."""
        return f"{self.data_dir}/cache"

    @property
    def runtime_home(self) -> str:
        """The service's HOME: the writable cache dir, so ~/.cache, ~/.nv and JIT caches can be written
        (data_dir itself is read-only to the service)."""
        return self.cache_dir

    @property
    def runtime_env(self) -> dict[str, str]:
        """The service's cache variables (`RUNTIME_ENV`) with their paths: HOME and XDG_CACHE_HOME are the writable
        cache dir (data_dir itself is read-only to the service, so ~/.cache, ~/.nv and JIT caches land there);
        FLASHINFER_WORKSPACE_BASE is FlashInfer's JIT cache base (<base>/.cache/flashinfer)."""
        return {name: getattr(self, prop) for name, prop in RUNTIME_ENV.items()}

    @property
    def cuda_cache(self) -> str:
        """CUDA_CACHE_PATH: the driver's JIT (PTX) compute cache."""
        return f"{self.cache_dir}/nv/ComputeCache"

    @property
    def vllm_cache(self) -> str:
        return f"{self.cache_dir}/vllm"

    @property
    def hf_home(self) -> str:
        return f"{self.cache_dir}/huggingface"

    @property
    def triton_cache(self) -> str:
        return f"{self.cache_dir}/triton"

    @property
    def torchinductor_cache(self) -> str:
        return f"{self.cache_dir}/torchinductor"

    @property
    def modelscope_cache(self) -> str:
        return f"{self.cache_dir}/modelscope"

    @property
    def modelscope_home(self) -> str:
        """HOME of the download unit for ModelScope (ProtectHome=yes: its ~/.modelscope goes here)."""
        return f"{self.cache_dir}/modelscope-home"

    # -- the SSH login user's ----------------------------------------------------------------
    @staticmethod
    def upload_dir(login_home: str) -> str:
        """Where the SSH login user stages a secret file's upload (0700) before sudo copies it into place
        (`hostops.operations.managed_files`): in that user's home, read on the host (``Home``)."""
        return f"{login_home.rstrip('/')}/{UPLOAD_DIR}"

    # -- what exists, and the way back ------------------------------------------------------
    @property
    def account_dirs(self) -> list[tuple[str, str, str, str]]:
        """(path, user, group, mode) of the directories the account step creates, parents first."""
        u = self.user
        return [(self.base_dir, "root", "root", "755"), (self.venvs_dir, "root", "root", "755"),
                (self.bin_dir, "root", "root", "755"), (self.state_dir, "root", "root", "755"),
                (self.data_dir, u, u, "750"), (self.models_dir, u, u, "750"), (self.cache_dir, u, u, "750"),
                (self.config_dir, "root", u, "750")]

    def deployed_services(self, gate_configs: list[str]) -> list[str]:
        """Service names from the gate configs found in config_dir (every deployed service has one)."""
        out = []
        for path in gate_configs:
            name = path.rsplit("/", 1)[-1]
            if path.startswith(self.config_dir + "/") and name.endswith(".gate.json"):
                out.append(name.removesuffix(".gate.json"))
        return sorted(set(out))

    def uninstall_targets(self, *, purge_venvs: bool = False, purge_weights: bool = False,
                          others: list[str] | tuple[str, ...] = (), login_home: str = "/root") -> list[Target]:
        """Every path a deploy creates, each removed by uninstall or kept on purpose (with the reason).

        + others: other services deployed on this host (sharing base_dir and data_dir): the shared
          tooling (programs, download worker, uv, wheelhouse, weights state) stays for them. The purge_*
          settings are explicit and remove their trees regardless.
        + login_home: the SSH login user's home on the host (its `upload_dir` goes: nothing stays in it between runs)

        Units first (they are stopped and disabled before), then files, then directories.
        """
        kept_venvs = "kept: set vllm_purge_venvs"
        kept_weights = "kept: set vllm_purge_weights"
        account = "kept: the account's directory (the service user and its directories stay)"
        shared = not others
        in_use = f"kept: also used by {', '.join(others)} on this host"

        def tool(path: str, kind: str, why: str) -> Target:
            return Target(path, kind, shared, why if shared else in_use)

        t = [
            Target(self.unit_path, "file", True, "the service unit"),
            Target(self.fetch_unit_path, "file", True, "the weights download unit"),
            Target(self.watchdog_unit_path, "file", True, "the watchdog unit"),
            Target(self.devices_unit_path, "file", True, "the NVIDIA device-node unit"),
            Target(self.router_unit_path, "file", True, "the router unit"),
            Target(self.router_config, "file", True, "the router's config"),
            Target(self.prober_unit_path, "file", True, "the router prober's unit"),
            Target(self.prober_config, "file", True, "the router prober's config"),
            Target(self.router_env_file, "file", True, "the router prober's API key"),
            Target(self.front_unit_path, "file", True, "the router front's unit"),
            Target(self.front_config, "file", True, "the router front's config and keys"),
            Target(self.router_rolling_dir, "directory", True, "the router's record of replicas a rolling change drained"),
            *(Target(p, "file", True, "an interrupted write of a secrets file")
              for secret in (self.router_env_file, self.front_config) for p in write_leftovers(secret)),
            Target(self.env_file, "file", True, "the service's secrets"),
            Target(self.prev(self.unit_path), "file", True, "the gate's last good unit"),
            Target(self.prev(self.env_file), "file", True, "the gate's last good env file"),
            Target(self.fetch_env_file, "file", True, "the download unit's HF token"),
            *(Target(p, "file", True, "an interrupted write of a secrets file")
              for secret in (self.env_file, self.prev(self.env_file), self.fetch_env_file) for p in write_leftovers(secret)),
            Target(self.upload_dir(login_home), "directory", True, "the staging directory of secret uploads"),
            Target(self.gate_config, "file", True, "the gate's config"),
            Target(self.watchdog_config, "file", True, "the watchdog's config"),
            Target(self.gate_state, "file", True, "the gate's last verdict"),
            Target(self.gate_log, "file", True, "the gate's log"),
            Target(self.weights_pending, "file", True, "the held-back-restart marker"),
            tool(self.gate_program, "file", "the gate program"),
            tool(self.venv_program, "file", "the venv program"),
            tool(self.watchdog_program, "file", "the watchdog program"),
            tool(self.fetch_dir, "directory", "the download worker and its venv"),
            tool(self.router_dir, "directory", "the router's venvs and launcher"),
            tool(self.uv_dir, "directory", "the bootstrap venv holding uv"),
            tool(self.wheelhouse_dir, "directory", "the pushed wheelhouse"),
            tool(self.weights_state_dir, "directory", "the download state and configs"),
            # A source venv is installed editable from its checkout: the checkouts go with the venvs.
            Target(self.src_dir, "directory", purge_venvs, "source checkouts of the venvs" if purge_venvs else kept_venvs),
            Target(self.uv_cache, "directory", purge_venvs, "uv's cache" if purge_venvs else kept_venvs),
            Target(self.venvs_dir, "directory", purge_venvs, "the venvs" if purge_venvs else kept_venvs),
            Target(self.models_dir, "directory", purge_weights, "the weights" if purge_weights else kept_weights),
            Target(self.cache_dir, "directory", purge_weights, "the runtime caches" if purge_weights else kept_weights),
        ]
        taken = {x.path for x in t}
        t += [Target(path, "directory", False, account) for path, *_ in self.account_dirs if path not in taken]
        return t
