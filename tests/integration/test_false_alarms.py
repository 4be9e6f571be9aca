"""Healthy runs of different kinds raise no false alarm (a healthy run produces no
``warning`` or ``error`` finding, no rollback and no skip).

Each run goes through ``SafeTrainer`` with its defaults (diagnostics on, rollback on, spike
detection on), trains long enough for the training-time checks to act (many log windows of
``log_every=10`` steps: the plateau window, the streaks of the gradient, update and dead-unit
checks, the spike detector's warm-up), and must learn. Data is synthetic and made here, from
fixed seeds. Each ``run_*`` function builds one kind of training and returns its result, so that
a longer or reseeded run of the same kind is one call away when tuning a threshold.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from safeloop import SafeTrainer
from safeloop.results import FitResult

pytestmark = pytest.mark.usefixtures("one_thread")

LOG_EVERY = 10


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _loader(*tensors: torch.Tensor, batch_size: int, seed: int = 0) -> DataLoader:
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=True, generator=_gen(seed))


def _fit(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, **kwargs) -> FitResult:
    trainer = SafeTrainer(model, optimizer, loader, seed=0, progress_bar=False, log_every=LOG_EVERY, **kwargs)
    return trainer.fit()


def _mean_loss(result: FitResult, entries: slice) -> float:
    losses = [h["loss"] for h in result.history[entries]]
    return sum(losses) / len(losses)


def assert_healthy(result: FitResult, *, steps: int, learned: float) -> tuple[float, float]:
    """No alarm, no rollback, no skip, and the loss fell below ``learned`` times its start.

    Returns the mean loss of the first two and the last two log windows.
    """
    alarms = [f for f in result.findings if f.severity in ("warning", "error")]
    assert not alarms, "false alarms on a healthy run:\n" + "\n".join(
        f"[{f.severity}] {f.code} (step {f.step}) {f.message}" for f in alarms
    )
    assert result.rollbacks == 0, [e for e in result.events if e.kind == "rollback"]
    assert result.skipped_steps == 0 and not [e for e in result.events if e.kind == "skip"]
    assert result.global_step == steps and len(result.history) == steps // LOG_EVERY
    assert all(math.isfinite(h["loss"]) for h in result.history)
    before, after = _mean_loss(result, slice(0, 2)), _mean_loss(result, slice(-2, None))
    assert after < learned * before, f"the run did not learn: loss {before:.4g} -> {after:.4g}"
    return before, after


# -- 1. MLP classifier, AdamW ------------------------------------------------------------------


def run_mlp_classifier(steps: int, seed: int = 0, label_noise: float = 0.05) -> FitResult:
    gen = _gen(100 + seed)
    n = 2048
    x = torch.randn(n, 20, generator=gen)
    teacher = torch.randn(20, 32, generator=gen), torch.randn(32, 5, generator=gen)
    y = (torch.tanh(x @ teacher[0]) @ teacher[1]).argmax(dim=1)
    noisy = torch.rand(n, generator=gen) < label_noise
    y = torch.where(noisy, torch.randint(0, 5, (n,), generator=gen), y)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    loader = _loader(x, y, batch_size=64, seed=seed)
    return _fit(model, optimizer, loader, loss_fn=nn.CrossEntropyLoss(), max_steps=steps)


def test_mlp_classifier_with_adamw():
    assert_healthy(run_mlp_classifier(300), steps=300, learned=0.6)


# -- 2. convnet with BatchNorm on synthetic images -------------------------------------------


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1x12x12 noisy images of 4 classes: a horizontal bar, a vertical bar, a blob up or down."""
    gen = _gen(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    x = 0.5 * torch.randn(n, 1, 12, 12, generator=gen)
    pos = torch.randint(2, 10, (n,), generator=gen)
    for i in range(n):
        p, c = int(pos[i]), int(y[i])
        if c == 0:
            x[i, 0, p, 1:11] += 1.5
        elif c == 1:
            x[i, 0, 1:11, p] += 1.5
        elif c == 2:
            x[i, 0, 1:5, p - 2 : p + 1] += 1.5
        else:
            x[i, 0, 7:11, p - 2 : p + 1] += 1.5
    return x, y


def run_convnet(steps: int, seed: int = 0) -> FitResult:
    x, y = _images(1024, seed=200 + seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = _loader(x, y, batch_size=32, seed=seed)
    return _fit(model, optimizer, loader, loss_fn=nn.CrossEntropyLoss(), max_steps=steps)


def test_convnet_with_batchnorm_on_synthetic_images():
    assert_healthy(run_convnet(200), steps=200, learned=0.5)


# -- 3. tiny transformer language model ------------------------------------------------------


class TinyLM(nn.Module):
    """Embedding, one causal pre-norm encoder layer, LayerNorm, a head tied to the embedding or not."""

    def __init__(self, vocab: int, dim: int, length: int, tied: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        nn.init.normal_(self.embed.weight, std=0.02)  # GPT-2's: N(0, 1) logits through a tied head are huge
        self.pos = nn.Parameter(0.02 * torch.randn(length, dim))
        self.block = nn.TransformerEncoderLayer(
            dim, nhead=2, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:t]
        h = self.block(h, src_mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def _token_sequences(n: int, vocab: int, length: int, seed: int) -> torch.Tensor:
    """Sequences of a noisy first-order rule: next = (3 * token + 1) % vocab, 10% random tokens."""
    gen = _gen(seed)
    seqs = torch.empty(n, length + 1, dtype=torch.long)
    seqs[:, 0] = torch.randint(0, vocab, (n,), generator=gen)
    for t in range(1, length + 1):
        rule = (3 * seqs[:, t - 1] + 1) % vocab
        noise = torch.randint(0, vocab, (n,), generator=gen)
        seqs[:, t] = torch.where(torch.rand(n, generator=gen) < 0.1, noise, rule)
    return seqs


def _token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def run_transformer_lm(steps: int, seed: int = 0, tied: bool = True) -> FitResult:
    vocab, length = 32, 16
    seqs = _token_sequences(1024, vocab, length, seed=300 + seed)
    torch.manual_seed(seed)
    model = TinyLM(vocab, 32, length, tied)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    if tied:  # a training_step that shifts and flattens itself

        def training_step(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
            (tokens,) = batch
            return _token_loss(model(tokens[:, :-1]), tokens[:, 1:])

        loader = _loader(seqs, batch_size=32, seed=seed)
        return _fit(model, optimizer, loader, training_step=training_step, max_steps=steps)
    # (inputs, targets) pairs and a loss_fn that flattens the tokens
    loader = _loader(seqs[:, :-1], seqs[:, 1:], batch_size=32, seed=seed)
    return _fit(model, optimizer, loader, loss_fn=_token_loss, max_steps=steps)


@pytest.mark.parametrize("tied", [True, False], ids=["tied-training-step", "untied-loss-fn"])
def test_tiny_transformer_language_model(tied):
    # chance is ln(32) = 3.47; the rule with 10% noise allows about 0.5
    before, after = assert_healthy(run_transformer_lm(200, tied=tied), steps=200, learned=0.5)
    assert before < 3.6 and after < 1.0


def _zipf_sequences(n: int, vocab: int, length: int, seed: int) -> torch.Tensor:
    """A rule next = (7 * token + 3) % vocab, with 20% of the tokens drawn from a Zipf law."""
    gen = _gen(seed)
    zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float)
    seqs = torch.empty(n, length + 1, dtype=torch.long)
    seqs[:, 0] = torch.multinomial(zipf, n, replacement=True, generator=gen)
    for t in range(1, length + 1):
        rule = (7 * seqs[:, t - 1] + 3) % vocab
        noise = torch.multinomial(zipf, n, replacement=True, generator=gen)
        seqs[:, t] = torch.where(torch.rand(n, generator=gen) < 0.2, noise, rule)
    return seqs


def run_large_vocabulary_lm(steps: int, seed: int = 0, vocab: int = 1000) -> FitResult:
    length = 16
    seqs = _zipf_sequences(1024, vocab, length, seed=350 + seed)
    torch.manual_seed(seed)
    model = TinyLM(vocab, 16, length, tied=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    loader = _loader(seqs[:, :-1], seqs[:, 1:], batch_size=16, seed=seed)
    return _fit(model, optimizer, loader, loss_fn=_token_loss, max_steps=steps)


def test_untied_embedding_of_a_large_vocabulary():
    # 256 tokens a batch from 1000: most rows of the table get no gradient at any step, by design
    before, _ = assert_healthy(run_large_vocabulary_lm(200), steps=200, learned=0.6)
    assert before < 1.2 * math.log(1000)


# -- 4. regression with standardised targets -------------------------------------------------


def run_regression(steps: int, seed: int = 0, noise: float = 0.1) -> FitResult:
    gen = _gen(400 + seed)
    n = 2048
    x = torch.randn(n, 8, generator=gen)
    y = torch.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3] + 0.5 * x[:, 3:4]
    y = y + noise * torch.randn(n, 1, generator=gen)
    y = (y - y.mean()) / y.std()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = _loader(x, y, batch_size=64, seed=seed)
    return _fit(model, optimizer, loader, loss_fn=nn.MSELoss(), max_steps=steps)


def test_regression_with_standardised_targets():
    assert_healthy(run_regression(300), steps=300, learned=0.3)


# -- 5. LoRA-style adapter on a frozen base ------------------------------------------------------


class LoRALinear(nn.Module):
    """A frozen Linear plus ``B @ A``: A random, B zero, so the adapter starts as the identity change."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T) @ self.lora_b.T


def run_lora(steps: int, seed: int = 0) -> tuple[FitResult, nn.Module]:
    gen = _gen(500 + seed)
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    x = torch.randn(2048, 16, generator=gen)
    with torch.no_grad():  # the target: the base with a low-rank change of its first layer
        delta = torch.randn(32, 2, generator=gen) @ torch.randn(2, 16, generator=gen) / 4
        y = base[2](F.gelu(base[0](x) + x @ delta.T))
    model = nn.Sequential(LoRALinear(base[0], rank=4), nn.GELU(), base[2].requires_grad_(False))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    loader = _loader(x, y, batch_size=64, seed=seed)
    return _fit(model, optimizer, loader, loss_fn=nn.MSELoss(), max_steps=steps), model


def test_lora_adapter_on_a_frozen_base():
    result, model = run_lora(300)
    assert_healthy(result, steps=300, learned=0.3)
    # the zero B is deliberate: reported as info at most, and never re-initialised
    assert not [e for e in result.events if e.kind == "reinit"]
    assert model[0].lora_b.abs().sum() > 0


# -- 6. zero-init residual blocks with LayerNorm -------------------------------------------------


class ResidualBlock(nn.Module):
    """Pre-norm MLP branch whose output Linear starts at zero: the block starts as the identity."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def run_zero_init_residual(steps: int, seed: int = 0) -> FitResult:
    gen = _gen(600 + seed)
    x = torch.randn(2048, 16, generator=gen)
    y = (torch.sin(x[:, :4]) @ torch.randn(4, 6, generator=gen) + x[:, 4:10] ** 2).argmax(dim=1)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(16, 32), ResidualBlock(32), ResidualBlock(32), nn.LayerNorm(32), nn.Linear(32, 6)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    loader = _loader(x, y, batch_size=64, seed=seed)
    return _fit(model, optimizer, loader, loss_fn=nn.CrossEntropyLoss(), max_steps=steps)


def test_zero_init_residual_blocks():
    result = run_zero_init_residual(300)
    assert_healthy(result, steps=300, learned=0.5)
    assert not [e for e in result.events if e.kind == "reinit"]  # zero on purpose, fed by gradient


# -- 7. held-out eval split and gradient accumulation ------------------------------------------


def run_eval_and_accumulation(epochs: int, seed: int = 0) -> FitResult:
    gen = _gen(700 + seed)
    n = 3000
    x = 3.0 + 2.0 * torch.randn(n, 12, generator=gen)  # raw features, standardised below
    y = ((x[:, :6] - 3.0).sum(dim=1) > (x[:, 6:] - 3.0).abs().sum(dim=1) - 6).long()
    perm = torch.randperm(n, generator=gen)
    train, held = perm[:2560], perm[2560:]
    mean, std = x[train].mean(dim=0), x[train].std(dim=0)  # the train split's statistics, for both
    x = (x - mean) / std
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    return _fit(
        model,
        optimizer,
        _loader(x[train], y[train], batch_size=32, seed=seed),
        eval_dataloader=DataLoader(TensorDataset(x[held], y[held]), batch_size=110),
        loss_fn=nn.CrossEntropyLoss(),
        gradient_accumulation_steps=2,
        max_epochs=epochs,
    )


def test_eval_split_and_gradient_accumulation():
    result = run_eval_and_accumulation(epochs=5)  # 80 micro-batches, 40 optimizer steps an epoch
    assert_healthy(result, steps=200, learned=0.6)
    assert result.eval_loss is not None and result.eval_loss < 0.5 * math.log(2)


# -- 8. SGD with momentum and a learning-rate schedule ----------------------------------------


def run_sgd_schedule(steps: int, seed: int = 0, schedule: str = "cosine") -> FitResult:
    x, y = _images(768, seed=800 + seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 36, 32),
        nn.ReLU(),
        nn.Linear(32, 4),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    if schedule == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=steps // 3, gamma=0.3)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    loader = _loader(x, y, batch_size=32, seed=seed)
    return _fit(
        model, optimizer, loader, loss_fn=nn.CrossEntropyLoss(), lr_scheduler=scheduler, max_steps=steps
    )


@pytest.mark.parametrize(("schedule", "steps"), [("step", 240), ("cosine", 1000)])
def test_sgd_momentum_with_a_schedule(schedule, steps):
    # 1000 steps: the last log checks of the cosine see an lr near 0 and a converged loss, whose
    # tiny updates are the end of the schedule, not an lr too low
    result = run_sgd_schedule(steps, schedule=schedule)
    assert_healthy(result, steps=steps, learned=0.5)
    assert result.history[-1]["lr"] < 0.2 * result.history[0]["lr"]  # the schedule ran


# -- 9.-13. healthy runs close to the baseline-loss rules ---------------------------------------
# no-learning compares the loss with a constant prediction's, label-distribution the class mixes,
# train-eval-gap the two losses, lr-too-high (oscillating) the loss with its best.


def run_hard_task(steps: int, seed: int = 0) -> FitResult:
    """10 classes, 60% of the labels random: the loss can only fall slowly from ln(10)."""
    gen = _gen(900 + seed)
    x = torch.randn(4096, 16, generator=gen)
    rule = (x @ torch.randn(16, 10, generator=gen)).argmax(1)
    noise = torch.randint(0, 10, (4096,), generator=gen)
    y = torch.where(torch.rand(4096, generator=gen) < 0.6, noise, rule)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return _fit(
        model,
        optimizer,
        _loader(x, y, batch_size=64, seed=seed),
        loss_fn=nn.CrossEntropyLoss(),
        max_steps=steps,
    )


def test_a_hard_task_whose_loss_falls_slowly_from_the_baseline():
    result = run_hard_task(400)
    before, after = assert_healthy(result, steps=400, learned=0.99)
    assert result.baseline_loss is not None and before < 1.05 * result.baseline_loss
    assert after < 0.97 * result.baseline_loss  # a few % below a constant prediction, and falling


def run_noisy_high_lr(steps: int, seed: int = 0) -> FitResult:
    """SGD at a high but workable rate on batches of 8: a loss that jumps from step to step."""
    gen = _gen(1000 + seed)
    x = torch.randn(2048, 12, generator=gen)
    y = (x @ torch.randn(12, 4, generator=gen) + 0.5 * torch.randn(2048, 4, generator=gen)).argmax(1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return _fit(
        model,
        optimizer,
        _loader(x, y, batch_size=8, seed=seed),
        loss_fn=nn.CrossEntropyLoss(),
        max_steps=steps,
    )


def test_a_high_but_fine_learning_rate_with_a_noisy_loss():
    result = run_noisy_high_lr(400)
    assert_healthy(result, steps=400, learned=0.7)
    spread = [h["loss"] for h in result.history[5:]]
    assert max(spread) > 1.3 * min(spread)  # the log-check means themselves jump


def run_tiny_variance_regression(steps: int, seed: int = 0) -> FitResult:
    """Targets of standard deviation 0.01: the baseline loss is 1e-4."""
    gen = _gen(1100 + seed)
    x = torch.randn(2048, 6, generator=gen)
    y = 0.01 * (torch.tanh(x[:, :2]).sum(1, keepdim=True) + 0.1 * torch.randn(2048, 1, generator=gen))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return _fit(
        model, optimizer, _loader(x, y, batch_size=64, seed=seed), loss_fn=nn.MSELoss(), max_steps=steps
    )


def test_a_regression_whose_targets_have_a_tiny_variance():
    result = run_tiny_variance_regression(400)
    assert_healthy(result, steps=400, learned=0.2)
    assert result.baseline_loss is not None and result.baseline_loss < 3e-4
    assert result.history[-1]["loss"] < result.baseline_loss


def run_fine_tuning(steps: int, seed: int = 0) -> FitResult:
    """A model trained first (a plain loop), then fine-tuned at a lower rate: below the baseline."""
    gen = _gen(1200 + seed)
    x = torch.randn(2048, 10, generator=gen)
    y = (x @ torch.randn(10, 5, generator=gen) + 0.3 * torch.randn(2048, 5, generator=gen)).argmax(1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 5))
    pretrain = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        for inputs, targets in _loader(x, y, batch_size=64, seed=seed):
            pretrain.zero_grad()
            nn.functional.cross_entropy(model(inputs), targets).backward()
            pretrain.step()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return _fit(
        model,
        optimizer,
        _loader(x, y, batch_size=64, seed=seed),
        loss_fn=nn.CrossEntropyLoss(),
        max_steps=steps,
    )


def test_fine_tuning_that_starts_below_the_baseline():
    result = run_fine_tuning(300)
    before, _ = assert_healthy(result, steps=300, learned=1.0)
    assert result.baseline_loss is not None and before < 0.6 * result.baseline_loss


def run_imbalanced_with_eval(epochs: int, seed: int = 0) -> FitResult:
    """Classes at 80/15/5% in both sets, split at random, evaluated each epoch."""
    gen = _gen(1300 + seed)
    x = torch.randn(1500, 8, generator=gen)
    score = x @ torch.randn(8, generator=gen)
    y = torch.bucketize(score, torch.quantile(score, torch.tensor([0.8, 0.95])))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = _loader(x[:1200], y[:1200], batch_size=32, seed=seed)
    evaluation = DataLoader(TensorDataset(x[1200:], y[1200:]), batch_size=64)
    return _fit(
        model, optimizer, loader, eval_dataloader=evaluation, loss_fn=nn.CrossEntropyLoss(), max_epochs=epochs
    )


def test_imbalanced_classes_with_an_eval_set():
    result = run_imbalanced_with_eval(epochs=5)  # 38 steps an epoch
    assert_healthy(result, steps=5 * 38, learned=0.5)
    assert result.eval_loss is not None and result.eval_loss < 0.5 * result.baseline_loss
