"""The router step: vllm-router in its own venv, as a hardened unit, in front of one model's replicas.

Runs on the hosts of the inventory group `routers` (docs/router.md), after the service step (so a first
deploy starts the router with its replicas up). The drain a rolling change uses is `drain` below, called by
the service step's gate on each replica.

    {base_dir}/router/venv-<version>     python3 -m venv + pip: vllm-router==<version>   root:root
    {base_dir}/router/vllm-fleet-router  the launcher (router/hostprog.py)                 root:root 0755
    {base_dir}/router/<service>-router.json  upstreams, policy, ports (no secret)          root:root 0644
    /etc/systemd/system/<service>-router.service  DynamicUser, hardened, Restart=always; on 127.0.0.1 only
    /etc/vllm-fleet/<service>-router-front.conf  nginx config: the clients' and replicas' keys  root:root 0600
    /etc/systemd/system/<service>-router-front.service  nginx (distribution package) as a DynamicUser: the port
                                          clients reach; checks their key, serves /v1/* and health only
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from urllib.parse import quote

from pyinfra import host, logger
from pyinfra.api import StringCommand, deploy
from pyinfra.api.exceptions import OperationError
from pyinfra.operations import apt, python, server

from vllm_fleet.fleet import Route
from vllm_fleet.hostops.facts import FileStates, Read, read
from vllm_fleet.handoff import any_changed
from vllm_fleet.hostops.operations import (Dir, ManagedFile, directories, directories_read, managed_files,
                                          restart_on_change, secret_file, unit_running)
from vllm_fleet.service.render import env_file_value
from vllm_fleet.layout import HostLayout, venv_bin
from vllm_fleet.router import render
from vllm_fleet.router.facts import RouterState
from vllm_fleet.settings import Settings
from vllm_fleet.weights.source import pip_args

PROGRAM_SRC = Path(__file__).with_name("hostprog.py")
PROBER_SRC = Path(__file__).with_name("hostprog_prober.py")
READY_TIMEOUT_S = 60


def _state_read(settings: Settings) -> Read:
    lay = HostLayout.of(settings)
    return Read.of(RouterState, venv=lay.router_venv(settings.router_version), unit=f"{lay.router_unit}.service",
                   prober=f"{lay.prober_unit}.service", front=f"{lay.front_unit}.service")


def _files(settings: Settings, route: Route) -> list[ManagedFile]:
    lay = HostLayout.of(settings)
    return [ManagedFile(lay.router_program, PROGRAM_SRC, "root", "root", "755"),
            ManagedFile(lay.router_config, render.config_text(route), "root", "root", "644"),
            ManagedFile(lay.router_unit_path, render.unit(settings, route), "root", "root", "644")]


def _prober_files(settings: Settings, route: Route) -> list[ManagedFile]:
    """The prober's program, config and unit, and its env file (the replicas' key, written as a secret)."""
    lay = HostLayout.of(settings)
    key = route.upstream_key.get_secret_value() if route.upstream_key is not None else ""
    return [ManagedFile(lay.prober_program, PROBER_SRC, "root", "root", "755"),
            ManagedFile(lay.prober_config, json.dumps(render.prober_config(settings, route), indent=1, sort_keys=True) + "\n",
                        "root", "root", "644"),
            ManagedFile(lay.prober_unit_path, render.prober_unit(settings, route), "root", "root", "644"),
            secret_file(lay.router_env_file, f"VLLM_API_KEY={env_file_value('VLLM_API_KEY', key)}\n" if key
                        else "# no API key set (vllm_api_key)\n")]


def _files_read(settings: Settings) -> Read:
    lay = HostLayout.of(settings)
    return Read.of(FileStates, paths=sorted((lay.router_program, lay.router_config, lay.router_unit_path, lay.prober_program,
                                             lay.prober_config, lay.prober_unit_path, lay.router_env_file,
                                             lay.front_config, lay.front_unit_path)))


def _front_files(settings: Settings, route: Route) -> list[ManagedFile]:
    """The front's nginx config (it holds keys: written as a secret, never shown in a diff) and its unit."""
    lay = HostLayout.of(settings)
    return [secret_file(lay.front_config, render.front_config(settings, route)),
            ManagedFile(lay.front_unit_path, render.front_unit(settings, route), "root", "root", "644")]


def _dirs(settings: Settings) -> list[Dir]:
    return [Dir(HostLayout.of(settings).router_dir, "root", "root", "755")]


def reads(settings: Settings, route: Route | None) -> list[Read]:
    """What `apply` reads of the host (deploy.py reads every step's facts in one round trip: `read_many`)."""
    if route is None:
        return []
    return [_state_read(settings), _files_read(settings), directories_read(_dirs(settings))]


def index_args(settings: Settings, serves_vllm: bool) -> list[str]:
    """pip's index options for the router venv: the wheelhouse the python env step pushed (a host that also
    serves vLLM), else the same indexes as the vLLM venv."""
    if settings.wheelhouse and serves_vllm:
        return ["--no-index", "--find-links", HostLayout.of(settings).wheelhouse_dir]
    return pip_args(settings)


@deploy("Router")
def apply(settings: Settings, route: Route, serves_vllm: bool = True) -> None:
    """Install or update the router for ``route`` and make sure it runs and answers."""
    lay = HostLayout.of(settings)
    q = shlex.quote
    fact = read(host, _state_read(settings))
    venv = lay.router_venv(settings.router_version)
    directories(name=f"Ensure {lay.router_dir} exists", dirs=_dirs(settings))
    if fact["version"] != settings.router_version:
        pip = [q(venv_bin(venv, "pip")), "install", "--quiet", "--disable-pip-version-check",
               *(q(a) for a in index_args(settings, serves_vllm)), q(f"vllm-router=={settings.router_version}")]
        built = server.shell(
            name=f"Ensure the router venv {venv} has vllm-router {settings.router_version}",
            commands=[f"rm -rf {q(venv)} && python3 -m venv {q(venv)} && {' '.join(pip)}"])
    else:
        built = server.shell(name=f"{venv} has vllm-router {settings.router_version}", commands=[])
    states = read(host, _files_read(settings))
    program, config, unit = _files(settings, route)
    files_ = managed_files(name=f"Ensure the router's launcher and config ({len(route.upstreams)} replicas of {route.model})",
                           files=[program, config], states=states)
    unit_ = managed_files(name=f"Ensure the unit {lay.router_unit}.service is current", files=[unit], states=states)
    name = f"{lay.router_unit}.service"
    restart_on_change(name, "its venv, launcher, config or unit", any_changed(built, files_, unit_))
    running = unit_running(name=f"Ensure {name} is enabled and running", unit=name, seen=(fact["active"], fact["enabled"]))
    front = f"{lay.front_unit}.service"
    if fact["nginx"] is None:
        nginx = apt.packages(name="Ensure nginx is installed (the router's key-checking front)", packages=["nginx"],
                             update=True, no_recommends=True)
        # the package starts the distribution's own nginx.service (port 80, a default site): not ours to run
        server.shell(name="Ensure the distribution's nginx.service, started by the package install, is stopped and disabled",
                     commands=["systemctl disable --now nginx.service"], _if=nginx.did_change)
    else:
        nginx = server.shell(name=f"nginx {fact['nginx']} is installed", commands=[])
    front_files = managed_files(name=f"Ensure the router's front (nginx) config and unit (content not shown: it holds keys)",
                                files=_front_files(settings, route), states=states)
    restart_on_change(front, "its config or unit", any_changed(nginx, front_files))
    front_running = unit_running(name=f"Ensure {front} is enabled and running", unit=front,
                                 seen=(fact["front_active"], fact["front_enabled"]))
    # after a (re)start only: a no-op rerun read the units active and changes nothing
    python.call(name=f"Check the router answers at {route.url}", function=_ready, route=route, units=(name, front),
                _if=any_changed(built, files_, unit_, running, nginx, front_files, front_running))
    prober = f"{lay.prober_unit}.service"
    prober_files = managed_files(name=f"Ensure the replica prober's program, config, unit and key file (content not shown)",
                                 files=_prober_files(settings, route), states=states)
    restart_on_change(prober, "its program, config, unit or key", any_changed(prober_files))
    unit_running(name=f"Ensure {prober} is enabled and running", unit=prober,
                 seen=(fact["prober_active"], fact["prober_enabled"]))
    checks = "checks the clients' key" if route.client_key is not None else "no key for clients: loopback only"
    logger.info(f"{host.print_prefix}router: {route.url} ({checks}) -> {', '.join(url for _, url in route.upstreams)} "
                f"(policy {route.policy}); metrics on port {route.metrics_port}")


def http_script(method: str, url: str, timeout_s: float) -> str:
    """A python3 one-liner for the host: ``METHOD url``, prints the status (0 when unreachable), exit 0."""
    code = ("import sys,urllib.request,urllib.error\n"
            "try:\n"
            " r=urllib.request.urlopen(urllib.request.Request(sys.argv[2],method=sys.argv[1]),timeout=float(sys.argv[3]))\n"
            " print(r.status, r.read(300).decode(errors='replace').replace(chr(10),' '))\n"
            "except urllib.error.HTTPError as e: print(e.code, e.read(300).decode(errors='replace').replace(chr(10),' '))\n"
            "except Exception as e: print(0, e)")
    return f"python3 -c {shlex.quote(code)} {shlex.quote(method)} {shlex.quote(url)} {timeout_s}"


def _ready(state, host, route: Route, units: tuple[str, ...]) -> None:
    """Poll the router's /liveness through its front, on its host, until 200 (READY_TIMEOUT_S); fail naming the
    units' journals otherwise."""
    script = (f"for i in $(seq {READY_TIMEOUT_S}); do out=$({http_script('GET', route.url + '/liveness', 2)}); "
              f'case "$out" in "200 "*) echo "$out"; exit 0;; esac; sleep 1; done; echo "$out"; exit 1')
    ok, output = host.run_shell_command(StringCommand(script), print_output=False)
    if not ok:
        raise OperationError(f"the router did not answer at {route.url} within {READY_TIMEOUT_S} s "
                             f"(last: {output.stdout[-300:]}); see journalctl -u {' -u '.join(units)}")


def _call(router_host, route: Route, action: str, upstream: str) -> tuple[int, str]:
    """POST /<action>?url=<upstream> to the router, on the router's host; (status, body) (0: unreachable)."""
    url = f"{route.admin_url}/{action}?url={quote(upstream, safe='')}"
    _, output = router_host.run_shell_command(StringCommand(http_script("POST", url, 10)), print_output=False)
    first = (output.stdout or "0 no output").split(" ", 1)
    status = int(first[0]) if first[0].isdigit() else 0
    return status, first[1] if len(first) > 1 else ""


def _idle_script(metrics_url: str, timeout_s: int) -> str:
    """Shell for the replica's host: wait until its vLLM has no request running or waiting (/metrics), at most
    ``timeout_s``; prints how long it waited."""
    code = ("import sys,time,urllib.request\n"
            "url,limit=sys.argv[1],float(sys.argv[2]); start=time.monotonic(); busy=None\n"
            "while True:\n"
            " try:\n"
            "  text=urllib.request.urlopen(url,timeout=5).read().decode()\n"
            "  busy=sum(float(l.rsplit(' ',1)[1]) for l in text.splitlines() if l.startswith(('vllm:num_requests_running','vllm:num_requests_waiting')))\n"
            " except Exception as e: busy=None\n"
            " if busy==0 or busy is None or time.monotonic()-start>=limit: break\n"
            " time.sleep(0.5)\n"
            "print(f'{time.monotonic()-start:.1f} {busy}')")
    return f"python3 -c {shlex.quote(code)} {shlex.quote(metrics_url)} {timeout_s}"


def drain(state, replica, route: Route, upstream: str, local_url: str, timeout_s: int) -> bool:
    """Take ``upstream`` out of the router's rotation and wait (on the replica's host, at most ``timeout_s``) until
    its vLLM has no request in flight. Returns whether the router took it out (False: the router is not running
    yet, e.g. a first deploy: nothing routes to the replica). Raises OperationError when the router host cannot be
    reached or refuses: the replica is not restarted under traffic."""
    router_host = state.inventory.get_host(route.router)
    if not router_host.connected:
        router_host.connect(reason="to drain a replica at its router", raise_exceptions=True)
    status, body = _call(router_host, route, "remove_worker", upstream)
    if status == 0:
        logger.warning(f"{replica.print_prefix}router: {route.router} does not answer at {route.admin_url} ({body.strip()}): "
                       "not drained (nothing routes to this replica)")
        return False
    if status != 200:
        raise OperationError(f"the router on {route.router} refused to take {upstream} out of rotation: {status} {body}")
    _record(router_host, route, upstream, replica.name)
    _, output = replica.run_shell_command(StringCommand(_idle_script(f"{local_url}/metrics", timeout_s)), print_output=False)
    waited = (output.stdout or "?").split(" ")[0]
    logger.info(f"{replica.print_prefix}router: drained at {route.router} (out of rotation; {waited} s until idle)")
    return True


def undrain(state, replica, route: Route, upstream: str) -> None:
    """Put ``upstream`` back into the router's rotation."""
    router_host = state.inventory.get_host(route.router)
    status, body = _call(router_host, route, "add_worker", upstream)
    if status != 200:
        raise OperationError(f"the router on {route.router} did not take {upstream} back: {status} {body}; "
                             f"add it with POST {route.admin_url}/add_worker?url={upstream} on {route.router}")
    _record(router_host, route, upstream, None)
    logger.info(f"{replica.print_prefix}router: back in rotation at {route.router}")


def rolling_record(route: Route, upstream: str) -> str:
    """The file on the router host that says a rolling change drained ``upstream`` (`HostLayout.router_rolling_dir`)."""
    return f"{route.rolling_dir}/{quote(upstream, safe='')}"


def _record(router_host, route: Route, upstream: str, replica: str | None) -> None:
    """Write (``replica`` given: its host name and the time) or remove the router host's record of a drain."""
    path = shlex.quote(rolling_record(route, upstream))
    if replica is None:
        command = f"rm -f {path}"
    else:
        line = shlex.quote(json.dumps({"host": replica}))
        command = (f"mkdir -p {shlex.quote(route.rolling_dir)} && "
                   f"printf '%s %s\\n' {line} \"$(date +%s)\" > {path}.tmp && mv {path}.tmp {path}")
    router_host.run_shell_command(StringCommand(command), print_output=False)
