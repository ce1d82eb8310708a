"""The way back: stop and remove the vLLM service; venvs and weights only when asked.

    pyinfra inventory/prod.py uninstall.py                               # units, env files, gate, fetch, uv, wheelhouse, weights state
    pyinfra inventory/prod.py uninstall.py --data vllm_purge_venvs=True  # + the venvs, source checkouts and uv cache under base_dir
    pyinfra inventory/prod.py uninstall.py --data vllm_purge_weights=True  # + weights and caches under data_dir

What is removed is `HostLayout.uninstall_targets` (vllm_fleet/layout.py), one list. The service user and
its directories stay (vllm_fleet/account/step.py owns them).
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
