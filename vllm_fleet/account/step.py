"""The unprivileged service user and the directories the service uses.

Layout on the host (vllm_fleet/layout.py, `HostLayout.account_dirs`; modes chosen so the service can read its code but not
change it, and nobody else can read its data or secrets):

    {base_dir}            root:root     0755  toolkit programs
    {base_dir}/venvs      root:root     0755  one venv per vLLM version (read-only to the service)
    {base_dir}/bin        root:root     0755  the health-gate program
    {base_dir}/state      root:root     0755  gate results and markers
    {data_dir}            user:user     0750  the service's home
    {data_dir}/models     user:user     0750  weights
    {data_dir}/cache      user:user     0750  HF / vLLM compile caches
    /etc/vllm-fleet       root:user     0750  env files (secrets at 0600 root:root)
"""

from __future__ import annotations

from pyinfra.api import deploy

from vllm_fleet.hostops.facts import Read
from vllm_fleet.hostops.operations import Dir, account_read, directories, directories_read, system_account
from vllm_fleet.layout import HostLayout
from vllm_fleet.settings import Settings


def reads(settings: Settings) -> list[Read]:
    """What `apply` reads of the host (deploy.py reads every step's facts in one round trip: `read_many`)."""
    return [account_read(settings.service_user), directories_read(_dirs(settings))]


def _dirs(settings: Settings) -> list[Dir]:
    return [Dir(*d) for d in HostLayout.of(settings).account_dirs]


@deploy("Service user and directories")
def apply(settings: Settings):
    user = settings.service_user
    lay = HostLayout.of(settings)
    system_account(name=f"Ensure the {user} system user and group exist (no login shell)",
                   account=user, home=lay.home)
    directories(
        name="Ensure the toolkit's directories exist with their owners and modes",
        dirs=_dirs(settings),
    )
