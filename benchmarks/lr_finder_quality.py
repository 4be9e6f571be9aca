"""Is ``find_lr``'s suggestion a learning rate worth training with? Measured on four problems.

For each problem a grid of 7 learning rates (half a decade apart) is trained for the same budget
from the same initial weights and data order; the held-out loss at the end says which rates reach
within 10% of the best one (the band). Then ``SafeTrainer.find_lr`` (defaults: 1e-7..10, 100 steps)
runs on a fresh copy of the same model, and every rule's suggestion is checked against the band and
trained for the same budget itself. Lightning's ``Tuner.lr_find`` (its defaults: 1e-8..1, 100 steps,
steepest slope) runs on the same problem beside it when Lightning is installed (the ``dev`` extra).

    python benchmarks/lr_finder_quality.py                 # all four problems
    python benchmarks/lr_finder_quality.py --problems mlp  # one of mlp, convnet, transformer, regression
    python benchmarks/lr_finder_quality.py --seeds 2       # the grid's final losses averaged over seeds

Everything runs on CPU with one torch thread; the data are made here (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from safeloop import SafeTrainer

GRID_STEPS = 7
BAND = 1.10


@dataclass
class Problem:
    name: str
    build: Callable[[], nn.Module]
    optimizer: Callable[[list[nn.Parameter], float], torch.optim.Optimizer]
    train: TensorDataset
    held_out: TensorDataset
    loss_fn: nn.Module
    grid: list[float]
    steps: int
    batch: int


def _grid(low: float) -> list[float]:
    return [low * 10 ** (i / 2) for i in range(GRID_STEPS)]


def mlp_problem() -> Problem:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3072, 20, generator=gen)
    w = torch.randn(20, 32, generator=gen)
    y = (torch.tanh(x @ w) @ torch.randn(32, 5, generator=gen)).argmax(1)

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))

    return Problem(
        "mlp", build, lambda p, lr: torch.optim.AdamW(p, lr=lr), TensorDataset(x[:2560], y[:2560]),
        TensorDataset(x[2560:], y[2560:]), nn.CrossEntropyLoss(), _grid(1e-4), 300, 64,
    )  # fmt: skip


def convnet_problem() -> Problem:
    gen = torch.Generator().manual_seed(2)
    n, size = 2560, 12
    y = torch.randint(0, 4, (n,), generator=gen)
    x = 0.8 * torch.randn(n, 1, size, size, generator=gen)
    for i, label in enumerate(y.tolist()):  # a bar in one of four orientations, at a random place
        r, c = torch.randint(2, size - 2, (2,), generator=gen).tolist()
        if label == 0:
            x[i, 0, r, :] += 1.0
        elif label == 1:
            x[i, 0, :, c] += 1.0
        elif label == 2:
            x[i, 0].diagonal().add_(1.0)
        else:
            x[i, 0].flip(1).diagonal().add_(1.0)

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16 * 9, 4),
        )  # fmt: skip

    return Problem(
        "convnet", build, lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
        TensorDataset(x[:2048], y[:2048]), TensorDataset(x[2048:], y[2048:]), nn.CrossEntropyLoss(),
        _grid(1e-3), 300, 32,
    )  # fmt: skip


class TinyLM(nn.Module):
    """A 2-layer causal transformer over a 16-token vocabulary."""

    def __init__(self, vocab: int = 16, width: int = 32, length: int = 24) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 64, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        h = self.body(h, mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True)
        return self.head(h).transpose(1, 2)  # (batch, vocab, length) for CrossEntropyLoss


def transformer_problem() -> Problem:
    gen = torch.Generator().manual_seed(3)
    vocab, length, n = 16, 24, 2560
    # a random sparse Markov chain: each token has 3 likely successors
    table = torch.full((vocab, vocab), 0.02)
    for token in range(vocab):
        table[token, torch.randperm(vocab, generator=gen)[:3]] = 1.0
    table /= table.sum(1, keepdim=True)
    seqs = torch.empty(n, length + 1, dtype=torch.long)
    seqs[:, 0] = torch.randint(0, vocab, (n,), generator=gen)
    for t in range(length):
        seqs[:, t + 1] = torch.multinomial(table[seqs[:, t]], 1, generator=gen).squeeze(1)
    x, y = seqs[:, :-1], seqs[:, 1:]

    def build() -> nn.Module:
        torch.manual_seed(0)
        return TinyLM(vocab, 32, length)

    return Problem(
        "transformer", build, lambda p, lr: torch.optim.AdamW(p, lr=lr), TensorDataset(x[:2048], y[:2048]),
        TensorDataset(x[2048:], y[2048:]), nn.CrossEntropyLoss(), _grid(1e-4), 300, 32,
    )  # fmt: skip


def regression_problem() -> Problem:
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(3072, 4, generator=gen) * 4 - 2
    y = (torch.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3] - 0.5 * x[:, 3:4] ** 2) + 0.1 * torch.randn(
        3072, 1, generator=gen
    )

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))

    return Problem(
        "regression", build, lambda p, lr: torch.optim.Adam(p, lr=lr), TensorDataset(x[:2560], y[:2560]),
        TensorDataset(x[2560:], y[2560:]), nn.MSELoss(), _grid(1e-4), 300, 64,
    )  # fmt: skip


PROBLEMS = {
    "mlp": mlp_problem,
    "convnet": convnet_problem,
    "transformer": transformer_problem,
    "regression": regression_problem,
}


def train(problem: Problem, lr: float, seed: int) -> float:
    """Train from the problem's initial weights for its budget; the held-out loss at the end."""
    model = problem.build()
    optimizer = problem.optimizer(list(model.parameters()), lr)
    loader = DataLoader(
        problem.train, batch_size=problem.batch, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    steps = 0
    while steps < problem.steps:
        for x, y in loader:
            loss = problem.loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if steps == problem.steps:
                break
    with torch.no_grad():
        x, y = problem.held_out.tensors
        loss = problem.loss_fn(model(x), y).item()
    return loss if math.isfinite(loss) else math.inf


def _fresh_accelerate() -> None:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def safeloop_sweep(
    problem: Problem, num_steps: int, order: int
) -> tuple[dict[str, float | None], str | None]:
    """Every rule's suggestion from one ``find_lr`` (data order ``order``), and its verdict."""
    _fresh_accelerate()
    model = problem.build()
    optimizer = problem.optimizer(list(model.parameters()), 1e-3)
    loader = DataLoader(problem.train, batch_size=problem.batch, shuffle=True)
    trainer = SafeTrainer(
        model, optimizer, loader, loss_fn=problem.loss_fn, progress_bar=False, summary=False
    )
    torch.manual_seed(1000 + order)  # the sweep's shuffle order
    result = trainer.find_lr(num_steps=num_steps)
    return dict(result.suggestions), result.verdict


def lightning_suggestion(problem: Problem) -> float | None:
    try:
        import lightning.pytorch as pl
        from lightning.pytorch.tuner import Tuner
    except ImportError:
        return None

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = problem.build()
            self.lr = 1e-3

        def training_step(self, batch, _index):
            x, y = batch
            return problem.loss_fn(self.model(x), y)

        def configure_optimizers(self):
            return problem.optimizer(list(self.parameters()), self.lr)

    module = Module()
    loader = DataLoader(problem.train, batch_size=problem.batch, shuffle=True)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_epochs=100,
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        finder = Tuner(trainer).lr_find(module, train_dataloaders=loader, update_attr=False)
    return None if finder is None else finder.suggestion()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--seeds", type=int, default=2, help="data orders each trained rate is averaged over")
    parser.add_argument("--sweeps", type=int, default=3, help="find_lr runs (data orders) per sweep length")
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 300], help="find_lr num_steps to try")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("safeloop").setLevel(logging.WARNING)
    cache: dict[tuple[str, float], float] = {}
    tally: dict[str, list[int]] = {}

    for name in args.problems:
        problem = PROBLEMS[name]()

        def final_loss(lr: float, problem: Problem = problem) -> float:
            key = (problem.name, lr)
            if key not in cache:
                cache[key] = statistics.fmean(train(problem, lr, seed) for seed in range(args.seeds))
            return cache[key]

        finals = [final_loss(lr) for lr in problem.grid]
        best = min(finals)
        good = [lr for lr, final in zip(problem.grid, finals, strict=True) if final <= BAND * best]

        def verdict_on(
            lr: float | None, good: list[float] = good, best: float = best, problem: Problem = problem
        ) -> str:
            if lr is None:
                return "none"
            final = final_loss(lr)
            # in the band: between good grid rates, or beside a good one with its own final loss
            # within 10% of the best
            below = max((g for g in problem.grid if g <= lr), default=None)
            above = min((g for g in problem.grid if g >= lr), default=None)
            inside = min(good) <= lr <= max(good) or (
                (below in good or above in good) and final <= BAND * best
            )
            return f"{lr:.3g} ({final / best:.2f}x{', in' if inside else ', OUT'})"

        print(
            f"\n{name}: "
            + ", ".join(f"{lr:.3g}: {f:.4g}" for lr, f in zip(problem.grid, finals, strict=True))
        )
        print(f"  band (final loss within 10% of the best, {best:.4g}): {min(good):.3g}..{max(good):.3g}")
        for num_steps in args.steps:
            for order in range(args.sweeps):
                found, verdict = safeloop_sweep(problem, num_steps, order)
                shown = {rule: verdict_on(lr) for rule, lr in found.items()} if order == 0 else {}
                minimum = verdict_on(found["minimum"]) if verdict is None else f"verdict {verdict}"
                tally.setdefault(f"minimum, {num_steps} steps", []).append(", in" in minimum)
                others = "; ".join(f"{r} {v}" for r, v in shown.items() if r != "minimum")
                print(
                    f"  find_lr({num_steps} steps, order {order}): minimum {minimum}"
                    + (f"; {others}" if others else "")
                )
                if order == 0 and num_steps == args.steps[0]:
                    for rule in ("steepest", "valley"):
                        tally.setdefault(rule, []).append(", in" in shown[rule])
        lightning = lightning_suggestion(problem)
        shown = verdict_on(lightning) if lightning is not None else "not installed"
        tally.setdefault("lightning", []).append(", in" in shown)
        print(f"  lightning Tuner.lr_find (defaults): {shown}")
    print("\nsuggestions inside the band:")
    for rule, hits in tally.items():
        print(f"  {rule:<22} {sum(hits)}/{len(hits)}")


if __name__ == "__main__":
    main()
