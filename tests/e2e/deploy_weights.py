"""The weights steps of deploy.py alone (settings -> preflight -> service user -> weights), for tests/e2e/test_weights.py.

The other steps (python env, service) have their own e2e tests; this keeps the
weights tests independent of them and quick.
"""

from pyinfra import host

from vllm_fleet.account import step as service_user
from vllm_fleet.preflight import step as preflight
from vllm_fleet.weights import step as weights
from vllm_fleet.hostops.abort import abort
from vllm_fleet.errors import FleetError
from vllm_fleet.settings import load_settings

try:
    settings = load_settings(host.data.dict(), host=host.name)
    model = weights.source(settings)
except (FleetError, ValueError) as exc:
    abort(FleetError(str(exc)))

state = preflight.run(settings, model)
service_user.apply(settings)
weights.apply(settings, model, state)
