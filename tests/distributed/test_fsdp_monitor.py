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
