"""The way back: stop and remove the vLLM service; venvs and weights only when asked.

    pyinfra inventory/prod.py uninstall.py                               # service, unit, env file, gate
    pyinfra inventory/prod.py uninstall.py --data vllm_purge_venvs=True  # + the venvs under base_dir
    pyinfra inventory/prod.py uninstall.py --data vllm_purge_weights=True  # + weights and caches under data_dir

The service user and the directories stay (vllm_fleet/account/step.py owns them).
"""

from pyinfra import host

from vllm_fleet.service import step as service
from vllm_fleet.hostops.abort import abort
from vllm_fleet.errors import FleetError
from vllm_fleet.settings import load_settings

try:
    settings = load_settings(host.data.dict(), host=host.name)
except FleetError as exc:
    abort(exc)

service.remove(settings)
