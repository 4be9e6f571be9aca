"""Time the work SafeTrainer adds to one optimizer step, piece by piece, against the step itself.

End-to-end ratios (benchmarks/overhead.py) are at the mercy of machine noise; this measures the
added pieces directly on gradients of the benchmark model, in CPU time on one thread, and prints
them as a share of one bare Accelerate step measured in the same run. Usage:

    python benchmarks/step_extras.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from safeloop.guards.clipping import grad_norms
from safeloop.guards.nonfinite import finite_flag
from safeloop.metrics import MetricBuffer


def per_call_ms(fn: Callable[[], object], calls: int) -> float:
    fn()
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls * 1e3


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(3):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(512, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(256, 512), torch.randint(0, 10, (256,))

    def bare_step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step_ms = per_call_ms(bare_step, 100)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    params = list(model.parameters())
    norms = grad_norms(params)
    flag = finite_flag(loss, norms.total)
    buffer = MetricBuffer(10**9)
    pieces = {
        "global + per-parameter grad norms": lambda: grad_norms(params),
        "(torch get_total_norm, for reference)": lambda: torch.nn.utils.get_total_norm(
            [p.grad for p in params]
        ),
        "finite flag": lambda: finite_flag(loss, norms.total),
        "non-finite parameter mask": lambda: ~torch.isfinite(norms.per_param),
        "metric row": lambda: buffer.record(loss, norms.total, flag, ~torch.isfinite(norms.per_param)),
        "flag host read (non-fused optimizers)": lambda: bool(flag.item()),
    }
    print(f"bare step (3x512 MLP, batch 256, AdamW, 1 thread): {step_ms:.3f} ms")
    added = 0.0
    for name, fn in pieces.items():
        ms = per_call_ms(fn, 1000)
        if not name.startswith("("):
            added += ms
        print(f"  {name:<40} {ms:7.4f} ms  {ms / step_ms:6.2%}")
    print(
        f"added per step (sum, without the reference line): {added:.3f} ms = {added / step_ms:.2%} of a step"
    )


if __name__ == "__main__":
    main()
