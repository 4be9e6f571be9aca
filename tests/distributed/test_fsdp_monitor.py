"""TrainingMonitor on sharded parameters, two ranks simulated in one process (no process group).

Each simulated rank holds a dim-0 slice of every parameter and of its gradient, as FSDP2's
``Shard(0)`` does (uneven and empty slices included). The trainer's log-step all-reduce is a
mean over processes; here it is the mean of the two ranks' vectors. The tracker values must be
those of an unsharded monitor watching the whole tensors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from safeloop.diagnostics.training import TrainingMonitor
from safeloop.guards.clipping import grad_norms

pytestmark = pytest.mark.usefixtures("one_thread")


class _Shard:
    """The part of a parameter that one rank holds: what the monitor reads of a DTensor."""

    def __init__(self, whole: nn.Parameter, rows: slice) -> None:
        self.whole, self.rows = whole, rows
        self.requires_grad = whole.requires_grad

    def numel(self) -> int:  # a DTensor's numel and dim are those of the whole parameter
        return self.whole.numel()

    def dim(self) -> int:
        return self.whole.dim()

    def detach(self) -> _Shard:
        return self

    def to_local(self) -> torch.Tensor:
        return self.whole.detach()[self.rows]  # a view: it follows the optimizer's updates


def _split(param: nn.Parameter) -> tuple[slice, slice]:
    cut = (param.shape[0] + 1) // 2  # FSDP2's Shard(0): rank 0 takes the larger half
    return slice(0, cut), slice(cut, param.shape[0])


def test_shard_norms_summed_over_ranks_give_the_unsharded_tracker_values():
    torch.manual_seed(0)
    # 16 rows split 8/8, 3 rows 2/1, and a (1, 16) weight whose second shard is empty
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3), nn.Tanh(), nn.Linear(3, 1))
    named = list(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    whole = TrainingMonitor(named, log_every=3)
    ranks = [
        TrainingMonitor(
            [(name, _Shard(p, _split(p)[rank])) for name, p in named],  # type: ignore[misc]
            log_every=3,
            shard_count=2,
        )
        for rank in (0, 1)
    ]
    gen = torch.Generator().manual_seed(1)
    compared = 0
    for step in range(1, 7):
        x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 1, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        whole.record(grad_norms(model.parameters()).per_param)
        for rank, monitor in enumerate(ranks):
            local = [p.grad[_split(p)[rank]] for _, p in named]  # type: ignore[index]
            monitor.record(torch.stack([torch.linalg.vector_norm(g) for g in local]))
        monitors = [whole, *ranks]
        if step % 3:
            optimizer.step()
            continue
        for monitor in monitors:
            monitor.before_update()
        optimizer.step()
        for monitor in monitors:
            monitor.after_update()
        expected = whole.tracker_values(whole.measurements().tolist())  # type: ignore[union-attr]
        vectors = [monitor.measurements() for monitor in ranks]
        mean = ((vectors[0] + vectors[1]) / 2).tolist()  # type: ignore[operator]
        got = ranks[0].tracker_values(mean)
        assert set(got) == set(expected) and len(got) == 6 + 3  # every tensor, every weight
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-5), key
        compared += 1
    assert compared == 2


class _FlatSlice:
    """One rank's part of a parameter under FSDP1 (``use_orig_params=True``): a flat, maybe empty, slice."""

    def __init__(self, whole: nn.Parameter, elements: slice) -> None:
        self.whole, self.elements = whole, elements
        self.requires_grad = whole.requires_grad
        self.shape = self.detach().shape  # its own shape is the slice's: 1-D

    def detach(self) -> torch.Tensor:
        return self.whole.detach().view(-1)[self.elements]  # a view: it follows the optimizer's updates


def _flat_cuts(params: list[nn.Parameter], ranks: int = 2) -> list[list[slice]]:
    """FSDP1's cut: the parameters flattened one after another, split in equal runs of elements."""
    total = sum(p.numel() for p in params)
    size = -(-total // ranks)
    cuts, start = [], 0
    for p in params:
        cuts.append(
            [
                slice(
                    min(max(r * size - start, 0), p.numel()), min(max((r + 1) * size - start, 0), p.numel())
                )
                for r in range(ranks)
            ]
        )
        start += p.numel()
    return [[c[r] for c in cuts] for r in range(ranks)]


def test_flat_slice_norms_with_whole_shapes_give_the_unsharded_tracker_values():
    torch.manual_seed(0)
    # 199 elements cut at 100: `0.weight` split 100/28, every other tensor whole on rank 1 and
    # empty on rank 0
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3), nn.Tanh(), nn.Linear(3, 1))
    named = list(model.named_parameters())
    params = [p for _, p in named]
    cuts = _flat_cuts(params)
    assert cuts[0][0] == slice(0, 100) and cuts[1][0] == slice(100, 128) and cuts[0][1] == slice(0, 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    whole = TrainingMonitor(named, log_every=3)
    ranks = [
        TrainingMonitor(
            [(name, _FlatSlice(p, cuts[rank][i])) for i, (name, p) in enumerate(named)],  # type: ignore[misc]
            log_every=3,
            shard_count=2,
            shapes=[p.shape for p in params],  # what the slices' own 1-D shapes do not tell
        )
        for rank in (0, 1)
    ]
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 4):
        x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 1, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        whole.record(grad_norms(model.parameters()).per_param)
        for rank, monitor in enumerate(ranks):
            local = [p.grad.view(-1)[cuts[rank][i]] for i, p in enumerate(params)]  # type: ignore[union-attr]
            monitor.record(torch.stack([torch.linalg.vector_norm(g) for g in local]))
        if step < 3:
            optimizer.step()
            continue
        for monitor in (whole, *ranks):
            monitor.before_update()
        optimizer.step()
        for monitor in (whole, *ranks):
            monitor.after_update()
    expected = whole.tracker_values(whole.measurements().tolist())  # type: ignore[union-attr]
    vectors = [monitor.measurements() for monitor in ranks]
    got = ranks[0].tracker_values(((vectors[0] + vectors[1]) / 2).tolist())  # type: ignore[operator]
    assert set(got) == set(expected) and len(got) == 6 + 3  # every tensor, every 2-D weight
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key


def test_whole_shapes_must_match_the_parameters():
    with pytest.raises(ValueError, match="1 shapes for 2 parameters"):
        TrainingMonitor(nn.Linear(2, 2).named_parameters(), shapes=[torch.Size([2, 2])])
