#!/usr/bin/env python3
"""Manage the vllm-fleet test hosts: systemd containers with emulated GPUs.

    python tests/hosts.py up|down|reset|status [NAME ...]

The hosts are the ones named in inventory/ci.py (the contract): hosts reached
with ``@docker/NAME`` become containers named NAME; SSH hosts become containers
named after their inventory name, whose sshd listens on the inventory's
``ssh_hostname:ssh_port`` and accepts the ``ssh_key`` for ``ssh_user`` (who has
passwordless sudo). The key pair and known_hosts live where the inventory reads
them (``$VLLM_FLEET_TEST_STATE``, default ``<repo>/.cache/testhosts``).

Recipe (see tests/README.md, verified on the CI machine kind): a Debian 12
rootfs made with debootstrap, cached as a tarball in ``$VLLM_FLEET_CACHE``
(default ~/.cache/vllm-fleet) keyed by the package list and RECIPE_VERSION,
imported with ``docker import`` (there is no registry), and run with systemd as
PID 1 and ``--network host``. Each host gets the nvidia-smi test double
(tests/doubles/nvidia-smi) and its hardware JSON (tests/hardware/NAME.json).

``up`` is idempotent: healthy containers from the current image are reused
(their double, hardware JSON and authorized key are refreshed), broken or
outdated ones are recreated. ``reset`` recreates from the image. ``down``
removes the containers. Exit status: 0 on success, 1 on a failure, 3 when no
Docker engine answers.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INVENTORY = REPO / "inventory" / "ci.py"
DOUBLE = REPO / "tests" / "doubles" / "nvidia-smi"
HARDWARE_DIR = REPO / "tests" / "hardware"

# Bump when the way the rootfs is built changes (invalidates cached tarballs and images).
RECIPE_VERSION = 1
SUITE = "bookworm"
MIRROR = os.environ.get("VLLM_FLEET_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = (
    "python3",
    "python3-venv",
    "openssh-server",
    "systemd",
    "systemd-sysv",
    "dbus",
    "sudo",
    "iproute2",
    "procps",
    "curl",
    "ca-certificates",
)
IMAGE = "fleet-testhost:bookworm"
LABEL_KEY = "vllm-fleet.rootfs"
LABEL_SPEC = "vllm-fleet.container"
DOUBLE_ETC = "etc/vllm-fleet-test"
OVERLAY_STAMP = f"{DOUBLE_ETC}/overlay.sha256"
HOLDER_COMMAND = ("/usr/bin/python3", "-c", "import signal; signal.pause()")
SYSTEMD_TIMEOUT_S = 180

RUN_FLAGS = (
    # The flags verified on the CI machine kind (tests/README.md; --privileged fails there).
    "--cap-add", "SYS_ADMIN", "--cap-add", "NET_ADMIN",
    "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
    "--cgroupns=host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
    "--tmpfs", "/run", "--tmpfs", "/run/lock", "-e", "container=docker",
    "--network", "host", "--stop-signal", "SIGRTMIN+3",
)  # fmt: skip


class HostError(RuntimeError):
    """A test host could not be brought to the wanted state."""


@dataclass(frozen=True)
class SshAccess:
    """How the control machine reaches a host over SSH (from inventory/ci.py)."""

    hostname: str
    port: int
    user: str
    key: Path
    known_hosts: Path


@dataclass(frozen=True)
class TestHost:
    """One test host: its container name, hardware file and optional SSH access."""

    __test__ = False  # a data class, not a pytest test class
    name: str
    hardware: Path
    ssh: SshAccess | None


def log(message: str) -> None:
    """Progress goes to stderr so stdout stays for `status`."""
    print(f"[hosts] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Where the rootfs tarball is cached."""
    return Path(os.environ.get("VLLM_FLEET_CACHE", Path.home() / ".cache" / "vllm-fleet"))


def load_hosts() -> list[TestHost]:
    """Read the host list from inventory/ci.py, the contract for names, ports and paths."""
    spec = importlib.util.spec_from_file_location("vllm_fleet_ci_inventory", INVENTORY)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    hosts = []
    for target, _data in module.docker_hosts:
        name = target.removeprefix("@docker/")
        hosts.append(TestHost(name, HARDWARE_DIR / f"{name}.json", None))
    for name, data in module.ssh_hosts:
        access = SshAccess(
            hostname=data["ssh_hostname"],
            port=int(data["ssh_port"]),
            user=data["ssh_user"],
            key=Path(data["ssh_key"]),
            known_hosts=Path(data["ssh_known_hosts_file"]),
        )
        hosts.append(TestHost(name, HARDWARE_DIR / f"{name}.json", access))
    return hosts


def docker(*args: str, check: bool = True, stdin: bytes | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the docker CLI (stdin may be binary, e.g. a tar stream) and capture its output as text."""
    proc = subprocess.run(["docker", *args], input=stdin, capture_output=True, timeout=timeout, check=False)
    result = subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    )
    if check and result.returncode != 0:
        raise HostError(f"docker {' '.join(args[:3])} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def docker_exec(
    name: str, script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a shell script (with positional args "$@") as root inside a container."""
    env_args = [arg for key, value in (env or {}).items() for arg in ("-e", f"{key}={value}")]
    return docker("exec", *env_args, name, "sh", "-ec", script, "sh", *args, check=False, timeout=timeout)


def engine_answers() -> bool:
    """True when a Docker engine answers `docker info`."""
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0


# --- image -------------------------------------------------------------------------------


def rootfs_key() -> str:
    """Cache key of the rootfs: recipe version, suite, variant and package list."""
    recipe = json.dumps({"recipe": RECIPE_VERSION, "suite": SUITE, "variant": "minbase", "packages": sorted(PACKAGES)})
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def ensure_rootfs(key: str) -> Path:
    """Return the cached rootfs tarball, building it with debootstrap if missing."""
    cache = cache_dir()
    tarball = cache / f"rootfs-{SUITE}-{key}.tar"
    if tarball.exists():
        log(f"rootfs: cached {tarball}")
        return tarball
    if shutil.which("debootstrap") is None:
        raise HostError("debootstrap is not installed (apt-get install -y debootstrap)")
    cache.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix="rootfs-", dir=cache))
    build_log = cache / "debootstrap.log"
    log(f"rootfs: debootstrap {SUITE} from {MIRROR} (about 1.5 min, log {build_log})")
    started = time.monotonic()
    try:
        with build_log.open("w") as out:
            code = subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(build), MIRROR],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            ).returncode
        if code != 0:
            tail = build_log.read_text(errors="replace").splitlines()[-15:]
            raise HostError("debootstrap failed:\n" + "\n".join(tail))
        trim_rootfs(build)
        partial = tarball.with_suffix(".partial")
        subprocess.run(["tar", "-C", str(build), "-cf", str(partial), "."], check=True)
        partial.rename(tarball)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    log(f"rootfs: built {tarball} in {time.monotonic() - started:.0f}s")
    return tarball


def trim_rootfs(root: Path) -> None:
    """Make the rootfs a neutral image: no shared identity, sshd off unless a host enables it."""
    for key_file in (root / "etc" / "ssh").glob("ssh_host_*"):
        key_file.unlink()
    (root / "etc" / "systemd" / "system" / "multi-user.target.wants" / "ssh.service").unlink(missing_ok=True)
    (root / "etc" / "machine-id").write_text("")
    for deb in (root / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        deb.unlink()


def image_key() -> str | None:
    """The rootfs key the local image was imported from, or None when there is no image."""
    proc = docker("image", "inspect", "--format", f'{{{{index .Config.Labels "{LABEL_KEY}"}}}}', IMAGE, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def ensure_image() -> str:
    """Import the rootfs as IMAGE unless the image already comes from the current key."""
    key = rootfs_key()
    if image_key() == key:
        return key
    tarball = ensure_rootfs(key)
    log(f"image: docker import {tarball.name} as {IMAGE}")
    with tarball.open("rb") as source:
        proc = subprocess.run(
            ["docker", "import", "--change", f"LABEL {LABEL_KEY}={key}", "-", IMAGE],
            stdin=source,
            capture_output=True,
            text=True,
            check=False,
        )
    if proc.returncode != 0:
        raise HostError(f"docker import failed: {proc.stderr.strip()}")
    return key


# --- containers --------------------------------------------------------------------------


def inspect(name: str) -> dict | None:
    """`docker inspect` of a container, or None if it does not exist."""
    proc = docker("container", "inspect", name, check=False)
    return json.loads(proc.stdout)[0] if proc.returncode == 0 else None


def systemd_state(name: str, *, wait: bool) -> str:
    """`systemctl is-system-running` inside the container, optionally waiting for boot to end."""
    args = ["systemctl", "is-system-running"] + (["--wait"] if wait else [])
    deadline = time.monotonic() + SYSTEMD_TIMEOUT_S
    while True:
        try:
            proc = docker("exec", name, *args, check=False, timeout=SYSTEMD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return "timeout"
        state = proc.stdout.strip()
        # Right after `docker start`, PID 1 may not have opened its bus socket yet.
        if state or not wait or time.monotonic() > deadline or not inspect_running(name):
            return state or f"unreachable ({proc.stderr.strip()})"
        time.sleep(0.5)


def is_healthy(host: TestHost, key: str) -> tuple[bool, str]:
    """Whether an existing container can be reused, and why not."""
    info = inspect(host.name)
    if info is None:
        return False, "absent"
    if not info["State"]["Running"]:
        return False, f"not running ({info['State']['Status']})"
    labels = info["Config"]["Labels"]
    if labels.get(LABEL_KEY) != key or labels.get(LABEL_SPEC) != spec_digest(host):
        return False, "made from an older image or with other flags"
    state = systemd_state(host.name, wait=True)
    if state not in ("running", "degraded"):
        return False, f"systemd is {state}"
    return True, state


def create_args(host: TestHost) -> list[str]:
    """The `docker create` arguments of a host (its own hostname resolves, for sudo)."""
    return [*RUN_FLAGS, "--name", host.name, "--hostname", host.name, "--add-host", f"{host.name}:127.0.1.1"]


def spec_digest(host: TestHost) -> str:
    """Digest of the create arguments: a container made with other flags is recreated."""
    return hashlib.sha256(json.dumps(create_args(host)).encode()).hexdigest()[:16]


def create(host: TestHost, key: str) -> None:
    """Create the container, put its overlay in place and boot systemd."""
    docker("rm", "-f", host.name, check=False)
    docker(
        "create", *create_args(host), "--label", f"{LABEL_KEY}={key}", "--label", f"{LABEL_SPEC}={spec_digest(host)}",
        IMAGE, "/lib/systemd/systemd",
    )
    install_overlay(host)
    docker("start", host.name)
    state = systemd_state(host.name, wait=True)
    if state not in ("running", "degraded"):
        raise HostError(f"{host.name}: systemd did not come up: {state}")


def report_systemd(host: TestHost) -> str:
    """Wait for boot to finish; return the state.

    A reused host can be degraded by units an earlier test session left failed
    (a killed download, a crashed engine): log them and clear their failed
    state, so every session starts from a host whose systemd is running.
    """
    state = systemd_state(host.name, wait=True)
    if state == "degraded":
        units = ", ".join(failed_units(host.name))
        log(f"{host.name}: systemd degraded, failed units left by an earlier run: {units}; clearing them")
        docker("exec", host.name, "systemctl", "reset-failed", check=False)
        state = systemd_state(host.name, wait=True)
    elif state != "running":
        raise HostError(f"{host.name}: systemd is {state}")
    return state


def failed_units(name: str) -> list[str]:
    """The units systemd lists as failed in a container (what makes it "degraded")."""
    failed = docker("exec", name, "systemctl", "--failed", "--plain", "--no-legend", check=False).stdout
    return [line.split()[0] for line in failed.splitlines() if line.strip()]


# --- what each host gets -----------------------------------------------------------------


def overlay_files(host: TestHost) -> list[tuple[str, bytes | str, int]]:
    """(path, content, mode) for every file the host gets; str content means a symlink target."""
    files: list[tuple[str, bytes | str, int]] = [
        (f"{DOUBLE_ETC}/hardware.json", host.hardware.read_bytes(), 0o644),
        ("usr/bin/nvidia-smi", DOUBLE.read_bytes(), 0o755),
    ]
    if host.ssh is None:
        # --network host shares the host's ports: no sshd on port 22 here.
        files += [
            ("etc/systemd/system/ssh.service", "/dev/null", 0o777),
            ("etc/systemd/system/ssh.socket", "/dev/null", 0o777),
        ]
        return files
    sshd = (
        "# vllm-fleet test host: sshd only on the loopback port from inventory/ci.py\n"
        f"Port {host.ssh.port}\nListenAddress {host.ssh.hostname}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
    )
    unit = (
        "# vllm-fleet test host: host keys are made per container, not shipped in the image\n"
        "[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n"
    )
    files += [
        ("etc/ssh/sshd_config.d/vllm-fleet-test.conf", sshd.encode(), 0o644),
        ("etc/systemd/system/ssh.service.d/vllm-fleet-test.conf", unit.encode(), 0o644),
        ("etc/systemd/system/multi-user.target.wants/ssh.service", "/lib/systemd/system/ssh.service", 0o777),
        (f"etc/sudoers.d/{host.ssh.user}", f"{host.ssh.user} ALL=(ALL) NOPASSWD:ALL\n".encode(), 0o440),
    ]
    return files


def overlay_tar(files: list[tuple[str, bytes | str, int]]) -> tuple[bytes, str]:
    """A tar stream of the overlay (for `docker cp -`) and its digest."""
    digest = hashlib.sha256(repr(files).encode()).hexdigest()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory in (DOUBLE_ETC, "etc/systemd/system/ssh.service.d"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for path, content, mode in [*files, (OVERLAY_STAMP, f"{digest}\n".encode(), 0o644)]:
            info = tarfile.TarInfo(path)
            info.mode = mode
            if isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue(), digest


def install_overlay(host: TestHost) -> bool:
    """Copy the overlay into the container unless it is already there; True if copied."""
    stream, digest = overlay_tar(overlay_files(host))
    current = docker("exec", host.name, "cat", f"/{OVERLAY_STAMP}", check=False) if inspect_running(host.name) else None
    if current is not None and current.stdout.strip() == digest:
        return False
    docker("cp", "-", f"{host.name}:/", stdin=stream)
    return True


def inspect_running(name: str) -> bool:
    """True if the container exists and runs."""
    info = inspect(name)
    return bool(info and info["State"]["Running"])


def ensure_holders(host: TestHost) -> None:
    """Start a real process for each hardware JSON process whose pid is "unit:NAME"."""
    processes = json.loads(host.hardware.read_text()).get("processes", [])
    for proc in processes:
        pid = proc["pid"]
        if not (isinstance(pid, str) and pid.startswith("unit:")):
            continue
        unit = pid.split(":", 1)[1]
        result = docker_exec(
            host.name,
            'systemctl is-active -q "$UNIT" && exit 0\n'
            'systemctl reset-failed "$UNIT" 2>/dev/null || true\n'
            'systemd-run --quiet --unit="$UNIT" '
            '--description="vllm-fleet test double: holds emulated GPU memory" "$@"',
            *HOLDER_COMMAND,
            env={"UNIT": unit},
        )
        if result.returncode != 0:
            raise HostError(f"{host.name}: could not start {unit}: {result.stderr.strip()}")


# --- SSH ---------------------------------------------------------------------------------


def ensure_key_pair(access: SshAccess) -> str:
    """Create the control machine's key pair where the inventory reads it; return the public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public_file = access.key.with_name(access.key.name + ".pub")
    if access.key.exists() and public_file.exists():
        return public_file.read_text().strip()
    access.key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    fd = os.open(access.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    line = f"{public.decode()} vllm-fleet-testhosts"
    public_file.write_text(line + "\n")
    log(f"ssh: new key pair {access.key}")
    return line


def ensure_ssh(host: TestHost, reload_units: bool) -> None:
    """Make the SSH user, authorize the current key, run sshd, and record its host key."""
    assert host.ssh is not None
    access = host.ssh
    public_key = ensure_key_pair(access)
    result = docker_exec(
        host.name,
        'id -u "$SSH_USER" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$SSH_USER"\n'
        'home=$(getent passwd "$SSH_USER" | cut -d: -f6)\n'
        'install -d -m 700 -o "$SSH_USER" -g "$SSH_USER" "$home/.ssh"\n'
        'touch "$home/.ssh/authorized_keys"\n'
        # Append, never replace: a dev tree and a CI clone may share these containers.
        'grep -qxF "$SSH_PUBKEY" "$home/.ssh/authorized_keys" || echo "$SSH_PUBKEY" >> "$home/.ssh/authorized_keys"\n'
        'chown "$SSH_USER:" "$home/.ssh/authorized_keys"; chmod 600 "$home/.ssh/authorized_keys"\n'
        'if [ "$RELOAD" = 1 ]; then systemctl daemon-reload; systemctl restart ssh; fi\n'
        "systemctl is-active -q ssh || systemctl start ssh\n"
        "cat /etc/ssh/ssh_host_ed25519_key.pub\n",
        env={"SSH_USER": access.user, "SSH_PUBKEY": public_key, "RELOAD": "1" if reload_units else "0"},
    )
    if result.returncode != 0:
        raise HostError(f"{host.name}: SSH setup failed: {result.stderr.strip()}")
    key_type, key_data = result.stdout.split()[:2]
    address = f"[{access.hostname}]:{access.port}"
    old = access.known_hosts.read_text().splitlines(keepends=True) if access.known_hosts.exists() else []
    # Keep other hosts' entries; replace this address's (a recreated host has a new key).
    new = [line for line in old if line.split(" ", 1)[0] != address] + [f"{address} {key_type} {key_data}\n"]
    if new != old:
        access.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        access.known_hosts.write_text("".join(new))
        log(f"ssh: wrote {access.known_hosts}")


# --- commands ----------------------------------------------------------------------------


@contextmanager
def machine_lock() -> Iterator[None]:
    """One manager at a time per machine: the container names are machine-wide."""
    with open(Path(tempfile.gettempdir()) / "vllm-fleet-testhosts.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def up(hosts: list[TestHost]) -> None:
    """Bring every host to: running, current image, systemd up, overlay and SSH in place."""
    key = ensure_image()
    for host in hosts:
        healthy, why = is_healthy(host, key)
        if healthy:
            changed = install_overlay(host)
            if changed:
                log(f"{host.name}: refreshed nvidia-smi double / hardware JSON / config")
                docker("exec", host.name, "systemctl", "daemon-reload")
        else:
            log(f"{host.name}: creating ({why})")
            create(host, key)
            changed = True
        if host.ssh is not None:
            ensure_ssh(host, reload_units=healthy and changed)
        ensure_holders(host)
        state = report_systemd(host)
        log(f"{host.name}: up (systemd {state})")


def down(hosts: list[TestHost]) -> None:
    """Remove the containers (the image and the cached rootfs stay)."""
    for host in hosts:
        if inspect(host.name) is not None:
            docker("rm", "-f", host.name)
            log(f"{host.name}: removed")


def status(hosts: list[TestHost]) -> int:
    """Print one line per host; exit 0 only if all are up with systemd running (no failed units)."""
    key = rootfs_key()
    ok = True
    for host in hosts:
        info = inspect(host.name)
        if info is None or not info["State"]["Running"]:
            state = "absent" if info is None else info["State"]["Status"]
            ok = False
            print(f"{host.name:10} {state}")
            continue
        systemd = systemd_state(host.name, wait=False)
        current = "current image" if info["Config"]["Labels"].get(LABEL_KEY) == key else "OUTDATED image"
        via = f"ssh {host.ssh.user}@{host.ssh.hostname}:{host.ssh.port}" if host.ssh else f"@docker/{host.name}"
        failed = f" failed units: {', '.join(failed_units(host.name))}" if systemd == "degraded" else ""
        ok = ok and systemd == "running"
        print(f"{host.name:10} running  systemd={systemd:9} {current:15} {via}{failed}")
    return 0 if ok else 1


def select(hosts: list[TestHost], names: list[str]) -> list[TestHost]:
    """The hosts named on the command line (all when none)."""
    known = {host.name: host for host in hosts}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise HostError(f"unknown host(s) {', '.join(unknown)}; inventory/ci.py has {', '.join(known)}")
    return [known[name] for name in names] if names else hosts


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down", "reset", "status"))
    parser.add_argument("names", nargs="*", help="hosts from inventory/ci.py (default: all)")
    args = parser.parse_args(argv)
    if not engine_answers():
        log("no Docker engine answers `docker info`: run ./setup (it installs Docker and starts the engine)")
        return 3
    try:
        hosts = select(load_hosts(), args.names)
        with machine_lock():
            if args.command == "status":
                return status(hosts)
            if args.command in ("down", "reset"):
                down(hosts)
            if args.command in ("up", "reset"):
                up(hosts)
    except (HostError, subprocess.TimeoutExpired) as error:
        log(f"error: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
