"""The host-side health gate (vllm_fleet/service/hostprog.py) against a local HTTP server; systemctl stubbed.

The HTTP checks run against a real server on 127.0.0.1 that answers like
vLLM (200/401/<think>), configurable per test to fail the ways the gate must catch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vllm_fleet.service import hostprog as gate

KEY = "sk-gate-unit-key-123456"


class Api:
    """What the fake server answers."""

    health = 200
    enforce_key = True
    content = "<think>ok</think>ready"
    model = "tiny"


def _handler(api: type[Api]):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def _send(self, code: int, body: dict | None = None):
            data = json.dumps(body or {}).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorised(self) -> bool:
            return not api.enforce_key or self.headers.get("Authorization") == f"Bearer {KEY}"

        def do_GET(self):
            if self.path == "/health":
                return self._send(api.health)
            if not self._authorised():
                return self._send(401, {"error": "Unauthorized"})
            return self._send(200, {"data": [{"id": api.model}]})

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            if not self._authorised():
                return self._send(401, {"error": "Unauthorized"})
            return self._send(200, {"choices": [{"message": {"content": api.content}}]})
    return H


@pytest.fixture
def api():
    class A(Api):
        pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(A))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    A.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield A
    server.shutdown()


def _cfg(tmp_path: Path, url: str, check_think=True, timeout_s=5.0, stability_s=0.05) -> gate.Config:
    unit, env = tmp_path / "vllm.service", tmp_path / "vllm.env"
    unit.write_text("new unit\n")
    env.write_text(f'# secrets\nVLLM_API_KEY="{KEY}"\n')
    return gate.Config(service="vllm", unit_path=str(unit), env_path=str(env), prev_dir=str(tmp_path),
                       state_dir=str(tmp_path / "state"), url=url, served_model_name="tiny", check_think=check_think,
                       timeout_s=timeout_s, stability_s=stability_s)


@pytest.fixture
def systemd(monkeypatch):
    """systemctl/journal stubs: records calls; `props` is what `systemctl show` reports. MainPID is this test
    process: the fake API server's listening socket is its own, so the gate's /proc owner check is real."""
    calls: list[tuple] = []
    props = {"ActiveState": "active", "SubState": "running", "MainPID": str(os.getpid()), "NRestarts": "0",
             "ExecMainStatus": "0"}

    class P:
        returncode, stdout, stderr = 0, "", ""

    def systemctl(*args):
        calls.append(args)
        return P()
    monkeypatch.setattr(gate, "systemctl", systemctl)
    monkeypatch.setattr(gate, "unit_props", lambda unit, *names: dict(props))
    monkeypatch.setattr(gate, "journal", lambda cfg, since: "ERROR torch.AcceleratorError: CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(gate, "POLL_S", 0.01)
    return calls, props


def test_read_env_file_unquotes(tmp_path):
    p = tmp_path / "e"
    p.write_text('# c\nVLLM_API_KEY="a\\"b\\\\c"\nHF_TOKEN=plain\n\n')
    assert gate.read_env_file(str(p)) == {"VLLM_API_KEY": 'a"b\\c', "HF_TOKEN": "plain"}
    assert gate.read_env_file(str(tmp_path / "missing")) == {}


def test_a_healthy_service_passes_and_becomes_the_last_good(tmp_path, api, systemd):
    cfg = _cfg(tmp_path, api.url)
    lines: list[str] = []
    verdict = gate.run(cfg, lines.append)
    assert verdict["ok"], verdict
    assert any("/v1/models without the key: 401" in l for l in lines)
    assert any("<think> in content" in l for l in lines)
    assert Path(cfg.prev(cfg.unit_path)).read_text() == "new unit\n"
    assert ("restart", "vllm.service") in systemd[0]
    assert all(KEY not in l for l in lines)


@pytest.mark.parametrize("attr,value,words", [
    ("enforce_key", False, "without the API key answered 200, expected 401"),
    ("content", "ready, no thinking", "has no <think>"),
    ("model", "other", "not 'tiny'"),
])
def test_api_faults_fail_the_gate(tmp_path, api, systemd, attr, value, words):
    setattr(api, attr, value)
    with pytest.raises(gate.GateFailed, match=words.replace("(", r"\(")):
        gate.gate(_cfg(tmp_path, api.url), lambda _l: None)


def test_think_is_only_checked_for_append_think_profiles(tmp_path, api, systemd):
    api.content = "plain answer"
    gate.gate(_cfg(tmp_path, api.url, check_think=False), lambda _l: None)


def test_a_service_that_exits_fails_at_once_not_at_the_timeout(tmp_path, systemd):
    calls, props = systemd
    props.update(ActiveState="activating", SubState="auto-restart", ExecMainStatus="1")
    cfg = _cfg(tmp_path, "http://127.0.0.1:9", timeout_s=60)
    with pytest.raises(gate.GateFailed, match="the service stopped"):
        gate.wait_healthy(cfg, lambda _l: None)


def test_timeout_with_progress_lines(tmp_path, systemd, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(gate, "http", lambda *a, **k: gate.Reply(0, "connection refused"))
    cfg = _cfg(tmp_path, "http://127.0.0.1:9", timeout_s=35)
    lines: list[str] = []

    def sleep(s):
        now[0] += 1.0
    with pytest.raises(gate.GateFailed, match="within 35 s"):
        gate.wait_healthy(cfg, lines.append, clock=lambda: now[0], sleep=sleep)
    assert [l.split(":")[0] for l in lines] == ["waiting for http"] * 3
    assert "10 s of 35 s" in lines[0]


def test_failure_restores_the_previous_files_and_reports_the_journal(tmp_path, api, systemd, monkeypatch):
    cfg = _cfg(tmp_path, api.url)
    Path(cfg.prev(cfg.unit_path)).write_text("good unit\n")
    Path(cfg.prev(cfg.env_path)).write_text(f'VLLM_API_KEY="{KEY}"\n')
    real_gate, attempts = gate.gate, []

    def flaky(c, say):
        attempts.append(1)
        if len(attempts) == 1:
            raise gate.GateFailed("/health never answered 200: the service stopped")
        return real_gate(c, say)
    monkeypatch.setattr(gate, "gate", flaky)
    verdict = gate.run(cfg, lambda _l: None)
    assert not verdict["ok"]
    assert "rolled back: the previous version is running and healthy" in verdict["message"]
    assert "illegal memory access" in verdict["journal"]
    assert Path(cfg.unit_path).read_text() == "good unit\n"
    assert [c for c in systemd[0] if c[0] == "restart"] == [("restart", "vllm.service")] * 2


def test_failure_without_a_previous_version_stops_the_service(tmp_path, systemd, monkeypatch):
    monkeypatch.setattr(gate, "gate", lambda c, s: (_ for _ in ()).throw(gate.GateFailed("boom")))
    verdict = gate.run(_cfg(tmp_path, "http://127.0.0.1:9"), lambda _l: None)
    assert not verdict["ok"] and "no previous version" in verdict["message"]
    assert ("stop", "vllm.service") in systemd[0]


def test_config_rejects_unknown_keys(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"service": "vllm", "bogus": 1}))
    assert gate.main(["apply", str(p)]) == 2
    assert gate.main(["frobnicate", str(p)]) == 2


def test_a_missing_key_fails_when_the_deploy_sets_one(tmp_path, api, systemd):
    cfg = _cfg(tmp_path, api.url)
    Path(cfg.env_path).write_text("# no secret\n")
    import dataclasses
    with pytest.raises(gate.GateFailed, match="holds no VLLM_API_KEY"):
        gate.gate(dataclasses.replace(cfg, require_key=True), lambda _l: None)


# ------------------------------------------------ who answers, and does it stay up (issue 13, item 3) --


@pytest.fixture
def child():
    """A child process that holds no socket (a MainPID that is not the server's)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_the_owner_check_finds_this_process_behind_the_port(tmp_path, api):
    cfg = _cfg(tmp_path, api.url)
    assert gate.check_owner(cfg, str(os.getpid())).startswith(f"port {gate.url_port(api.url)} is served by vllm.service")
    assert gate.check_owner(cfg, str(os.getppid()))  # a descendant of MainPID (vLLM's api-server children) counts


def test_a_server_of_another_process_on_the_port_fails_the_owner_check(tmp_path, api, child):
    with pytest.raises(gate.GateFailed, match=f"served by process {os.getpid()}, which is not vllm.service's main process {child.pid}"):
        gate.check_owner(_cfg(tmp_path, api.url), str(child.pid))


def test_a_server_in_a_child_of_mainpid_passes_the_owner_check(tmp_path, child):
    code = ("import http.server, sys\n"
            "s = http.server.HTTPServer(('127.0.0.1', 0), http.server.BaseHTTPRequestHandler)\n"
            "print(s.server_address[1], flush=True)\n"
            "s.serve_forever()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        cfg = _cfg(tmp_path, f"http://127.0.0.1:{port}")
        assert "is served by vllm.service" in gate.check_owner(cfg, str(os.getpid()))
        with pytest.raises(gate.GateFailed, match=f"served by process {proc.pid}"):
            gate.check_owner(cfg, str(child.pid))  # a sibling, not an ancestor
    finally:
        proc.kill()
        proc.wait()


def test_nothing_listening_or_no_mainpid_fails_the_owner_check(tmp_path):
    with socket.socket() as s:  # a port nobody listens on (bound, not listening)
        s.bind(("127.0.0.1", 0))
        cfg = _cfg(tmp_path, f"http://127.0.0.1:{s.getsockname()[1]}")
        with pytest.raises(gate.GateFailed, match="no process of this host listens on port"):
            gate.check_owner(cfg, str(os.getpid()))
    with pytest.raises(gate.GateFailed, match="has no main process"):
        gate.check_owner(cfg, "0")


def test_a_gate_answered_by_another_server_rolls_back(tmp_path, api, systemd, child):
    calls, props = systemd
    props["MainPID"] = str(child.pid)  # the unit's process is not the one holding the port
    cfg = _cfg(tmp_path, api.url)
    Path(cfg.prev(cfg.unit_path)).write_text("good unit\n")
    verdict = gate.run(cfg, lambda _l: None)
    assert not verdict["ok"]
    assert verdict["message"].startswith(f"port {gate.url_port(api.url)} is served by process {os.getpid()}")
    assert Path(cfg.unit_path).read_text() == "good unit\n"


def _moving_restarts(monkeypatch, props, after: int):
    """`systemctl show` reports NRestarts one higher from its ``after``-th call on (a crash and an automatic restart)."""
    seen = [0]

    def unit_props(unit, *names):
        seen[0] += 1
        out = dict(props)
        if seen[0] >= after:
            out["NRestarts"] = str(int(props["NRestarts"]) + 1)
        return out
    monkeypatch.setattr(gate, "unit_props", unit_props)
    return seen


def test_a_restart_in_the_stability_window_fails_the_gate(tmp_path, api, systemd, monkeypatch):
    calls, props = systemd
    cfg = _cfg(tmp_path, api.url, stability_s=5.0)
    seen = _moving_restarts(monkeypatch, props, after=4)  # 1: base, 2: wait_healthy, 3: after /health, 4: in the window
    with pytest.raises(gate.GateFailed, match=r"restarted during the gate \(NRestarts 0 -> 1\)"):
        gate.gate(cfg, lambda _l: None)
    assert seen[0] == 4


def test_a_restart_before_the_first_answer_fails_the_gate(tmp_path, api, systemd, monkeypatch):
    calls, props = systemd
    _moving_restarts(monkeypatch, props, after=2)
    with pytest.raises(gate.GateFailed, match=r"restarted before it answered \(NRestarts 0 -> 1\)"):
        gate.gate(_cfg(tmp_path, api.url), lambda _l: None)


def test_health_must_hold_for_the_whole_stability_window(tmp_path, api, systemd, monkeypatch):
    cfg = _cfg(tmp_path, api.url, stability_s=30.0)
    answers = iter([200, 200, 503])
    real = gate.http

    def http(url, **kw):
        return gate.Reply(next(answers), "") if url.endswith("/health") else real(url, **kw)
    monkeypatch.setattr(gate, "http", http)
    with pytest.raises(gate.GateFailed, match="/health answered 503 during the stability window"):
        gate.gate(cfg, lambda _l: None)


def test_the_stability_window_lasts_its_setting(tmp_path, api, systemd):
    lines: list[str] = []
    import time as _time
    t0 = _time.monotonic()
    gate.gate(_cfg(tmp_path, api.url, stability_s=0.6), lines.append)
    assert _time.monotonic() - t0 >= 0.6
    assert "NRestarts 0 and /health 200 for 1 s" in lines[-1]


# ------------------------------------------------ every path ends with a verdict --


def _failing_systemctl(monkeypatch, calls, fail: set[str]):
    class P:
        def __init__(self, rc):
            self.returncode, self.stdout, self.stderr = rc, "active\n" if rc == 0 else "", "" if rc == 0 else "Job failed"

    def systemctl(*args):
        calls.append(args)
        return P(1 if args[0] in fail else 0)
    monkeypatch.setattr(gate, "systemctl", systemctl)
    monkeypatch.setattr(gate, "START_RETRY_S", 0.0)


def test_a_restart_that_fails_inside_the_rollback_still_ends_in_a_verdict_and_a_started_service(tmp_path, systemd, monkeypatch):
    calls, props = systemd
    _failing_systemctl(monkeypatch, calls, fail={"restart"})
    cfg = _cfg(tmp_path, "http://127.0.0.1:9")
    Path(cfg.prev(cfg.unit_path)).write_text("good unit\n")
    assert gate.cmd_run(cfg, "r1") == 1
    verdict = json.loads(Path(cfg.result_path).read_text())
    assert verdict["run_id"] == "r1" and not verdict["ok"]
    assert "the previous version did not start after 3 attempts" in verdict["message"]
    assert "the previous version was started again: vllm.service is active" in verdict["message"]
    assert [c for c in calls if c[0] == "restart"] == [("restart", "vllm.service")] * 4  # the new one + 3 tries
    assert calls[-2:] == [("start", "vllm.service"), ("is-active", "vllm.service")]
    assert Path(cfg.unit_path).read_text() == "good unit\n"


def test_an_error_of_the_gate_itself_is_a_failed_gate_rolled_back(tmp_path, api, systemd, monkeypatch):
    cfg = _cfg(tmp_path, api.url)
    Path(cfg.prev(cfg.unit_path)).write_text("good unit\n")
    real, calls = gate.read_env_file, []

    def broken_once(path):
        calls.append(path)
        if len(calls) == 1:
            raise PermissionError(13, "Permission denied", path)
        return real(path)
    monkeypatch.setattr(gate, "read_env_file", broken_once)
    verdict = gate.run(cfg, lambda _l: None)
    assert not verdict["ok"]
    assert verdict["message"].startswith("the gate itself failed: PermissionError")
    assert verdict["message"].endswith("rolled back: the previous version is running and healthy")


def test_a_rollback_that_raises_falls_back_to_starting_the_previous_version(tmp_path, systemd, monkeypatch):
    calls, props = systemd
    cfg = _cfg(tmp_path, "http://127.0.0.1:9")
    Path(cfg.prev(cfg.unit_path)).write_text("good unit\n")
    monkeypatch.setattr(gate, "gate", lambda c, s: (_ for _ in ()).throw(gate.GateFailed("boom")))
    copies = []

    def copy(src, dst, secret=False):
        copies.append(dst)
        if len(copies) == 1:
            raise OSError(28, "No space left on device")
        Path(dst).write_text(Path(src).read_text())
    monkeypatch.setattr(gate, "_copy", copy)
    verdict = gate.run(cfg, lambda _l: None)
    assert "rollback failed (OSError: [Errno 28] No space left on device)" in verdict["message"]
    assert "the previous version was started again" in verdict["message"]
    assert ("start", "vllm.service") in calls


def test_the_worker_writes_a_verdict_even_when_it_crashes(tmp_path, systemd, monkeypatch):
    monkeypatch.setattr(gate, "run", lambda cfg, say: 1 / 0)
    cfg = _cfg(tmp_path, "http://127.0.0.1:9")
    assert gate.cmd_run(cfg, "r2") == 1
    verdict = json.loads(Path(cfg.result_path).read_text())
    assert verdict["run_id"] == "r2" and "the gate worker failed: ZeroDivisionError" in verdict["message"]


def test_recording_the_last_good_failing_keeps_the_new_version_running(tmp_path, api, systemd, monkeypatch):
    calls, _ = systemd
    monkeypatch.setattr(gate, "keep_as_good", lambda cfg: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    verdict = gate.run(_cfg(tmp_path, api.url), lambda _l: None)
    assert not verdict["ok"] and "the new version keeps running" in verdict["message"]
    assert not any(c[0] == "stop" for c in calls)


# ------------------------------------------------ what the gate writes is root's only (issue 14, item 5) --


def test_the_gate_log_and_verdict_are_not_world_readable(tmp_path, api, systemd, monkeypatch):
    cfg = _cfg(tmp_path, api.url)
    Path(cfg.state_dir).mkdir()
    Path(cfg.log_path).write_text("an old log\n")
    os.chmod(cfg.log_path, 0o644)  # left by an earlier version of the gate
    monkeypatch.setattr(os, "umask", lambda mask: 0o022)  # the test process keeps its umask; the files must not need it
    assert gate.cmd_run(cfg, "r3") == 0
    for path in (cfg.log_path, cfg.result_path):
        assert os.stat(path).st_mode & 0o777 == 0o600, path


def test_copies_of_the_env_file_are_never_readable_by_others_while_written(tmp_path, monkeypatch):
    src, dst = tmp_path / "vllm.env", tmp_path / "vllm.env.prev"
    src.write_text(f'VLLM_API_KEY="{KEY}"\n')
    os.chmod(src, 0o600)
    seen = []
    real = gate.shutil.copyfileobj

    def copyfileobj(a, b):
        seen.append(os.stat(str(dst) + ".tmp").st_mode & 0o777)
        return real(a, b)
    monkeypatch.setattr(gate.shutil, "copyfileobj", copyfileobj)
    gate._copy(str(src), str(dst))
    assert seen == [0o600]
    assert dst.read_text() == src.read_text() and os.stat(dst).st_mode & 0o777 == 0o600


def test_env_file_copies_are_root_only_even_from_an_older_0640_file(tmp_path, monkeypatch):
    src, dst = tmp_path / "vllm.env.prev", tmp_path / "vllm.env"
    src.write_text(f'VLLM_API_KEY="{KEY}"\n')
    os.chmod(src, 0o640)  # kept by a toolkit that wrote env files root:<user> 0640
    owners = []
    monkeypatch.setattr(gate.os, "chown", lambda path, uid, gid: owners.append((uid, gid)))
    gate._copy(str(src), str(dst), secret=True)
    assert os.stat(dst).st_mode & 0o777 == 0o600 and owners == [(0, 0)]


def test_without_cap_sys_ptrace_the_owner_check_compares_the_socket_uid(tmp_path, api, child, monkeypatch):
    """Root in a container with Docker's default capabilities cannot read another user's /proc/PID/fd (EACCES):
    the check falls back to the listening socket's uid, which must be the main process's (measured on the e2e hosts)."""
    def denied(path, *a, **k):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(gate.os, "readlink", denied)
    cfg = _cfg(tmp_path, api.url)
    assert "the uid of vllm.service's MainPID" in gate.check_owner(cfg, str(child.pid))
    monkeypatch.setattr(gate, "process_uid", lambda pid, proc="/proc": os.getuid() + 1)
    with pytest.raises(gate.GateFailed, match=f"held by uid {os.getuid()}, not by vllm.service's main process"):
        gate.check_owner(cfg, str(child.pid))
