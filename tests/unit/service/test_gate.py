"""The host-side health gate (vllm_fleet/service/hostprog.py) against a local HTTP server; systemctl stubbed.

The HTTP checks run against a real server on 127.0.0.1 that answers like
vLLM (200/401/<think>), configurable per test to fail the ways the gate must catch.
"""

from __future__ import annotations

import json
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


def _cfg(tmp_path: Path, url: str, check_think=True, timeout_s=5.0) -> gate.Config:
    unit, env = tmp_path / "vllm.service", tmp_path / "vllm.env"
    unit.write_text("new unit\n")
    env.write_text(f'# secrets\nVLLM_API_KEY="{KEY}"\n')
    return gate.Config(service="vllm", unit_path=str(unit), env_path=str(env), prev_dir=str(tmp_path),
                       state_dir=str(tmp_path / "state"), url=url, served_model_name="tiny", check_think=check_think,
                       timeout_s=timeout_s)


@pytest.fixture
def systemd(monkeypatch):
    """systemctl/journal stubs: records calls; `props` is what `systemctl show` reports."""
    calls: list[tuple] = []
    props = {"ActiveState": "active", "SubState": "running", "MainPID": "100", "NRestarts": "0", "ExecMainStatus": "0"}

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
