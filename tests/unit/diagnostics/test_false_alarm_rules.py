"""The rules that keep healthy runs quiet, each next to the fault it must still find.

A slow descent under minibatch noise is no plateau, a flat or climbing loss still is; tiny updates
at the end of an annealed schedule, or of a converged loss, are no low learning rate, a tiny
constant learning rate still is; an embedding table's rows without gradient are no dead units, a
Linear layer's still are.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from safeloop.diagnostics.health import WeightHealth, lookup_tables
from safeloop.diagnostics.plateau import LossPlateau
from safeloop.diagnostics.updates import LR_LOW_RATIO, Cause, UpdateSize


def _intervals(level, checks: int, noise: float, steps: int = 10, seed: int = 0) -> list[list[float]]:
    """Per-step losses of ``checks`` log intervals around ``level(check)``, Gaussian step noise."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(checks):
        base = level(i)
        out.append([base * (1 + noise * float(torch.randn((), generator=gen))) for _ in range(steps)])
    return out


def _plateaus(intervals: list[list[float]], window: int = 10) -> list[int]:
    plateau = LossPlateau(log_every=10, window=window)
    return [i for i, losses in enumerate(intervals) if plateau.update(losses)]


# -- loss-plateau ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_a_slow_descent_under_minibatch_noise_is_no_plateau(seed):
    # 1.6 -> 1.28 in 20 checks, then 3% per window of 10 checks down to 0.87 at check 150, with
    # 15% noise per step (5% per check mean): "no new best by 1% in 10 checks" calls this flat
    def level(i: int) -> float:
        return 0.9 + 0.7 * 0.97**i if i < 20 else (0.9 + 0.7 * 0.97**20) * 0.997 ** (i - 20)

    intervals = _intervals(level, 150, 0.15, seed=seed)
    assert _plateaus(intervals) == []


def test_a_noisy_flat_loss_is_still_a_plateau():
    flat = _plateaus(_intervals(lambda i: 1.4, 80, 0.15))
    assert flat and flat[0] <= 40  # later than a noiseless one, but found


def test_a_noiseless_flat_loss_is_a_plateau_after_one_window():
    assert _plateaus([[2.0]] * 12, window=5)[0] == 5


def test_a_loss_that_halved_then_climbs_back_is_reported():
    # learned (1.0 -> 0.3), then diverges slowly: the run's best is far below half its start,
    # yet the loss now is not converged but rising
    climbing = _intervals(lambda i: max(1.0 * 0.9**i, 0.3) * (1.08 ** max(0, i - 15)), 60, 0.05)
    found = _plateaus(climbing)
    assert found and found[0] < 40
    converged = _intervals(lambda i: max(1.0 * 0.9**i, 0.3), 60, 0.05)
    assert _plateaus(converged) == []


def _first_plateau(intervals: list[list[float]]) -> tuple[LossPlateau, int]:
    plateau = LossPlateau(log_every=10, window=10)
    found = [i for i, losses in enumerate(intervals) if plateau.update(losses)]
    assert found, "no plateau found"
    return plateau, (found[0] + 1) * 10


def test_a_flat_loss_after_a_large_drop_with_no_measured_cause_is_convergence_not_a_warning():
    # a noisy regression settling at its noise floor, 0.97 -> 0.64 (above half its start)
    plateau, step = _first_plateau(_intervals(lambda i: max(0.97 * 0.95**i, 0.64), 80, 0.1))
    finding = plateau.finding(step, [])
    assert finding.severity == "info" and "converged" in finding.message
    assert "fell 3" in finding.message  # by about a third
    # the same plateau with a measured cause is a warning that names it first
    cause = Cause(0, "lr-too-low", "median update-to-weight ratio 1e-08", ("w",), "Multiply the lr.")
    ranked = plateau.finding(step, [cause])
    assert ranked.severity == "warning" and "1) lr-too-low" in ranked.message
    # ... and so is one where per-parameter statistics were not measured
    assert plateau.finding(step, [], measured=False).severity == "warning"


def test_a_flat_loss_that_never_fell_far_is_a_warning_even_without_a_cause():
    # stuck near the untrained loss (the label prior): 1.4 -> 1.2 and flat
    plateau, step = _first_plateau(_intervals(lambda i: max(1.4 * 0.98**i, 1.2), 80, 0.1))
    finding = plateau.finding(step, [])
    assert finding.severity == "warning" and "No measured cause" in finding.message


# -- lr-too-low ------------------------------------------------------------------------------


def _judge(ratio: float, lrs: list[float], losses: list[float]) -> list[str]:
    updates = UpdateSize()
    found = []
    for step, (lr, loss) in enumerate(zip(lrs, losses, strict=True), 1):
        found += [f.code for f in updates.judge(step * 10, {"w": ratio}, [loss] * 10, lr)]
    return found


def test_tiny_updates_at_a_constant_tiny_lr_are_lr_too_low():
    assert _judge(LR_LOW_RATIO / 10, [1e-8] * 6, [1.0] * 6) == ["lr-too-low"]


def test_tiny_updates_once_the_schedule_annealed_the_lr_are_not():
    lrs = [0.1, 0.1, 0.1, 1e-3, 1e-4, 1e-5, 1e-6]  # the end of a cosine or step schedule
    losses = [1.0, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8]
    assert _judge(LR_LOW_RATIO / 10, lrs, losses) == []


def test_tiny_updates_of_a_converged_loss_are_not():
    # SGD near a minimum: the gradient, so the step, shrinks with the loss at a constant lr
    assert _judge(LR_LOW_RATIO / 10, [0.05] * 7, [1.0, 0.2, 0.01, 0.01, 0.01, 0.01, 0.01]) == []


# -- dead-units ------------------------------------------------------------------------------


class _Tagger(nn.Module):
    def __init__(self, vocab: int = 1000, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(self.embed(tokens))))


def _dead_units(model: _Tagger, tables: list[str]) -> list[tuple[str, ...]]:
    health = WeightHealth(model.named_parameters(), lookup_tables=tables)
    gen = torch.Generator().manual_seed(0)
    found = []
    for step in range(1, 5):
        tokens = torch.randint(0, 50, (16,), generator=gen)  # 50 of 1000 rows of the table in use
        model.zero_grad()
        model(tokens).sum().backward()
        health.capture_gradients()
        found += [
            f.params for f in health.check(step, health.measurements().tolist()) if f.code == "dead-units"
        ]
    return found


def test_rows_of_an_embedding_table_without_gradient_are_no_dead_units():
    torch.manual_seed(0)
    model = _Tagger()
    assert lookup_tables(model) == ["embed.weight"]
    assert _dead_units(model, lookup_tables(model)) == []
    assert _dead_units(model, []) == [("embed.weight",)]  # what the check said without the list


def test_dead_relu_units_are_still_reported_next_to_an_embedding_table():
    torch.manual_seed(0)
    model = _Tagger()
    with torch.no_grad():
        model.fc.bias.fill_(-100.0)  # every unit of fc is dead: `out` gets no gradient through it
    found = _dead_units(model, lookup_tables(model))
    assert ("fc.weight",) in found and ("embed.weight",) not in found


def test_a_tied_head_shares_the_table_and_is_listed_once():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    assert lookup_tables(model) == ["0.weight"]
