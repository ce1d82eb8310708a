"""vllm_fleet/service/hostprog_watchdog.py: the completion watchdog and the GPU reaper.

The watchdog's decisions are checked tick by tick (what systemd said is a value;
the HTTP checks are real ones against the vLLM TEST DOUBLE on 127.0.0.1, whose
engine is a subprocess that can be SIGSTOPped as real vLLM's was on the H200).
The reaper reads GPU holders from the nvidia-smi TEST DOUBLE (tests/doubles/nvidia-smi)
pointed at a hardware file whose process entry matches a real local process.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.test_vllm_double import KEY, engine_pid, start
from vllm_fleet.service import hostprog_watchdog as wd

ROOT = Path(__file__).resolve().parents[3]
SMI_DOUBLE = ROOT / "tests" / "doubles" / "nvidia-smi"
RUNNING = wd.UnitState("active", "running", "4242", 100.0)


def _cfg(tmp_path: Path, port: int = 1, **kw) -> wd.Config:
    env = tmp_path / "vllm.env"
    env.write_text(f'# secrets\nVLLM_API_KEY="{KEY}"\n')
    base = dict(service="vllm", url=f"http://127.0.0.1:{port}", served_model_name="model", env_path=str(env),
                user="vllm", gate_unit="vllm-fleet-gate-vllm.service", interval_s=1, deadline_s=1, misses=3,
                start_grace_s=60)
    base.update(kw)
    return wd.Config(**base)


def _never(*_):
    raise AssertionError("must not be called")


# ------------------------------------------------------------------ decisions --

def test_idle_while_the_gate_runs_or_the_service_is_not_running(tmp_path):
    dog = wd.Watchdog(_cfg(tmp_path))
    line, again = dog.tick(RUNNING, True, 500.0, _never, _never)
    assert not again and "idle: the health gate (vllm-fleet-gate-vllm.service) is running" in line
    for state in (wd.UnitState("activating", "auto-restart", "0", 0), wd.UnitState("activating", "start-pre", "9", 0),
                  wd.UnitState("failed", "failed", "0", 0), wd.UnitState("inactive", "dead", "0", 0)):
        line, again = dog.tick(state, False, 500.0, _never, _never)
        assert not again and f"is {state.active}/{state.sub}" in line


def test_a_start_is_left_alone_until_health_answers_or_the_grace_ends(tmp_path):
    dog = wd.Watchdog(_cfg(tmp_path, start_grace_s=60))
    line, again = dog.tick(RUNNING, False, 130.0, lambda: 0, _never)  # up 30 s of 60: no probe at all
    assert not again and "is starting, 30 s of 60 s" in line
    line, _ = dog.tick(RUNNING, False, 131.0, lambda: 200, lambda: wd.Probe(True, "answered 200 in 0.01 s", 0.01))
    assert "ok:" in line and dog.ready
    late = wd.Watchdog(_cfg(tmp_path, start_grace_s=60))  # never healthy within the grace: probes count
    line, _ = late.tick(RUNNING, False, 161.0, lambda: 0, lambda: wd.Probe(False, "connection refused", 0))
    assert "miss 1/3" in line


def test_misses_in_a_row_restart_and_an_answer_or_a_new_pid_resets_the_count(tmp_path):
    dog = wd.Watchdog(_cfg(tmp_path, misses=3))
    miss, ok = (lambda: wd.Probe(False, "no answer within the deadline after 1.0 s", 1.0),
                lambda: wd.Probe(True, "answered 200", 0.1))
    health = lambda: 200  # noqa: E731
    assert dog.tick(RUNNING, False, 500, health, miss) == (
        "vllm-fleet-watchdog: miss 1/3: vllm.service (pid 4242): no answer within the deadline after 1.0 s", False)
    assert dog.tick(RUNNING, False, 501, health, miss)[1] is False
    assert dog.tick(RUNNING, False, 502, health, ok)[1] is False and dog.missed == 0
    dog.tick(RUNNING, False, 503, health, miss)
    dog.tick(RUNNING, False, 504, health, miss)
    dog.tick(wd.UnitState("active", "running", "5555", 503.0), False, 505, health, miss)  # restarted by someone
    assert dog.missed == 1
    dog.tick(wd.UnitState("active", "running", "5555", 503.0), False, 506, health, miss)
    line, again = dog.tick(wd.UnitState("active", "running", "5555", 503.0), False, 507, health, miss)
    assert again and "miss 3/3" in line
    assert dog.missed == 0 and not dog.ready  # the restarted service gets its start grace again


def test_a_4xx_answer_is_not_counted(tmp_path):
    dog = wd.Watchdog(_cfg(tmp_path, misses=1))
    line, again = dog.tick(RUNNING, False, 500, lambda: 200, lambda: wd.Probe(None, "answered 401", 0.1))
    assert not again and "not counted" in line and dog.missed == 0


def test_the_restart_line_is_what_the_doctor_reads():
    from vllm_fleet.service import doctor

    line = wd.RESTART_LINE.format(prog=wd.PROG, unit="vllm.service", misses=3, deadline=30)
    assert [d.code for d in doctor.diagnose(line)] == ["watchdog_restart"]


def test_the_restart_is_a_sigkill_of_the_main_process_that_systemd_restarts_and_counts(tmp_path, monkeypatch):
    """Not `systemctl restart`, which resets NRestarts (seen on the H200: status showed 0 restarts after the
    watchdog's); the kill is what Restart=always restarts, as after any crash (tests/e2e/test_selfheal.py checks
    NRestarts moves)."""
    calls, sent = [], []
    monkeypatch.setattr(wd, "systemctl", lambda *a: calls.append(a) or subprocess.CompletedProcess(a, 0, "", ""))
    monkeypatch.setattr(wd, "journal_send", lambda message, unit, priority=4: sent.append((unit, message)) or True)
    wd.restart(_cfg(tmp_path))
    assert calls == [("kill", "--kill-who=main", "--signal=SIGKILL", "vllm.service")]
    assert sent and sent[0][0] == "vllm.service" and "consecutive completion probes missed" in sent[0][1]


# ----------------------------------------------------- against the vLLM double --

def test_probes_of_a_real_double_answer_then_miss_while_its_engine_is_stopped(tmp_path):
    double = start(tmp_path, "--served-model-name", "model", VLLM_API_KEY=KEY, VLLM_DOUBLE_WATCHDOG_SECONDS="0.5")
    double.wait_for("Application startup complete.")
    cfg = _cfg(tmp_path, port=double.port, misses=2, deadline_s=1)
    pid = engine_pid(double)
    try:
        answered = wd.probe(cfg)
        assert answered.ok is True and answered.detail.startswith("answered 200")
        assert wd.probe(wd.Config(**{**cfg.__dict__, "env_path": str(tmp_path / "missing.env")})).ok is None  # 401
        dog = wd.Watchdog(cfg)
        unit = wd.UnitState("active", "running", str(double.proc.pid), time.monotonic() - 5)
        health = lambda: wd.http(cfg.url + "/health", timeout=1)[0]  # noqa: E731
        assert dog.tick(unit, False, time.monotonic(), health, lambda: wd.probe(cfg))[0].startswith(
            "vllm-fleet-watchdog: ok: vllm.service")
        os.kill(pid, signal.SIGSTOP)
        began = time.monotonic()
        first = dog.tick(unit, False, time.monotonic(), health, lambda: wd.probe(cfg))
        assert health() == 200  # the hang vLLM 0.25 has: /health stays 200
        second = dog.tick(unit, False, time.monotonic(), health, lambda: wd.probe(cfg))
        took = time.monotonic() - began
        assert first == (f"vllm-fleet-watchdog: miss 1/2: vllm.service (pid {double.proc.pid}): no answer within the "
                         f"deadline after {first[0].rsplit('after ', 1)[1]}", False)
        assert second[1] is True and "miss 2/2" in second[0]
        print(f"hung engine detected after 2 probes in {took:.2f} s (deadline 1 s each)")
        assert 2.0 <= took < 4.0
    finally:
        os.kill(pid, signal.SIGCONT)
    assert wd.probe(cfg).ok is True
    assert double.terminate() < 1.0


def test_the_key_is_read_from_the_env_file_and_never_printed(tmp_path, capsys):
    double = start(tmp_path, "--served-model-name", "model", VLLM_API_KEY=KEY)
    double.wait_for("Application startup complete.")
    config = tmp_path / "watchdog.json"
    cfg = _cfg(tmp_path, port=double.port)
    config.write_text(json.dumps(cfg.__dict__))
    try:
        assert KEY not in config.read_text()
        proc = subprocess.run([sys.executable, wd.__file__, "probe", str(config)], capture_output=True, text=True,
                              timeout=20)
        assert proc.returncode == 0 and "probe: answered 200" in proc.stdout
        assert KEY not in proc.stdout + proc.stderr
    finally:
        double.terminate()


def test_the_deploys_config_is_what_the_program_reads():
    from tests.unit.service.test_render_matches_deploy import _state
    from vllm_fleet.service.step import service_files
    from vllm_fleet.settings import Settings

    settings = Settings(model=str(ROOT / "tests/fixtures/tiny-minimax-m2"), api_key=KEY, gpus=[2, 3],
                        watchdog_interval_s=20, watchdog_misses=5)
    _, programs, _, _ = service_files(settings, _state(settings, "12.8"), venv=None)
    files = {f.path: f for f in programs}
    text = files["/etc/vllm-fleet/vllm.watchdog.json"].data().decode()
    cfg = wd.Config(**json.loads(text))  # every key known to the program, none missing
    assert (cfg.url, cfg.interval_s, cfg.misses, cfg.gpus, cfg.user) == ("http://127.0.0.1:8100", 20, 5, [2, 3], "vllm")
    assert cfg.env_path == "/etc/vllm-fleet/vllm.env" and cfg.gate_unit == "vllm-fleet-gate-vllm.service"
    assert KEY not in text
    assert files["/opt/vllm-fleet/bin/vllm-fleet-watchdog"].data() == Path(wd.__file__).read_bytes()


# ------------------------------------------------------------------ reaping --

def _hardware(tmp_path: Path, marker: str) -> dict:
    hw = {"driver_version": "570.124.06", "cuda_version": "12.8",
          "gpus": [{"name": "NVIDIA H200", "uuid": f"GPU-{i}", "memory_total_mib": 143771, "memory_used_mib": 0,
                    "compute_cap": "9.0"} for i in range(2)],
          "processes": [{"gpu_index": 1, "pid": f"cmdline:{marker}", "name": "python3", "used_memory_mib": 70000}]}
    path = tmp_path / "hardware.json"
    path.write_text(json.dumps(hw))
    return {"VLLM_FLEET_TEST_HARDWARE": str(path)}


def _smi(env: dict):
    def run(argv: list) -> str:
        assert argv[0] == "nvidia-smi"
        return subprocess.run([sys.executable, str(SMI_DOUBLE), *argv[1:]], capture_output=True, text=True, check=True,
                              env={**os.environ, **env}, timeout=20).stdout
    return run


def _leftover(marker: str) -> subprocess.Popen:
    """A process of this user that the nvidia-smi double reports as holding GPU 1 (a killed run's engine)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])


def test_reap_ends_this_services_leftover_and_starts(tmp_path, capsys):
    marker = f"vllm-leftover-{os.getpid()}-{time.monotonic_ns()}"
    smi = _smi(_hardware(tmp_path, marker))
    proc = _leftover(marker)
    try:
        holders = wd.gpu_holders(None, smi)
        assert [(h.pid, h.mib, h.gpu) for h in holders] == [(proc.pid, 70000, "GPU 1 (GPU-1)")]
        me = pwd.getpwuid(os.getuid()).pw_name
        assert wd.gpu_holders([0], smi) == []  # not on the service's GPUs: none of its business
        began = time.monotonic()
        assert wd.reap(_cfg(tmp_path, user=me, reap_grace_s=5), smi) == 0
        assert proc.wait(5) == -signal.SIGTERM and time.monotonic() - began < 5
        out = capsys.readouterr().out
        assert f"leftover of vllm.service: pid {proc.pid} (python3, user {me}" in out and "ended on SIGTERM" in out
        assert wd.gpu_holders(None, smi) == []
    finally:
        proc.kill()


def test_reap_refuses_to_start_while_another_users_process_holds_the_gpus(tmp_path, capsys):
    marker = f"vllm-foreign-{os.getpid()}-{time.monotonic_ns()}"
    smi = _smi(_hardware(tmp_path, marker))
    proc = _leftover(marker)
    try:
        assert wd.reap(_cfg(tmp_path, user="nobody", gpus=[1]), smi) == 1
        assert proc.poll() is None  # not ours: left alone
        out = capsys.readouterr().out
        assert f"refusing to start vllm.service: pid {proc.pid} (python3, user {pwd.getpwuid(os.getuid()).pw_name}" in out
        assert "holds 70000 MiB on GPU 1 (GPU-1)" in out and "set vllm_gpus" in out
    finally:
        proc.kill()


@pytest.mark.parametrize("cgroup,uid,ours", [
    ("/system.slice/vllm.service", 999, True),                 # the unit's own cgroup (any user)
    ("/system.slice/vllm.service/payload", 999, True),
    ("/user.slice/user-1000.slice/session-4.scope", 1000, True),  # the service user, by hand
    ("/system.slice/other.service", 1000, False),               # the same user, but another service
    ("/user.slice/user-1001.slice/session-4.scope", 1001, False),
    ("/system.slice/vllm.service.d", 1001, False),
])
def test_which_holders_are_the_services(cgroup, uid, ours):
    holder = wd.Holder(1, "python3", 1, "GPU 0", uid, cgroup)
    assert wd.is_ours(holder, "vllm.service", 1000) is ours


def test_reap_without_nvidia_smi_checks_nothing(tmp_path, capsys):
    def missing(argv):
        raise FileNotFoundError(argv[0])
    assert wd.reap(_cfg(tmp_path), missing) == 0
    assert "no nvidia-smi on this host" in capsys.readouterr().out


def test_a_config_with_an_unknown_key_is_refused(tmp_path):
    bad = tmp_path / "w.json"
    bad.write_text(json.dumps({**_cfg(tmp_path).__dict__, "interval": 5}))
    proc = subprocess.run([sys.executable, wd.__file__, "watch", str(bad)], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 2 and "cannot read" in proc.stderr


# ------------------------------------------------------------------ metrics (node exporter's textfile collector) --

def _samples(path: Path) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(path.read_text()) for s in f.samples}


def test_each_restart_adds_one_to_the_counter_that_survives_the_watchdogs_own_restart(tmp_path, monkeypatch):
    monkeypatch.setattr(wd, "systemctl", lambda *a: subprocess.CompletedProcess(a, 0, "", ""))
    monkeypatch.setattr(wd, "journal_send", lambda *a, **k: True)
    cfg = _cfg(tmp_path, textfile_dir=str(tmp_path))
    prom = tmp_path / "vllm-fleet-watchdog-vllm.prom"
    assert wd.count_restart(cfg, by=0) == 0  # what `watch` writes first: the series exists before any restart
    assert _samples(prom) == {("vllm_fleet_watchdog_restarts_total", (("service", "vllm"),)): 0.0}
    wd.restart(cfg)
    wd.restart(cfg)
    assert wd.count_restart(cfg, by=0) == 2  # a new watchdog process starts from the file, not from 0
    wd.restart(cfg)
    assert _samples(prom)[("vllm_fleet_watchdog_restarts_total", (("service", "vllm"),))] == 3.0
    assert "counter" in prom.read_text() and not list(tmp_path.glob("*.tmp"))


def test_a_failed_kill_is_not_counted_and_no_directory_means_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(wd, "systemctl", lambda *a: subprocess.CompletedProcess(a, 1, "", "Failed"))
    monkeypatch.setattr(wd, "journal_send", lambda *a, **k: True)
    cfg = _cfg(tmp_path, textfile_dir=str(tmp_path))
    wd.restart(cfg)
    assert not (tmp_path / "vllm-fleet-watchdog-vllm.prom").exists()
    assert wd.count_restart(_cfg(tmp_path)) is None


def test_an_unwritable_directory_is_said_and_changes_nothing_else(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(wd, "systemctl", lambda *a: subprocess.CompletedProcess(a, 0, "", ""))
    monkeypatch.setattr(wd, "journal_send", lambda *a, **k: True)
    wd.restart(_cfg(tmp_path, textfile_dir=str(tmp_path / "missing")))
    assert "cannot write metrics file" in capsys.readouterr().out


def test_reap_writes_the_foreign_holders_it_refused_and_zero_once_they_are_gone(tmp_path, capsys):
    marker = f"vllm-foreign-{os.getpid()}-{time.monotonic_ns()}"
    smi = _smi(_hardware(tmp_path, marker))
    prom = tmp_path / "vllm-fleet-reap-vllm.prom"
    label = (("service", "vllm"),)
    proc = _leftover(marker)
    try:
        assert wd.reap(_cfg(tmp_path, user="nobody", gpus=[1], textfile_dir=str(tmp_path)), smi) == 1
        assert _samples(prom) == {("vllm_fleet_gpu_foreign_processes", label): 1.0,
                                  ("vllm_fleet_gpu_foreign_memory_mib", label): 70000.0}
    finally:
        proc.kill()
        proc.wait(5)
    assert wd.reap(_cfg(tmp_path, user="nobody", gpus=[1], textfile_dir=str(tmp_path)), smi) == 0
    assert _samples(prom) == {("vllm_fleet_gpu_foreign_processes", label): 0.0,
                              ("vllm_fleet_gpu_foreign_memory_mib", label): 0.0}
