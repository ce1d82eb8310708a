"""Weights, pure part: which sources, which revision, where the files go, the path vLLM gets.

No pyinfra and no network here. vllm_fleet/weights/step.py turns a `FetchPlan` into
operations; the host program vllm_fleet/weights/hostprog.py (run by the
``{service_name}-fetch`` unit) does the download, the file plan (what to keep,
re-fetch, hash) and the verification state, reading the JSON `FetchPlan.config`.

Layout on the host, for repo ``Org/Name`` (every path from vllm_fleet/layout.py):

    {data_dir}/models/Org/Name           the snapshot directory vLLM gets (config.json in it; never a
                                         huggingface cache root like models--Org--Name)
    {data_dir}/weights-state/Org--Name/  fetch.json (the config), state.json (verification state),
                                         status.json (live progress), fetch.lock
    {base_dir}/fetch/                    fetch_weights.py and its venv (huggingface_hub)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import jinja2

from vllm_fleet.layout import HostLayout
from vllm_fleet.settings import Settings
from vllm_fleet.weights.settings import WeightsSource

# What the host's fetch venv installs (the version these tests ran against).
HF_HUB_REQUIREMENT = "huggingface_hub==2.4.0"
# Added to the fetch venv only when a source is of kind "modelscope" (modelscope delegates its hub calls to
# modelscope-hub; both pinned to what tests/msmirror was checked with).
MODELSCOPE_REQUIREMENTS = ("modelscope==1.40.2", "modelscope-hub==0.5.1")
BACKOFF_MAX_S = 300.0


@dataclass(frozen=True)
class FetchPlan:
    """Everything the deploy needs to place the weights from `vllm_weights_sources`."""

    sources: tuple[WeightsSource, ...]
    serve_path: str  # the snapshot directory given to `vllm serve`
    unit: str  # systemd unit name, without .service
    fetch_dir: str  # {base_dir}/fetch: program + venv
    state_dir: str
    config: dict  # the JSON the host program reads (no secret)
    venv: str = ""
    program: str = ""
    config_path: str = ""
    env_path: str = ""  # the unit's EnvironmentFile (HF token)
    unit_path: str = ""

    @property
    def modelscope(self) -> bool:
        """A source is ModelScope: the fetch venv needs MODELSCOPE_REQUIREMENTS."""
        return any(s.kind == "modelscope" for s in self.sources)

    @property
    def requirements(self) -> tuple[str, ...]:
        """What the fetch venv installs."""
        return (HF_HUB_REQUIREMENT, *(MODELSCOPE_REQUIREMENTS if self.modelscope else ()))

    @property
    def downloads(self) -> bool:
        """False when the first source is a directory already on the host (served in place)."""
        return self.sources[0].kind != "local"


def _model_name(sources: tuple[WeightsSource, ...]) -> str:
    """`Org/Name` of the first hub source (the directory name under models/)."""
    for s in sources:
        if s.repo:
            return s.repo
    return PurePosixPath(sources[0].path or "model").name


def resolved_sources(settings: Settings, profile_revision: str | None = None) -> tuple[WeightsSource, ...]:
    """The sources in order, each hub source pinned to its own revision, else the profile's."""
    out = []
    for s in settings.weights_sources or ():
        if s.kind != "local" and s.revision is None and profile_revision:
            s = s.model_copy(update={"revision": profile_revision})
        out.append(s)
    return tuple(out)


def identity(dest: str, sources: tuple[WeightsSource, ...]) -> str:
    """What the download is, independent of where it is fetched from: dest + (kind, repo, revision) per source.

    Changing a mirror's endpoint keeps the identity (no re-download); another repo
    or revision changes it (files with the same digest are still kept).
    """
    key = json.dumps([dest, [(s.kind, s.repo, s.revision, s.path) for s in sources]])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def fetch_plan(settings: Settings, profile_revision: str | None = None) -> FetchPlan | None:
    """The plan for `vllm_weights_sources`, or None when it is unset (local dir / repo id handled elsewhere)."""
    sources = resolved_sources(settings, profile_revision)
    if not sources:
        return None
    name = _model_name(sources)
    lay = HostLayout.of(settings)
    if sources[0].kind == "local":
        dest = str(PurePosixPath(sources[0].path))
    else:
        dest = lay.model(name)
    state_dir = lay.weights_state(name)
    config = {
        "identity": identity(dest, sources),
        "dest": dest,
        "state_dir": state_dir,
        "sources": [s.model_dump() for s in sources],
        "retries": settings.weights_retries,
        "backoff_s": settings.weights_backoff_s,
        "backoff_max_s": BACKOFF_MAX_S,
        "workers": settings.weights_workers,
        "headroom_bytes": settings.disk_headroom_gib * 1024**3,
        "verify": "full" if settings.weights_reverify else "stat",
    }
    return FetchPlan(sources, dest, lay.fetch_unit, lay.fetch_dir, state_dir, config, venv=lay.fetch_venv,
                     program=lay.fetch_program, config_path=lay.fetch_config(name), env_path=lay.fetch_env_file,
                     unit_path=lay.fetch_unit_path)


def check_serve_path(path: str) -> str:
    """Refuse a huggingface cache root (``models--Org--Name``): vLLM needs the snapshot directory."""
    parts = PurePosixPath(path).parts
    if parts and parts[-1].startswith("models--"):
        raise ValueError(f"{path} is a huggingface cache root; vLLM needs the snapshot directory holding "
                         f"config.json ({path}/snapshots/<commit>)")
    if not PurePosixPath(path).is_absolute():
        raise ValueError(f"{path} is not an absolute path")
    return path


def unit_environment(settings: Settings, plan: FetchPlan) -> list[str]:
    """Environment= lines of the fetch unit (no secret: HF_TOKEN is in the EnvironmentFile)."""
    lay = HostLayout.of(settings)
    env = [f"HF_HOME={lay.hf_home}", "HF_HUB_DISABLE_TELEMETRY=1",
           "HF_HUB_ENABLE_HF_TRANSFER=0", "PYTHONUNBUFFERED=1"]
    if not settings.hf_xet:
        env.append("HF_HUB_DISABLE_XET=1")
    if plan.modelscope:
        # The unit runs with ProtectHome=yes: the client's cache and its ~/.modelscope go under data_dir.
        env += [f"MODELSCOPE_CACHE={lay.modelscope_cache}", f"HOME={lay.modelscope_home}"]
    return env


def pip_args(settings: Settings) -> list[str]:
    """Index options for the fetch venv's pip, from the same settings as the vLLM venv."""
    args = []
    if settings.no_index:
        args.append("--no-index")
    elif settings.index_url:
        args += ["--index-url", settings.index_url]
    for u in settings.extra_index_urls:
        args += ["--extra-index-url", u]
    for u in settings.find_links:
        args += ["--find-links", u]
    return args


UNIT_TEMPLATE = Path(__file__).resolve().parent / "templates" / "vllm-fetch.service.j2"


def render_fetch_unit(settings: Settings, plan: FetchPlan) -> str:
    """The download unit's text, rendered exactly as pyinfra's ``files.template`` renders the template
    (StrictUndefined, trailing newline kept, no block trimming)."""
    parent = str(PurePosixPath(plan.serve_path).parent)
    template = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                                  autoescape=False).from_string(UNIT_TEMPLATE.read_text())
    return template.render(
        unit=plan.unit, model=plan.sources[0].repo or plan.serve_path, dest_dir=plan.serve_path,
        config=plan.config_path, run_as=settings.service_user, python=f"{plan.venv}/bin/python", program=plan.program,
        environment=unit_environment(settings, plan), env_file=plan.env_path,
        read_write_paths=[settings.data_dir] if parent.startswith(settings.data_dir) else [settings.data_dir, parent],
    )
