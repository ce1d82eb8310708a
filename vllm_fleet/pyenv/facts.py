"""The `VenvState` fact: every venv, uv, the pushed wheelhouse and the host's Pythons in one round trip.

The command sends the host program `vllm_fleet/pyenv/hostprog.py` inline to the
host's python3 (`python3 -c SOURCE state BASE_DIR`), so it works before the
program is installed; `parse_state` turns its JSON into `StackState`.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from pyinfra.api import FactBase
from pyinfra.api.exceptions import FactProcessError
from typing_extensions import override

from vllm_fleet.pyenv.stack import HostVenv

PROGRAM_SOURCE = Path(__file__).with_name("hostprog.py")  # the host program, stdlib only


@dataclass(frozen=True)
class StackState:
    """What the host holds of the Python stack (see hostprog.state)."""

    venvs: list[HostVenv] = field(default_factory=list)
    in_use: list[str] = field(default_factory=list)  # venvs the live unit and the last known good unit run
    partial: list[str] = field(default_factory=list)
    uv: str | None = None
    program_sha256: str | None = None
    wheelhouse: dict[str, dict] | None = None
    pythons: dict[str, str] = field(default_factory=dict)
    git: str | None = None

    def to_json(self) -> dict[str, object]:
        """Plain data, for `pyinfra HOST fact`."""
        from dataclasses import asdict

        return asdict(self)


def parse_state(text: str) -> StackState:
    """Build a StackState from `hostprog.py state` output (one JSON line)."""
    data = json.loads(text)
    venvs = [HostVenv(name=v["name"], complete=bool(v.get("complete")), intact=bool(v.get("intact")),
                      problem=v.get("problem"), key=v.get("key"), version=v.get("version"),
                      built_at=float(v.get("built_at") or 0.0), target=v.get("target"))
             for v in data.get("venvs", [])]
    return StackState(venvs=venvs, in_use=list(data.get("in_use", [])), partial=list(data.get("partial", [])), uv=data.get("uv"),
                      program_sha256=data.get("program_sha256"), wheelhouse=data.get("wheelhouse"),
                      pythons=dict(data.get("pythons") or {}), git=data.get("git"))


class VenvState(FactBase[StackState]):
    """
    Returns the venvs under ``{base_dir}/venvs`` (complete? intact? built for
    what? when?), those the live unit and the gate's last known good unit run, leftovers of killed builds, the bootstrap uv's version, the
    installed host program's sha256, the pushed wheelhouse's manifest, the
    ``python3.X`` interpreters on PATH and git's path (the source channel needs it).

    + paths: JSON of ``HostLayout.venv_state_paths()`` (venvs dir, uv, the program, the wheelhouse)

    .. code:: python

        StackState(venvs=[HostVenv(name="vllm-0.25.0-cu130", complete=True, intact=True, ...)],
                   partial=[], uv="0.13.9", program_sha256="ab12...", wheelhouse=None,
                   pythons={"3.12": "/usr/bin/python3.12"})

    Example:

    .. code:: python

        state = host.get_fact(VenvState, paths=json.dumps(HostLayout.of(settings).venv_state_paths()))
        usable = [v.name for v in state.venvs if v.usable]
    """

    @override
    def requires_command(self, *args, **kwargs) -> str:
        return "python3"

    @override
    def command(self, paths: str) -> str:
        return f"python3 -c {shlex.quote(PROGRAM_SOURCE.read_text())} state {shlex.quote(paths)}"

    @override
    def process(self, output: list[str]) -> StackState:
        try:
            return parse_state(output[-1])
        except (IndexError, ValueError, KeyError) as exc:
            raise FactProcessError(f"venvctl state printed no JSON: {output[-3:]!r}") from exc
