"""FSDP1's flat slices on one process: where a slice sits in the whole, and what cannot be read.

Two CPU processes run the real thing (``tests/distributed/test_fsdp.py``, the re-initialisation
under FSDP1 against DDP; ``tests/distributed/test_lightning_fsdp1.py``). Here one process holds
hand-made slices of a whole weight, without a collective (``sharded=False``), so that the
arithmetic of :class:`FlatSlices` is checked element by element, and the refusals are given
modules that do not hold what FSDP1 holds.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from safeloop.errors import ConfigError
from safeloop.guards.flat_slices import FlatSlices, _Slice, flat_slices
from safeloop.guards.reinit import initial_values


def _slice_of(whole: torch.Tensor, start: int, stop: int, grad: torch.Tensor | None) -> nn.Parameter:
    """A parameter that is a flat slice of ``whole`` (a copy), with ``grad`` as its gradient."""
    param = nn.Parameter(whole.reshape(-1)[start:stop].clone())
    param.grad = grad
    return param


def test_a_stuck_slice_is_found_and_gets_its_own_elements_of_the_whole_draw():
    # a (4, 5) weight of 20 elements: this process holds elements 7..16 (as FSDP1's slice would)
    weight = _slice_of(torch.zeros(4, 5), 7, 17, grad=torch.zeros(10))
    learning = _slice_of(torch.zeros(3, 2), 0, 6, grad=torch.ones(6))  # zero, but a gradient comes
    unused = _slice_of(torch.zeros(2, 2), 0, 4, grad=None)  # no gradient: not this check's
    slices = {
        id(weight): _Slice(torch.Size([4, 5]), 7),
        id(learning): _Slice(torch.Size([3, 2]), 0),
        id(unused): _Slice(torch.Size([2, 2]), 0),
    }
    checks = FlatSlices(slices, sharded=False, group=None)
    found = checks.find_zero_params([("w", weight), ("v", learning), ("u", unused)])
    assert [(z.name, z.shape, z.stuck) for z in found] == [("w", (4, 5), True), ("v", (3, 2), False)]
    assert found[1].grad_norm == pytest.approx(6**0.5)

    checks.reinit_(weight, "xavier", std=0.02, generator=torch.Generator().manual_seed(3))
    whole = initial_values((4, 5), "xavier", std=0.02, generator=torch.Generator().manual_seed(3))
    assert torch.equal(weight.detach(), whole.reshape(-1)[7:17])  # bitwise its elements of the draw


def test_an_empty_slice_counts_as_zero_without_a_gradient():
    empty = _slice_of(torch.zeros(4, 5), 0, 0, grad=None)  # another process holds the elements
    checks = FlatSlices({id(empty): _Slice(torch.Size([4, 5]), 0)}, sharded=False, group=None)
    assert checks.find_zero_params([("w", empty)]) == []  # no gradient here: left to the others


def test_a_model_that_is_not_fsdp1_or_leaves_parameters_out_is_said_so():
    model = nn.Linear(3, 2)  # no FSDP1 unit: none of its parameters is in a FlatParameter
    reason = flat_slices(model, list(model.parameters()))
    assert isinstance(reason, str)
    assert reason.startswith("2 trainable parameters are outside FSDP1's FlatParameters")


def test_fsdp1_internals_that_are_missing_refuse_the_fit_instead_of_a_wrong_norm():
    pytest.importorskip("lightning")
    from safeloop.lightning.fsdp import Fsdp1Norms, fsdp1_internals_problem

    plain = nn.Linear(3, 2)  # not an FSDP1 root: no process group, no units
    assert "process group" in fsdp1_internals_problem(plain)
    with pytest.raises(ConfigError, match="SafeLoopCallback cannot measure this FSDP1 fit"):
        Fsdp1Norms(plain, list(plain.parameters()))
