"""Weights, pure part: which sources, which revision, where the files go, the path vLLM gets.

No pyinfra and no network here. vllm_fleet/weights/step.py turns a `FetchPlan` into
operations; the host program vllm_fleet/weights/hostprog.py (run by the
``{service_name}-fetch`` unit) does the download, the file plan (what to keep,
re-fetch, hash) and the verification state, reading the JSON `FetchPlan.config`.

Layout on the host, for repo ``Org/Name`` at revision ``REV`` (every path from vllm_fleet/layout.py):

    {data_dir}/models/Org/Name/REV           the snapshot directory vLLM gets (config.json in it; never a
                                             huggingface cache root like models--Org--Name); one per revision,
                                             so a revision change leaves the previous one for rollback
    {data_dir}/weights-state/Org--Name/REV/  fetch.json (the config), state.json (verification state),
                                             status.json (live progress), fetch.lock, verified.json (the
                                             marker the vLLM unit asserts)
    {base_dir}/fetch/                        fetch_weights.py and its venv (huggingface_hub)
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
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
    marker: str = ""  # written by the fetch program when the revision is complete and verified ("" : none)
    model_name: str = ""  # Org/Name
    revision: str | None = None  # the revision the directory is of (None: the hub's default branch)
    python: str = ""  # the fetch venv's interpreter
    status_path: str = ""  # the download's live progress (written by the fetch program)

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


def _revision(sources: tuple[WeightsSource, ...]) -> str | None:
    """The revision of the first hub source: the one the weights directory is named after."""
    return next((s.revision for s in sources if s.repo), None)


def resolved_sources(settings: Settings, profile_revision: str | None = None) -> tuple[WeightsSource, ...]:
    """The sources in order, each hub source pinned to its own revision, else the profile's."""
    out = []
    for s in settings.weights_sources or ():
        if s.kind != "local" and s.revision is None and profile_revision:
            s = s.model_copy(update={"revision": profile_revision})
        out.append(s)
    return tuple(out)


#: A commit id as the hubs take it: 40 lower-case hex digits (huggingface_hub's REGEX_COMMIT_HASH; anything else,
#: upper-case hex included, is looked up as a branch or tag).
COMMIT_ID = re.compile(r"[0-9a-f]{40}")


def is_commit(revision: str | None) -> bool:
    """``revision`` pins one commit (it cannot move as a branch or a tag can)."""
    return revision is not None and COMMIT_ID.fullmatch(revision) is not None


def source_warnings(settings: Settings, profile) -> list[str]:
    """What the weights' sources leave to chance, as ``problem; remedy: ...`` lines (warnings, not errors).

    + profile: the model's profile (vllm_fleet.planner.modelinfo.Profile), None for a local directory

    - a hub source with no revision (its own or the profile's): the download takes the repo's newest
      commit of that moment, so two hosts, or two runs, may serve different weights;
    - a hub source whose revision is a branch or tag (``main``, ``master``, ``v1.0``), not a commit id
      (`is_commit`): the same, later;
    - a profile served by repo id (no vllm_weights_sources) without a pinned revision: vLLM fetches the
      newest commit itself;
    - a source repo that differs from the profile's (hf_repo, modelscope_repo): the plan's sizes and
      architecture come from the profile, the files from elsewhere.
    """
    revision = getattr(profile, "revision", None)
    out = []
    if not settings.weights_sources:
        if profile is not None and getattr(profile, "local_path", None) is None and profile.hf_repo and not is_commit(revision):
            pins = "the profile pins none" if not revision else f"the profile pins {revision!r}, a branch or tag, not a commit"
            out.append(f"vLLM fetches {profile.hf_repo} itself at its newest revision ({pins}), so hosts "
                       "may serve different weights; remedy: set vllm_weights_sources = [{kind: hf, repo: "
                       f"{profile.hf_repo}, revision: <commit sha>}}]")
        return out
    for i, s in enumerate(settings.weights_sources):
        if s.kind == "local":
            continue
        where = f"vllm_weights_sources[{i}] ({s.kind} {s.repo})"
        if s.revision is None and not revision:
            out.append(f"{where} has no revision and the profile pins none: the download takes the repo's newest commit, "
                       "so hosts may serve different weights; remedy: set its revision to a commit sha")
        elif not is_commit(s.revision or revision):
            whose = "its" if s.revision is not None else "the profile's"
            out.append(f"{where} has {whose} revision {s.revision or revision!r}, a branch or tag name, not a commit: it can "
                       "move, so hosts, or two runs, may serve different weights; remedy: pin a commit sha (40 hex "
                       "digits, the hub's commit id) as its revision")
        expected = getattr(profile, "modelscope_repo" if s.kind == "modelscope" else "hf_repo", None) if profile else None
        if expected and s.repo != expected:
            out.append(f"{where} differs from the profile's {'modelscope_repo' if s.kind == 'modelscope' else 'hf_repo'} "
                       f"{expected}: the plan's sizes and architecture come from the profile, the files from {s.repo}; "
                       f"remedy: set repo: {expected}, or use a profile (vllm_model) that describes {s.repo}")
    return out


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
    revision = _revision(sources)
    lay = HostLayout.of(settings)
    if sources[0].kind == "local":
        dest = str(PurePosixPath(sources[0].path))
    else:
        dest = lay.model_revision(name, revision)
    state_dir = lay.weights_revision_state(name, revision)
    marker = lay.weights_verified(name, revision)
    config = {
        "identity": identity(dest, sources),
        "dest": dest,
        "state_dir": state_dir,
        "marker": marker,
        # the toolkit's other revisions of this repo, and the units whose revision is never removed (the live unit and
        # the gate's last known good copy)
        "revisions_root": lay.model(name),
        "states_root": lay.weights_state(name),
        "keep_units": [lay.unit_path, lay.prev(lay.unit_path)],
        "sources": [s.model_dump() for s in sources],
        "retries": settings.weights_retries,
        "backoff_s": settings.weights_backoff_s,
        "backoff_max_s": BACKOFF_MAX_S,
        "workers": settings.weights_workers,
        "headroom_bytes": settings.disk_headroom_gib * 1024**3,
        "verify": "full" if settings.weights_reverify else "stat",
    }
    return FetchPlan(sources, dest, lay.fetch_unit, lay.fetch_dir, state_dir, config, venv=lay.fetch_venv,
                     program=lay.fetch_program, config_path=lay.fetch_config(name, revision), env_path=lay.fetch_env_file,
                     unit_path=lay.fetch_unit_path, marker=marker, model_name=name, revision=revision,
                     python=lay.fetch_python, status_path=lay.weights_status(name, revision))


def already_complete(check: dict | None, plan: FetchPlan, reverify: bool) -> bool:
    """Whether the deploy may skip the download unit: the host's recorded check (read at planning time with the config
    already on the host) says complete for this very download (same identity: another revision or source list is
    another download), and this deploy does not ask for a full re-verification (`vllm_weights_reverify` takes effect
    on the deploy that sets it, not only on the next)."""
    check = check or {}
    return bool(check.get("complete")) and check.get("identity") == plan.config["identity"] and not reverify


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


@functools.cache
def _fetch_unit_template() -> jinja2.Template:
    """Compiled once per process (a deploy renders it for every host)."""
    return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                              autoescape=False).from_string(UNIT_TEMPLATE.read_text())


def render_fetch_unit(settings: Settings, plan: FetchPlan) -> str:
    """The download unit's text, rendered exactly as pyinfra's ``files.template`` renders the template
    (StrictUndefined, trailing newline kept, no block trimming)."""
    parent = str(PurePosixPath(plan.serve_path).parent)
    return _fetch_unit_template().render(
        unit=plan.unit, model=plan.sources[0].repo or plan.serve_path, dest_dir=plan.serve_path,
        config=plan.config_path, run_as=settings.service_user, python=plan.python, program=plan.program,
        environment=unit_environment(settings, plan), env_file=plan.env_path,
        read_write_paths=[settings.data_dir] if parent.startswith(settings.data_dir) else [settings.data_dir, parent],
    )
