"""The unprivileged service user and the directories the service uses.

Layout on the host (modes chosen so the service can read its code but not
change it, and nobody else can read its data or secrets):

    {base_dir}            root:root     0755  toolkit programs
    {base_dir}/venvs      root:root     0755  one venv per vLLM version (read-only to the service)
    {data_dir}            user:user     0750  the service's home
    {data_dir}/models     user:user     0750  weights
    {data_dir}/cache      user:user     0750  HF / vLLM compile caches
    /etc/vllm-fleet       root:user     0750  env files (secrets at 0640 root:user)
"""

from __future__ import annotations

from pyinfra.api import deploy
from pyinfra.operations import files, server

from vllm_fleet.settings import Settings

CONFIG_DIR = "/etc/vllm-fleet"


@deploy("Service user and directories")
def apply(settings: Settings):
    user = settings.service_user
    server.group(name=f"Ensure the {user} system group exists", group=user, system=True)
    server.user(
        name=f"Ensure the {user} system user exists (no login shell)",
        user=user,
        group=user,
        system=True,
        home=settings.data_dir,
        shell="/usr/sbin/nologin",
        ensure_home=False,
    )
    dirs = [
        (settings.base_dir, "root", "root", "755"),
        (f"{settings.base_dir}/venvs", "root", "root", "755"),
        (settings.data_dir, user, user, "750"),
        (f"{settings.data_dir}/models", user, user, "750"),
        (f"{settings.data_dir}/cache", user, user, "750"),
        (CONFIG_DIR, "root", user, "750"),
    ]
    for path, owner, group, mode in dirs:
        files.directory(name=f"Ensure {path} exists ({owner}:{group} {mode})", path=path, user=owner, group=group, mode=mode)
