"""Every path vllm-fleet uses on a host, in one value: ``HostLayout.of(settings)``.

Pure (no pyinfra). The steps, the renderers, ``vllm-fleet render``/``status``,
uninstall and the JSON configs handed to the host programs take their paths
from here; nothing else formats a host path. ``SERVICE`` is the service name
(``vllm_service_name``), ``BASE`` is ``vllm_base_dir`` (/opt/vllm-fleet),
``DATA`` is ``vllm_data_dir`` (/var/lib/vllm-fleet).

FILES

    /etc/systemd/system/SERVICE.service    the vLLM unit                              (service)
    /etc/systemd/system/SERVICE-fetch.service  the weights download unit          (weights)
    /etc/vllm-fleet/                        root:USER 0750                             (account)
        SERVICE.env                         the service's secrets (API key, HF token), root:USER 0640
        SERVICE-fetch.env                   the download unit's HF token, root:USER 0640
        SERVICE.gate.json                   the health gate's config (no secret)
        SERVICE.service.prev, SERVICE.env.prev   last known good unit/env file (the gate's rollback)
    BASE/                                   root:root 0755                             (account)
        bin/vllm-fleet-gate                 the health gate (vllm_fleet/service/hostprog.py)
        bin/vllm-fleet-venv                 the venv builder (vllm_fleet/pyenv/hostprog.py)
        state/SERVICE.gate.json, .gate.log  the gate's last verdict and its log
        state/SERVICE.weights-pending       marker: restart held back for incomplete weights
        venvs/vllm-VERSION-BACKEND          one venv per vLLM version + torch backend (kept for rollback)
        uv/                                 bootstrap venv holding uv
        cache/uv/                           uv's cache (same filesystem as the venvs: hard links)
        wheelhouse/                         wheels pushed from vllm_wheelhouse (air-gapped hosts)
        src/VENV-NAME/                      source channel: the checkout a venv is installed from
        fetch/fetch_weights.py, fetch/venv  the download worker (vllm_fleet/weights/hostprog.py) + its venv
    DATA/                                   USER:USER 0750, the service's home           (account)
        models/ORG/NAME                     the weights vLLM serves
        weights-state/ORG--NAME/            fetch.json (config), state.json, status.json, fetch.lock
        cache/                              XDG_CACHE_HOME; vllm/ (VLLM_CACHE_ROOT), huggingface/ (HF_HOME),
                                            triton/, torchinductor/, modelscope/, modelscope-home/

What uninstall removes is `HostLayout.uninstall_targets` (one list, with the
reason each path kept is kept).
"""

from __future__ import annotations

from dataclasses import dataclass

CONFIG_DIR = "/etc/vllm-fleet"
UNIT_DIR = "/etc/systemd/system"
#: Owner group and mode of every secret file (EnvironmentFiles): root:<service user> 0640. systemd reads an
#: EnvironmentFile as root; the group lets the service user's own tools read its key (docs/service.md).
SECRET_MODE = "640"
GATE_PROGRAM = "vllm-fleet-gate"
VENV_PROGRAM = "vllm-fleet-venv"
FETCH_PROGRAM = "fetch_weights.py"


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
        return f"{self.uv_dir}/bin/uv"

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
    def src_dir(self) -> str:
        return f"{self.base_dir}/src"

    def source_checkout(self, venv_name: str) -> str:
        """The git checkout a source-channel venv is installed from (editable), one per venv."""
        return f"{self.src_dir}/{venv_name}"

    def venv_state_paths(self) -> dict[str, str]:
        """What the venv program's `state` reads (vllm_fleet/pyenv/hostprog.py)."""
        return {"venvs_dir": self.venvs_dir, "uv": self.uv, "program": self.venv_program,
                "wheelhouse_dir": self.wheelhouse_dir}

    # -- the weights download ---------------------------------------------------------------
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

    def fetch_config(self, model: str) -> str:
        """The JSON the download worker reads (no secret)."""
        return f"{self.weights_state(model)}/fetch.json"

    # -- data_dir: home, models, caches -----------------------------------------------------
    @property
    def home(self) -> str:
        return self.data_dir

    @property
    def models_dir(self) -> str:
        return f"{self.data_dir}/models"

    def model(self, name: str) -> str:
        """Where a model named ``name`` (``Org/Name`` or a directory's name) is served from."""
        return f"{self.models_dir}/{name}"

    @property
    def cache_dir(self) -> str:
        """XDG_CACHE_HOME of the service; every runtime cache is below it."""
        return f"{self.data_dir}/cache"

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
                          others: list[str] | tuple[str, ...] = ()) -> list[Target]:
        """Every path a deploy creates, each removed by uninstall or kept on purpose (with the reason).

        + others: other services deployed on this host (sharing base_dir and data_dir): the shared
          tooling (programs, download worker, uv, wheelhouse, weights state) stays for them. The purge_*
          settings are explicit and remove their trees regardless.

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
            Target(self.env_file, "file", True, "the service's secrets"),
            Target(self.prev(self.unit_path), "file", True, "the gate's last good unit"),
            Target(self.prev(self.env_file), "file", True, "the gate's last good env file"),
            Target(self.fetch_env_file, "file", True, "the download unit's HF token"),
            Target(self.gate_config, "file", True, "the gate's config"),
            Target(self.gate_state, "file", True, "the gate's last verdict"),
            Target(self.gate_log, "file", True, "the gate's log"),
            Target(self.weights_pending, "file", True, "the held-back-restart marker"),
            tool(self.gate_program, "file", "the gate program"),
            tool(self.venv_program, "file", "the venv program"),
            tool(self.fetch_dir, "directory", "the download worker and its venv"),
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
