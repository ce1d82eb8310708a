"""`read_once`: a fact several steps need is read once per run (pyinfra 3.10 reads it again on every call)."""

from __future__ import annotations

from pyinfra.facts.server import Home

from tests.unit.fakerun import fake_run
from vllm_fleet.hostops.facts import read_once


def test_read_once_per_run_and_arguments():
    run = fake_run({}, lambda cls, args, kwargs: "/srv/deploy")
    with run.context():
        assert read_once(run.host, Home, _sudo=False) == "/srv/deploy"
        assert read_once(run.host, Home, _sudo=False) == "/srv/deploy"
        read_once(run.host, Home, _sudo=True)  # other arguments: another read
    assert run.count("Home") == 2
    other = fake_run({}, lambda cls, args, kwargs: "/srv/other")
    with other.context():
        assert read_once(other.host, Home, _sudo=False) == "/srv/other"  # another run reads again
