"""The router's files, built without a host (pure): its unit and config, its front's, its prober's (docs/router.md)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jinja2

from vllm_fleet.fleet import Route
from vllm_fleet.layout import HostLayout, venv_bin
from vllm_fleet.settings import Settings

TEMPLATES = Path(__file__).resolve().parent / "templates"


@functools.cache
def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)


def _template() -> jinja2.Template:
    return _env().get_template("vllm-router.service.j2")


def config(route: Route) -> dict:
    """The launcher's config (vllm_fleet/router/hostprog.py: RouterArgs keywords). Retries stay on (a replica
    that refuses a connection is retried on another one); health checks every vllm_router_health_interval_s,
    a replica out after 2 failed checks, back after 1 good one."""
    return {
        "worker_urls": [url for _, url in route.upstreams],
        # behind the front only: vllm-router answers /add_worker and /remove_worker without a key
        "host": "127.0.0.1",
        "port": route.internal_port,
        "policy": route.policy,
        "prometheus_host": route.bind_host,
        "prometheus_port": route.metrics_port,
        "health_check_interval_secs": route.health_interval_s,
        "health_check_endpoint": "/health",
        "health_failure_threshold": 2,
        "health_success_threshold": 1,
        "health_check_timeout_secs": 5,
        "retry_max_retries": 3,
        # a replica whose circuit opened (failures in a row) is tried again after 10 s, not vllm-router's 60 s
        "cb_timeout_duration_secs": 10,
        # the replicas may still be starting when the router starts: it waits for them, not fails
        "worker_startup_timeout_secs": 3600,
        "worker_startup_check_interval": 2,
        "log_level": "info",
    }


def config_text(route: Route) -> str:
    return json.dumps(config(route), indent=1, sort_keys=True) + "\n"


def prober_config(settings: Settings, route: Route) -> dict:
    """The prober's config (router/hostprog_prober.py; no secret: the key is in the env file)."""
    return {"router_url": route.admin_url, "upstreams": [url for _, url in route.upstreams], "model": route.model,
            "env_path": HostLayout.of(settings).router_env_file, "interval_s": settings.router_probe_interval_s,
            "deadline_s": settings.router_probe_deadline_s, "misses": settings.router_probe_misses}


def prober_unit(settings: Settings, route: Route) -> str:
    lay = HostLayout.of(settings)
    return _env().get_template("vllm-router-prober.service.j2").render(
        unit_name=f"{lay.prober_unit}.service", router_unit=f"{lay.router_unit}.service", program=lay.prober_program,
        config=lay.prober_config, interval_s=settings.router_probe_interval_s,
        deadline_s=settings.router_probe_deadline_s, misses=settings.router_probe_misses)


def unit(settings: Settings, route: Route) -> str:
    lay = HostLayout.of(settings)
    return _template().render(
        unit_name=f"{lay.router_unit}.service", version=settings.router_version, replicas=len(route.upstreams),
        model=route.model, python=venv_bin(lay.router_venv(settings.router_version), "python"), program=lay.router_program,
        config=lay.router_config)


FRONT_WORKER_USER = "www-data"
"""The account nginx's worker runs as: Debian's and Ubuntu's nginx user (base-passwd, uid 33), on every host."""
NGINX = "/usr/sbin/nginx"
"""The front's server: nginx from the distribution's package (Debian 12: 1.22.1; Ubuntu 22.04: 1.18; 24.04: 1.24)."""


def front_config(settings: Settings, route: Route) -> str:
    """The front's nginx config (a secret: it holds the clients' key and the replicas' key; written root 0600).

    Clients reach only /v1/* (with the key) and /health, /liveness, /readiness (without, as vLLM's /health);
    vllm-router's admin endpoints are not served. The keys are bearer tokens (`fleet.routes` checks them), so
    they go into the config verbatim: no quote, space or `$` nginx would read."""
    lay = HostLayout.of(settings)
    client = route.client_key.get_secret_value() if route.client_key is not None else None
    upstream = route.upstream_key.get_secret_value() if route.upstream_key is not None else None
    listen = f"[{route.bind_host}]:{route.port}" if ":" in route.bind_host else f"{route.bind_host}:{route.port}"
    return _env().get_template("vllm-router-front.conf.j2").render(
        unit_name=f"{lay.front_unit}.service", runtime=f"/run/{lay.front_unit}", listen=listen,
        upstream=f"127.0.0.1:{route.internal_port}", client_key=client, upstream_key=upstream, model=route.model,
        worker_user=FRONT_WORKER_USER)


def front_unit(settings: Settings, route: Route) -> str:
    """The front's unit: nginx's master as root with three capabilities (it reads the root-only config and starts
    its worker as FRONT_WORKER_USER), hardened like the router's."""
    lay = HostLayout.of(settings)
    return _env().get_template("vllm-router-front.service.j2").render(
        unit_name=f"{lay.front_unit}.service", router_unit=f"{lay.router_unit}.service", nginx=NGINX,
        config=lay.front_config, runtime=lay.front_unit, model=route.model, listen=route.url,
        worker_user=FRONT_WORKER_USER)
