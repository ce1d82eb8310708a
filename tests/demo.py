"""The local demo: vllm-fleet's main job against one container host with emulated GPUs.

    ./demo            # bring the host up, deploy twice, probe the endpoint, print how to use it
    ./demo down       # remove the demo host (its container; the cached image stays)

The host is `fleet-a` of inventory/ci.py: a Debian 12 systemd container with
4x A800 emulated by the nvidia-smi TEST DOUBLE, whose Python stack comes from a
local wheelhouse holding the vLLM serving-engine TEST DOUBLE (CPU containers
cannot run real vLLM; tests/README.md). The deploy is the real one:
`pyinfra -y inventory/ci.py deploy.py --limit @docker/fleet-a`, run twice;
the second run must report no changes. The API key is made once and kept in
`.demo/api-key` (mode 0600) so reruns keep the same endpoint credentials.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import hosts  # noqa: E402
from tests.e2e.harness import INVENTORY, PYINFRA, Result, changed_ops  # noqa: E402

HOST = "@docker/fleet-a"
CONTAINER = "fleet-a"
PORT = 8101
KEY_FILE = REPO / ".demo" / "api-key"
BASE = f"http://127.0.0.1:{PORT}"


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def fail(what: str, remedy: str) -> int:
    print(f"[demo] FAILED: {what}\n[demo]   fix: {remedy}", file=sys.stderr, flush=True)
    return 1


def api_key() -> str:
    """The demo's API key: made once, kept in .demo/api-key (0600)."""
    if KEY_FILE.is_file():
        return KEY_FILE.read_text().strip()
    KEY_FILE.parent.mkdir(mode=0o700, exist_ok=True)
    key = secrets.token_urlsafe(32)
    fd = os.open(KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key


def deploy(key: str) -> Result:
    """One real deploy of the demo host; its output streams to the terminal as pyinfra prints it."""
    argv = [str(PYINFRA), "-y", str(INVENTORY.relative_to(REPO)), "deploy.py", "--limit", HOST]
    say("$ " + " ".join(["pyinfra", *argv[1:]]))
    env = {**os.environ, "VLLM_FLEET_API_KEY": key}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
    output = "".join(lines)
    return Result(proc.wait(), output, "", output)


def request(path: str, key: str | None, body: dict | None = None) -> tuple[int, dict]:
    """One HTTP request to the endpoint; (status, JSON body or {})."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(BASE + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, {}


def main(argv: list[str]) -> int:
    if argv[:1] == ["down"]:
        hosts.down([h for h in hosts.load_hosts() if h.name == CONTAINER])
        say(f"removed the demo host {CONTAINER}")
        return 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    started = time.monotonic()
    if os.geteuid() != 0:
        return fail("the demo host is a systemd container built with debootstrap: that needs root",
                    "run it as root: sudo ./demo")
    if not hosts.engine_answers():
        return fail("no Docker engine answers `docker info`", "run ./setup (it installs Docker and starts the engine)")
    key = api_key()
    say(f"host {CONTAINER}: a Debian 12 systemd container, 4x A800 emulated (tests/hosts.py up)")
    up = subprocess.run([sys.executable, str(REPO / "tests" / "hosts.py"), "up", CONTAINER], cwd=REPO, check=False)
    if up.returncode != 0:
        return fail("the demo host did not come up (see above)", "fix what tests/hosts.py said, rerun ./demo")
    say("wheelhouse: the vLLM TEST DOUBLE, uv, torch CPU (tests/e2e/wheelhouse.py; first time a few minutes)")
    from tests.e2e import wheelhouse

    try:
        say(f"wheelhouse: {wheelhouse.build()}")
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        return fail(f"the test wheelhouse could not be built: {exc}", "see the message; ./setup installs what it needs")

    say("first run: converges the host")
    first = deploy(key)
    if first.returncode != 0:
        return fail(f"the first deploy exited {first.returncode} (output above)", "read pyinfra's error above")
    say("second run: must report no changes")
    second = deploy(key)
    if second.returncode != 0:
        return fail(f"the second deploy exited {second.returncode} (output above)", "read pyinfra's error above")
    changes = {host: n for host, n in changed_ops(second).items() if n}
    if changes:
        return fail(f"the second run changed something: {changes}", "a bug in vllm-fleet: please report it")
    say("second run: no changes")

    status, models = request("/v1/models", key)
    if status != 200 or not models.get("data"):
        return fail(f"GET /v1/models with the key answered {status}", f"journalctl -u vllm on {CONTAINER}")
    model = models["data"][0]["id"]
    unauthorized, _ = request("/v1/models", None)
    if unauthorized != 401:
        return fail(f"GET /v1/models without the key answered {unauthorized}, not 401", "a bug: please report it")
    chat = {"model": model, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 16}
    status, answer = request("/v1/chat/completions", key, chat)
    if status != 200:
        return fail(f"POST /v1/chat/completions answered {status}", f"journalctl -u vllm on {CONTAINER}")
    say(f"endpoint checked: /v1/models 200 with the key, 401 without; a chat completion answered "
        f"{answer['choices'][0]['message'].get('content', '')!r}")
    status_cmd = [str(Path(sys.executable).parent / "vllm-fleet"), "status", str(INVENTORY.relative_to(REPO)),
                  "--limit", HOST]
    subprocess.run(status_cmd, cwd=REPO, check=False)

    key_file = KEY_FILE.relative_to(REPO)
    payload = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32})
    print(f"""
Ready in {time.monotonic() - started:.0f} s. The endpoint (OpenAI-compatible, API key required):

  URL      {BASE}/v1        model {model}
  API key  {key_file}  (mode 0600; the deploy read it as VLLM_FLEET_API_KEY)

Try it (from {REPO}):

  curl -sS {BASE}/v1/chat/completions \\
    -H "Authorization: Bearer $(cat {key_file})" -H 'Content-Type: application/json' \\
    -d '{payload}'

The engine behind it is the vLLM TEST DOUBLE (a CPU container cannot run real vLLM); on real GPU
hosts the same deploy runs: pyinfra inventory/prod.py deploy.py. Remove the demo host: ./demo down
""", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
