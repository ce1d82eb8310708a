"""Weights: put the model where vLLM will read it, and say which directory that is.

Two ways, chosen by the settings:

- ``vllm_weights_sources`` set: a detached, resumable, verified download on the
  host (docs/weights.md). The deploy installs a small venv with huggingface_hub
  and the host program ``fetch_weights.py``, renders the ``{service}-fetch``
  unit, starts it unless the verification state says the files are complete
  and unchanged (and ``vllm_weights_reverify`` is off), and waits for it with a
  progress line (``vllm_weights_wait``, ``vllm_weights_wait_timeout_s``); the wait
  restarts a unit that died or stalled (``vllm_weights_stall_s``, at most
  ``vllm_weights_restarts`` times: it resumes every partial file), else stops with
  the unit's last log lines; Ctrl-C ends it at once. A rerun while it runs
  attaches to the running unit; systemd never starts a second one. Each
  revision has its own directory; other revisions no unit uses are removed.
- otherwise, a model directory on the control machine (``vllm_model`` is a
  directory: the CI model, a fine-tune) is mirrored to ``{data_dir}/models/<name>``;
  a profile name is served by repo id and fetched by vLLM itself.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from pyinfra import host, logger
from pyinfra.api import FunctionCommand, deploy, operation
from pyinfra.operations import server, systemd

from vllm_fleet.handoff import HostState, ModelSource, WeightsResult
from vllm_fleet.hostops.facts import FileStates, Read, read
from vllm_fleet.hostops.operations import (Dir, ManagedFile, directories, directories_read, managed_files, mirror_dir,
                                          secret_file, tree_read)
from vllm_fleet.layout import HostLayout
from vllm_fleet.weights import source as wplan
from vllm_fleet.weights.facts import FetchState
from vllm_fleet.weights.watch import Interrupt, Watch
from vllm_fleet.errors import FleetError
from vllm_fleet.settings import Settings

PROGRAM_SRC = Path(__file__).with_name("hostprog.py")  # installed on the host as HostLayout.fetch_program
TEMPLATE = wplan.UNIT_TEMPLATE
POLL_S = 2.0
PROGRESS_EVERY_S = 5.0


class WeightsDownloadError(FleetError):
    """The download unit failed, or the deploy's wait ran out."""


def source(settings: Settings) -> ModelSource:
    """Decide, without touching the host, what `vllm serve` will be given; warn about what it leaves to chance
    (an unpinned revision, a source repo other than the profile's: `wplan.source_warnings`)."""
    from vllm_fleet.planner.modelinfo import load_profile

    try:
        profile = load_profile(settings.model)
    except Exception:  # noqa: BLE001 - settings validated the model; a local config dir has no profile revision
        profile = None
    for line in wplan.source_warnings(settings, profile):
        logger.warning(f"{host.print_prefix}weights warning: {line}")
    if settings.weights_sources:
        revision = profile.revision if profile is not None else None
        plan = wplan.fetch_plan(settings, revision)
        return ModelSource(None, wplan.check_serve_path(plan.serve_path), plan)
    local = Path(settings.model)
    if local.is_dir():
        return ModelSource(local.resolve(), HostLayout.of(settings).model(local.resolve().name))
    return ModelSource(None, "")  # the planner uses the profile's repo id


JOURNAL_LINES = 15
INTERRUPT_SLICE_S = 0.2


def parse_poll(lines: list[str], identity: str) -> tuple[dict | None, str]:
    """(this download's status.json or None, ``systemctl is-active``) from the wait's poll output."""
    lines = [ln for ln in lines if ln.strip()]
    active = lines[-1].strip() if lines else "unknown"
    try:
        status = json.loads("".join(lines[:-1]) or "{}")
    except ValueError:
        status = {}
    return (status if status.get("identity") == identity else None), active


class DownloadChange:
    """The ``changed`` the weights step hands the service step when it runs the download: true only when the wait ran
    and the fetch program says it changed bytes of the revision on disk (fetched, hard-linked or removed a file). A
    full re-verify (``vllm_weights_reverify``) that finds every file good changes nothing, so vLLM is not restarted
    for it. A status without the key (an older program) counts as changed."""

    def __init__(self) -> None:
        self.op = None  # the wait operation (pyinfra's OperationMeta), once added
        self.changed: bool | None = None  # what the finished download said (None: the wait did not finish)

    def record(self, status: dict | None) -> None:
        self.changed = bool((status or {}).get("changed", True))

    def did_change(self) -> bool:
        return self.op is not None and self.op.did_change() and self.changed is not False


def wait_for_download(run, plan: wplan.FetchPlan, watch: Watch, interrupt: Interrupt, name: str,
                      log=logger.info, warn=logger.warning, poll_s: float = POLL_S,
                      outcome: DownloadChange | None = None) -> str:
    """Follow the download unit until it is done (return its last progress line, with the source that served it), restart it when `watch` says so, or
    raise WeightsDownloadError (failed, restarts spent, timed out, Ctrl-C).

    + run: ``run(command) -> list of output lines`` on the host (with sudo where the deploy uses it)
    + name: the host's name (for the messages)
    + outcome: told, when the download is done, whether it changed bytes on disk (`DownloadChange`)
    """
    q = shlex.quote
    unit = f"{plan.unit}.service"
    poll = f"cat {q(plan.status_path)} 2>/dev/null || echo '{{}}'; echo; systemctl is-active {q(unit)} || true"
    last_log = 0.0
    with interrupt:
        while True:
            if interrupt.event.is_set():
                raise WeightsDownloadError(
                    f"{name}: the wait for the weights was interrupted (Ctrl-C); the download goes on in {unit} "
                    f"(journalctl -fu {plan.unit}); rerun the deploy to attach to it")
            status, active = parse_poll(run(poll), plan.config["identity"])
            now = time.monotonic()
            verdict = watch.observe(now, status, active)
            if verdict.action == "done":
                if outcome is not None:
                    outcome.record(status)
                line, source = (status or {}).get("line", ""), (status or {}).get("source", "")
                return f"{line} from {source}" if source else line
            if verdict.action in ("restart", "fail"):
                journal = run(f"journalctl -u {q(unit)} -n {JOURNAL_LINES} --no-pager -o cat 2>/dev/null || true")
                tail = "\n".join(f"    {ln}" for ln in journal if ln.strip()) or "    (no journal lines)"
                if verdict.action == "fail":
                    raise WeightsDownloadError(
                        f"{name}: the weights download ({unit}) {verdict.why}; last lines of its log:\n{tail}\n"
                        f"The partial files stay and are resumed by the next deploy. Remedy: fix what the log says "
                        f"(a source: vllm_weights_sources; the disk: vllm_data_dir), or raise vllm_weights_restarts / "
                        f"vllm_weights_stall_s / vllm_weights_wait_timeout_s")
                warn(f"weights: {verdict.why}; last lines of its log:\n{tail}")
                run(f"systemctl restart -- {q(unit)}")
                last_log = now
            elif now - last_log >= PROGRESS_EVERY_S:
                phase = (status or {}).get("phase") or "starting"
                log(f"weights: {phase} {(status or {}).get('line', '')} ({(status or {}).get('source', '')})")
                last_log = now
            # In slices: a signal that reached another thread runs its Python handler only when this one runs code.
            until = time.monotonic() + poll_s
            while not interrupt.event.is_set() and time.monotonic() < until:
                interrupt.event.wait(min(INTERRUPT_SLICE_S, max(0.0, until - time.monotonic())))


def _wait(state, host, plan: wplan.FetchPlan, timeout_s: int, stall_s: int, restarts: int, sudo: bool,
          outcome: DownloadChange | None = None) -> None:
    """Follow status.json until the unit is done, failed, or the timeout; log a progress line."""
    def run(command: str) -> list[str]:
        ok, out = host.run_shell_command(command, _sudo=sudo)
        return list(out.stdout_lines) if ok else []

    watch = Watch(stall_s=stall_s, restarts_max=restarts, timeout_s=timeout_s, started=time.monotonic())
    line = wait_for_download(run, plan, watch, Interrupt.of(state), host.name,
                             log=lambda m: logger.info(f"{host.print_prefix}{m}"),
                             warn=lambda m: logger.warning(f"{host.print_prefix}{m}"), outcome=outcome)
    logger.info(f"{host.print_prefix}weights: complete and verified, {line}")
    if outcome is not None and outcome.changed is False:
        logger.info(f"{host.print_prefix}weights: no file changed on disk (verified as they were)")


@operation(is_idempotent=False)
def follow_download(plan: wplan.FetchPlan, timeout_s: int, stall_s: int = 300, restarts: int = 3,
                    outcome: DownloadChange | None = None):
    """
    Wait for the weights download unit with a progress line (bytes on disk/total, rate, ETA, files); restart it when
    it dies or stalls (bounded), stop with its last log lines otherwise.

    + plan: the weights' FetchPlan
    + timeout_s: give up waiting (the unit keeps going) after this many seconds
    + stall_s: no byte for this long while downloading = stalled
    + restarts: restarts of a dead or stalled unit before giving up
    + outcome: told whether the download changed bytes on disk (the weights' ``changed`` for the service step)
    """
    yield FunctionCommand(_wait, (plan, timeout_s, stall_s, restarts, bool(host.data.get("_sudo")), outcome), {})


def fetch_env_file(settings: Settings, plan: wplan.FetchPlan):
    """The download unit's EnvironmentFile, a secret file like the service's (`secret_file`)."""
    token = settings.hf_token.get_secret_value() if settings.hf_token else ""
    return secret_file(plan.env_path, f"HF_TOKEN={token}\n" if token else "# no HF token set (vllm_hf_token)\n")


def fetch_files(settings: Settings, plan: wplan.FetchPlan) -> tuple[ManagedFile, ManagedFile, ManagedFile, ManagedFile]:
    """(program, config, env file, unit): the download's files as `_apply_fetch` installs them, built without a host."""
    return (
        ManagedFile(plan.program, PROGRAM_SRC, "root", "root", "755"),
        ManagedFile(plan.config_path, json.dumps(plan.config, indent=1, sort_keys=True) + "\n", "root",
                    settings.service_user, "640"),
        fetch_env_file(settings, plan),
        ManagedFile(plan.unit_path, wplan.render_fetch_unit(settings, plan), "root", "root", "644"),
    )


def reads(settings: Settings, src: ModelSource) -> list[Read]:
    """What `apply` reads of the host (deploy.py reads every step's facts in one round trip: `read_many`)."""
    if src.fetch is not None:
        if not src.fetch.downloads:
            return []
        plan = src.fetch
        return [Read.of(FetchState, plan=plan), directories_read(_fetch_dirs(settings, plan)), _fetch_files_read(plan)]
    return [tree_read(src.serve_path)] if src.local_dir is not None else []


def _fetch_dirs(settings: Settings, plan: wplan.FetchPlan) -> list[Dir]:
    """The download's directories: its program's, and the state directories the service user writes."""
    user, lay = settings.service_user, HostLayout.of(settings)
    mine = (lay.weights_state_dir, lay.weights_state(plan.model_name), plan.state_dir)
    if plan.config.get("revisions_root"):  # the revision directories' parent: the program removes unused revisions
        org = plan.model_name.split("/")[0]
        mine += (*((lay.model(org),) if "/" in plan.model_name else ()), plan.config["revisions_root"])
    return [Dir(plan.fetch_dir, "root", "root", "755"), *(Dir(d, user, user, "750") for d in mine)]


def _fetch_files_read(plan: wplan.FetchPlan) -> Read:
    """One FileStates fact for the download's four files (`fetch_files`), handed to each managed_files."""
    return Read.of(FileStates, paths=sorted((plan.program, plan.config_path, plan.env_path, plan.unit_path)))


def _apply_fetch(settings: Settings, plan: wplan.FetchPlan, check: dict | None) -> WeightsResult:
    """+ check: the recorded verification preflight read (``Snapshot.weights_check``; None: none yet)."""
    fact = read(host, Read.of(FetchState, plan=plan))
    hub_ok = fact["hub"] == wplan.HF_HUB_REQUIREMENT.split("==")[1]
    if plan.modelscope:  # modelscope only when a ModelScope source is configured
        hub_ok = hub_ok and fact["modelscope"] == wplan.MODELSCOPE_REQUIREMENTS[0].split("==")[1]
    q = shlex.quote
    user = settings.service_user
    reqs = " ".join(q(r) for r in plan.requirements)
    directories(name=f"Ensure {plan.fetch_dir} and the fetch state directories exist", dirs=_fetch_dirs(settings, plan))
    if not hub_ok:
        server.shell(
            name=f"Ensure the fetch venv {plan.venv} has {' '.join(plan.requirements)}",
            commands=[f"test -x {q(plan.python)} || python3 -m venv {q(plan.venv)}",
                      f"{q(plan.python)} -m pip install --quiet --disable-pip-version-check "
                      f"{' '.join(q(a) for a in wplan.pip_args(settings))} {reqs}"],
        )
    else:
        host.noop(f"{plan.venv} has {' '.join(plan.requirements)}")
    program, config, env, unit_file = fetch_files(settings, plan)
    # One FileStates fact for the four files, handed to each managed_files (pyinfra does not cache facts).
    states = read(host, _fetch_files_read(plan))
    managed_files(name=f"Ensure the fetch program {plan.program}", files=[program], states=states)
    managed_files(name=f"Ensure the fetch config {plan.config_path}", files=[config], states=states)
    managed_files(name=f"Ensure the fetch unit's EnvironmentFile {plan.env_path} is current (HF token; content not shown)",
                  files=[env], states=states)
    unit = managed_files(name=f"Ensure the weights download unit {plan.unit}.service", files=[unit_file], states=states)
    systemd.daemon_reload(name="Reload systemd for the download unit", _if=unit.did_change)
    check = check or {}
    running = fact["active"] in ("active", "activating")
    _report_leftovers(plan, check)
    if wplan.already_complete(check, plan, settings.weights_reverify) and not running:
        return WeightsResult(server.shell(
            name=f"Weights in {plan.serve_path} are complete and verified (commit {check.get('commit')})", commands=[]))
    if not running:
        mk = f"install -d -o {q(user)} -g {q(user)} -m 750 {q(plan.serve_path)}"
        server.shell(name=f"Start the weights download unit {plan.unit}.service into {plan.serve_path}",
                     commands=[mk, f"rm -f {q(plan.status_path)}", f"systemctl start -- {q(plan.unit)}.service"])
    else:
        logger.info(f"{host.print_prefix}weights: {plan.unit}.service is already running; attaching to it")
    if not settings.weights_wait:
        logger.info(f"{host.print_prefix}weights: not waiting (vllm_weights_wait=False); follow with journalctl -fu {plan.unit}")
        return WeightsResult(
            server.shell(name="Not waiting for the weights download (vllm_weights_wait=False)", commands=[]),
            ready=False,
            reason=f"the weights in {plan.serve_path} are still downloading ({plan.unit}.service) and "
                   f"vllm_weights_wait=False")
    outcome = DownloadChange()
    outcome.op = follow_download(name=f"Wait for the weights download into {plan.serve_path}", plan=plan,
                                 timeout_s=settings.weights_wait_timeout_s, stall_s=settings.weights_stall_s,
                                 restarts=settings.weights_restarts, outcome=outcome)
    return WeightsResult(outcome)


def _report_leftovers(plan: wplan.FetchPlan, check: dict) -> None:
    """Log the toolkit's weights of other revisions (from the planning-time check) and remove the unused ones now
    (``fetch_weights.py prune`` reads the unit files again when it runs: it never removes what a unit uses)."""
    items = check.get("leftovers") or []
    for item in items:
        logger.info(f"{host.print_prefix}weights: other revision {item['path']} ({item['bytes'] / 1024**3:.2f} GiB of "
                    f"its own): {'removed: ' if item['remove'] else ''}{item['why']}")
    if any(item["remove"] for item in items):
        server.shell(name=f"Remove the toolkit's weights of revisions of {plan.model_name} no unit uses",
                     commands=[f"python3 {shlex.quote(plan.program)} prune {shlex.quote(plan.config_path)}"])


@deploy("Weights")
def apply(settings: Settings, src: ModelSource, state: HostState) -> WeightsResult:
    """Place the weights; return whether they changed in this run and whether the service may be (re)started on them.

    + src: `source` (what to place and where)
    + state: preflight's ``HostState``; its snapshot holds the download's recorded verification
    """
    if src.fetch is not None:
        if not src.fetch.downloads:
            return WeightsResult()  # a directory already on the host, served in place
        return _apply_fetch(settings, src.fetch, state.snapshot.weights_check)
    if src.local_dir is None:
        return WeightsResult()
    return WeightsResult(mirror_dir(
        name=f"Ensure the host holds exactly the model files of {Path(src.local_dir).name}",
        src=str(src.local_dir),
        dest=src.serve_path,
        user=settings.service_user,
        group=settings.service_user,
    ))
