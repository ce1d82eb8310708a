"""Preflight: read the host in one round trip, stop everything if anything is wrong.

Adds no operation. It runs while pyinfra plans, so a problem on any host ends
the run before any host is changed.
"""

from __future__ import annotations

from pyinfra import host

from roles.common import abort
from vllm_fleet import preflight
from vllm_fleet.errors import PreflightError
from vllm_fleet.facts import HostSnapshot
from vllm_fleet.settings import Settings


def run(settings: Settings, weights_bytes: int = 0):
    """Gather the host's snapshot, check it, and return it for later steps."""
    snap = host.get_fact(HostSnapshot, paths=[settings.base_dir, settings.data_dir])
    problems = preflight.check(settings, snap, weights_bytes=weights_bytes)
    if problems:
        abort(PreflightError(host.name, problems))
    return snap
