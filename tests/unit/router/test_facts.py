"""RouterState: its command run on this machine as pyinfra runs it on a host, and process() on what it prints.

The case that broke CI (2b3e741): on a fresh host nginx is not installed, `dpkg-query` prints nothing, and the
fact said nginx was there (an empty version); the deploy skipped the install and the front's unit failed."""

from __future__ import annotations

import subprocess

import pytest

from vllm_fleet.router.facts import RouterState

UNITS = {"venv": "/nonexistent/router/venv-0.1.17", "unit": "vllm-router.service",
         "prober": "vllm-router-prober.service", "front": "vllm-router-front.service"}


def _run(command: str) -> list[str]:
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()


def _installed(package: str) -> bool:
    return subprocess.run(["dpkg-query", "-W", package], capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(_installed("nginx"), reason="this machine has nginx installed: the not-installed case needs one without")
def test_a_host_without_nginx_is_read_as_without_it() -> None:
    fact = RouterState()
    out = fact.process(_run(fact.command(**UNITS)))
    assert out["nginx"] is None, out
    assert out["version"] is None, out


@pytest.mark.parametrize(("line", "nginx"), [
    ("nginx=installed 1.22.1-9+deb12u11", "1.22.1-9+deb12u11"),  # Debian 12's, as read on a test host
    ("nginx=", None),  # dpkg-query knows no such package: it prints nothing on stdout
    ("nginx=config-files 1.22.1-9+deb12u11", None),  # removed, its conffiles left
    ("nginx=not-installed ", None),
])
def test_only_an_installed_nginx_counts(line: str, nginx: str | None) -> None:
    assert RouterState().process([line, "router_active=inactive"])["nginx"] == nginx


def test_the_package_query_line_is_what_process_reads() -> None:
    """The command's nginx line for a package that is installed here (bash), read back through process()."""
    command = RouterState().command(**UNITS).replace("' nginx", "' bash")
    lines = _run(command)
    assert any(line.startswith("nginx=installed ") for line in lines), lines
    assert RouterState().process(lines)["nginx"], lines
