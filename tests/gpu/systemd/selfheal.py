#!/usr/bin/python3
"""GPU machine, real systemd 252: the files a deploy installs, the health gate, and each crash class, measured.

Device side, stdlib only, run INSIDE systemd's namespace (tests/gpu/systemd/device.sh does it):

    nsx /usr/bin/python3 selfheal.py RENDER_DIR OUT_DIR BUDGET_S

RENDER_DIR is what tests/gpu/systemd/render_kit.py wrote on the control machine (the toolkit's own
service_files/companion_files: unit, env file, gate and watchdog programs and configs, device-node and watchdog
units; manifest.json says where each goes and its owner and mode). The steps, in order, each done once (a marker
under /srv/vf/state; a later call goes on where the last stopped) and only while BUDGET_S allows its estimate:

- setup: service user, the account step's directories, every file of the manifest (atomically, with owner and
  mode), daemon-reload, the unit enabled; systemd-analyze security and verify.
- cold: the gate (`vllm-fleet-gate apply`) on an empty cache dir; the journal of that start is journal-cold.txt
  (vLLM's KV lines; render_kit.py compare puts them next to the plan). Then the watchdog unit enabled and
  started, as the service step does after the gate.
- warm: the gate again, same unit (compile cache kept).
- engine_kill: SIGKILL of the EngineCore process; systemd state, /health and NRestarts every 0.5 s until a new
  MainPID answers /health 200 and a 1-token completion.
- api_kill: SIGKILL of the API server (MainPID), the same.
- hang: SIGSTOP of the EngineCore: /health stays 200; the watchdog must restart the service.
- broken: a unit with --max-model-len 999999 through the gate: it must fail, roll back, and the previous
  version must serve again.
- final (every call): leak check of the API key (argv of every process, the whole journal, unit files, gate
  output), journals, gate status.

Every figure in OUT_DIR/results.json is read off this machine: times are CLOCK_MONOTONIC differences taken here.
The API key is read from the root-only env file and never printed.
"""

from __future__ import annotations

import json
import os
import pwd
import grp
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

STATE = Path("/srv/vf/state")
POLL_S = 0.5
ESTIMATE_S = {"cold": 170, "warm": 110, "engine_kill": 130, "api_kill": 110, "hang": 200, "broken": 190}
KV_WORDS = ("Available KV cache memory", "GPU KV cache size", "Maximum concurrency", "Model loading took",
            "torch.compile took", "init engine", "Graph capturing finished", "Directly load the compiled graph",
            "Initializing a V1 LLM engine", "Using FlashAttention")
EVENT_WORDS = ("Main process exited", "Scheduled restart", "Failed with", "Deactivated", "Started", "Stopping",
               "Stopped", "vllm-fleet-watchdog", "reap", "Killing", "SIGKILL", "EngineCore", "died", "Dead",
               "dead", "Consumed", "Application startup complete", "Shutting down", "Traceback", "Error")


class Run:
    def __init__(self, render: Path, out: Path, budget_s: float):
        self.t0 = time.monotonic()
        self.budget_s = budget_s
        self.render, self.out = render, out
        self.dirs = json.loads((render / "dirs.json").read_text())
        self.plan = json.loads((render / "plan.json").read_text())
        self.manifest = json.loads((render / "manifest.json").read_text())
        self.unit, self.wd = self.dirs["unit"], self.dirs["watchdog_unit"]
        self.url = f"http://127.0.0.1:{self.dirs['port']}"
        self.results_path = out / "results.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        out.mkdir(parents=True, exist_ok=True)
        STATE.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ helpers --
    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    @staticmethod
    def say(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    def save(self, name: str, value) -> None:
        self.results[name] = value
        tmp = self.results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        os.replace(tmp, self.results_path)

    @staticmethod
    def sh(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(argv, 124, exc.stdout or "", f"timed out after {timeout} s")

    def show(self, unit: str | None = None) -> dict:
        out = self.sh(["systemctl", "show", unit or self.unit, "-p",
                       "ActiveState,SubState,MainPID,NRestarts,ExecMainStatus,ExecMainCode,Result"]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def key(self) -> str | None:
        for line in Path(self.dirs["env_path"]).read_text().splitlines():
            if line.startswith("VLLM_API_KEY="):
                return line.split("=", 1)[1].strip().strip('"')
        return None

    def http(self, path: str, payload: dict | None = None, timeout: float = 2.0, key: bool = False) -> int:
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(self.url + path, data=data, method="POST" if data else "GET")
        if data:
            req.add_header("Content-Type", "application/json")
        if key:
            req.add_header("Authorization", f"Bearer {self.key()}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                resp.read()
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, OSError):
            return 0

    def health(self) -> int:
        return self.http("/health", timeout=1.0)

    def completion(self, timeout: float = 10.0) -> int:
        return self.http("/v1/completions", {"model": self.plan["argv"][4], "prompt": "ping", "max_tokens": 1},
                         timeout=timeout, key=True)

    @staticmethod
    def children(pid: int) -> list[int]:
        kids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as handle:
                        if int(handle.read().rsplit(")", 1)[1].split()[1]) == pid:
                            kids.append(int(entry))
                except (OSError, ValueError, IndexError):
                    pass
        return kids

    @staticmethod
    def cmdline(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            return ""

    def engine_pid(self, main: int) -> int | None:
        for kid in sorted(self.children(main)):
            if "spawn_main" in self.cmdline(kid):
                return kid
        return None

    def tree(self, main: int) -> list[str]:
        return [f"{pid} {self.cmdline(pid)[:160]}" for pid in [main, *sorted(self.children(main))]]

    def gpu_used_mib(self) -> str:
        return self.sh(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]).stdout.strip()

    def journal(self, unit: str, since_epoch: float, fmt: str = "short-precise") -> str:
        return self.sh(["journalctl", "-u", unit, "--since", f"@{since_epoch - 1:.0f}", "-o", fmt, "--no-pager"],
                       timeout=60).stdout

    @staticmethod
    def pick(text: str, words) -> list[str]:
        return [line for line in text.splitlines() if any(w in line for w in words)]

    def done(self, step: str) -> bool:
        return (STATE / step).exists()

    def mark(self, step: str) -> None:
        (STATE / step).touch()

    # ------------------------------------------------------------ install --
    def setup(self) -> None:
        user, home = self.dirs["user"], self.dirs["home"]
        try:
            pwd.getpwnam(user)
        except KeyError:
            p = self.sh(["useradd", "--system", "--user-group", "--home-dir", home, "--no-create-home",
                         "--shell", "/usr/sbin/nologin", user])
            self.say(f"useradd {user}: rc={p.returncode} {p.stderr.strip()}")
        for path, owner, group, mode in self.dirs["account_dirs"]:
            os.makedirs(path, exist_ok=True)
            shutil.chown(path, owner, group)
            os.chmod(path, int(mode, 8))
        model = self.dirs["model_dir"]
        for root, dirnames, files in os.walk(model):
            shutil.chown(root, user, user)
            os.chmod(root, 0o750)
            for f in files:
                shutil.chown(os.path.join(root, f), user, user)
                os.chmod(os.path.join(root, f), 0o640)
        for entry in self.manifest:
            self.install(entry)
        self.sh(["systemctl", "daemon-reload"])
        enable = self.sh(["systemctl", "enable", self.unit])
        verify = self.sh(["systemd-analyze", "verify", self.unit, self.wd, self.dirs["devices_unit"]], timeout=120)
        sec = {u: self.sh(["systemd-analyze", "security", u, "--no-pager"], timeout=120).stdout.strip().splitlines()[-1:]
               for u in (self.unit, self.wd)}
        info = {
            "systemd": self.sh(["systemctl", "--version"]).stdout.splitlines()[:1],
            "installed": [f"{e['mode']} {e['owner']}:{e['group']} {e['path']}" for e in self.manifest],
            "enable": (enable.returncode, enable.stderr.strip()[-300:]),
            "verify_rc": verify.returncode, "verify": (verify.stdout + verify.stderr).strip().splitlines()[-15:],
            "security": sec,
            "nvidia_smi": self.sh(["nvidia-smi", "--query-gpu=index,name,memory.total,memory.used,driver_version,compute_cap",
                                   "--format=csv,noheader"]).stdout.strip(),
            "nofile_hard_limit_here": self.sh(["sh", "-c", "ulimit -Hn"]).stdout.strip(),
        }
        self.say(f"setup: {json.dumps(info)[:1500]}")
        self.save("setup", info)

    def install(self, entry: dict) -> None:
        """Write one file of the manifest as the deploy does: temp file in the same directory, owner, mode, rename."""
        path = entry["path"]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write((self.render / "files" / entry["src"]).read_bytes())
        os.chown(tmp, pwd.getpwnam(entry["owner"]).pw_uid, grp.getgrnam(entry["group"]).gr_gid)
        os.chmod(tmp, int(entry["mode"], 8))
        os.replace(tmp, path)

    # ------------------------------------------------------------ gate --
    def gate(self, label: str) -> dict:
        started = time.time()
        t = time.monotonic()
        p = self.sh(["/usr/bin/python3", self.dirs["gate_program"], "apply", self.dirs["gate_config"]],
                    timeout=max(30.0, self.left() - 20))
        wall = time.monotonic() - t
        text = p.stdout + p.stderr
        with open(self.out / "gates.txt", "a") as handle:
            handle.write(f"===== gate {label}: rc={p.returncode} wall {wall:.1f} s (started {time.strftime('%H:%M:%S', time.localtime(started))})\n{text}\n")
        lines = text.splitlines()
        res = {"rc": p.returncode, "wall_s": round(wall, 1), "started_epoch": started,
               "verdict": next((l for l in reversed(lines) if l.startswith("gate verdict")), lines[-1:] or None),
               "progress": [l for l in lines if " gate: " in l][:40]}
        self.say(f"gate {label}: rc={p.returncode} in {wall:.1f} s: {res['verdict']}")
        return res

    def wait_healthy(self, limit_s: float) -> float | None:
        t = time.monotonic()
        while time.monotonic() - t < limit_s:
            if self.health() == 200 and self.show().get("SubState") == "running" and self.completion() == 200:
                return time.monotonic() - t
            time.sleep(1)
        return None

    # ------------------------------------------------------------ steps --
    def step_cold(self) -> None:
        cache = self.dirs["cache_dir"]
        for entry in os.listdir(cache):  # a cold compile cache: what a first deploy on this host sees
            p = os.path.join(cache, entry)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
        res = self.gate("cold")
        text = self.journal(self.unit, res["started_epoch"], fmt="cat")
        (self.out / "journal-cold.txt").write_text(text)
        res["kv_lines"] = self.pick(text, KV_WORDS)
        res["gpu_used_mib"] = self.gpu_used_mib()
        props = self.show()
        main = int(props.get("MainPID") or 0)
        res["tree"] = self.tree(main) if main else []
        res["cgroup_procs"] = self.sh(["sh", "-c", f"cat /sys/fs/cgroup$(systemctl show {self.unit} -p ControlGroup --value)/cgroup.procs"]).stdout.split()
        # what the GPU reaper sees from inside this PID namespace, against the unit's own PIDs
        res["compute_apps_seen_here"] = self.sh(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                                                 "--format=csv,noheader"]).stdout.strip().splitlines()
        # the service step enables and (re)starts the watchdog after the gate
        self.sh(["systemctl", "daemon-reload"])
        res["watchdog_enable"] = self.sh(["systemctl", "enable", self.wd]).returncode
        res["watchdog_start"] = self.sh(["systemctl", "restart", self.wd]).returncode
        time.sleep(1)
        res["watchdog_state"] = self.show(self.wd)
        self.save("cold", res)
        if res["rc"] == 0:
            self.mark("cold")

    def step_warm(self) -> None:
        res = self.gate("warm")
        text = self.journal(self.unit, res["started_epoch"], fmt="cat")
        res["kv_lines"] = self.pick(text, KV_WORDS)
        res["compile_cache_hit"] = "Directly load the compiled graph" in text
        res["watchdog_lines_during_gate"] = self.pick(self.journal(self.wd, res["started_epoch"], fmt="cat"), ("idle: the health gate",))[:3]
        self.save("warm", res)
        if res["rc"] == 0:
            self.mark("warm")

    def watch_recovery(self, label: str, target: str, sig: int, limit_s: float) -> dict:
        """Signal the API server ('main') or the EngineCore ('engine'), then follow systemd and /health until a new
        MainPID serves a completion again."""
        ready = self.wait_healthy(min(200.0, max(10.0, self.left() - limit_s)))
        before = self.show()
        main = int(before.get("MainPID") or 0)
        engine = self.engine_pid(main) if main else None
        res: dict = {"before": before, "tree_before": self.tree(main) if main else [], "ready_wait_s": ready,
                     "gpu_used_mib_before": self.gpu_used_mib()}
        pid = main if target == "main" else engine
        if ready is None or not pid:
            res["error"] = f"not ready (waited {ready}) or no {target} process (main {main}, engine {engine})"
            self.say(f"{label}: {res['error']}")
            return res
        started = time.time()
        t0 = time.monotonic()
        os.kill(pid, sig)
        self.say(f"{label}: sent {signal.Signals(sig).name} to {target} pid {pid} (MainPID {main})")
        res.update(signalled_pid=pid, signal=signal.Signals(sig).name, started_epoch=started)
        events, last = [], None
        first_non200 = main_changed = healthy = None
        hang_probe = None
        while time.monotonic() - t0 < limit_s:
            el = time.monotonic() - t0
            props = self.show()
            h = self.health()
            state = (props.get("ActiveState"), props.get("SubState"), props.get("MainPID"), props.get("NRestarts"), h)
            if state != last:
                ev = {"t": round(el, 1), "active": state[0], "sub": state[1], "main_pid": state[2], "n_restarts": state[3],
                      "health": h, "exec_main_status": props.get("ExecMainStatus"), "exec_main_code": props.get("ExecMainCode")}
                events.append(ev)
                self.say(f"{label} +{el:5.1f}s {ev}")
                last = state
            if h != 200 and first_non200 is None:
                first_non200 = el
            if props.get("MainPID") != str(main) and main_changed is None:
                main_changed = el
            if sig == signal.SIGSTOP and hang_probe is None and el > 1:
                tc = time.monotonic()
                hang_probe = {"t": round(el, 1), "completion_status": self.completion(timeout=3), "waited_s": round(time.monotonic() - tc, 1),
                              "health": self.health()}
                self.say(f"{label}: during the hang: {hang_probe}")
            if h == 200 and props.get("MainPID") not in (str(main), "0", "") and props.get("SubState") == "running":
                c = self.completion(timeout=10)
                if c == 200:
                    healthy = time.monotonic() - t0
                    break
            time.sleep(POLL_S)
        after = self.show()
        res.update(events=events, first_health_not_200_s=first_non200, main_pid_changed_s=main_changed,
                   healthy_again_s=round(healthy, 1) if healthy is not None else None, after=after,
                   gpu_used_mib_after=self.gpu_used_mib(), hang_probe=hang_probe,
                   signalled_pid_still_exists=os.path.exists(f"/proc/{pid}"))
        text = self.journal(self.unit, started)
        res["journal_events"] = self.pick(text, EVENT_WORDS)[:60]
        res["watchdog_journal"] = [l for l in self.journal(self.wd, started).splitlines() if "ok:" not in l][:40]
        self.say(f"{label}: healthy again after {res['healthy_again_s']} s (limit {limit_s:.0f} s)")
        return res

    def step_engine_kill(self) -> None:
        res = self.watch_recovery("engine_kill", "engine", signal.SIGKILL, min(240.0, self.left() - 15))
        self.save("engine_kill", res)
        if res.get("healthy_again_s") is not None:
            self.mark("engine_kill")

    def step_api_kill(self) -> None:
        res = self.watch_recovery("api_kill", "main", signal.SIGKILL, min(240.0, self.left() - 15))
        self.save("api_kill", res)
        if res.get("healthy_again_s") is not None:
            self.mark("api_kill")

    def step_hang(self) -> None:
        res = self.watch_recovery("hang", "engine", signal.SIGSTOP, min(300.0, self.left() - 15))
        pid = res.get("signalled_pid")
        if pid and os.path.exists(f"/proc/{pid}"):  # never leave a stopped process behind
            os.kill(pid, signal.SIGCONT)
        self.save("hang", res)
        if res.get("healthy_again_s") is not None:
            self.mark("hang")

    def step_broken(self) -> None:
        path = self.dirs["unit_path"]
        good = Path(path).read_text()
        broken = good.replace("--max-model-len 8192", "--max-model-len 999999")
        assert broken != good, "the unit has no --max-model-len 8192 to break"
        ready = self.wait_healthy(150)
        tmp = path + ".tmp"
        Path(tmp).write_text(broken)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        res = self.gate("broken")
        res["ready_wait_s"] = ready
        res["unit_restored"] = Path(path).read_text() == good
        res["after"] = self.show()
        res["health_after"] = self.health()
        res["completion_after"] = self.completion()
        text = self.journal(self.unit, res["started_epoch"])
        res["journal_events"] = self.pick(text, EVENT_WORDS + ("max_model_len", "max-model-len", "ValueError"))[:60]
        if not res["unit_restored"]:  # put the good unit back whatever the gate did
            Path(tmp).write_text(good)
            os.replace(tmp, path)
            self.sh(["systemctl", "daemon-reload"])
        self.save("broken", res)
        self.mark("broken")

    def final(self) -> None:
        key = self.key() or "\0never"
        ps = self.sh(["ps", "-eo", "args"]).stdout
        whole = self.sh(["journalctl", "--no-pager", "-o", "cat"], timeout=120).stdout
        units = "".join(Path(p).read_text(errors="replace") for p in Path("/etc/systemd/system").glob("*.service"))
        gates = (self.out / "gates.txt").read_text() if (self.out / "gates.txt").exists() else ""
        leaks = {"argv": key in ps, "journal": key in whole, "unit_files": key in units, "gate_output": key in gates,
                 "processes_checked": len(ps.splitlines()), "journal_lines_checked": len(whole.splitlines())}
        self.save("leaks", leaks)
        self.say(f"leaks: {leaks}")
        (self.out / "journal-vllm.txt").write_text(self.sh(["journalctl", "-u", self.unit, "-o", "short-precise",
                                                           "--no-pager"], timeout=120).stdout)
        (self.out / "journal-watchdog.txt").write_text(self.sh(["journalctl", "-u", self.wd, "-o", "short-precise",
                                                               "--no-pager"], timeout=120).stdout)
        status = self.sh(["/usr/bin/python3", self.dirs["gate_program"], "status", self.dirs["gate_config"]]).stdout.strip()
        self.save("status_at_end", status)
        self.say(f"status: {status[:600]}")
        env_mode = oct(os.stat(self.dirs["env_path"]).st_mode & 0o777)
        st = os.stat(self.dirs["env_path"])
        self.save("env_file", {"mode": env_mode, "uid": st.st_uid, "gid": st.st_gid})

    def main(self) -> int:
        if not self.done("setup"):
            self.setup()
            self.mark("setup")
        for step in ("cold", "warm", "engine_kill", "api_kill", "hang", "broken"):
            if self.done(step):
                continue
            if step != "cold" and not self.done("cold"):
                self.say(f"skip {step}: the cold gate has not passed")
                continue
            if self.left() < ESTIMATE_S[step]:
                self.say(f"skip {step}: {self.left():.0f} s left < {ESTIMATE_S[step]} s estimate")
                continue
            self.say(f"== {step} ({self.left():.0f} s left)")
            getattr(self, f"step_{step}")()
        self.final()
        left = [s for s in ESTIMATE_S if not self.done(s)]
        self.say(f"done in {time.monotonic() - self.t0:.0f} s; not done yet: {left or 'nothing'}")
        return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(Run(Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])).main())
