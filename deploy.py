"""The playbook: preflight -> service user -> python env -> weights -> service -> verify.

    pyinfra inventory/prod.py deploy.py          # converge every host
    pyinfra inventory/prod.py deploy.py --dry    # show the plan and diffs, change nothing

Settings are validated (and preflight runs) while pyinfra plans, before any
operation runs on any host: bad input or a bad host ends the run with one
message and nothing changed.
"""

from pyinfra import host

from roles import preflight, service_user
from roles.common import abort
from vllm_fleet.errors import FleetError
from vllm_fleet.settings import load_settings

try:
    settings = load_settings(host.data.dict(), host=host.name)
except FleetError as exc:
    abort(exc)

snapshot = preflight.run(settings)
service_user.apply(settings)
# Next steps, each its own role (see the issues): python env (uv venv, torch,
# vLLM), weights (detached, verified download), service (unit + env file,
# health-gated restart with rollback), verify.
