#!/usr/bin/python3
"""vllm-fleet-gate: restart the vLLM service, prove it healthy, roll back when it is not.

Installed on each host as ``{base_dir}/bin/vllm-fleet-gate`` by vllm_fleet/service/step.py.
Stdlib only (it runs with the host's python3, outside any venv) and
independent of the SSH session: ``apply`` starts the worker as a transient
systemd unit, so a dropped connection cannot stop a half-done rollback, and
then follows the worker's log until its verdict.

    vllm-fleet-gate apply  CONFIG   # start the worker detached, follow it, exit with its verdict
    vllm-fleet-gate run    CONFIG RUN_ID   # the worker itself (what `apply` starts)
    vllm-fleet-gate status CONFIG   # one JSON object: unit state, model, version, uptime, GPUs, health

CONFIG is a JSON file written by the deploy (no secret in it); the API key is
read from the service's EnvironmentFile (root-only readable) and never
printed. The gate after a (re)start: /health 200, the process listening on the
port is the unit's MainPID or one of its descendants (read from /proc: not some
other server on the port), then /v1/models 200 with the key and 401 without it,
then one short chat completion (its content must keep ``<think>`` when
``check_think``), then a stability window (``stability_s``) in which /health
stays 200 and neither MainPID nor NRestarts moves (NRestarts is compared with
its value right after the restart, over the whole gate). On success the live
unit and env file are kept as ``*.prev`` (the last known good); on failure
those are restored, the service restarted and its health confirmed, and the
run exits 1 with the journal of the failed start between the markers
JOURNAL_BEGIN / JOURNAL_END.

Every path ends with a verdict file, also when the gate or the rollback itself
raises (a ``systemctl`` that fails, a full disk): the rollback retries the start
of the previous version and never leaves the service stopped while a last
known good exists. Files it writes (log, verdict, copies) are created 0600
(``umask 077``): the log is root's only.

Exit codes: 0 healthy; 1 gate failed (rolled back, or stopped when there was
nothing to roll back to); 2 usage or configuration error; 3 another gate runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Callable, Optional

JOURNAL_BEGIN = "----- JOURNAL_BEGIN (the failed start) -----"
JOURNAL_END = "----- JOURNAL_END -----"
PROGRESS_EVERY_S = 10.0
POLL_S = 0.5
HTTP_TIMEOUT_S = 30.0
START_ATTEMPTS = 3  # starts of the previous version a rollback tries before it reports that it did not start
START_RETRY_S = 2.0  # wait before the next start of the previous version (times the attempt, at most 10 s)
LISTEN = "0A"  # TCP state LISTEN in /proc/net/tcp*


@dataclass(frozen=True)
class Config:
    """What the deploy tells the gate (the JSON file), all non-secret."""

    service: str
    unit_path: str
    env_path: str
    prev_dir: str
    state_dir: str
    url: str
    served_model_name: str
    check_think: bool
    timeout_s: float
    require_key: bool = False
    journal_lines: int = 200
    stability_s: float = 5.0  # after the checks: /health 200, MainPID and NRestarts unchanged this long
    log_file: Optional[str] = None  # the deploy sends both (vllm_fleet/layout.py); absent: derived from state_dir
    result_file: Optional[str] = None

    @property
    def unit(self) -> str:
        """The systemd unit name."""
        return f"{self.service}.service"

    def prev(self, path: str) -> str:
        """Where the last known good copy of ``path`` is kept."""
        return os.path.join(self.prev_dir, os.path.basename(path) + ".prev")

    @property
    def log_path(self) -> str:
        """The worker's progress log (followed by ``apply``)."""
        return self.log_file or os.path.join(self.state_dir, f"{self.service}.gate.log")

    @property
    def result_path(self) -> str:
        """The verdict of the last gate run (JSON)."""
        return self.result_file or os.path.join(self.state_dir, f"{self.service}.gate.json")


def load_config(path: str) -> Config:
    """Read CONFIG; unknown keys are errors (a typo must not become a default)."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    return Config(**data)


class GateFailed(Exception):
    """One check of the gate did not pass; the message says which and why."""


# ------------------------------------------------------------------ host I/O --


def systemctl(*args: str) -> subprocess.CompletedProcess:
    """Run systemctl, output captured."""
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)


def unit_props(unit: str, *names: str) -> dict[str, str]:
    """`systemctl show -p ...` as a dict."""
    out = systemctl("show", unit, "-p", ",".join(names)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def read_env_file(path: str) -> dict[str, str]:
    """KEY=VALUE lines of a systemd EnvironmentFile (double-quoted values as the toolkit writes them)."""
    env: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return env
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        env[key.strip()] = value
    return env


@dataclass(frozen=True)
class Reply:
    """An HTTP answer: status (0 when nothing answered) and body text."""

    status: int
    body: str


def http(url: str, *, key: Optional[str] = None, payload: Optional[dict] = None, timeout: float = HTTP_TIMEOUT_S) -> Reply:
    """GET (or POST ``payload`` as JSON) ``url``; connection errors are status 0."""
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    if data:
        request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Reply(response.status, response.read().decode(errors="replace"))
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.read().decode(errors="replace"))
    except (urllib.error.URLError, OSError) as exc:
        return Reply(0, str(getattr(exc, "reason", exc)))


# ------------------------------------------------------------------ the gate --


def _exited(cfg: Config, main_pid: str, props: dict[str, str]) -> Optional[str]:
    """Why the started service is gone (None while it is still the process we started)."""
    if props.get("ActiveState") in ("failed", "inactive") or props.get("SubState") == "auto-restart":
        return f"the service stopped ({props.get('ActiveState')}/{props.get('SubState')}, exit status {props.get('ExecMainStatus')})"
    if main_pid not in ("", "0") and props.get("MainPID") not in (main_pid, None):
        return f"the service's main process {main_pid} exited (now {props.get('MainPID')}, restarts {props.get('NRestarts')})"
    return None


def wait_healthy(cfg: Config, say: Callable[[str], None], clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> float:
    """Poll /health until 200; fail early when the service exits, or at the timeout. Returns seconds waited."""
    start = clock()
    main_pid = unit_props(cfg.unit, "MainPID").get("MainPID", "")
    next_progress = start + PROGRESS_EVERY_S
    last = Reply(0, "no answer yet")
    while True:
        last = http(cfg.url + "/health", timeout=5)
        waited = clock() - start
        if last.status == 200:
            return waited
        props = unit_props(cfg.unit, "ActiveState", "SubState", "MainPID", "NRestarts", "ExecMainStatus")
        gone = _exited(cfg, main_pid, props)
        if gone:
            raise GateFailed(f"/health never answered 200: {gone} after {waited:.0f} s")
        if waited >= cfg.timeout_s:
            raise GateFailed(f"/health did not answer 200 within {cfg.timeout_s:.0f} s (last: {last.status or last.body})")
        if clock() >= next_progress:
            say(f"waiting for {cfg.url}/health: {waited:.0f} s of {cfg.timeout_s:.0f} s, "
                f"unit {props.get('ActiveState')}/{props.get('SubState')}, last answer {last.status or last.body}")
            next_progress += PROGRESS_EVERY_S
        sleep(POLL_S)


def check_api(cfg: Config, key: Optional[str], say: Callable[[str], None]) -> None:
    """/v1/models with the key (and 401 without it), then one chat completion."""
    models = http(cfg.url + "/v1/models", key=key)
    if models.status != 200:
        raise GateFailed(f"/v1/models with the API key answered {models.status}: {models.body[:200]}")
    try:
        ids = [card["id"] for card in json.loads(models.body)["data"]]
    except (ValueError, KeyError, TypeError):
        raise GateFailed(f"/v1/models answered no model list: {models.body[:200]}") from None
    if cfg.served_model_name not in ids:
        raise GateFailed(f"/v1/models lists {ids}, not {cfg.served_model_name!r}")
    say(f"/v1/models: 200, serves {cfg.served_model_name}")
    if key:
        anonymous = http(cfg.url + "/v1/models")
        if anonymous.status != 401:
            raise GateFailed(f"/v1/models without the API key answered {anonymous.status}, expected 401")
        say("/v1/models without the key: 401")
    chat = http(cfg.url + "/v1/chat/completions", key=key, payload={
        "model": cfg.served_model_name, "max_tokens": 16,
        "messages": [{"role": "user", "content": "Reply with one word: ready?"}],
    })
    if chat.status != 200:
        raise GateFailed(f"chat completion answered {chat.status}: {chat.body[:300]}")
    try:
        content = json.loads(chat.body)["choices"][0]["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError):
        raise GateFailed(f"chat completion answered no message: {chat.body[:300]}") from None
    if cfg.check_think and "<think>" not in content:
        raise GateFailed("chat completion content has no <think>: with --reasoning-parser minimax_m2_append_think the "
                         f"thinking must stay in content (got {content[:120]!r})")
    say(f"chat completion: 200, {len(content)} characters" + (", <think> in content" if cfg.check_think else ""))


def url_port(url: str) -> int:
    """The TCP port of the gate's URL (80/443 when it names none)."""
    parsed = urllib.parse.urlsplit(url)
    return parsed.port or (443 if parsed.scheme == "https" else 80)


def listening_inodes(port: int, proc: str = "/proc") -> set[str]:
    """Socket inodes listening on TCP ``port`` (IPv4 and IPv6), from /proc/net/tcp and tcp6."""
    return set(listening_sockets(port, proc))


def listening_sockets(port: int, proc: str = "/proc") -> dict[str, int]:
    """{socket inode: owner uid} of the sockets listening on TCP ``port`` (IPv4 and IPv6)."""
    inodes: dict[str, int] = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(os.path.join(proc, "net", name), encoding="ascii") as handle:
                rows = handle.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cells = row.split()
            if len(cells) > 9 and cells[3] == LISTEN and int(cells[1].rsplit(":", 1)[1], 16) == port:
                inodes[cells[9]] = int(cells[7])
    return inodes


def socket_owners(inodes: set[str], proc: str = "/proc") -> set[int]:
    """PIDs holding a file descriptor of one of the socket ``inodes``."""
    return _socket_owners(inodes, proc)[0]


def _socket_owners(inodes: set[str], proc: str = "/proc") -> tuple[set[int], bool]:
    """(PIDs holding one of the socket ``inodes``, whether some process's descriptors could not be read).

    Reading another user's /proc/PID/fd links needs CAP_SYS_PTRACE: root on a host has it, root inside a
    container started with Docker's default capabilities does not (EACCES)."""
    wanted = {f"socket:[{i}]" for i in inodes}
    owners: set[int] = set()
    unreadable = False
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        fd_dir = os.path.join(proc, entry, "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(os.path.join(fd_dir, fd)) in wanted:
                    owners.add(int(entry))
                    break
            except PermissionError:
                unreadable = True
                break
            except OSError:
                continue
    return owners, unreadable


def process_uid(pid: int, proc: str = "/proc") -> Optional[int]:
    """The real uid of ``pid`` (/proc/PID/status is readable without CAP_SYS_PTRACE); None when it is gone."""
    try:
        with open(os.path.join(proc, str(pid), "status"), encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def parent_pid(pid: int, proc: str = "/proc") -> Optional[int]:
    """The parent of ``pid`` (None when it is gone)."""
    try:
        with open(os.path.join(proc, str(pid), "stat"), encoding="ascii", errors="replace") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def descends_from(pid: int, ancestor: int, proc: str = "/proc") -> bool:
    """``pid`` is ``ancestor`` or one of its descendants."""
    seen: set[int] = set()
    while pid and pid not in seen:
        if pid == ancestor:
            return True
        seen.add(pid)
        pid = parent_pid(pid, proc) or 0
    return False


def check_owner(cfg: Config, main_pid: str, proc: str = "/proc") -> str:
    """The server listening on the gate's port is this unit's MainPID or a descendant of it; a one-line summary."""
    port = url_port(cfg.url)
    if not main_pid.isdigit() or main_pid == "0":
        raise GateFailed(f"{cfg.unit} has no main process (MainPID={main_pid or 'none'}) while port {port} answers")
    sockets = listening_sockets(port, proc)
    owners, unreadable = _socket_owners(set(sockets), proc)
    if not owners and sockets and unreadable:
        # No CAP_SYS_PTRACE here (a container): the socket's owner uid is what can be read; it must be the main process's.
        uid = process_uid(int(main_pid), proc)
        others = sorted({u for u in sockets.values() if u != uid})
        if uid is None or others:
            raise GateFailed(f"port {port} is held by uid {', '.join(map(str, others or sorted(set(sockets.values()))))}, "
                             f"not by {cfg.unit}'s main process {main_pid} (uid {uid}): another server holds the port")
        return f"port {port} is held by uid {uid}, the uid of {cfg.unit}'s MainPID {main_pid} (descriptors not readable here)"
    if not owners:
        raise GateFailed(f"no process of this host listens on port {port}, yet {cfg.url} answered: "
                         "the answer did not come from this unit")
    strangers = sorted(p for p in owners if not descends_from(p, int(main_pid), proc))
    if strangers:
        raise GateFailed(f"port {port} is served by process {', '.join(map(str, strangers))}, which is not {cfg.unit}'s "
                         f"main process {main_pid} or one of its children (another server holds the port)")
    return f"port {port} is served by {cfg.unit} (MainPID {main_pid})"


def check_stable(cfg: Config, base: dict[str, str], say: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
    """For ``stability_s``: /health 200, MainPID and NRestarts as in ``base`` (read right after the restart)."""
    end = clock() + cfg.stability_s
    while True:
        props = unit_props(cfg.unit, "ActiveState", "SubState", "MainPID", "NRestarts", "ExecMainStatus")
        if props.get("NRestarts") != base.get("NRestarts"):
            raise GateFailed(f"{cfg.unit} restarted during the gate (NRestarts {base.get('NRestarts')} -> "
                             f"{props.get('NRestarts')}): it crashed after answering")
        gone = _exited(cfg, base.get("MainPID", ""), props)
        if gone:
            raise GateFailed(f"{gone} during the stability window")
        health = http(cfg.url + "/health", timeout=5)
        if health.status != 200:
            raise GateFailed(f"/health answered {health.status or health.body} during the stability window "
                             f"({cfg.stability_s:.0f} s after the checks)")
        if clock() >= end:
            return
        sleep(POLL_S)


def restart(cfg: Config) -> float:
    """daemon-reload and restart the service; the wall-clock time of the restart (for the journal)."""
    systemctl("daemon-reload")
    systemctl("reset-failed", cfg.unit)
    started = time.time()
    proc = systemctl("restart", cfg.unit)
    if proc.returncode != 0:
        raise GateFailed(f"systemctl restart {cfg.unit} failed: {proc.stderr.strip()}")
    return started


def gate(cfg: Config, say: Callable[[str], None]) -> None:
    """Health, owner, models (+401), chat, then the stability window on the running service; raises GateFailed."""
    base = unit_props(cfg.unit, "MainPID", "NRestarts")  # right after the restart: nothing may move from here
    key = read_env_file(cfg.env_path).get("VLLM_API_KEY") or None
    if cfg.require_key and not key:
        raise GateFailed(f"{cfg.env_path} holds no VLLM_API_KEY, but the deploy sets vllm_api_key")
    waited = wait_healthy(cfg, say)
    say(f"/health: 200 after {waited:.1f} s")
    now = unit_props(cfg.unit, "MainPID", "NRestarts")
    if now.get("NRestarts") != base.get("NRestarts"):
        raise GateFailed(f"{cfg.unit} restarted before it answered (NRestarts {base.get('NRestarts')} -> {now.get('NRestarts')})")
    base = {"MainPID": now.get("MainPID", ""), "NRestarts": now.get("NRestarts", "")}
    say(check_owner(cfg, base["MainPID"]))
    check_api(cfg, key, say)
    check_stable(cfg, base, say)
    say(check_owner(cfg, base["MainPID"]) + f"; NRestarts {base['NRestarts']} and /health 200 for {cfg.stability_s:.0f} s")


def journal(cfg: Config, since: float) -> str:
    """The service's journal since ``since`` (the failed start), last ``journal_lines`` lines ('' when unreadable)."""
    try:
        proc = subprocess.run(
            ["journalctl", "-u", cfg.unit, "--since", f"@{since - 1:.0f}", "-n", str(cfg.journal_lines), "-o", "cat", "--no-pager"],
            capture_output=True, text=True, check=False,
        )
    except OSError as exc:
        return f"(journalctl failed: {exc})"
    return proc.stdout


def _copy(src: str, dst: str, secret: bool = False) -> None:
    """Copy with mode and owner, atomically replacing ``dst``: the copy is written to a temp file in the same
    directory created 0600 (a secret is never readable by others, not even while copied), then renamed.
    ``secret``: the copy is root:root 0600 whatever ``src`` is (an env file kept by an older toolkit at 0640)."""
    tmp = dst + ".tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out, open(src, "rb") as source:
        shutil.copyfileobj(source, out)
        out.flush()
        os.fsync(out.fileno())
    st = os.stat(src)
    os.chown(tmp, *((0, 0) if secret else (st.st_uid, st.st_gid)))
    os.chmod(tmp, 0o600 if secret else st.st_mode & 0o7777)
    os.replace(tmp, dst)


def keep_as_good(cfg: Config) -> None:
    """The live unit and env file become the last known good (*.prev)."""
    for path in (cfg.unit_path, cfg.env_path):
        if os.path.exists(path):
            _copy(path, cfg.prev(path), secret=path == cfg.env_path)


def _start_previous(cfg: Config, say: Callable[[str], None]) -> None:
    """Start the restored previous version, up to START_ATTEMPTS times (reset-failed before each: a start limit
    hit by the failed version must not keep the good one down); GateFailed when it never starts."""
    last: Optional[Exception] = None
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            restart(cfg)
            return
        except (GateFailed, OSError) as exc:
            last = exc
            say(f"rolling back: start {attempt} of {START_ATTEMPTS} of the previous version failed: {exc}")
            time.sleep(min(START_RETRY_S * attempt, 10.0))
    raise GateFailed(f"the previous version did not start after {START_ATTEMPTS} attempts: {last}")


def _roll_back(cfg: Config, say: Callable[[str], None]) -> str:
    if not os.path.exists(cfg.prev(cfg.unit_path)):
        systemctl("stop", cfg.unit)
        return "no previous version to roll back to: the service is stopped"
    for path in (cfg.unit_path, cfg.env_path):
        if os.path.exists(cfg.prev(path)):
            _copy(cfg.prev(path), path, secret=path == cfg.env_path)
    say("rolling back: previous unit and env file restored, restarting")
    _start_previous(cfg, say)
    try:
        gate(cfg, say)
    except GateFailed as exc:
        return f"rolled back, but the previous version is not healthy either: {exc}"
    return "rolled back: the previous version is running and healthy"


def _last_resort(cfg: Config) -> str:
    """After a rollback that raised: the previous version's files once more, and a plain start; what is running."""
    try:
        for path in (cfg.unit_path, cfg.env_path):
            if os.path.exists(cfg.prev(path)):
                _copy(cfg.prev(path), path, secret=path == cfg.env_path)
        systemctl("daemon-reload")
        systemctl("reset-failed", cfg.unit)
        systemctl("start", cfg.unit)
        state = systemctl("is-active", cfg.unit).stdout.strip() or "unknown"
    except Exception as exc:  # noqa: BLE001 - the verdict must still be written
        return f"starting the previous version failed too ({type(exc).__name__}: {exc}); start {cfg.unit} by hand"
    return f"the previous version was started again: {cfg.unit} is {state}"


def roll_back(cfg: Config, say: Callable[[str], None]) -> str:
    """Restore the last known good unit/env, restart, confirm health; a one-line outcome. Never raises: with a
    last known good on disk the service is never left stopped (a failing rollback ends in `_last_resort`)."""
    try:
        return _roll_back(cfg, say)
    except Exception as exc:  # noqa: BLE001 - every path ends with a verdict
        reason = str(exc) if isinstance(exc, GateFailed) else f"{type(exc).__name__}: {exc}"
        say(f"rollback failed: {reason}")
        if not os.path.exists(cfg.prev(cfg.unit_path)):
            return f"rollback failed ({reason})"
        return f"rollback failed ({reason}); {_last_resort(cfg)}"


def run(cfg: Config, say: Callable[[str], None]) -> dict:
    """The worker: restart, gate, keep or roll back. Returns the verdict (also written to result_path).

    Never raises: an error of the gate itself (not only a failed check) is a failed gate, rolled back."""
    started = time.time()
    verdict: dict = {"started": started, "service": cfg.unit}
    try:
        say(f"restarting {cfg.unit}; gate timeout {cfg.timeout_s:.0f} s")
        started = restart(cfg)
        gate(cfg, say)
    except Exception as exc:  # noqa: BLE001 - GateFailed, or the gate itself broke: both end in a rollback
        reason = str(exc) if isinstance(exc, GateFailed) else f"the gate itself failed: {type(exc).__name__}: {exc}"
        say(f"gate failed: {reason}")
        excerpt = journal(cfg, started)
        outcome = roll_back(cfg, say)
        verdict.update(ok=False, message=f"{reason}; {outcome}", journal=excerpt)
    else:
        checks = "/health, /v1/models (+401 without the key)" if cfg.require_key else "/health, /v1/models (no API key set)"
        try:
            keep_as_good(cfg)
        except OSError as exc:
            verdict.update(ok=False, journal="", message=f"healthy ({checks}, chat completion passed), but the last known "
                           f"good could not be recorded ({exc}); the new version keeps running, the next deploy gates it again")
        else:
            verdict.update(ok=True, message=f"healthy: {checks}, chat completion passed, "
                                            f"stable for {cfg.stability_s:.0f} s")
    verdict["finished"] = time.time()
    return verdict


# ------------------------------------------------------------------ commands --


def _private(path: str, mode: str = "w"):
    """Open ``path`` for writing as a root-only file (0600), whatever mode an earlier file there had."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, mode, encoding="utf-8", buffering=1)


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with _private(tmp) as handle:
        json.dump(data, handle)
    os.replace(tmp, path)


def cmd_run(cfg: Config, run_id: str) -> int:
    """Worker entry point: a fresh log (first line names the run), progress lines, then the verdict file.

    The verdict file is written on every path, also when the worker itself fails."""
    os.umask(0o077)
    os.makedirs(cfg.state_dir, exist_ok=True)
    verdict: dict = {"started": time.time(), "service": cfg.unit}
    try:
        with _private(cfg.log_path) as log:
            log.write(f"run {run_id}\n")

            def say(line: str) -> None:
                log.write(f"{time.strftime('%H:%M:%S')} gate: {line}\n")
            verdict = run(cfg, say)
            say("PASSED" if verdict["ok"] else "FAILED")
    except Exception as exc:  # noqa: BLE001 - e.g. the log cannot be written: still a verdict
        verdict.update(ok=False, journal="", finished=time.time(),
                       message=f"the gate worker failed: {type(exc).__name__}: {exc}")
    verdict["run_id"] = run_id
    _write_json(cfg.result_path, verdict)
    return 0 if verdict["ok"] else 1


def _read_verdict(cfg: Config, run_id: str) -> Optional[dict]:
    """The verdict of run ``run_id`` (None until the worker wrote it)."""
    try:
        with open(cfg.result_path, encoding="utf-8") as handle:
            verdict = json.load(handle)
    except (OSError, ValueError):
        return None
    return verdict if verdict.get("run_id") == run_id else None


def cmd_apply(cfg: Config, config_path: str) -> int:
    """Start the worker as a transient unit (it survives SSH loss), follow its log, print its verdict.

    systemd refuses a second transient unit of the same name, so two deploys can
    never gate one service at once; the run id keeps this run's log and verdict
    apart from an earlier run's.
    """
    os.makedirs(cfg.state_dir, exist_ok=True)
    worker = f"vllm-fleet-gate-{cfg.service}"
    run_id = f"{os.getpid()}-{time.time():.0f}"
    proc = subprocess.run(["systemd-run", "--quiet", "--collect", f"--unit={worker}", "--description=vllm-fleet health gate",
                           sys.executable, os.path.abspath(__file__), "run", config_path, run_id],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"gate verdict: NOT RUN: cannot start {worker}.service (another gate of {cfg.unit} running?): "
              f"{proc.stderr.strip()}", flush=True)
        return 3
    offset, started, verdict = None, time.monotonic(), None
    while verdict is None:
        verdict = _read_verdict(cfg, run_id)
        try:
            with open(cfg.log_path, encoding="utf-8") as log:
                if offset is None and log.readline().rstrip("\n") == f"run {run_id}":
                    offset = log.tell()
                if offset is not None:
                    log.seek(offset)
                    chunk = log.read()
                    offset = log.tell()
                    if chunk:
                        sys.stdout.write(chunk)
                        sys.stdout.flush()
        except FileNotFoundError:
            pass
        if verdict is None:
            if systemctl("is-active", "--quiet", f"{worker}.service").returncode != 0 and time.monotonic() - started > 5:
                time.sleep(1)
                verdict = _read_verdict(cfg, run_id)
                if verdict is None:
                    print(f"gate verdict: FAILED: the gate worker ended without a verdict (journalctl -u {worker})", flush=True)
                    return 1
            time.sleep(POLL_S)
    print(f"gate verdict: {'PASSED' if verdict['ok'] else 'FAILED'}: {verdict['message']}", flush=True)
    if not verdict["ok"]:
        print(JOURNAL_BEGIN)
        print(verdict.get("journal", "").rstrip())
        print(JOURNAL_END, flush=True)
    return 0 if verdict["ok"] else 1


def _first_line(cfg: Config) -> str:
    """The log's first line (the run id line), '' when absent."""
    try:
        with open(cfg.log_path, encoding="utf-8") as log:
            return log.readline().rstrip("\n")
    except FileNotFoundError:
        return ""


def _uptime_s(props: dict[str, str]) -> Optional[float]:
    """Seconds since the unit entered 'active', from the monotonic clock."""
    try:
        entered = int(props.get("ActiveEnterTimestampMonotonic", "0")) / 1e6
        with open("/proc/uptime", encoding="ascii") as handle:
            now = float(handle.read().split()[0])
    except (OSError, ValueError):
        return None
    return round(now - entered, 1) if entered and props.get("ActiveState") == "active" else None


def _gpus() -> list[dict]:
    """Memory used/total per GPU from nvidia-smi (empty when there is none)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,name,memory.total,memory.used,compute_cap,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, check=False, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) >= 5 and cells[0].isdigit():
            gpus.append({"index": int(cells[0]), "used_mib": cells[4], "total_mib": cells[3]})
    return gpus


def status(cfg: Config) -> dict:
    """The service as the fleet status table shows it."""
    props = unit_props(cfg.unit, "ActiveState", "SubState", "NRestarts", "ActiveEnterTimestampMonotonic", "LoadState")
    key = read_env_file(cfg.env_path).get("VLLM_API_KEY") or None
    health = http(cfg.url + "/health", timeout=5)
    version = http(cfg.url + "/version", timeout=5)
    models = http(cfg.url + "/v1/models", key=key, timeout=5)
    out: dict = {
        "unit": f"{props.get('ActiveState', '?')}/{props.get('SubState', '?')}" if props.get("LoadState") == "loaded" else "not installed",
        "restarts": int(props.get("NRestarts") or 0),
        "uptime_s": _uptime_s(props),
        "health": health.status,
        "version": None,
        "model": None,
        "gpus": _gpus(),
        "last_gate": None,
    }
    try:
        out["version"] = json.loads(version.body).get("version") if version.status == 200 else None
        out["model"] = ",".join(c["id"] for c in json.loads(models.body)["data"]) if models.status == 200 else None
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    try:
        with open(cfg.result_path, encoding="utf-8") as handle:
            last = json.load(handle)
        out["last_gate"] = {"ok": last["ok"], "finished": last.get("finished"), "message": last["message"][:200]}
    except (OSError, ValueError, KeyError):
        pass
    return out


def main(argv: list[str]) -> int:
    """CLI entry point."""
    if not ((len(argv) == 2 and argv[0] in ("apply", "status")) or (len(argv) == 3 and argv[0] == "run")):
        print(__doc__, file=sys.stderr)
        return 2
    command, config_path = argv[:2]
    try:
        cfg = load_config(config_path)
    except (OSError, ValueError, TypeError) as exc:
        print(f"gate: cannot read {config_path}: {exc}", file=sys.stderr)
        return 2
    if command == "run":
        return cmd_run(cfg, argv[2])
    if command == "status":
        print(json.dumps(status(cfg)))
        return 0
    return cmd_apply(cfg, config_path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
