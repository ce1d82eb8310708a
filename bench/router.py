"""The router's cost and its drain time, side by side on the CI test hosts (issue 16).

Deploys the CI hosts with vllm-router on fleet-a in front of the three replicas (as tests/e2e/test_router.py
does: replicas on the shared loopback, each completion kept in flight --request-seconds by the vLLM double),
then, alternating N rounds:

  direct:  R requests from C clients straight to one replica (fleet-a's vLLM, 127.0.0.1:8101)
  router:  R requests from C clients through the router's key-checking front (nginx, 127.0.0.1:18000) and
           vllm-router, spread over three replicas: what clients use
  bare:    the same straight to vllm-router on its loopback port (127.0.0.1:18002), without the front

and prints requests/s and p50/p99 latency of each, with their ratios (router / direct, router / bare: the
front's own cost); then the drain time
of each replica under the same load: from the router's /remove_worker until the replica has no request in
flight (its vllm:num_requests_running), and the router's /add_worker after.

    python tests/hosts.py up && python bench/router.py [-n 3] [--requests 200] [--clients 4] [--request-seconds 0.05]

The double's latency is not vLLM's: only the ratios and the drain times (bounded by --request-seconds)
mean something here.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
PYINFRA = str(Path(sys.executable).parent / "pyinfra")
KEY = "sk-bench-router-" + secrets.token_hex(8)
ROUTER = "http://127.0.0.1:18000"
BARE = "http://127.0.0.1:18002"  # vllm-router itself, behind the front (vllm_router_internal_port)
DIRECT = "http://127.0.0.1:8101"
REPLICAS = {"@docker/fleet-a": 8101, "@docker/fleet-b": 8102, "fleet-c": 8103}
MODEL = "tiny-minimax-m2"


def inventory(directory: Path, request_s: float) -> Path:
    path = directory / "ci.py"  # named ci.py: group_data/ci.py applies, as for inventory/ci.py
    path.write_text(f'''import runpy
_ci = runpy.run_path({str(REPO / "inventory" / "ci.py")!r})
_lo = {{"vllm_advertise_address": "127.0.0.1", "vllm_extra_env": {{"VLLM_DOUBLE_REQUEST_SECONDS": "{request_s}"}}}}
docker_hosts = [(name, {{**data, **_lo}}) for name, data in _ci["docker_hosts"]]
ssh_hosts = [(name, {{**data, **_lo}}) for name, data in _ci["ssh_hosts"]]
routers = [("@docker/fleet-a", {{"vllm_router_port": 18000, "vllm_router_metrics_port": 18001,
                                 "vllm_router_internal_port": 18002, "vllm_router_health_interval_s": 2}})]
''')
    return path


def chat(base: str) -> float | None:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    req = urllib.request.Request(f"{base}/v1/chat/completions", body,
                                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()
    except (urllib.error.URLError, OSError):
        return None
    return time.perf_counter() - start


def load(base: str, requests: int, clients: int) -> tuple[float, list[float], int]:
    """(requests/s, latencies, failures) of ``requests`` sent by ``clients`` threads."""
    latencies: list[float] = []
    failed = [0]
    left = [requests]
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            t = chat(base)
            with lock:
                if t is None:
                    failed[0] += 1
                else:
                    latencies.append(t)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return requests / (time.perf_counter() - start), latencies, failed[0]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def running(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith("vllm:num_requests_running"))


def post(path: str) -> int:
    req = urllib.request.Request(f"{BARE}{path}", method="POST")  # admin endpoints: on vllm-router's loopback port only
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=3, help="rounds of each series (default 3)")
    ap.add_argument("--requests", type=int, default=200, help="requests per round (default 200)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    ap.add_argument("--request-seconds", type=float, default=0.05,
                    help="how long the double keeps each completion in flight (default 0.05)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        inv = inventory(Path(tmp), args.request_seconds)
        proc = subprocess.run([PYINFRA, "-y", str(inv), "deploy.py"], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "VLLM_FLEET_API_KEY": KEY})
        if proc.returncode != 0:
            sys.exit(f"deploy failed:\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}")
    load(ROUTER, 20, 2)  # warm every path
    load(BARE, 20, 2)
    load(DIRECT, 20, 2)
    series: dict[str, list] = {"direct": [], "router": [], "bare": []}
    for _ in range(args.n):
        series["direct"].append(load(DIRECT, args.requests, args.clients))
        series["router"].append(load(ROUTER, args.requests, args.clients))
        series["bare"].append(load(BARE, args.requests, args.clients))
    med = statistics.median
    print(f"{args.n} rounds of {args.requests} requests from {args.clients} clients, alternating; the double keeps each "
          f"completion {args.request_seconds} s")
    rows = {}
    for name, runs in series.items():
        rps = med(r[0] for r in runs)
        lat = [t for r in runs for t in r[1]]
        fails = sum(r[2] for r in runs)
        rows[name] = (rps, pct(lat, 0.5), pct(lat, 0.99))
        print(f"{name:7s} {rps:8.1f} req/s  p50 {rows[name][1] * 1000:7.1f} ms  p99 {rows[name][2] * 1000:7.1f} ms  "
              f"failed {fails}  (req/s per round: {', '.join(f'{r[0]:.1f}' for r in runs)})")
    d, r, b = rows["direct"], rows["router"], rows["bare"]
    print(f"router / direct: req/s {r[0] / d[0]:.2f}x, p50 {r[1] / d[1]:.2f}x, p99 {r[2] / d[2]:.2f}x "
          "(the router spreads over 3 replicas; direct is one)")
    print(f"router / bare (the front's cost): req/s {r[0] / b[0]:.2f}x, p50 {r[1] / b[1]:.2f}x, p99 {r[2] / b[2]:.2f}x")
    # the drain of each replica under the same load
    stop = threading.Event()
    background = threading.Thread(target=lambda: [load(ROUTER, args.clients * 5, args.clients) for _ in iter(stop.is_set, True)])
    background.start()
    try:
        time.sleep(1)
        for host, port in REPLICAS.items():
            url = f"http://127.0.0.1:{port}"
            start = time.perf_counter()
            post(f"/remove_worker?url={quote(url, safe='')}")
            while running(port) > 0:
                time.sleep(0.01)
            idle = time.perf_counter() - start
            post(f"/add_worker?url={quote(url, safe='')}")
            print(f"drain {host}: out of rotation -> idle in {idle * 1000:.0f} ms (bound: {args.request_seconds * 1000:.0f} ms "
                  "per request in flight), back in rotation")
            time.sleep(1)
    finally:
        stop.set()
        background.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
