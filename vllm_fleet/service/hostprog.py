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
printed. The gate after a (re)start: /health 200, then /v1/models 200 with the
key and 401 without it, then one short chat completion (its content must keep
``<think>`` when ``check_think``). On success the live unit and env file are
kept as ``*.prev`` (the last known good); on failure those are restored, the
service restarted and its health confirmed, and the run exits 1 with the
journal of the failed start between the markers JOURNAL_BEGIN / JOURNAL_END.

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
import urllib.request
from dataclasses import dataclass
from typing import Callable, Optional

JOURNAL_BEGIN = "----- JOURNAL_BEGIN (the failed start) -----"
JOURNAL_END = "----- JOURNAL_END -----"
PROGRESS_EVERY_S = 10.0
POLL_S = 0.5
HTTP_TIMEOUT_S = 30.0


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
    """Health, models (+401), chat on the running service; raises GateFailed."""
    key = read_env_file(cfg.env_path).get("VLLM_API_KEY") or None
    if cfg.require_key and not key:
        raise GateFailed(f"{cfg.env_path} holds no VLLM_API_KEY, but the deploy sets vllm_api_key")
    waited = wait_healthy(cfg, say)
    say(f"/health: 200 after {waited:.1f} s")
    check_api(cfg, key, say)


def journal(cfg: Config, since: float) -> str:
    """The service's journal since ``since`` (the failed start), last ``journal_lines`` lines."""
    proc = subprocess.run(
        ["journalctl", "-u", cfg.unit, "--since", f"@{since - 1:.0f}", "-n", str(cfg.journal_lines), "-o", "cat", "--no-pager"],
        capture_output=True, text=True, check=False,
    )
    return proc.stdout


def _copy(src: str, dst: str) -> None:
    """Copy with mode and owner, atomically replacing ``dst``."""
    tmp = dst + ".tmp"
    shutil.copy2(src, tmp)
    st = os.stat(src)
    os.chown(tmp, st.st_uid, st.st_gid)
    os.replace(tmp, dst)


def keep_as_good(cfg: Config) -> None:
    """The live unit and env file become the last known good (*.prev)."""
    for path in (cfg.unit_path, cfg.env_path):
        if os.path.exists(path):
            _copy(path, cfg.prev(path))


def roll_back(cfg: Config, say: Callable[[str], None]) -> str:
    """Restore the last known good unit/env, restart, confirm health; a one-line outcome."""
    if not os.path.exists(cfg.prev(cfg.unit_path)):
        systemctl("stop", cfg.unit)
        return "no previous version to roll back to: the service is stopped"
    for path in (cfg.unit_path, cfg.env_path):
        if os.path.exists(cfg.prev(path)):
            _copy(cfg.prev(path), path)
    say("rolling back: previous unit and env file restored, restarting")
    restart(cfg)
    try:
        gate(cfg, say)
    except GateFailed as exc:
        return f"rolled back, but the previous version is not healthy either: {exc}"
    return "rolled back: the previous version is running and healthy"


def run(cfg: Config, say: Callable[[str], None]) -> dict:
    """The worker: restart, gate, keep or roll back. Returns the verdict (also written to result_path)."""
    started = time.time()
    verdict: dict = {"started": started, "service": cfg.unit}
    try:
        say(f"restarting {cfg.unit}; gate timeout {cfg.timeout_s:.0f} s")
        started = restart(cfg)
        gate(cfg, say)
        keep_as_good(cfg)
        checks = "/health, /v1/models (+401 without the key)" if cfg.require_key else "/health, /v1/models (no API key set)"
        verdict.update(ok=True, message=f"healthy: {checks}, chat completion passed")
    except GateFailed as exc:
        say(f"gate failed: {exc}")
        excerpt = journal(cfg, started)
        outcome = roll_back(cfg, say)
        verdict.update(ok=False, message=f"{exc}; {outcome}", journal=excerpt)
    verdict["finished"] = time.time()
    return verdict


# ------------------------------------------------------------------ commands --


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle)
    os.replace(tmp, path)


def cmd_run(cfg: Config, run_id: str) -> int:
    """Worker entry point: a fresh log (first line names the run), progress lines, then the verdict file."""
    os.makedirs(cfg.state_dir, exist_ok=True)
    with open(cfg.log_path, "w", encoding="utf-8", buffering=1) as log:
        log.write(f"run {run_id}\n")

        def say(line: str) -> None:
            log.write(f"{time.strftime('%H:%M:%S')} gate: {line}\n")
        verdict = run(cfg, say)
        say("PASSED" if verdict["ok"] else "FAILED")
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
