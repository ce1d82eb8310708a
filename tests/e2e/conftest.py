"""End-to-end fixtures: bring the container test hosts up once per session.

`python -m pytest` on a machine with a Docker engine and debootstrap builds and
starts the hosts itself (tests/hosts.py up); without a Docker engine the e2e
tests fail with the reason, they are never silently skipped. The hosts are left
running afterwards (reused by the next session); `python tests/hosts.py down`
removes them. They are left as they were found: a unit a test left failed
(systemd "degraded") fails the session, naming the unit.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
import pytest
from tests import hosts
from tests.e2e.harness import REPO

HERE = Path(__file__).resolve().parent
UP_TIMEOUT_S = 1200  # a cold start runs debootstrap (about a minute or two)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/e2e carries the `e2e` marker (select with -m e2e / -m 'not e2e')."""
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def test_hosts() -> Iterator[list[hosts.TestHost]]:
    """The test hosts (tests/hosts.py TestHost objects), up and with systemd running; checked clean after."""
    if not hosts.engine_answers():
        pytest.fail(
            "e2e tests need a Docker engine and none answers `docker info`: run ./setup (it installs "
            "Docker and starts the engine), see tests/README.md",
            pytrace=False,
        )
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "hosts.py"), "up"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=UP_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"tests/hosts.py up failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}", pytrace=False)
    every = hosts.load_hosts()
    yield every
    left = {host.name: units for host in every if (units := hosts.failed_units(host.name))}
    for name in left:  # the next session starts clean either way (tests/hosts.py up clears them too)
        hosts.docker("exec", name, "systemctl", "reset-failed", check=False)
    assert not left, f"the e2e tests left failed units on their hosts (each test must clean up): {left}"


@pytest.fixture(scope="session", autouse=True)
def wheelhouse():
    """The local wheelhouse (tests/e2e/wheelhouse.py), built once and served on 127.0.0.1 for the session.

    Every deploy of the test hosts installs its Python stack from it:
    group_data/ci.py pushes the directory (VLLM_FLEET_CI_WHEELHOUSE, set here);
    tests of the find-links path use the URL. Yields (directory, url).
    """
    import os

    from tests.e2e import wheelhouse as wh

    path = wh.build()
    os.environ["VLLM_FLEET_CI_WHEELHOUSE"] = str(path)
    with wh.serve(path) as url:
        yield path, url
