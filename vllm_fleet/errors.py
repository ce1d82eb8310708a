"""Errors that end a run with one clear message, before any host is changed."""

from __future__ import annotations


class FleetError(Exception):
    """Base of every error vllm-fleet reports to a user (exit code 2 in the CLI)."""


class SettingsError(FleetError):
    """One bad setting: names the host, the key, the value and the remedy."""

    def __init__(self, host: str | None, key: str, value: object, problem: str, remedy: str):
        self.host, self.key, self.value, self.problem, self.remedy = host, key, value, problem, remedy
        where = f"host {host}: " if host else ""
        super().__init__(f"{where}{key}={value!r}: {problem}\n  remedy: {remedy}")


class PreflightError(FleetError):
    """One or more problems found on a host by preflight; nothing was changed."""

    def __init__(self, host: str, problems: list[str]):
        self.host, self.problems = host, problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"host {host}: preflight found {len(problems)} problem(s), nothing was changed:\n{lines}")
