"""The API server's side of the TEST DOUBLE's engine process (vllm.test_double.engine).

`EngineClient.start` spawns the engine with a socket pair, `wait_ready` waits for its
"ready"/"failed" line, `generate` forwards one request and blocks until the engine
answers (for ever, like vLLM, when the engine is stopped: only the HTTP client's
deadline ends it), and a monitor thread marks the engine dead the moment its process
exits, logging vLLM 0.25's line for it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import socket
import subprocess
import sys
import threading
from typing import Callable, Dict, Mapping, Optional

ENGINE_EXITED = "[shutdown] MPClient: engine core exited unexpectedly; starting cleanup"


class EngineDead(Exception):
    """The engine process is gone (vLLM's EngineDeadError)."""


class EngineClient:
    """One engine subprocess and the requests waiting on it."""

    def __init__(self, proc: subprocess.Popen, conn: socket.socket) -> None:
        self.proc = proc
        self.conn = conn
        self.dead = threading.Event()
        self._send = threading.Lock()
        self._ids = itertools.count(1)
        self._waiting: Dict[str, threading.Event] = {}
        self._reader = conn.makefile("rb")
        self._first = threading.Event()
        self._first_line = ""
        self.stopping = False

    @classmethod
    def start(cls, args: argparse.Namespace, env: Mapping[str, str]) -> "EngineClient":
        """Spawn `python -m vllm.test_double.engine FD ARGS` with one end of a socket pair."""
        ours, theirs = socket.socketpair()
        payload = json.dumps(vars(args))
        proc = subprocess.Popen([sys.executable, "-m", "vllm.test_double.engine", str(theirs.fileno()), payload],
                                env=dict(env), pass_fds=(theirs.fileno(),))
        theirs.close()
        client = cls(proc, ours)
        threading.Thread(target=client._read, daemon=True, name="EngineOutput").start()
        return client

    def _read(self) -> None:
        for raw in self._reader:
            line = raw.decode().strip()
            if not self._first.is_set():
                self._first_line = line
                self._first.set()
                continue
            word, _, rid = line.partition(" ")
            event = self._waiting.get(rid)
            if word == "done" and event is not None:
                event.set()
        self._first.set()

    def wait_ready(self, stop: threading.Event) -> str:
        """"ready", "failed" (the engine logged why) or "stopped" (SIGTERM first)."""
        while not self._first.wait(0.05):
            if stop.is_set():
                return "stopped"
        return "ready" if self._first_line == "ready" else "failed"

    def monitor(self, on_death: Callable[[], None]) -> None:
        """Watch the engine process; when it exits unasked, mark it dead and call ``on_death``."""
        def watch() -> None:
            self.proc.wait()
            if self.stopping:
                return
            self.dead.set()
            for event in list(self._waiting.values()):
                event.set()
            on_death()
        threading.Thread(target=watch, daemon=True, name="MPClientEngineMonitor").start()

    def generate(self, timeout: Optional[float] = None) -> None:
        """Forward one request and wait for the engine's answer; EngineDead when the engine is gone."""
        if self.dead.is_set():
            raise EngineDead()
        rid = str(next(self._ids))
        event = threading.Event()
        self._waiting[rid] = event
        try:
            with self._send:
                try:
                    self.conn.sendall(f"req {rid}\n".encode())
                except OSError:
                    raise EngineDead() from None
            event.wait(timeout)
            if self.dead.is_set():
                raise EngineDead()
        finally:
            self._waiting.pop(rid, None)

    def stop(self, timeout: float = 2.0) -> None:
        """Shut the engine down (SIGTERM, then SIGKILL after ``timeout``)."""
        self.stopping = True
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.conn.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

