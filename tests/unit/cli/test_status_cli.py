"""`vllm-fleet status` without hosts: rows in inventory order, numbers in --json, the width of the text.

The pyinfra part (`status_cli._gather`: connect, run the gate's `status` on each
host) is replaced by fake gate answers; everything after it is the real code.
"""

from __future__ import annotations

import json
import random

import pytest
from rich.cells import cell_len

from vllm_fleet.cli import status as status_cli
from vllm_fleet.cli.main import main

# Inventory order, as make_inventory yields the hosts.
INVENTORY = ["@docker/fleet-a", "@docker/fleet-b", "fleet-c", "gpu-07.example.internal", "gpu-08.example.internal"]


def _gate(restarts: object = 0, used: object = "32768", gpus: int = 4, health: int = 200) -> dict:
    """A gate `status` answer as an installed gate sends it: nvidia-smi's MiB as text."""
    return {
        "unit": "active/running", "restarts": restarts, "uptime_s": 5025.3, "health": health,
        "version": "0.25.0", "model": "tiny-minimax-m2",
        "gpus": [{"index": i, "used_mib": used, "total_mib": "81559"} for i in range(gpus)],
        "last_gate": {"ok": True, "finished": 1767225600.0, "message": "healthy"},
    }


ANSWERS = {
    "@docker/fleet-a": _gate(gpus=8),
    "@docker/fleet-b": _gate(restarts="3", used="[N/A]", gpus=2),
    "fleet-c": {"unit": "not installed"},
    "gpu-07.example.internal": {"error": "vllm_model: unknown profile 'minimax-m3' [see docs/settings.md]"},
    # gpu-08 did not connect: no answer at all
}


def _shuffled(seed: int) -> dict[str, dict]:
    """The answers in the order pyinfra's set of active hosts happens to give them."""
    names = list(ANSWERS)
    random.Random(seed).shuffle(names)
    return {name: ANSWERS[name] for name in names}


@pytest.mark.parametrize("seed", range(5))
def test_rows_follow_inventory_order(seed: int) -> None:
    answers = _shuffled(seed)
    rows = status_cli.in_inventory_order(INVENTORY, answers)
    assert list(rows) == INVENTORY
    assert rows["gpu-08.example.internal"] == {"error": "could not connect"}
    assert rows["fleet-c"] == {"unit": "not installed"}


def test_shuffled_answers_are_shuffled() -> None:
    """The order test above would prove nothing if the fakes came in inventory order."""
    assert any(list(_shuffled(seed)) != list(ANSWERS) for seed in range(5))


@pytest.fixture
def fake_gather(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(status_cli, "_gather", lambda inventory, limit: (INVENTORY, _shuffled(3)))


def test_json_lines_in_order_with_numbers(fake_gather: None, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["status", "inventory/ci.py", "--json"])
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 1  # not every host is healthy
    assert [d["host"] for d in docs] == INVENTORY
    a, b = docs[0], docs[1]
    assert a["restarts"] == 0 and a["health"] == 200 and a["uptime_s"] == 5025.3
    assert a["gpus"][7] == {"index": 7, "used_mib": 32768, "total_mib": 81559}
    assert b["restarts"] == 3  # sent as text
    assert b["gpus"][0]["used_mib"] is None and b["gpus"][0]["total_mib"] == 81559  # "[N/A]": no number
    for doc in docs:
        for key in ("restarts", "uptime_s", "health"):
            assert key not in doc or doc[key] is None or type(doc[key]) in (int, float), (doc["host"], key)
        for gpu in doc.get("gpus", []):
            assert all(v is None or type(v) is int for v in gpu.values()), gpu


def test_exit_0_only_when_all_healthy(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(status_cli, "_gather", lambda inventory, limit: (["a", "b"], {"b": _gate(), "a": _gate()}))
    assert main(["status", "inventory/ci.py", "--json"]) == 0
    monkeypatch.setattr(status_cli, "_gather", lambda inventory, limit: (["a", "b"], {"a": _gate()}))
    assert main(["status", "inventory/ci.py"]) == 1
    assert "could not connect" in capsys.readouterr().out


@pytest.mark.parametrize("width", [80, 100])
def test_text_fits_the_terminal(width: int, fake_gather: None, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", str(width))
    main(["status", "inventory/ci.py"])
    out = capsys.readouterr().out
    too_wide = [line for line in out.splitlines() if cell_len(line) > width]
    assert not too_wide, "\n".join(too_wide)
    # one block per host, titled by its whole name, in inventory order
    assert [out.index(f"\n{name} ") for name in INVENTORY] == sorted(out.index(f"\n{name} ") for name in INVENTORY)
    assert "[see docs/settings.md]" in out  # no rich markup taken from what a host sends
    assert "restarts" in out and "could not connect" in out


def test_wide_terminal_gets_one_table(fake_gather: None, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "160")
    main(["status", "inventory/ci.py"])
    lines = capsys.readouterr().out.splitlines()
    assert all(cell_len(line) <= 160 for line in lines)
    header = next(line for line in lines if "restarts" in line)
    assert "host" in header and "last gate" in header
    firsts = [next(i for i, line in enumerate(lines) if f" {name} " in line) for name in INVENTORY]
    assert firsts == sorted(firsts)
    assert "0:32768/81559" in lines[firsts[0]] and "0:?/81559" in lines[firsts[1]]


@pytest.mark.parametrize("row,loop", [
    ({"unit": "activating/auto-restart", "restarts": 4, "uptime_s": None}, True),   # between two tries
    ({"unit": "activating/start", "restarts": 2, "uptime_s": None}, True),          # trying again
    ({"unit": "active/running", "restarts": 5, "uptime_s": 40.0}, True),            # up briefly after many restarts
    ({"unit": "active/running", "restarts": 5, "uptime_s": 7200.0}, False),         # recovered long ago
    ({"unit": "active/running", "restarts": 1, "uptime_s": 30.0}, False),           # one crash, back
    ({"unit": "activating/start", "restarts": 0, "uptime_s": None}, False),         # a first start
    ({"unit": "failed/failed", "restarts": 0, "uptime_s": None}, False),
])
def test_a_restart_loop_is_named(row: dict, loop: bool) -> None:
    from vllm_fleet.cli.status import _cells, in_inventory_order

    rows = in_inventory_order(["h"], {"h": row})
    assert rows["h"]["restart_loop"] is loop
    assert _cells("h", rows["h"])[5].endswith(" (restart loop)") is loop
