"""Helpers shared by the roles: how a FleetError ends a pyinfra run."""

from __future__ import annotations

from typing import NoReturn

from pyinfra_cli.exceptions import CliError

from vllm_fleet.errors import FleetError


def abort(exc: FleetError) -> NoReturn:
    """End the run while pyinfra is still planning: no operation has run on any host.

    pyinfra re-raises a CliError from deploy code as-is and prints its message
    without a traceback ("--> pyinfra error: ..."), which is what a user with
    bad input should see.
    """
    raise CliError(str(exc)) from exc
