"""Errors that end a run with one clear message, before any host is changed."""

from __future__ import annotations

from dataclasses import dataclass


class FleetError(Exception):
    """Base of every error vllm-fleet reports to a user (exit code 2 in the CLI)."""


@dataclass(frozen=True)
class Problem:
    """One bad setting: the key, the value as given, what is wrong, how to fix it."""

    key: str
    value: object
    problem: str
    remedy: str

    def render(self) -> str:
        return f"{self.key}={self.value!r}: {self.problem}\n    remedy: {self.remedy}"


class SettingConflict(ValueError):
    """A problem found by a model validator of the settings (several fields together), carried out of
    pydantic's validation with the key it is reported under and its remedy (``key`` without ``vllm_``)."""

    def __init__(self, key: str, value: object, problem: str, remedy: str):
        super().__init__(problem)
        self.problem = Problem("vllm_" + key, value, problem, remedy)


class SettingsError(FleetError):
    """Bad host data: names the host, and for each problem the key, value and remedy."""

    def __init__(self, host: str | None, problems: list[Problem]):
        self.host, self.problems = host, problems
        where = f"host {host}" if host else "settings"
        if len(problems) == 1:
            super().__init__(f"{where}: {problems[0].render()}")
        else:
            lines = "\n".join(f"  - {p.render()}" for p in problems)
            super().__init__(f"{where}: {len(problems)} bad settings, nothing was changed:\n{lines}")


class PreflightError(FleetError):
    """One or more problems found on a host by preflight; nothing was changed."""

    def __init__(self, host: str, problems: list[str]):
        self.host, self.problems = host, problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"host {host}: preflight found {len(problems)} problem(s), nothing was changed:\n{lines}")
