"""The typed values the steps hand each other (vllm_fleet/handoff.py)."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest

from vllm_fleet import handoff
from vllm_fleet.handoff import Changed, HostState, ModelSource, Venv, WeightsResult, any_changed


class _Op:
    def __init__(self, changed: bool):
        self.changed = changed

    def did_change(self) -> bool:
        return self.changed


def test_weights_result_says_changed_only_from_its_operation():
    assert WeightsResult().did_change() is False
    assert WeightsResult(_Op(False)).did_change() is False
    assert WeightsResult(_Op(True)).did_change() is True
    assert WeightsResult().ready and WeightsResult().reason == ""


def test_any_changed_ignores_none_and_is_lazy():
    op = _Op(False)
    check = any_changed(None, op, None)
    assert check() is False
    op.changed = True  # evaluated when pyinfra calls it (after the operations ran), not when built
    assert check() is True
    assert any_changed()() is False


def test_pyinfra_operation_meta_is_a_changed():
    from pyinfra.api.operation import OperationMeta

    assert issubclass(OperationMeta, Changed)


@pytest.mark.parametrize("cls", [ModelSource, HostState, Venv, WeightsResult])
def test_handoffs_are_frozen(cls):
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen


def test_steps_take_and_return_the_handoff_types():
    from vllm_fleet.preflight import step as preflight
    from vllm_fleet.pyenv import step as pyenv
    from vllm_fleet.service import step as service
    from vllm_fleet.weights import step as weights

    assert typing.get_type_hints(preflight.run)["model"] is ModelSource
    assert typing.get_type_hints(preflight.run)["return"] is HostState
    assert typing.get_type_hints(weights.source)["return"] is ModelSource
    assert typing.get_type_hints(pyenv.apply)["return"] is Venv
    # @deploy wraps the functions; the wrapped signature is what deploy.py calls
    w = inspect.unwrap(weights.apply)
    assert typing.get_type_hints(w)["return"] is WeightsResult
    s = typing.get_type_hints(inspect.unwrap(service.apply))
    assert s["weights"] is WeightsResult and s["venv"] == typing.Optional[Venv]
    assert s["state"] is HostState
