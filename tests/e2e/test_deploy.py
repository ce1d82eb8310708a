"""deploy.py end to end with the real pyinfra CLI against the container hosts.

Converges, then converges again with no change; `--dry` and bad input change
nothing (probed with a data dir no run may create); preflight stops the whole
run on one bad host.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.e2e.harness import REPO, changed_ops, host_exec, run_pyinfra

pytestmark = pytest.mark.e2e

HOSTS = ["@docker/fleet-a", "@docker/fleet-b", "fleet-c"]
CONTAINERS = {"@docker/fleet-a": "fleet-a", "@docker/fleet-b": "fleet-b", "fleet-c": "fleet-c"}


def _exists(container: str, path: str) -> bool:
    return host_exec(container, ["test", "-e", path]).returncode == 0


def _assert_untouched(result, probe: str):
    for container in CONTAINERS.values():
        assert not _exists(container, probe), f"{container}: {probe} was created by a run that must change nothing"
    assert "Starting operation" not in result.output


def test_dry_run_prints_the_plan_and_changes_nothing(test_hosts):
    probe = "/srv/vllm-fleet-dry-probe"
    result = run_pyinfra(["deploy.py", "--dry", "--data", f"vllm_data_dir={probe}"], yes=False)
    assert "--> Detected changes:" in result.output
    assert "Weights | Ensure the host holds exactly the model files of tiny-minimax-m2" in result.output
    assert probe in result.output  # the --data override reached the plan
    assert "Ensure the toolkit's directories exist" in result.output
    for host in HOSTS:
        assert re.search(rf"\[{re.escape(host)}\] +plan: tiny-minimax-m2 on GPUs", result.output), host
        assert re.search(rf"\[{re.escape(host)}\] +plan: vllm serve \S+ --served-model-name tiny-minimax-m2", result.output), host
    _assert_untouched(result, probe)


def test_deploy_converges_then_a_second_run_changes_nothing(test_hosts):
    first = run_pyinfra(["deploy.py"])
    assert set(changed_ops(first)) == set(HOSTS), first.output
    for container in CONTAINERS.values():
        user = host_exec(container, ["getent", "passwd", "vllm"])
        assert user.returncode == 0, f"{container}: no vllm user"
        fields = user.stdout.strip().split(":")
        group = host_exec(container, ["getent", "group", "vllm"]).stdout.strip().split(":")
        # the home is set when the account is created (a reused host may have made it for another data dir)
        assert fields[3] == group[2] and fields[6] == "/usr/sbin/nologin" and fields[5].startswith("/")
        stat = host_exec(container, ["stat", "-c", "%U:%G %a", "/var/lib/vllm-fleet", "/etc/vllm-fleet", "/opt/vllm-fleet/venvs"])
        assert stat.stdout.split("\n")[:3] == ["vllm:vllm 750", "root:vllm 750", "root:root 755"], stat.stdout

    second = run_pyinfra(["deploy.py", "-vv"])
    assert changed_ops(second) == {h: 0 for h in HOSTS}, second.output
    # issue 12 item 6: a no-op rerun reads every host in one round trip (-vv prints each command pyinfra sends)
    sent = {h: len(re.findall(rf"(?m)^\s*\[{re.escape(h)}\]\s+>>> ", second.output)) for h in HOSTS}
    assert sent == {h: 1 for h in HOSTS}, sent


def test_a_drifted_host_is_repaired_and_only_it_changes(test_hosts):
    run_pyinfra(["deploy.py"])
    model = "/var/lib/vllm-fleet/models/tiny-minimax-m2"
    host_exec("fleet-b", ["chmod", "0777", "/etc/vllm-fleet"])
    host_exec("fleet-c", ["sh", "-c", f"echo corrupt >> {model}/config.json && touch {model}/stray.bin"])
    result = run_pyinfra(["deploy.py"])
    changes = changed_ops(result)
    # fleet-c: the weights were repaired, so its service is restarted and gated (vllm_fleet/service/step.py): 2 operations
    assert changes == {"@docker/fleet-a": 0, "@docker/fleet-b": 1, "fleet-c": 2}, result.output
    assert host_exec("fleet-b", ["stat", "-c", "%a", "/etc/vllm-fleet"]).stdout.strip() == "750"
    local = (REPO / "tests/fixtures/tiny-minimax-m2/config.json").read_text()
    assert host_exec("fleet-c", ["cat", f"{model}/config.json"]).stdout == local
    assert host_exec("fleet-c", ["test", "-e", f"{model}/stray.bin"]).returncode == 1
    assert host_exec("fleet-c", ["stat", "-c", "%U:%G %a", f"{model}/config.json"]).stdout.strip() == "vllm:vllm 640"


@pytest.mark.parametrize("data,words", [
    ("vllm_port=70000", ["vllm_port=70000", "65535", "remedy:"]),
    ("vllm_prot=8100", ["vllm_prot=", "did you mean vllm_port?"]),
    ("vllm_bind_host=0.0.0.0", ["vllm_api_key=None", "reachable from other machines", "remedy:"]),
    ('vllm_gpus="0,1"', ["vllm_gpus='0,1'", "valid list"]),
    # issue 14: a system directory, a plan-owned flag abbreviated as vLLM's parser allows, a privileged port
    ("vllm_data_dir=/tmp", ["vllm_data_dir='/tmp'", "system directory", "remedy:"]),
    ('vllm_extra_args=["--max-model", "4096"]', ["vllm_extra_args=", "set vllm_max_model_len instead"]),
    ("vllm_port=80", ["vllm_port=80", "CAP_NET_BIND_SERVICE"]),
])
def test_bad_input_stops_the_run_with_one_message_and_changes_nothing(test_hosts, data, words):
    probe = "/srv/vllm-fleet-bad-input-probe"
    result = run_pyinfra(["deploy.py", "--data", f"vllm_data_dir={probe}", "--data", data], check=False)
    assert result.returncode != 0
    assert re.search(r"--> pyinfra error.*: host \S+: ", result.output), result.output
    for w in words:
        assert w in result.output
    assert "Traceback" not in result.output
    _assert_untouched(result, probe)


def _preflight(data: list[str], limit: str | None = None):
    probe = "/srv/vllm-fleet-preflight-probe"
    args = ["deploy.py", "--data", f"vllm_data_dir={probe}"]
    for d in data:
        args += ["--data", d]
    if limit:
        args += ["--limit", limit]
    result = run_pyinfra(args, check=False)
    assert result.returncode != 0, result.output
    assert "preflight found" in result.output
    _assert_untouched(result, probe)
    return result.output


def test_preflight_names_a_gpu_index_the_host_does_not_have(test_hosts):
    out = _preflight(["vllm_gpus=[0, 5]"], limit="@docker/fleet-b")
    assert "names GPU 5, but the host has GPUs [0, 1]" in out


def test_preflight_names_who_holds_gpu_memory_and_the_utilization_that_fits(test_hosts):
    out = _preflight(["vllm_gpus=[1, 2]", "vllm_gpu_memory_utilization=0.9"], limit="fleet-c")
    hw = json.loads(host_exec("fleet-c", ["cat", "/etc/vllm-fleet-test/hardware.json"]).stdout)
    proc = hw["processes"][0]
    assert "GPU 1 (NVIDIA A800-SXM4-80GB) has 48.00/80.00 GiB free" in out
    assert f"({proc['name']}, {proc['used_memory_mib']} MiB)" in out
    assert "vllm_gpu_memory_utilization <= 0.60" in out


def test_preflight_names_the_owner_of_a_busy_port(test_hosts):
    host_exec("fleet-b", ["systemctl", "stop", "vllm.service"])  # our own service holds 8102 after a deploy
    listener = host_exec("fleet-b", ["systemd-run", "--unit", "port-squatter", "--collect",
                                     "python3", "-m", "http.server", "--bind", "127.0.0.1", "8102"])
    assert listener.returncode == 0, listener.stderr
    try:
        for _ in range(50):
            if host_exec("fleet-b", ["sh", "-c", "ss -Htln | grep -q ':8102 '"]).returncode == 0:
                break
        out = _preflight([], limit="@docker/fleet-b")
        assert "port 8102 is already taken by python3 (pid" in out
    finally:
        host_exec("fleet-b", ["systemctl", "stop", "port-squatter"])


def test_one_bad_host_stops_every_host(test_hosts):
    """fleet-b fails preflight; fleet-a and fleet-c, though fine, get no operation either."""
    probe = "/srv/vllm-fleet-all-or-nothing"
    result = run_pyinfra(["deploy.py", "--data", f"vllm_data_dir={probe}", "--data", "vllm_gpus=[0, 1, 2, 3]"], check=False)
    assert result.returncode != 0
    assert "host @docker/fleet-b: preflight found 1 problem(s)" in result.output
    assert "names GPU 2, 3, but the host has GPUs [0, 1]" in result.output
    _assert_untouched(result, probe)
