"""Errors that end a run with one clear message, before any host is changed."""

from __future__ import annotations

import re
from dataclasses import dataclass

#: The user-info part of a URL (``scheme://user:password@``), which may hold a credential.
URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/@\s'\"]+)@")
#: A URL (scheme to the first space or quote).
URL = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+")
#: Query (or fragment) parameters whose name says they hold a secret: one of these names, case-insensitive, alone or
#: as the last part of a name (``hf_token``, ``X-Amz-Signature``).
SECRET_PARAMS = ("token", "key", "api_key", "apikey", "access_token", "password", "secret", "sig", "signature")
URL_QUERY_SECRET = re.compile(r"(?i)([?&;#](?:[^=&;#?\s]*[_.-])?(?:" + "|".join(sorted(SECRET_PARAMS, key=len, reverse=True))
                              + r")=)([^&;#\s'\"<>]+)")


def mask_credentials(text: str) -> str:
    """``text`` with the user-info of every URL in it replaced by ``***`` (``https://***@host/``), and the value of
    every secret-named query parameter (`SECRET_PARAMS`: ``?token=***``): what an error, a log line or a plan line may
    show of a URL that carried credentials."""
    text = URL_USERINFO.sub(lambda m: f"{m.group(1)}***@", text)
    return URL.sub(lambda m: URL_QUERY_SECRET.sub(lambda q: f"{q.group(1)}***", m.group(0)), text)


def url_credentials(text: str) -> bool:
    """True when a URL in ``text`` carries a password, a user name over http(s) (a token passed as the user), or a
    secret-named query parameter with a value (`SECRET_PARAMS`: ``?token=abc``, ``&X-Amz-Signature=...``);
    ``ssh://git@host`` names an account, not a secret."""
    for m in URL_USERINFO.finditer(text):
        if ":" in m.group(2) or not m.group(1).lower().startswith("ssh"):
            return True
    return any(URL_QUERY_SECRET.search(m.group(0)) for m in URL.finditer(text))


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
