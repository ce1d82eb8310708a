#!/usr/bin/python3
"""vllm-fleet-router-prober: take a replica whose engine hangs out of the router's rotation, and put it back.

Installed on a router host as ``{base_dir}/router/vllm-fleet-router-prober`` by vllm_fleet/router/step.py and run
by ``<service>-router-prober.service``. Stdlib only (the host's python3) and imports nothing of vllm-fleet.

    vllm-fleet-router-prober watch CONFIG

Why: when vLLM's engine hangs (measured on an H200: EngineCore SIGSTOPped), ``/health`` keeps answering 200,
so vllm-router's health checks keep the replica in rotation while every request sent to it waits. Every
``interval_s`` this program sends each replica a 1-token completion with a ``deadline_s`` deadline (the API
key read from a root-only env file, never in argv); ``misses`` misses in a row take it out of rotation at the
router (``POST /remove_worker``); its first answered probe puts it back (``POST /add_worker``). It only puts
back what it took out: a replica a rolling change drained (no longer listed at the router) is left to the
deploy. A probe answered 4xx (the key refused, the model unknown) is not counted. One line per change of
state on stdout (the unit's journal).

CONFIG (JSON, no secret): router_url, upstreams (the URLs the router knows the replicas by), model,
env_path, interval_s, deadline_s, misses.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

PROG = "vllm-fleet-router-prober"


@dataclass(frozen=True)
class Config:
    router_url: str
    upstreams: List[str]
    model: str
    env_path: str
    interval_s: float = 10.0
    deadline_s: float = 30.0
    misses: int = 2


def load_config(path: str) -> Config:
    with open(path, encoding="utf-8") as handle:
        return Config(**json.load(handle))


def read_key(path: str) -> Optional[str]:
    """VLLM_API_KEY of a systemd EnvironmentFile (double-quoted as the toolkit writes it); None when absent."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    for line in lines:
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() == "VLLM_API_KEY":
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            return value or None
    return None


def http(method: str, url: str, *, key: Optional[str] = None, payload: Optional[dict] = None,
         timeout: float = 10.0) -> tuple:
    """(status, body); status 0 when nothing answered within ``timeout``."""
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(2000).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(2000).decode(errors="replace")
    except (OSError, ValueError) as exc:
        return 0, str(exc)


@dataclass
class Prober:
    """What the prober remembers between rounds: misses in a row per upstream, and which it took out."""

    cfg: Config
    missed: Dict[str, int] = field(default_factory=dict)
    removed: set = field(default_factory=set)

    def round(self, answers: Dict[str, Optional[bool]], listed: Optional[set],
              router: Callable[[str, str], tuple]) -> List[str]:
        """One round: ``answers`` per upstream (True answered, False missed, None not counted), ``listed`` the
        upstreams the router has in rotation now (None: the router did not answer: change nothing), ``router``
        the call ``(action, upstream) -> (status, body)``. Returns the lines to log."""
        lines = []
        for up in self.cfg.upstreams:
            ok = answers.get(up)
            if ok is None:
                continue
            if ok:
                self.missed[up] = 0
                if up in self.removed and listed is not None:
                    status, body = router("add_worker", up)
                    if status == 200 or (status == 400 and "already exists" in body):
                        self.removed.discard(up)
                        lines.append(f"{PROG}: {up} answers again: back in rotation")
                    else:
                        lines.append(f"{PROG}: {up} answers again, but the router did not take it back: {status} {body[:200]}")
                continue
            self.missed[up] = self.missed.get(up, 0) + 1
            if self.missed[up] == self.cfg.misses and listed is not None and up in listed and up not in self.removed:
                status, body = router("remove_worker", up)
                if status == 200:
                    self.removed.add(up)
                    lines.append(f"{PROG}: {up} missed {self.cfg.misses} completion probes in a row "
                                 f"({self.cfg.deadline_s:.0f} s deadline): out of rotation")
                else:
                    lines.append(f"{PROG}: {up} missed {self.cfg.misses} probes; the router refused to take it out: "
                                 f"{status} {body[:200]}")
        return lines


def probe(cfg: Config, upstream: str, key: Optional[str]) -> Optional[bool]:
    status, _ = http("POST", upstream + "/v1/completions", key=key, timeout=cfg.deadline_s,
                     payload={"model": cfg.model, "prompt": "ping", "max_tokens": 1})
    if status == 200:
        return True
    return None if 400 <= status < 500 else False


def listed(cfg: Config) -> Optional[set]:
    status, body = http("GET", cfg.router_url + "/workers", timeout=10)
    if status != 200:
        return None
    try:
        return {w.get("url") for w in json.loads(body).get("workers", [])}
    except (ValueError, AttributeError):
        return None


def watch(cfg: Config) -> int:
    prober = Prober(cfg)

    def router(action: str, upstream: str) -> tuple:
        return http("POST", f"{cfg.router_url}/{action}?url={urllib.parse.quote(upstream, safe='')}", timeout=10)

    print(f"{PROG}: probing {', '.join(cfg.upstreams)} every {cfg.interval_s:.0f} s "
          f"({cfg.misses} misses of a {cfg.deadline_s:.0f} s deadline take one out)", flush=True)
    while True:
        start = time.monotonic()
        key = read_key(cfg.env_path)
        answers: Dict[str, Optional[bool]] = {}
        threads = [threading.Thread(target=lambda u=u: answers.__setitem__(u, probe(cfg, u, key)), daemon=True)
                   for u in cfg.upstreams]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for line in prober.round(answers, listed(cfg), router):
            print(line, flush=True)
        time.sleep(max(0.0, cfg.interval_s - (time.monotonic() - start)))


def main(argv: List[str]) -> int:
    if len(argv) != 3 or argv[1] != "watch":
        sys.stderr.write(__doc__)
        return 2
    return watch(load_config(argv[2]))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
