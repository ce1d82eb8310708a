"""Weights, pure part: how the deploy's wait reads the download unit (vllm_fleet/weights/step.py follows it).

The deploy polls the unit every couple of seconds (``status.json`` + ``systemctl is-active``) and hands
each observation to `Watch.observe`, which says what to do: keep waiting, done, restart the unit
(it died without saying why, or it stalled: no byte for ``vllm_weights_stall_s`` while downloading,
or its status stopped being written), or fail with one clear error. Restarts are bounded by
``vllm_weights_restarts``; the program resumes every partial file, so a restart costs little.

    w = Watch(stall_s=300, restarts_max=3, timeout_s=21600, started=now)
    w.observe(now, status, "active")  # Verdict("wait", "")
"""

from __future__ import annotations

from dataclasses import dataclass

#: A unit that is not active right after the deploy started it may not have begun yet (no status): wait this long.
START_GRACE_S = 6.0
#: Phases in which the program is expected to receive bytes (a stall counts only there).
MOVING_PHASES = ("downloading",)


@dataclass(frozen=True)
class Verdict:
    """What the wait does next: "wait", "done", "restart" or "fail", and why (the text for the log / error)."""

    action: str
    why: str = ""


@dataclass
class Watch:
    """The wait's memory across polls: when bytes last moved, when the status was last written, restarts so far.

    + stall_s: no byte received for this long while downloading (or no status written for this long) = stalled
    + restarts_max: restarts of the unit before the wait gives up
    + timeout_s: the whole wait (vllm_weights_wait_timeout_s)
    + started: the clock when the wait began (a monotonic clock of the deploy; the host's clock is never compared)
    """

    stall_s: float
    restarts_max: int
    timeout_s: float
    started: float
    restarts: int = 0
    _fetched: int | None = None
    _moved_at: float | None = None
    _updated: float | None = None
    _updated_at: float | None = None
    _since: float | None = None  # when the unit was (re)started by the wait

    def observe(self, now: float, status: dict | None, active: str) -> Verdict:
        """One poll: `status` is this download's status.json (None: none yet, or another download's), `active` what
        ``systemctl is-active`` said."""
        since = self._since if self._since is not None else self.started
        phase = (status or {}).get("phase")
        running = active in ("active", "activating", "reloading")
        if phase == "done" and not running:
            return Verdict("done", (status or {}).get("line", ""))
        if now - self.started > self.timeout_s:
            return Verdict("fail", f"still downloading after vllm_weights_wait_timeout_s={self.timeout_s:.0f} s")
        if not running:
            if phase == "failed":
                return Verdict("fail", (status or {}).get("error") or "the download failed")
            if now - since < START_GRACE_S:
                return Verdict("wait")  # just (re)started: systemd may not show it active yet
            return self._restart(now, f"the download unit is {active or 'gone'} (phase {phase or 'none'}): it died "
                                      f"without finishing (killed, out of memory, or the host restarted it)")
        # running: did bytes move, is the status still written?
        fetched = int((status or {}).get("fetched") or 0)
        updated = (status or {}).get("updated")
        if self._moved_at is None or fetched != self._fetched or phase not in MOVING_PHASES:
            self._fetched, self._moved_at = fetched, now
        if self._updated_at is None or updated != self._updated:
            self._updated, self._updated_at = updated, now
        if now - self._moved_at > self.stall_s:
            return self._restart(now, f"the download stalled: no byte received for {now - self._moved_at:.0f} s "
                                      f"(vllm_weights_stall_s={self.stall_s:.0f})")
        if status is not None and now - self._updated_at > self.stall_s:
            return self._restart(now, f"the download program stopped writing its progress for {now - self._updated_at:.0f} s "
                                      f"(vllm_weights_stall_s={self.stall_s:.0f})")
        return Verdict("wait")

    def _restart(self, now: float, why: str) -> Verdict:
        if self.restarts >= self.restarts_max:
            return Verdict("fail", f"{why}; restarted {self.restarts} time(s) already (vllm_weights_restarts="
                                   f"{self.restarts_max})")
        self.restarts += 1
        self._since, self._moved_at, self._updated_at = now, None, None
        return Verdict("restart", f"{why}; restarting it ({self.restarts} of {self.restarts_max}), it resumes every "
                                  f"partial file")


INTERRUPT_ATTRIBUTE = "_vllm_fleet_weights_interrupt"


class Interrupt:
    """Ctrl-C during the deploy's waits for download units: the first SIGINT ends every wait at once (each raises its
    error; the units go on and the next deploy attaches), a second one goes to the handler that was there before
    (pyinfra's, which exits). One per run (`of`), entered by each host's wait; the handler is installed while at least
    one wait runs, and only from the main thread (signals are delivered there; pyinfra's hosts are greenlets of it)."""

    def __init__(self) -> None:
        import threading

        self.event = threading.Event()
        self._depth = 0
        self._previous = None
        self._installed = False

    @classmethod
    def of(cls, run) -> "Interrupt":
        """The run's Interrupt (``run``: pyinfra's State, or any object that takes attributes), created on first use."""
        found = vars(run).get(INTERRUPT_ATTRIBUTE)
        if found is None:
            found = cls()
            setattr(run, INTERRUPT_ATTRIBUTE, found)
        return found

    def _handle(self, signum, frame) -> None:
        if self.event.is_set() and callable(self._previous):
            self._previous(signum, frame)
            return
        self.event.set()

    def __enter__(self) -> "Interrupt":
        import signal
        import threading

        if self._depth == 0 and threading.current_thread() is threading.main_thread():
            self.event.clear()
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        import signal

        self._depth -= 1
        if self._depth == 0 and self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False
