"""Units and accounts the toolkit did not create are never taken over unless an adopt setting says so.

The facts come in the snapshot's round trip (`HostSnapshot(units=..., user=...)`, the "ownership"
section); the check is pure (`checks.check_ownership`).
"""

from __future__ import annotations

import subprocess

import pytest

from tests.unit.preflight.test_preflight import snapshot
from vllm_fleet.layout import ACCOUNT_COMMENT, UNIT_MARK
from vllm_fleet.preflight import checks
from vllm_fleet.preflight.facts import HostSnapshot, ownership_section
from vllm_fleet.preflight.parse import parse_snapshot
from vllm_fleet.settings import load_settings

S = load_settings({})
UNITS = ("vllm", "vllm-fetch")
OURS_HOME = S.data_dir


def _section(*lines: str) -> list[str]:
    return ["@@vllm-fleet@@ begin ownership", *lines, "@@vllm-fleet@@ end ownership rc=0"]


def test_the_ownership_section_parses_unit_files_and_the_account():
    from vllm_fleet.preflight.parse import SECTION_MARK

    out = [ln.replace("@@vllm-fleet@@", SECTION_MARK) for ln in _section(
        "unit vllm.service ours /etc/systemd/system/vllm.service",
        "unit vllm.service foreign /lib/systemd/system/vllm.service",
        "passwd vllm:x:998:998:vllm-fleet service user:/var/lib/vllm-fleet:/usr/sbin/nologin")]
    snap = parse_snapshot(out)
    assert snap.unit_files == {"vllm.service": [("/etc/systemd/system/vllm.service", True),
                                                ("/lib/systemd/system/vllm.service", False)]}
    assert snap.account == ("vllm", "x", "998", "998", ACCOUNT_COMMENT, "/var/lib/vllm-fleet", "/usr/sbin/nologin")


def test_the_section_runs_here_and_reads_a_real_account():
    """Run on this machine: no vllm-fleet-probe unit exists; root's passwd entry is read."""
    out = subprocess.run(["sh", "-c", "export LC_ALL=C; " + ownership_section(["vllm-fleet-probe-no-such-unit"], "root")],
                         capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()
    snap = parse_snapshot(out)
    assert snap.unit_files == {}
    assert snap.account is not None and snap.account[0] == "root" and snap.account[2] == "0"
    problems, _ = checks.check_ownership(S, snap, ["vllm-fleet-probe-no-such-unit"])
    assert problems and "uid 0" in problems[0]


def test_the_snapshot_asks_only_when_told():
    assert "ownership" not in HostSnapshot().command(["/tmp"])
    assert "getent passwd vllm" in HostSnapshot().command(["/tmp"], units=["vllm"], user="vllm")


def test_the_templates_carry_the_mark_in_their_first_lines():
    from pathlib import Path

    import vllm_fleet

    root = Path(vllm_fleet.__file__).parent
    for t in (root / "service/templates/vllm.service.j2", root / "weights/templates/vllm-fetch.service.j2"):
        assert UNIT_MARK in "".join(t.read_text().splitlines(True)[:3]), t


def test_a_bare_host_and_our_own_things_pass():
    assert checks.check_ownership(S, snapshot(), UNITS) == ([], [])
    ours = snapshot(unit_files={"vllm.service": [("/etc/systemd/system/vllm.service", True)]},
                    account=("vllm", "x", "998", "998", ACCOUNT_COMMENT, "/srv/other", "/usr/sbin/nologin"))
    assert checks.check_ownership(S, ours, UNITS) == ([], [])
    legacy = snapshot(account=("vllm", "x", "998", "998", "", OURS_HOME, "/usr/sbin/nologin"))
    assert checks.check_ownership(S, legacy, UNITS) == ([], [])


@pytest.mark.parametrize("files", [[("/lib/systemd/system/vllm.service", False)],
                                   [("/etc/systemd/system/vllm.service", False)],
                                   [("/etc/systemd/system/vllm.service", True), ("/lib/systemd/system/vllm.service", False)]])
def test_a_unit_the_toolkit_did_not_render_is_refused_unless_adopted(files):
    snap = snapshot(unit_files={"vllm.service": files})
    problems, notes = checks.check_ownership(S, snap, UNITS)
    assert len(problems) == 1 and not notes
    assert "not rendered by vllm-fleet" in problems[0] and "vllm_service_name" in problems[0]
    assert "vllm_adopt_existing_unit = True" in problems[0]
    problems, notes = checks.check_ownership(load_settings({"vllm_adopt_existing_unit": True}), snap, UNITS)
    assert not problems and "takes it over" in notes[0]


@pytest.mark.parametrize(("account", "kind"), [
    (("vllm", "x", "1000", "1000", "Val L. M.,,,", "/" + "home" + "/vllm", "/bin/bash"), "a login account"),
    (("vllm", "x", "33", "33", "www-data", "/var/www", "/usr/sbin/nologin"), "a system account"),
    (("vllm", "x", "998", "998", "", "/var/lib/other", "/bin/false"), "a system account"),
])
def test_an_account_the_toolkit_did_not_create_is_refused_unless_adopted(account, kind):
    snap = snapshot(account=account)
    problems, notes = checks.check_ownership(S, snap, UNITS)
    assert len(problems) == 1 and kind in problems[0] and "vllm_adopt_existing_user = True" in problems[0]
    assert "vllm_service_user" in problems[0]
    problems, notes = checks.check_ownership(load_settings({"vllm_adopt_existing_user": True}), snap, UNITS)
    assert not problems and "vllm_adopt_existing_user = True" in notes[0]


def test_a_uid_0_account_is_never_adopted():
    snap = snapshot(account=("vllm", "x", "0", "0", "", "/root", "/bin/bash"))
    problems, _ = checks.check_ownership(load_settings({"vllm_adopt_existing_user": True}), snap, UNITS)
    assert problems and "uid 0" in problems[0]


def test_every_unit_the_toolkit_writes_for_the_service_is_checked():
    """The names come from HostLayout (the same the steps and uninstall use), not from formatted strings."""
    from vllm_fleet.layout import HostLayout

    lay = HostLayout.of(S)
    units = lay.units
    for path in (lay.unit_path, lay.fetch_unit_path, lay.watchdog_unit_path, lay.devices_unit_path,
                 lay.router_unit_path, lay.prober_unit_path, lay.front_unit_path):
        assert path.rsplit("/", 1)[1].removesuffix(".service") in units, path
    assert lay.gate_unit.removesuffix(".service") in units
    assert len(set(units)) == len(units) == 8


@pytest.mark.parametrize("unit", ["vllm-watchdog", "vllm-devices", "vllm-fleet-gate-vllm", "vllm-router",
                                  "vllm-router-prober", "vllm-router-front"])
def test_a_foreign_companion_unit_is_refused_unless_adopted(unit):
    from vllm_fleet.layout import HostLayout

    snap = snapshot(unit_files={f"{unit}.service": [(f"/etc/systemd/system/{unit}.service", False)]})
    problems, notes = checks.check_ownership(S, snap, HostLayout.of(S).units)
    assert len(problems) == 1 and f"unit {unit}.service already exists" in problems[0] and not notes
    problems, notes = checks.check_ownership(load_settings({"vllm_adopt_existing_unit": True}), snap, HostLayout.of(S).units)
    assert not problems and "takes it over" in notes[0]


def test_the_preflight_step_reads_and_checks_the_layouts_units():
    """The step's snapshot asks for every unit of HostLayout.units (one round trip; `run` checks the same)."""
    from vllm_fleet.handoff import ModelSource
    from vllm_fleet.layout import HostLayout
    from vllm_fleet.preflight import step

    read = step._snapshot_read(S, ModelSource(local_dir=None, serve_path="", fetch=None))
    assert dict(read.kwargs)["units"] == HostLayout.of(S).units


def test_the_companion_templates_carry_the_mark_in_their_first_lines():
    from pathlib import Path

    import vllm_fleet

    root = Path(vllm_fleet.__file__).parent
    for t in [*(root / "service/templates").glob("*.service.j2"), *(root / "router/templates").glob("*.service.j2")]:
        assert UNIT_MARK in "".join(t.read_text().splitlines(True)[:3]), t
