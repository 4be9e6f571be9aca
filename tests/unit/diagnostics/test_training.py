"""TrainingMonitor driven by real tiny trainings, the way the trainer drives it.

Each run is a hand-written loop: per step the monitor only records device tensors; on log steps
it measures the update around ``optimizer.step()`` and is checked with one host read, as in
``log_step.LogStep.run``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from safeloop.diagnostics.plateau import LossPlateau
from safeloop.diagnostics.training import TrainingMonitor
from safeloop.guards.clipping import grad_norms
from safeloop.results import Finding

pytestmark = pytest.mark.usefixtures("one_thread")


def train(model, optimizer, batches, loss_fn, steps, log_every=10, on_step=None, **options):
    """Train ``steps`` steps; return (findings, monitor, tracker values of the last log)."""
    monitor = TrainingMonitor(model.named_parameters(), log_every=log_every, **options)
    findings: list[Finding] = []
    losses, norms_seen, tracker = [], [], {}
    for step in range(steps):
        if on_step is not None:
            on_step(step)
        inputs, targets = batches(step)
        loss = loss_fn(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norms = grad_norms(model.parameters())
        monitor.record(None if options.get("sharded") else norms.per_param, norms.total)
        losses.append(loss.detach())
        norms_seen.append(norms.total)
        log_step = (step + 1) % log_every == 0
        if log_step:
            monitor.before_update()
        optimizer.step()
        if log_step:
            monitor.after_update()
            vector = monitor.measurements()
            # the trainer's one read: metrics and measurements together
            metrics = torch.stack(losses + norms_seen)
            flat = (metrics if vector is None else torch.cat([metrics, vector])).tolist()
            per_step, values = flat[: 2 * len(losses)], flat[2 * len(losses) :]
            new = monitor.check(
                step + 1,
                values,
                losses=per_step[: len(losses)],
                grad_norms=per_step[len(losses) :],
                lr=optimizer.param_groups[0]["lr"],
                context=findings,
            )
            findings += new
            tracker = monitor.tracker_values(values)
            losses, norms_seen = [], []
    return findings, monitor, tracker


def classification(n=512, features=20, classes=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    y = (x @ torch.randn(features, classes, generator=gen)).argmax(1)
    return x, y


def minibatches(x, y, batch_size=64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def batch(step):
        index = torch.randint(0, len(x), (batch_size,), generator=gen)
        return x[index], y[index]

    return batch


def mlp(features=20, width=64, classes=4):
    return nn.Sequential(
        nn.Linear(features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes)
    )


def deep_linear(depth=10, width=16):
    layers = [nn.Linear(width, width, bias=False) for _ in range(depth)]
    for layer in layers:
        nn.init.orthogonal_(layer.weight)
    return nn.Sequential(*layers)


def codes(findings):
    return [f.code for f in findings]


# -- faults are found and named -------------------------------------------------------------


def test_deep_sigmoid_mlp_reports_vanishing_gradients_in_first_layers():
    torch.manual_seed(0)
    layers = [nn.Linear(20, 16), nn.Sigmoid()]
    for _ in range(18):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(16, 4))
    x, y = classification()
    findings, _, _ = train(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        minibatches(x, y),
        nn.functional.cross_entropy,
        steps=60,
        log_every=5,
        plateau_window=5,
    )
    vanishing = [f for f in findings if f.code == "vanishing-grad"]
    assert vanishing, findings
    assert vanishing[0].params[:3] == ("0.weight", "2.weight", "4.weight")  # the first layers
    named = {name for f in vanishing for name in f.params}
    assert not named & {"36.weight", "38.weight", "40.weight"}  # the last layers are fed fine
    assert "`0.weight`" in vanishing[0].message and "sigmoid" in vanishing[0].message
    plateau = [f for f in findings if f.code == "loss-plateau"]
    assert len(plateau) == 1 and "1) vanishing-grad" in plateau[0].message
    assert not {"lr-too-low", "lr-too-high", "exploding-grad"} & set(codes(findings))


def test_tiny_learning_rate_reports_lr_too_low_and_a_plateau_ranking_it_first():
    torch.manual_seed(0)
    model = mlp()
    x, y = classification()
    findings, _, tracker = train(
        model,
        torch.optim.Adam(model.parameters(), lr=1e-8),
        minibatches(x, y),
        nn.functional.cross_entropy,
        steps=60,
        log_every=5,
        plateau_window=5,
    )
    assert codes(findings) == ["lr-too-low", "loss-plateau"]
    low, plateau = findings
    assert set(low.params) == {"0.weight", "2.weight", "4.weight"}
    assert "lr 1e-08" in low.message and "1e+04" in low.suggestion  # 1e-8 * 1e4 gives a ~1e-3 ratio
    assert "Measured causes, most likely first: 1) lr-too-low" in plateau.message
    assert all(tracker[f"update_ratio/{n}"] < 1e-6 for n in low.params)


def test_dead_relu_network_plateaus_with_missing_gradients_ranked_first():
    torch.manual_seed(0)
    model = mlp()
    with torch.no_grad():
        model[2].bias.fill_(-100.0)  # every unit of the second layer is dead from the start
    x, y = classification()
    findings, _, _ = train(
        model,
        torch.optim.Adam(model.parameters(), lr=1e-3),
        minibatches(x, y),
        nn.functional.cross_entropy,
        steps=60,
        log_every=5,
        plateau_window=5,
    )
    assert codes(findings) == ["loss-plateau"]
    assert "1) no-gradient: 5 trainable parameters" in findings[0].message
    assert findings[0].params == ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight")


def test_learning_rate_far_too_high_with_sgd_reports_lr_too_high():
    torch.manual_seed(0)
    model = mlp()
    x, y = classification()
    findings, _, _ = train(
        model,
        torch.optim.SGD(model.parameters(), lr=10.0),
        minibatches(x, y),
        nn.functional.cross_entropy,
        steps=30,
    )
    assert codes(findings) == ["lr-too-high"]
    assert findings[0].params and set(findings[0].params) <= {"0.weight", "2.weight", "4.weight"}
    assert "lr 10" in findings[0].message and "1e-03" in findings[0].suggestion


@pytest.mark.parametrize("sharded", [False, True])
def test_weights_scaled_up_mid_run_report_exploding_gradients(sharded):
    torch.manual_seed(0)
    model = deep_linear()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 16, generator=gen), torch.randn(128, 16, generator=gen)

    def scale_up(step):
        if step == 45:  # weights grow 1.6x per layer: ~110x through 10 layers
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.6)

    findings, monitor, tracker = train(
        model,
        torch.optim.SGD(model.parameters(), lr=1e-3),
        lambda step: (x, y),
        nn.functional.mse_loss,
        steps=50,
        on_step=scale_up,
        sharded=sharded,
    )
    assert codes(findings) == ["exploding-grad"]
    assert "at step 46" in findings[0].message and "running median" in findings[0].message
    if sharded:  # per-parameter norms unknown: the global check still works, without names
        assert findings[0].params == () and tracker == {} and monitor.measurements() is None
    else:
        assert len(findings[0].params) == 3 and "0.weight" in findings[0].message


def test_first_layer_gradient_far_above_the_last_reports_exploding_gradients():
    model = mlp()
    monitor = TrainingMonitor(model.named_parameters(), log_every=1)
    findings = []
    for step in range(1, 8):
        # 0.weight, 0.bias, 2.weight, 2.bias, 4.weight, 4.bias: first weight 100x the last
        monitor.record(torch.tensor([100.0, 1.0, 10.0, 1.0, 1.0, 1.0]))
        values = monitor.measurements().tolist()
        findings += monitor.check(step, values, losses=[1.0], grad_norms=[100.0])
    assert codes(findings) == ["exploding-grad"]
    assert findings[0].params == ("0.weight", "4.weight") and "100x" in findings[0].message
    assert findings[0].step == 6  # 3 checks after the 3-check warm-up


# -- healthy runs raise nothing ---------------------------------------------------------------


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.Adam(params, lr=1e-3),
        lambda params: torch.optim.AdamW(params, lr=3e-4),
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    ],
    ids=["adam", "adamw", "sgd-momentum"],
)
def test_healthy_mlp_classifier_has_no_findings(make_optimizer):
    torch.manual_seed(0)
    model = mlp()
    x, y = classification()
    findings, _, tracker = train(
        model,
        make_optimizer(model.parameters()),
        minibatches(x, y),
        nn.functional.cross_entropy,
        steps=400,
    )
    assert findings == []
    assert set(tracker) == {f"grad_norm/{n}" for n, _ in model.named_parameters()} | {
        f"update_ratio/{n}" for n in ("0.weight", "2.weight", "4.weight")
    }
    assert all(math.isfinite(v) and v > 0 for v in tracker.values())


def test_healthy_convnet_has_no_findings():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(256, 1, 8, 8, generator=gen)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 2),
    )
    findings, _, _ = train(
        model,
        torch.optim.Adam(model.parameters(), lr=1e-3),
        minibatches(x, y, batch_size=32),
        nn.functional.cross_entropy,
        steps=300,
    )
    assert findings == []


def test_healthy_regression_has_no_findings():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(512, 8, generator=gen)
    y = x @ torch.randn(8, 1, generator=gen) + 0.1 * torch.randn(512, 1, generator=gen)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    findings, _, _ = train(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        minibatches(x, y),
        nn.functional.mse_loss,
        steps=400,
    )
    assert findings == []


# -- mechanics --------------------------------------------------------------------------------


def test_update_measurement_leaves_weights_bitwise_untouched():
    torch.manual_seed(0)
    model = mlp()
    monitor = TrainingMonitor(model.named_parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    monitor.before_update()
    monitor.after_update()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    values = monitor.measurements().tolist()
    assert values[-3:] == [0.0, 0.0, 0.0]  # ||dw|| of the three weights, no update in between


def test_skipped_step_norms_do_not_poison_the_interval_and_bad_shapes_degrade():
    model = mlp()
    monitor = TrainingMonitor(model.named_parameters(), log_every=2)
    monitor.record(torch.full((6,), float("nan")))  # a step the NaN guard skipped
    monitor.record(torch.full((6,), 2.0))
    tracker = monitor.tracker_values(monitor.measurements().tolist())
    assert tracker["grad_norm/0.weight"] == 1.0  # (0 + 2) / 2 steps
    monitor.record(torch.full((6,), 3.0))
    monitor.clear()  # a rollback undid that step: nothing of it is reported
    assert monitor.tracker_values(monitor.measurements().tolist()) == {}
    monitor.record(torch.ones(5))  # not the parameters it was given: never misname, stop measuring
    assert monitor.measurements() is None


def test_plateau_is_reported_once_and_again_only_after_a_new_improvement():
    plateau = LossPlateau(log_every=10, window=3)
    flags = [plateau.update([loss]) for loss in [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 1.8, 1.8, 1.8, 1.8, 1.8]]
    # flat from check 1 (found at 4); improved at 7; flat for the 3 checks after it (found at 10)
    assert flags == [False, False, False, True, False, False, False, False, False, True, False]
    converged = LossPlateau(log_every=10, window=3)  # flat after halving: convergence, not a fault
    assert not any(converged.update([loss]) for loss in [2.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])


def test_plateau_without_a_measured_cause_says_so_and_ranks_context_findings():
    plateau = LossPlateau(log_every=10, window=2)
    assert [plateau.update([1.0]) for _ in range(3)] == [False, False, True]
    honest = plateau.finding(30, [])
    assert "No measured cause" in honest.message and "data and labels" in honest.message
    dead = Finding("dead-units", "warning", "`fc1.weight` 90% of rows dead.", ("fc1.weight",), 10)
    other = Finding("target-scale", "warning", "targets have std 500.", (), 0)
    info = Finding("zero-params", "info", "LoRA B is zero.", ("lora_B",), 0)
    ranked = plateau.finding(30, [], [other, info, dead])
    assert ranked.message.index("1) dead-units") < ranked.message.index("2) target-scale")
    assert "lora_B" not in ranked.message and ranked.params == ("fc1.weight",)


def test_plateau_restarts_from_the_restored_state_after_a_rollback():
    # the abandoned branch blew up (1e16); after the rollback the loss sits at chance level
    diverged = [1.0e16, 3.0e15, 8.0e14]
    stuck = [1.61, 1.64, 1.60, 1.63, 1.62, 1.61, 1.63, 1.62]
    kept = LossPlateau(log_every=10, window=3)
    assert not any(kept.update([loss]) for loss in diverged + stuck)  # "converged" from 1e16: silent
    restarted = LossPlateau(log_every=10, window=3)
    for loss in diverged:
        restarted.update([loss])
    restarted.restart()
    flags = [restarted.update([loss]) for loss in stuck]
    assert any(flags)
    assert "1.61 at the start" in restarted.summary  # the restored state's start, not 1e+16
    # another realisation: a regression loss of 2.0 that sits flat after a rollback from 5e8
    other = LossPlateau(log_every=5, window=4)
    for loss in [5.0e8, 2.0e9]:
        other.update([loss, loss * 1.1])
    other.restart()
    assert any(other.update([2.0 + 0.01 * (i % 3), 2.01]) for i in range(12))


def test_a_rollback_restarts_the_monitors_plateau():
    monitor = TrainingMonitor(list(nn.Linear(2, 2).named_parameters()), log_every=10, plateau_window=3)
    for loss in [1.0e16, 3.0e15, 8.0e14]:
        monitor._plateau.update([loss])
    monitor.after_rollback()
    assert monitor._plateau._first is None and not monitor._plateau._recent
