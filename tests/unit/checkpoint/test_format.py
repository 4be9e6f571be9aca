"""State <-> safetensors and JSON round trips, for each kind of training state."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from safeloop import CheckpointError
from safeloop.checkpoint.format import (
    capture_rng,
    join_state,
    restore_rng,
    split_state,
    tensors_from_bytes,
    tensors_to_bytes,
)


def _round_trip(state, what):
    tree, tensors = split_state(state, what)
    data, aliases = tensors_to_bytes(tensors)
    tree = json.loads(json.dumps(tree))  # what goes to disk is plain JSON
    return join_state(tree, tensors_from_bytes(data, aliases))


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b) and a.dtype == b.dtype
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b and type(a) is type(b)


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_state_round_trips_exactly_and_loads_back(fused):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95), fused=fused)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    state = opt.state_dict()
    restored = _round_trip(state, "optimizer")
    _assert_same(state, restored)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    fresh.load_state_dict(restored)
    assert fresh.param_groups[0]["betas"] == (0.8, 0.95) or list(fresh.param_groups[0]["betas"]) == [
        0.8,
        0.95,
    ]


def test_sgd_momentum_and_scheduler_state_round_trip():
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    sched.step()
    _assert_same(opt.state_dict(), _round_trip(opt.state_dict(), "optimizer"))
    _assert_same(sched.state_dict(), _round_trip(sched.state_dict(), "lr_scheduler"))


def test_non_finite_floats_survive_json():
    state = {"best": float("inf"), "worst": float("-inf"), "nan": float("nan"), "n": 3}
    _assert_same(state, _round_trip(state, "guard"))


def test_tied_weights_are_stored_once_and_come_back_shared():
    embedding = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight
    state = {"embedding.weight": embedding.weight, "head.weight": head.weight}
    data, aliases = tensors_to_bytes(state)
    assert aliases == {"head.weight": "embedding.weight"}
    loaded = tensors_from_bytes(data, aliases)
    assert torch.equal(loaded["head.weight"], embedding.weight.detach())
    assert loaded["head.weight"] is loaded["embedding.weight"]


def test_values_that_need_pickle_are_reported_with_their_path():
    state = {"lr_lambdas": [lambda step: 1.0], "groups": [{"fn": object()}]}
    with pytest.raises(CheckpointError) as excinfo:
        split_state(state, "lr_scheduler")
    message = str(excinfo.value)
    assert "2 values" in message and "lr_scheduler.lr_lambdas[0]" in message
    assert "lr_scheduler.groups[0].fn" in message and "without pickle" in message


def test_rng_states_round_trip_so_the_next_draws_repeat():
    tree, tensors = capture_rng()
    tree = json.loads(json.dumps(tree))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    data, aliases = tensors_to_bytes(tensors)
    restore_rng(tree, tensors_from_bytes(data, aliases))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[0] == again[0] and expected[1] == again[1] and torch.equal(expected[2], again[2])
