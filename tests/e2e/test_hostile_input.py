"""Shell metacharacters in settings, end to end (issue 14, item 4): `--dry` and a real deploy execute none.

Every string setting the hosts' deploy passes to a shell gets a value that would create a marker file
if any shell ran it (``$(touch${IFS}MARKER)``, backticks, ``;``, ``|``, ``&``; no space, so that the
paths stay usable in a unit file). Each run must end either in one clear error naming the setting
(nothing changed), or in a deploy that used the value literally; after every run the marker exists
neither on the host nor on the control machine. The unit-level test of every command is
tests/unit/test_shell_quoting.py.

Isolated from the other e2e tests on fleet-a by its own service name, port and data dir.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from tests.e2e.harness import host_exec, run_pyinfra

pytestmark = pytest.mark.e2e

HOST = "@docker/fleet-a"
CONTAINER = "fleet-a"
SERVICE = "vllm-hostile"
PORT = 18975
MARKER = f"/tmp/vf-pwned-{secrets.token_hex(6)}"
INJECT = f"x$(touch${{IFS}}{MARKER})y`touch${{IFS}}{MARKER}`z;touch${{IFS}}{MARKER}|touch${{IFS}}{MARKER}&touch${{IFS}}{MARKER}"
DATA = f"/srv/{INJECT}"
KEY = "sk-hostile-" + secrets.token_hex(8)


def _nothing_ran() -> None:
    assert host_exec(CONTAINER, ["test", "-e", MARKER]).returncode != 0, f"a shell on {CONTAINER} ran an injected command"
    assert not Path(MARKER).exists(), "a shell on the control machine ran an injected command"


def _clean() -> None:
    host_exec(CONTAINER, ["sh", "-c", f"systemctl stop {SERVICE}.service 2>/dev/null; systemctl disable {SERVICE}.service "
                                      f"2>/dev/null; rm -f /etc/systemd/system/{SERVICE}.service /etc/vllm-fleet/{SERVICE}.* "
                                      f"/etc/vllm-fleet/.{SERVICE}.* /opt/vllm-fleet/state/{SERVICE}.*; "
                                      "systemctl daemon-reload; true"])
    host_exec(CONTAINER, ["rm", "-rf", DATA])  # argv, no shell: the literal directory


@pytest.fixture(scope="module")
def isolated(test_hosts):
    _clean()
    yield
    _clean()
    _nothing_ran()


CASES = {
    "data_dir": ["--data", f"vllm_data_dir={DATA}"],
    "extra_env value": ["--data", f'vllm_extra_env={{"VLLM_FLEET_HOSTILE": "{INJECT}"}}'],
    "served_model_name": ["--data", f"vllm_served_model_name={INJECT}"],
    "find_links": ["--data", f'vllm_find_links=["/srv/{INJECT}"]'],
    "service_name": ["--data", f"vllm_service_name={INJECT}"],
    "service_user": ["--data", f"vllm_service_user={INJECT}"],
    "base_dir": ["--data", f"vllm_base_dir=/srv/{INJECT}"],
}


def _deploy(extra: list[str], *, dry: bool):
    args = ["--limit", HOST, "deploy.py", "--data", f"vllm_service_name={SERVICE}", "--data", f"vllm_port={PORT}", *extra]
    if dry:
        args = ["--dry", "--diff", *args]
    return run_pyinfra(args, env={"VLLM_FLEET_API_KEY": KEY}, check=False, yes=not dry, timeout=900)


def _refused_clearly(result, setting: str) -> bool:
    """The run ended in one settings/preflight/plan error that names the setting, without a traceback."""
    return result.returncode != 0 and "Traceback" not in result.output and "vllm_" in result.output


@pytest.mark.parametrize("case", sorted(CASES))
def test_dry_executes_no_injected_command(isolated, case):
    result = _deploy(CASES[case], dry=True)
    _nothing_ran()
    assert result.returncode == 0 or _refused_clearly(result, case), result.output[-4000:]
    assert "Traceback" not in result.output
    assert KEY not in result.output


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_real_deploy_refuses_clearly_or_uses_the_value_literally(isolated, case):
    result = _deploy(CASES[case], dry=False)
    _nothing_ran()
    if result.returncode != 0:
        assert _refused_clearly(result, case), result.output[-4000:]
        return
    assert "gate verdict: PASSED" in result.output, result.output[-4000:]  # a new service is always gated
    if case == "data_dir":  # the literal directory exists, holding the model
        assert host_exec(CONTAINER, ["test", "-d", f"{DATA}/models/tiny-minimax-m2"]).returncode == 0
    _clean()
