#!/usr/bin/python3
"""GPU machine, real systemd 252: the files a deploy installs, the health gate, and each crash class, measured.

Device side, stdlib only, run INSIDE systemd's namespace (tests/gpu/systemd/device.sh does it):

    nsx /usr/bin/python3 selfheal.py RENDER_DIR OUT_DIR BUDGET_S
    SELFHEAL_STEPS=cold,devices,ipc,hang nsx ...     # only these steps, in this order (default: STEPS)

RENDER_DIR is what tests/gpu/systemd/render_kit.py wrote on the control machine (the toolkit's own
service_files/companion_files: unit, env file, gate and watchdog programs and configs, device-node and watchdog
units; manifest.json says where each goes and its owner and mode). The steps, in order, each done once (a marker
under /srv/vf/state; a later call goes on where the last stopped) and only while BUDGET_S allows its estimate:

- setup: service user, the account step's directories, every file of the manifest (atomically, with owner and
  mode), daemon-reload, the unit enabled; systemd-analyze security and verify; the NVIDIA device nodes before any
  unit of ours ran; which syscall groups of this systemd hold pidfd_getfd (systemd-analyze syscall-filter, nested
  groups expanded).
- cold: the gate (`vllm-fleet-gate apply`) on an empty cache dir; the journal of that start is journal-cold.txt
  (vLLM's KV lines; render_kit.py compare puts them next to the plan). Then the watchdog unit enabled and
  started, as the service step does after the gate.
- devices: the device-node unit (vllm-devices.service, started through the service's Wants=): its state, result
  and journal, and the device nodes afterwards.
- ipc: cross-process CUDA IPC (a CUDA tensor handed to a spawned child, as torch.multiprocessing does) run under
  the installed unit itself (only ExecStart replaced, the reaper and Restart dropped: same user, sandbox, device
  policy, system-call filter and Environment=, PYTORCH_CUDA_ALLOC_CONF included), and under the same unit without
  the `SystemCallFilter=pidfd_getfd` allow line, and without it and without `@debug` in the deny list (controls:
  they show whether the probe needs pidfd_getfd and which line gives it). vLLM itself at TP=1 has one CUDA
  process (the EngineCore), so the gate alone does not exercise CUDA IPC.
- warm: the gate again, same unit (compile cache kept).
- engine_kill: SIGKILL of the EngineCore process; systemd state, /health and NRestarts every 0.5 s until a new
  MainPID answers /health 200 and a 1-token completion.
- api_kill: SIGKILL of the API server (MainPID), the same.
- hang: SIGSTOP of the EngineCore: /health stays 200; the watchdog must restart the service (SIGKILL of the
  main process, so Restart=always restarts it and NRestarts counts it).
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
import re
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
ESTIMATE_S = {"cold": 170, "devices": 5, "ipc": 100, "hang": 160, "engine_kill": 130, "warm": 110, "api_kill": 110,
              "broken": 190}
STEPS = ("cold", "devices", "ipc", "hang", "engine_kill", "warm", "api_kill", "broken")
# Cross-process CUDA IPC as torch.multiprocessing does it (the consumer rebuilds the producer's CUDA tensor; with
# expandable segments that takes the producer's file descriptor with pidfd_getfd). Written to the host, run by the
# service venv's python under a copy of the installed unit.
IPC_PROBE = r'''
import json, os, sys

def child(q, r):
    try:
        t = q.get(timeout=60)
        t += 1
        import torch
        torch.cuda.synchronize()
        r.put("ok")
    except Exception as e:
        r.put(f"fail {type(e).__name__}: {e}".splitlines()[0][:300])

def main():
    import torch, torch.multiprocessing as mp
    res = {"uid": os.getuid(), "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "torch": torch.__version__}
    try:
        t = torch.zeros(8, device="cuda")
        torch.cuda.synchronize()
        res["cuda"] = "ok"
        res["segments_expandable"] = sorted({str(seg.get("is_expandable")) for seg in torch.cuda.memory_snapshot()})
        ctx = mp.get_context("spawn")
        q, r = ctx.Queue(), ctx.Queue()
        p = ctx.Process(target=child, args=(q, r))
        p.start()
        q.put(t)
        v = r.get(timeout=60)
        p.join(30)
        torch.cuda.synchronize()
        res["ipc"] = v
        res["producer_sees_child_write"] = float(t.sum()) == 8.0
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    print("RESULT " + json.dumps(res), flush=True)
    sys.exit(0 if res.get("ipc") == "ok" else 1)

if __name__ == "__main__":
    main()
'''
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

    def chat(self) -> dict:
        """One chat completion with the key (what a client sends); status and the start of the answer."""
        payload = {"model": self.plan["argv"][4], "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 24}
        req = urllib.request.Request(self.url + "/v1/chat/completions", data=json.dumps(payload).encode(), method="POST")
        req.add_header("Content-Type", "application/json")
        req.add_header("Authorization", f"Bearer {self.key()}")
        t = time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                body = json.loads(resp.read())
                msg = body["choices"][0]["message"]
                return {"status": resp.status, "s": round(time.monotonic() - t, 2),
                        "content": (msg.get("content") or "")[:120], "reasoning": str(msg.get("reasoning_content") or msg.get("reasoning") or "")[:80],
                        "finish_reason": body["choices"][0].get("finish_reason"), "usage": body.get("usage")}
        except urllib.error.HTTPError as exc:
            return {"status": exc.code}
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as exc:
            return {"status": 0, "error": f"{type(exc).__name__}: {exc}"[:200]}

    @staticmethod
    def environ_of(pid: int, name: str) -> str | None:
        try:
            for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                if item.startswith(name.encode() + b"="):
                    return item.split(b"=", 1)[1].decode(errors="replace")
        except OSError:
            return "unreadable"
        return None

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
            "devices_before": self.dev_snapshot(),
            "syscall_groups_with_pidfd_getfd": self.syscall_groups(),
            "yama_ptrace_scope": self.sh(["cat", "/proc/sys/kernel/yama/ptrace_scope"]).stdout.strip(),
            "kernel": os.uname().release,
        }
        self.say(f"setup: {json.dumps(info)[:1500]}")
        self.save("setup", info)

    def dev_snapshot(self) -> dict:
        return {
            "dev_nodes": self.sh(["sh", "-c", "ls -ld /dev/nvidia* /dev/nvidia-caps/* 2>&1"]).stdout.strip().splitlines(),
            "proc_devices": [l.strip() for l in Path("/proc/devices").read_text().splitlines() if "nvidia" in l],
            "proc_modules": [" ".join(l.split()[:3]) for l in Path("/proc/modules").read_text().splitlines()
                             if l.startswith("nvidia")] if os.path.exists("/proc/modules") else None,
            "nvidia_modprobe": self.sh(["sh", "-c", "p=$(command -v nvidia-modprobe) && ls -l $p || echo 'not on PATH'; "
                                        "ls -l /usr/bin/nvidia-modprobe 2>&1"]).stdout.strip().splitlines(),
        }

    def syscall_groups(self) -> dict:
        """Which of this systemd's syscall groups hold pidfd_getfd, nested groups expanded."""
        cache: dict[str, set[str]] = {}

        def members(group: str) -> set[str]:
            if group in cache:
                return cache[group]
            cache[group] = set()
            out = self.sh(["systemd-analyze", "syscall-filter", group, "--no-pager"]).stdout.splitlines()
            names: set[str] = set()
            for line in out[1:]:
                word = line.strip()
                if not word or word.startswith("#"):
                    continue
                names |= members(word) if word.startswith("@") else {word}
            cache[group] = names
            return names

        groups = ("@system-service", "@debug", "@process", "@default", "@basic-io", "@ipc")
        res = {g: "pidfd_getfd" in members(g) for g in groups}
        res["@system-service_size"] = len(members("@system-service"))
        res["@system-service_pidfd_calls"] = sorted(n for n in members("@system-service") if "pidfd" in n)
        res["@debug_members"] = sorted(members("@debug"))
        return res

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
        engine = self.engine_pid(main) if main else None
        res["alloc_conf_in_processes"] = {f"main {main}": self.environ_of(main, "PYTORCH_CUDA_ALLOC_CONF") if main else None,
                                          f"engine {engine}": self.environ_of(engine, "PYTORCH_CUDA_ALLOC_CONF") if engine else None}
        res["journal_alloc_lines"] = self.pick(text, ("expandable", "pidfd", "PYTORCH_CUDA_ALLOC_CONF", "Operation not permitted"))[:20]
        res["chat"] = self.chat()
        self.say(f"cold: chat {res['chat']}; PYTORCH_CUDA_ALLOC_CONF in {res['alloc_conf_in_processes']}")
        # the service step enables and (re)starts the watchdog after the gate
        self.sh(["systemctl", "daemon-reload"])
        res["watchdog_enable"] = self.sh(["systemctl", "enable", self.wd]).returncode
        res["watchdog_start"] = self.sh(["systemctl", "restart", self.wd]).returncode
        time.sleep(1)
        res["watchdog_state"] = self.show(self.wd)
        self.save("cold", res)
        if res["rc"] == 0:
            self.mark("cold")

    def step_devices(self) -> None:
        unit = self.dirs["devices_unit"]
        props = self.sh(["systemctl", "show", unit, "-p", "ActiveState,SubState,Result,ExecMainStatus,ExecMainCode,"
                         "ExecMainStartTimestamp,ExecMainExitTimestamp,ExecStart"]).stdout
        res = {"show": dict(line.split("=", 1) for line in props.splitlines() if "=" in line),
               "journal": self.sh(["journalctl", "-u", unit, "-o", "short-precise", "--no-pager"]).stdout.strip().splitlines()[-30:],
               "after": self.dev_snapshot(), "before": self.results.get("setup", {}).get("devices_before")}
        (self.out / "journal-devices.txt").write_text("\n".join(res["journal"]) + "\n")
        self.say(f"devices: {json.dumps(res)[:1500]}")
        self.save("devices", res)
        self.mark("devices")

    def step_ipc(self) -> None:
        """The IPC probe under the installed unit and two controls; each a transient copy of the unit file."""
        probe = Path("/opt/vllm-fleet/probe/ipcprobe.py")
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(IPC_PROBE)
        os.chmod(probe.parent, 0o755)
        os.chmod(probe, 0o644)
        python = self.dirs["venv"] + "/bin/python3"
        base = []
        for line in Path(self.dirs["unit_path"]).read_text().splitlines():
            if line.startswith("ExecStart="):
                line = f"ExecStart={python} {probe}"
            elif line.startswith("ExecStartPre=+") or line.startswith("WantedBy=") or line == "[Install]":
                continue  # no reaper (it would look for this unit's GPU leftovers), never enabled
            elif line.startswith("Restart="):
                line = "Restart=no\nRuntimeMaxSec=90"
            base.append(line)
        variants = {
            "unit_as_rendered": base,
            "without_allow_line": [l for l in base if l != "SystemCallFilter=pidfd_getfd"],
            "without_allow_line_and_debug_deny": [l.replace(" @debug", "") if l.startswith("SystemCallFilter=~") else l
                                                  for l in base if l != "SystemCallFilter=pidfd_getfd"],
        }
        out = {}
        for name, lines in variants.items():
            if self.left() < 130:
                self.say(f"ipc {name}: skipped, {self.left():.0f} s left")
                continue
            unit = f"vf-ipcprobe-{name.replace('_', '-')}.service"
            path = f"/etc/systemd/system/{unit}"
            Path(path).write_text("\n".join(lines) + "\n")
            self.sh(["systemctl", "daemon-reload"])
            t = time.monotonic()
            started = time.time()
            self.sh(["systemctl", "start", unit])
            while time.monotonic() - t < 100 and self.show(unit).get("ActiveState") in ("active", "activating"):
                time.sleep(0.5)
            props = self.show(unit)
            text = self.sh(["journalctl", "-u", unit, "-o", "cat", "--no-pager", "--since", f"@{started - 1:.0f}"]).stdout
            result = next((l for l in text.splitlines() if l.startswith("RESULT ")), None)
            out[name] = {"wall_s": round(time.monotonic() - t, 1), "result": json.loads(result[7:]) if result else None,
                         "exit": (props.get("Result"), props.get("ExecMainCode"), props.get("ExecMainStatus")),
                         "filter_lines": [l for l in lines if l.startswith("SystemCallFilter=")],
                         "environment_alloc": [l for l in lines if "PYTORCH_CUDA_ALLOC_CONF" in l],
                         "journal_errors": self.pick(text, ("pidfd", "Operation not permitted", "Error", "error", "fail"))[:12]}
            self.say(f"ipc {name}: {json.dumps(out[name])[:900]}")
            os.unlink(path)
        self.sh(["systemctl", "daemon-reload"])
        self.save("ipc", out)
        self.mark("ipc")

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
        steps = [s for s in os.environ.get("SELFHEAL_STEPS", ",".join(STEPS)).split(",") if s]
        for step in steps:
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
        left = [s for s in steps if not self.done(s)]
        self.say(f"done in {time.monotonic() - self.t0:.0f} s; not done yet: {left or 'nothing'}")
        return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(Run(Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])).main())
