#!/usr/bin/python3
"""vllm-fleet-watchdog: restart a hung vLLM, and clear GPU memory this service left behind before it starts.

Installed on each host as ``{base_dir}/bin/vllm-fleet-watchdog`` by vllm_fleet/service/step.py.
Stdlib only (it runs with the host's python3, outside any venv) and imports nothing of vllm-fleet.

    vllm-fleet-watchdog watch CONFIG   # <service>-watchdog.service: probe for ever, restart after N misses
    vllm-fleet-watchdog probe CONFIG   # one probe now, its verdict on stdout (exit 0 answered, 1 missed)
    vllm-fleet-watchdog reap  CONFIG   # the service's ExecStartPre=+: end our GPU leftovers, refuse foreign holders

Why: when vLLM 0.25's engine hangs (measured on an H200: EngineCore SIGSTOPped),
``/health`` and ``/metrics`` keep answering 200 and systemd sees the unit running,
while no completion is ever answered. Only a real inference request with a
deadline notices. Every ``interval_s`` the watchdog sends a 1-token completion
(``max_tokens=1``; the API key read from the service's root-only env file, never
in argv) with a ``deadline_s`` deadline; ``misses`` misses in a row restart the
service (SIGKILL of its main process: Restart=always restarts it and counts it). It does nothing while the service is not
active/running, while the health gate runs (its transient unit is active), and
after each (re)start until ``/health`` first answers 200 (or ``start_grace_s``
passed): it never fights a start or the gate. Each verdict is one line on stdout
(the watchdog unit's journal); a restart is also written to the service's own
journal (``journalctl -u SERVICE`` shows it), where the doctor finds it.

``reap``: before each start, ``nvidia-smi --query-compute-apps`` lists who holds
memory on the service's GPUs. A holder that is this service's (its cgroup is the
service's unit, or it runs as the service user outside any other service) is
sent SIGTERM, then SIGKILL after ``reap_grace_s``; any other holder is named and
the start refused (exit 1; systemd retries every RestartSec, so the service
starts once the holder is gone). No nvidia-smi: nothing to do.

Metrics (when CONFIG names ``textfile_dir``, node exporter's textfile collector directory): ``watch`` keeps
``vllm_fleet_watchdog_restarts_total{service=...}`` (a counter, 0 from the first watch on, +1 per restart, kept
across watchdog restarts) in ``vllm-fleet-watchdog-SERVICE.prom``; ``reap`` writes
``vllm_fleet_gpu_foreign_processes`` and ``vllm_fleet_gpu_foreign_memory_mib`` (gauges: what holds the service's GPUs
and is not the service's, 0 when nothing) to ``vllm-fleet-reap-SERVICE.prom``. Each file is replaced atomically.
A file that cannot be written is said on stdout and changes nothing else.

CONFIG is a JSON file written by the deploy (no secret in it). Exit codes: 0 ok,
1 probe missed / start refused, 2 usage or configuration error.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, List, Optional

PROG = "vllm-fleet-watchdog"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
APPS_QUERY = ["nvidia-smi", "--query-compute-apps=gpu_uuid,pid,process_name,used_memory", "--format=csv,noheader,nounits"]
# The same query as the deploy's GPU facts (index and uuid are its first two columns).
GPUS_QUERY = ["nvidia-smi", "--query-gpu=index,uuid,name,memory.total,memory.used,compute_cap,driver_version",
              "--format=csv,noheader,nounits"]
RESTART_LINE = "{prog}: restarting {unit}: {misses} consecutive completion probes missed their {deadline:.0f} s deadline"


@dataclass(frozen=True)
class Config:
    """What the deploy tells the watchdog (the JSON file), all non-secret."""

    service: str
    url: str
    served_model_name: str
    env_path: str
    user: str
    gate_unit: str
    interval_s: float = 30.0
    deadline_s: float = 30.0
    misses: int = 3
    start_grace_s: float = 600.0
    gpus: Optional[List[int]] = None
    reap_grace_s: float = 30.0
    textfile_dir: Optional[str] = None  # node exporter's textfile collector directory; None: no metrics files

    @property
    def unit(self) -> str:
        """The vLLM unit's name."""
        return f"{self.service}.service"


def load_config(path: str) -> Config:
    """Read CONFIG; unknown keys are errors (a typo must not become a default)."""
    with open(path, encoding="utf-8") as handle:
        return Config(**json.load(handle))


# ------------------------------------------------------------------ host I/O --


def say(line: str) -> None:
    """One verdict line on stdout (the watchdog unit's journal)."""
    print(line, flush=True)


def journal_send(message: str, unit: str, priority: int = 4) -> bool:
    """Write ``message`` to the journal about ``unit`` (OBJECT_SYSTEMD_UNIT: ``journalctl -u UNIT`` shows it,
    for root senders), by journald's native protocol. False when there is no journal socket."""
    fields = {"MESSAGE": message, "PRIORITY": str(priority), "SYSLOG_IDENTIFIER": PROG, "OBJECT_SYSTEMD_UNIT": unit}
    data = "".join(f"{k}={v}\n" for k, v in fields.items() if "\n" not in v).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(data, JOURNAL_SOCKET)
        return True
    except OSError:
        return False


def systemctl(*args: str) -> subprocess.CompletedProcess:
    """Run systemctl, output captured."""
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)


def read_env_file(path: str) -> dict:
    """KEY=VALUE lines of a systemd EnvironmentFile (double-quoted values as the toolkit writes them)."""
    env: dict = {}
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (FileNotFoundError, PermissionError):
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


def http(url: str, *, key: Optional[str] = None, payload: Optional[dict] = None, timeout: float = 10.0) -> tuple:
    """(status, body) of a GET, or a POST of ``payload``; status 0 when nothing answered within ``timeout``."""
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    if data:
        request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return 0, "no answer within the deadline" if isinstance(reason, (socket.timeout, TimeoutError)) else str(reason)


# ------------------------------------------------------------------ metrics --

RESTARTS_METRIC = "vllm_fleet_watchdog_restarts_total"


def textfile_path(cfg: Config, part: str) -> Optional[str]:
    """Where ``part`` (watchdog, reap) writes its metrics; None without a textfile directory."""
    return os.path.join(cfg.textfile_dir, f"vllm-fleet-{part}-{cfg.service}.prom") if cfg.textfile_dir else None


def write_textfile(path: str, text: str) -> bool:
    """Replace ``path`` with ``text`` atomically (the collector never reads half a file); False, said, on error."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        return True
    except OSError as exc:
        say(f"{PROG}: cannot write metrics file {path}: {exc}")
        return False


def count_restart(cfg: Config, by: int = 1) -> Optional[int]:
    """Add ``by`` to the service's restart counter in its textfile (read back first, so the count survives the
    watchdog's own restarts); the new total, or None without a textfile directory."""
    path = textfile_path(cfg, "watchdog")
    if path is None:
        return None
    total = 0
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(RESTARTS_METRIC + "{"):
                    total = int(float(line.rsplit(None, 1)[1]))
    except (OSError, ValueError, IndexError):
        pass
    total += by
    write_textfile(path, f"# HELP {RESTARTS_METRIC} Restarts of a vLLM service by vllm-fleet-watchdog "
                         f"(completion probes missed).\n# TYPE {RESTARTS_METRIC} counter\n"
                         f'{RESTARTS_METRIC}{{service="{cfg.service}"}} {total}\n')
    return total


def write_foreign(cfg: Config, foreign: list) -> None:
    """The reap's finding as gauges: processes holding the service's GPUs that are not the service's, and their MiB."""
    path = textfile_path(cfg, "reap")
    if path is None:
        return
    label = f'{{service="{cfg.service}"}}'
    write_textfile(path, "# HELP vllm_fleet_gpu_foreign_processes Processes not of this service holding its GPUs "
                         "at its last start.\n# TYPE vllm_fleet_gpu_foreign_processes gauge\n"
                         f"vllm_fleet_gpu_foreign_processes{label} {len(foreign)}\n"
                         "# HELP vllm_fleet_gpu_foreign_memory_mib GPU memory (MiB) they hold.\n"
                         "# TYPE vllm_fleet_gpu_foreign_memory_mib gauge\n"
                         f"vllm_fleet_gpu_foreign_memory_mib{label} {sum(h.mib for h in foreign)}\n")


# ------------------------------------------------------------------ watching --


@dataclass(frozen=True)
class UnitState:
    """What systemd says about the service (``systemctl show``)."""

    active: str
    sub: str
    main_pid: str
    entered_monotonic_s: float  # ActiveEnterTimestampMonotonic, in seconds

    @classmethod
    def read(cls, unit: str) -> "UnitState":
        out = systemctl("show", unit, "-p", "ActiveState,SubState,MainPID,ActiveEnterTimestampMonotonic").stdout
        props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        return cls(props.get("ActiveState", ""), props.get("SubState", ""), props.get("MainPID", "0"),
                   int(props.get("ActiveEnterTimestampMonotonic") or 0) / 1e6)


@dataclass(frozen=True)
class Probe:
    """One completion probe: ``ok`` True (answered), False (missed: no answer in time, refused, or 5xx) or None
    (answered, but not about the engine: a 4xx such as a key or model-name mismatch; not counted)."""

    ok: Optional[bool]
    detail: str
    seconds: float


def probe(cfg: Config) -> Probe:
    """A 1-token completion with the deadline; the key from the env file (never argv, never printed)."""
    key = read_env_file(cfg.env_path).get("VLLM_API_KEY") or None
    began = time.monotonic()
    status, body = http(cfg.url + "/v1/completions", key=key, timeout=cfg.deadline_s,
                        payload={"model": cfg.served_model_name, "prompt": "ping", "max_tokens": 1})
    took = time.monotonic() - began
    if status == 200:
        return Probe(True, f"answered 200 in {took:.2f} s", took)
    if 400 <= status < 500:
        return Probe(None, f"answered {status} ({body[:120]!r}): the server answers but the probe is refused; "
                           "not counted", took)
    return Probe(False, f"{'HTTP ' + str(status) if status else body} after {took:.1f} s", took)


@dataclass
class Watchdog:
    """The watchdog's memory between ticks: the MainPID it watches, whether that start became ready, misses."""

    cfg: Config
    pid: str = ""
    ready: bool = False
    missed: int = 0
    history: List[str] = field(default_factory=list)

    def tick(self, unit: UnitState, gate_running: bool, now_monotonic: float,
             health: Callable[[], int], completion: Callable[[], Probe]) -> tuple:
        """One round: (verdict line, restart?). ``health``/``completion`` are the HTTP checks (called only
        when needed), ``now_monotonic`` is CLOCK_MONOTONIC (systemd's clock for ActiveEnterTimestampMonotonic)."""
        cfg = self.cfg
        if gate_running:
            self.pid, self.ready, self.missed = "", False, 0
            return f"{PROG}: idle: the health gate ({cfg.gate_unit}) is running", False
        if unit.active != "active" or unit.sub != "running" or unit.main_pid in ("", "0"):
            self.pid, self.ready, self.missed = "", False, 0
            return f"{PROG}: idle: {cfg.unit} is {unit.active}/{unit.sub}", False
        if unit.main_pid != self.pid:
            self.pid, self.ready, self.missed = unit.main_pid, False, 0
        if not self.ready:
            up = now_monotonic - unit.entered_monotonic_s if unit.entered_monotonic_s else 0.0
            if health() == 200:
                self.ready = True
            elif up < cfg.start_grace_s:
                return f"{PROG}: idle: {cfg.unit} (pid {unit.main_pid}) is starting, {up:.0f} s of {cfg.start_grace_s:.0f} s", False
            else:
                self.ready = True  # never became healthy within the start timeout: its probes count from now
        result = completion()
        if result.ok is None:
            return f"{PROG}: probe not counted: {result.detail}", False
        if result.ok:
            self.missed = 0
            return f"{PROG}: ok: {cfg.unit} (pid {unit.main_pid}) {result.detail}", False
        self.missed += 1
        line = f"{PROG}: miss {self.missed}/{cfg.misses}: {cfg.unit} (pid {unit.main_pid}): {result.detail}"
        if self.missed < cfg.misses:
            return line, False
        self.pid, self.ready, self.missed = "", False, 0
        return line, True


def gate_running(cfg: Config) -> bool:
    """The health gate's transient unit is active (the deploy is restarting and checking the service)."""
    return systemctl("is-active", "--quiet", cfg.gate_unit).returncode == 0


def restart(cfg: Config) -> None:
    """Have systemd restart the service, saying so in its own journal first.

    SIGKILL to the main process (the API server), not `systemctl restart`: the unit's Restart=always then restarts
    it as it does after any crash (systemd kills the rest of the cgroup, the engine included, and counts the
    restart in NRestarts, which `vllm-fleet status` shows; a `systemctl restart` resets NRestarts to 0). A hung
    engine may not act on SIGTERM at all (a stopped process does not), so there is nothing graceful to wait for.
    `--kill-who` (not 252's new `--kill-whom`) works on systemd 249 (Ubuntu 22.04) too."""
    line = RESTART_LINE.format(prog=PROG, unit=cfg.unit, misses=cfg.misses, deadline=cfg.deadline_s)
    say(line)
    journal_send(line, cfg.unit)
    done = systemctl("kill", "--kill-who=main", "--signal=SIGKILL", cfg.unit)
    if done.returncode != 0:
        say(f"{PROG}: systemctl kill --kill-who=main --signal=SIGKILL {cfg.unit} failed: {done.stderr.strip()}")
    else:
        count_restart(cfg)


def cmd_watch(cfg: Config) -> int:
    """Probe every interval_s for ever."""
    dog = Watchdog(cfg)
    say(f"{PROG}: watching {cfg.unit} at {cfg.url}: a 1-token completion every {cfg.interval_s:.0f} s, deadline "
        f"{cfg.deadline_s:.0f} s, restart after {cfg.misses} misses in a row")
    count_restart(cfg, by=0)  # the series exists from the start: increase() sees the first restart
    while True:
        began = time.monotonic()
        line, again = dog.tick(UnitState.read(cfg.unit), gate_running(cfg), time.monotonic(),
                               lambda: http(cfg.url + "/health", timeout=min(cfg.deadline_s, 10.0))[0],
                               lambda: probe(cfg))
        say(line)
        if again:
            restart(cfg)
        time.sleep(max(0.0, cfg.interval_s - (time.monotonic() - began)))


def cmd_probe(cfg: Config) -> int:
    """One probe now."""
    result = probe(cfg)
    say(f"{PROG}: probe: {result.detail}")
    return 0 if result.ok is not False else 1


# ------------------------------------------------------------------ reaping --


@dataclass(frozen=True)
class Holder:
    """A process holding GPU memory (nvidia-smi) and who it is (/proc)."""

    pid: int
    name: str
    mib: int
    gpu: str
    uid: Optional[int]
    cgroup: str

    def describe(self) -> str:
        try:
            user = pwd.getpwuid(self.uid).pw_name if self.uid is not None else "?"
        except KeyError:
            user = str(self.uid)
        return f"pid {self.pid} ({self.name}, user {user}, cgroup {self.cgroup or '?'}) holds {self.mib} MiB on {self.gpu}"


def _proc_owner(pid: int) -> tuple:
    """(uid, cgroup path) of a process from /proc; (None, '') when it is not visible here."""
    uid, cgroup = None, ""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("Uid:"):
                    uid = int(line.split()[1])
        with open(f"/proc/{pid}/cgroup", encoding="ascii", errors="replace") as handle:
            cgroup = next((l.strip().split(":", 2)[2] for l in handle if l.startswith("0::")), "")
    except (OSError, ValueError, IndexError):
        pass
    return uid, cgroup


def gpu_holders(gpus: Optional[List[int]], run: Callable[[List[str]], str]) -> List[Holder]:
    """Compute processes on the service's GPUs (all GPUs when ``gpus`` is None), from nvidia-smi."""
    names = {}
    for line in run(GPUS_QUERY).splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) >= 2 and cells[0].isdigit():
            names[cells[1]] = int(cells[0])
    holders = []
    for line in run(APPS_QUERY).splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 4 or not cells[1].isdigit():
            continue
        uuid, pid, name, mib = cells
        index = names.get(uuid)
        if gpus is not None and index not in gpus:
            continue
        uid, cgroup = _proc_owner(int(pid))
        holders.append(Holder(int(pid), name, int(mib) if mib.isdigit() else 0,
                              f"GPU {index} ({uuid})" if index is not None else uuid, uid, cgroup))
    return holders


def is_ours(holder: Holder, unit: str, uid: Optional[int]) -> bool:
    """This service's: in its unit's cgroup, or run by its user outside any other service (a session, a scope)."""
    cgroup = holder.cgroup.rstrip("/")
    if cgroup.endswith("/" + unit) or f"/{unit}/" in cgroup + "/":
        return True
    in_other_service = any(part.endswith(".service") for part in cgroup.split("/"))
    return uid is not None and holder.uid == uid and not in_other_service


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def end_process(pid: int, grace_s: float, sleep: Callable[[float], None] = time.sleep) -> str:
    """SIGTERM, then SIGKILL after ``grace_s``; how it ended."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return "already gone"
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return "ended on SIGTERM"
        sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return "ended on SIGTERM"
    for _ in range(50):
        if not _alive(pid):
            break
        sleep(0.1)
    return "killed (SIGKILL)"


def reap(cfg: Config, run: Callable[[List[str]], str]) -> int:
    """End this service's GPU leftovers; refuse (1) while another program holds the service's GPUs."""
    try:
        uid: Optional[int] = pwd.getpwnam(cfg.user).pw_uid
    except KeyError:
        uid = None
    try:
        holders = gpu_holders(cfg.gpus, run)
    except FileNotFoundError:
        say(f"{PROG} reap: no nvidia-smi on this host: nothing to check")
        return 0
    except (OSError, subprocess.SubprocessError) as exc:
        say(f"{PROG} reap: nvidia-smi failed ({exc}): not checked; vLLM reports any memory shortfall itself")
        return 0
    me = os.getpid()
    foreign = []
    for holder in holders:
        if holder.pid == me:
            continue
        if holder.uid is None:
            foreign.append(holder)
            continue
        if is_ours(holder, cfg.unit, uid):
            outcome = end_process(holder.pid, cfg.reap_grace_s)
            say(f"{PROG} reap: leftover of {cfg.unit}: {holder.describe()}: {outcome}")
        else:
            foreign.append(holder)
    write_foreign(cfg, foreign)
    if foreign:
        for holder in foreign:
            say(f"{PROG} reap: refusing to start {cfg.unit}: {holder.describe()}, and it is not this service's: "
                f"stop it, or set vllm_gpus to GPUs it does not use (systemd retries the start every RestartSec)")
        return 1
    return 0


def _run_smi(argv: List[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


def main(argv: List[str]) -> int:
    """CLI entry point."""
    if len(argv) != 2 or argv[0] not in ("watch", "probe", "reap"):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        cfg = load_config(argv[1])
    except (OSError, ValueError, TypeError) as exc:
        print(f"{PROG}: cannot read {argv[1]}: {exc}", file=sys.stderr)
        return 2
    if argv[0] == "watch":
        return cmd_watch(cfg)
    if argv[0] == "probe":
        return cmd_probe(cfg)
    return reap(cfg, _run_smi)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
