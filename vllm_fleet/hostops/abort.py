"""Helpers shared by the roles: how a FleetError ends a pyinfra run."""

from __future__ import annotations

from typing import NoReturn

from pyinfra.api.exceptions import PyinfraError

from vllm_fleet.errors import FleetError


class FleetAbort(PyinfraError):
    """A FleetError raised while pyinfra plans: pyinfra prints it as one message, no traceback."""


def abort(exc: FleetError) -> NoReturn:
    """End the run while pyinfra is still planning: no operation has run on any host.

    pyinfra re-raises a PyinfraError from deploy code as-is and prints its
    message ("--> pyinfra error ...: <message>") instead of a traceback.
    """
    raise FleetAbort(str(exc)) from None
