#!/usr/bin/env python3
"""GPU machine, real systemd: the rendered unit, env file, gate and watchdog under systemd 252, and the crash classes.

Device side. Needs: the kit installed (tests/gpu/kit.sh with SITE/VROOT under /srv, since the namespace's
systemd empties /tmp), systemd running in its namespace (tests/gpu/systemd/sysd.sh: every systemd command goes
through `nsx`), the tiny model (tests/gpu/make_tiny_model.py). Then

    VLLM_API_KEY=... python3 tests/gpu/systemd/selfheal.py --out $OUT install cold engine-kill api-kill
    VLLM_API_KEY=... python3 tests/gpu/systemd/selfheal.py --out $OUT hang rollback

Each scenario appends one JSON object to OUT/selfheal.jsonl (what was done, what systemd and /health said, and
how long the endpoint was down) and keeps the journal of the scenario as OUT/journal-<scenario>.txt:

- install: plan + render through the toolkit (vllm_fleet.service.step.service_files, the files a deploy
  installs, byte for byte) for this machine's GPU, write them where the layout says, create the service user.
- cold: the gate (`vllm-fleet-gate apply`) on a cold compile cache; the KV lines vLLM logs vs the plan.
- engine-kill: SIGKILL of the EngineCore process (vLLM's API server then exits 0) -> healthy again?
- api-kill: SIGKILL of the API server (MainPID) -> healthy again?
- hang: SIGSTOP of the EngineCore (/health stays 200) -> the watchdog restarts the service -> healthy again?
- rollback: a broken unit (`--max-model-len 999999`) through the gate -> rolled back, previous version healthy.

The API key comes from the environment and goes only into the root-only env file; it is never put in argv.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "gpu"))

import smoke  # noqa: E402  (tests/gpu/smoke.py: GPU facts, log parsing, KV comparison)

MODEL = "/srv/tinym"
VENV = "/srv/vroot"
PORT = 8100
STATE = Path("/srv/vf-systemd")


def nsx(*argv: str, check: bool = False, timeout: float | None = None) -> subprocess.CompletedProcess:
    """A command inside systemd's namespace (PIDs there are the namespace's)."""
    return subprocess.run(["nsx", *argv], capture_output=True, text=True, check=check, timeout=timeout)


def show(unit: str, *props: str) -> dict[str, str]:
    out = nsx("systemctl", "show", unit, "-p", ",".join(props)).stdout
    return dict(line.partition("=")[::2] for line in out.splitlines() if "=" in line)


def health() -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def chat_ok(key: str, timeout: float = 20.0) -> bool:
    """One real completion (what the watchdog sends); True when it answered 200 in time."""
    body = json.dumps({"model": smoke.SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}/v1/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def engine_pid(main_pid: str) -> str | None:
    """The EngineCore process: the API server's child started by multiprocessing spawn."""
    out = nsx("ps", "-o", "pid=,args=", "--ppid", main_pid).stdout
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if "spawn_main" in args or "EngineCore" in args:
            return pid
    return None


def wait_back(key: str, old_main: str, limit_s: float, t0: float, trace: list) -> float | None:
    """Seconds from t0 until a new MainPID answers /health 200 and one real completion; None if not in limit_s."""
    while time.monotonic() - t0 < limit_s:
        st = show("vllm", "ActiveState", "SubState", "MainPID", "NRestarts")
        h = health()
        trace.append({"t": round(time.monotonic() - t0, 1), "health": h, **st})
        if h == 200 and st.get("MainPID") not in ("0", old_main, None) and chat_ok(key):
            return time.monotonic() - t0
        time.sleep(1)
    return None


def journal(since: str) -> str:
    return nsx("journalctl", "--no-pager", "-o", "short-monotonic", "--since", since).stdout


def record(out: Path, name: str, result: dict, since: str) -> None:
    text = journal(since)
    (out / f"journal-{name}.txt").write_text(text)
    from vllm_fleet.service import doctor

    result["doctor"] = [f"{d.code}: {d.summary}" for d in doctor.diagnose(text)]
    with open(out / "selfheal.jsonl", "a") as f:
        f.write(json.dumps({"scenario": name, **result}, default=str) + "\n")
    print(f"== {name}: " + json.dumps({k: v for k, v in result.items() if k != "trace"}, default=str)[:1500], flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("scenarios", nargs="+", choices=["install", "cold", "engine-kill", "api-kill", "hang", "rollback"])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    key = os.environ.get("VLLM_API_KEY") or sys.exit("set VLLM_API_KEY")
    for name in args.scenarios:
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        result = SCENARIOS[name](key)
        record(args.out, name, result, since)
    return 0


def gate(label: str) -> dict:
    """`vllm-fleet-gate apply` as the deploy runs it (inside the namespace, as root); its verdict and duration."""
    from vllm_fleet.layout import HostLayout

    lay = HostLayout.of(settings())
    t0 = time.monotonic()
    proc = nsx("/usr/bin/python3", lay.gate_program, "apply", lay.gate_config, timeout=900)
    lines = (proc.stdout + proc.stderr).splitlines()
    verdict = next((l for l in reversed(lines) if l.startswith("gate verdict:")), lines[-1] if lines else "")
    return {"gate": label, "rc": proc.returncode, "seconds": round(time.monotonic() - t0, 1), "verdict": verdict,
            "gate_output_tail": lines[-12:]}


def crash(key: str, sig: signal.Signals, target: str, limit_s: float) -> dict:
    """Send `sig` to the engine or the API server of a healthy service; how long until it serves again."""
    before = show("vllm", "MainPID", "NRestarts")
    main_pid = before["MainPID"]
    pid = engine_pid(main_pid) if target == "engine" else main_pid
    if not pid or main_pid == "0":
        return {"error": f"no {target} process (MainPID {main_pid})", "before": before}
    t0 = time.monotonic()
    nsx("kill", f"-{sig.name.removeprefix('SIG')}", pid, check=True)
    trace: list = []
    back = wait_back(key, main_pid, limit_s, t0, trace)
    after = show("vllm", "MainPID", "NRestarts", "ActiveState")
    if sig == signal.SIGSTOP and back is None:
        nsx("kill", "-CONT", pid)
    down = [t["t"] for t in trace if t["health"] != 200]
    return {"signal": sig.name, "target": target, "pid": pid, "before": before, "after": after,
            "healthy_again_s": None if back is None else round(back, 1),
            "health_not_200_first_last_s": [down[0], down[-1]] if down else None,
            "health_codes_seen": sorted({t["health"] for t in trace}), "trace": trace}


def scenario_cold(key: str) -> dict:
    import shutil

    shutil.rmtree(f"{settings().data_dir}/cache/vllm", ignore_errors=True)
    nsx("systemctl", "stop", "vllm")
    res = gate("cold")
    text = nsx("journalctl", "-u", "vllm", "--no-pager", "-o", "cat").stdout
    logged = smoke.parse_log(text)
    if logged.get("available_kv_gib") and logged.get("kv_cache_tokens"):
        res["kv_vs_plan"] = smoke.compare_kv(plan(), logged)
    res["logged"] = {k: v for k, v in logged.items() if k in ("available_kv_gib", "kv_cache_tokens", "torch_compile_s", "engine_init_s")}
    res["leaks"] = leaks(key)
    res["exposure"] = nsx("systemd-analyze", "security", "vllm.service", "--no-pager").stdout.strip().splitlines()[-1:]
    return res


def leaks(key: str) -> dict:
    """Where the API key shows up: argv of any process, the journal, the unit (each must be 0)."""
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return {"argv": ps.count(key), "journal": nsx("journalctl", "--no-pager").stdout.count(key),
            "unit": Path("/etc/systemd/system/vllm.service").read_text().count(key)}


def scenario_rollback(key: str) -> dict:
    unit = Path("/etc/systemd/system/vllm.service")
    good = unit.read_text()
    broken = re.sub(r"--max-model-len \d+", "--max-model-len 999999", good)
    if broken == good:
        return {"error": "no --max-model-len in the unit to break"}
    unit.write_text(broken)
    res = gate("broken")
    res["unit_after"] = "restored" if unit.read_text() == good else "NOT restored"
    t0 = time.monotonic()
    trace: list = []
    res["previous_serving_after_gate_s"] = wait_back(key, "-", 180, t0, trace)
    res["active_after"] = show("vllm", "ActiveState", "MainPID", "NRestarts")
    return res


SCENARIOS: dict = {
    "cold": scenario_cold,
    "engine-kill": lambda key: crash(key, signal.SIGKILL, "engine", 240),
    "api-kill": lambda key: crash(key, signal.SIGKILL, "api", 240),
    "hang": lambda key: crash(key, signal.SIGSTOP, "engine", 300),
    "rollback": scenario_rollback,
}

if __name__ == "__main__":
    sys.exit(main())
