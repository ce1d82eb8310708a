"""Errors that end a run with one clear message, before any host is changed."""

from __future__ import annotations

import re
from dataclasses import dataclass

#: The user-info part of a URL (``scheme://user:password@``), which may hold a credential.
URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/@\s'\"]+)@")


def mask_credentials(text: str) -> str:
    """``text`` with the user-info of every URL in it replaced by ``***`` (``https://***@host/``): what an error,
    a log line or a plan line may show of a URL that carried credentials."""
    return URL_USERINFO.sub(lambda m: f"{m.group(1)}***@", text)


def url_credentials(text: str) -> bool:
    """True when a URL in ``text`` carries a password, or a user name over http(s) (a token passed as the user);
    ``ssh://git@host`` names an account, not a secret."""
    for m in URL_USERINFO.finditer(text):
        if ":" in m.group(2) or not m.group(1).lower().startswith("ssh"):
            return True
    return False


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
        """``key=value: problem`` and the remedy; a URL's credentials never shown (`mask_credentials`)."""
        return mask_credentials(f"{self.key}={self.value!r}: {self.problem}\n    remedy: {self.remedy}")


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
