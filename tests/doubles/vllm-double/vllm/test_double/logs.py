"""vLLM-like log lines of the TEST DOUBLE, written to stdout and flushed per line.

Format as vLLM 0.25 prints it (source line numbers omitted):
`(APIServer pid=123) INFO 11-28 10:00:00 [api_server.py] vLLM API server version 0.25.0`
and uvicorn's lines as vLLM relays them: `(APIServer pid=123) INFO:     Application startup complete.`
Exception texts go to stderr like an uncaught traceback's last line.
"""

from __future__ import annotations

import logging
import os
import sys
import time


class _VllmFormatter(logging.Formatter):
    """Formats records as `(PROC pid=N) LEVEL MM-DD HH:MM:SS [source] message`."""

    def format(self, record: logging.LogRecord) -> str:
        proc = getattr(record, "proc", "APIServer")
        prefix = f"({proc} pid={os.getpid()}) "
        message = record.getMessage()
        if getattr(record, "uvicorn", False):
            return prefix + f"{record.levelname + ':':<9} " + message
        stamp = time.strftime("%m-%d %H:%M:%S", time.localtime(record.created))
        source = getattr(record, "source", "api_server.py")
        lines = message.splitlines() or [""]
        return "\n".join(f"{prefix}{record.levelname} {stamp} [{source}] {line}" for line in lines)


def _logger() -> logging.Logger:
    logger = logging.getLogger("vllm.test_double")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)  # StreamHandler flushes after every record
        handler.setFormatter(_VllmFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
    return logger


_UVICORN_LEVELS = {"critical": logging.CRITICAL, "error": logging.ERROR, "warning": logging.WARNING,
                   "info": logging.INFO, "debug": logging.DEBUG, "trace": logging.DEBUG}
_uvicorn_threshold = logging.INFO


def set_uvicorn_log_level(name: str) -> None:
    """Apply --uvicorn-log-level: uvicorn's INFO lines (startup, access) vanish at warning and above."""
    global _uvicorn_threshold
    _uvicorn_threshold = _UVICORN_LEVELS[name]


class ProcLog:
    """Logger of one (emulated) vLLM process, e.g. APIServer or EngineCore_DP0."""

    def __init__(self, proc: str) -> None:
        self.proc = proc
        self._log = _logger()

    def info(self, source: str, message: str) -> None:
        """An INFO line from `source` (a vLLM file name)."""
        self._log.info(message, extra={"proc": self.proc, "source": source})

    def warning(self, source: str, message: str) -> None:
        """A WARNING line."""
        self._log.warning(message, extra={"proc": self.proc, "source": source})

    def error(self, source: str, message: str) -> None:
        """An ERROR line (multi-line messages get the prefix on every line)."""
        self._log.error(message, extra={"proc": self.proc, "source": source})

    def uvicorn(self, message: str, level: int = logging.INFO) -> None:
        """A uvicorn line as vLLM relays it (`INFO:     ...`), unless --uvicorn-log-level hides it."""
        if level < _uvicorn_threshold:
            return
        self._log.log(level, message, extra={"proc": self.proc, "uvicorn": True})


def stderr(text: str, proc: str = "APIServer") -> None:
    """Write exception text to stderr, flushed, each line prefixed `(PROC pid=N) ` as vLLM does."""
    prefix = f"({proc} pid={os.getpid()}) "
    sys.stderr.write("".join(prefix + line + "\n" for line in text.rstrip("\n").splitlines()))
    sys.stderr.flush()
