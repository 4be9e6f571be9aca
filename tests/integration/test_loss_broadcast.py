"""``loss-broadcast`` through ``SafeTrainer.fit``: a regression head of shape (B, 1) trained against
targets of shape (B,), written three ways (``nn.MSELoss``, a lambda, ``F.l1_loss`` inside a
``training_step``), each reported once; the same run with aligned shapes reports nothing, and
the user's own warnings of the first forward still reach them."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from safeloop import SafeTrainer
from safeloop.results import Finding, FitResult

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 16


def _data(column: bool = False) -> DataLoader:
    """A standardised linear regression: inputs (128, 4), targets (128,) or (128, 1)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=gen)
    y = x @ torch.randn(4, generator=gen) + 0.1 * torch.randn(128, generator=gen)
    y = y.unsqueeze(-1) if column else y
    return DataLoader(
        TensorDataset(x, y), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0)
    )


def _fit(loader: DataLoader, **kwargs) -> FitResult:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)  # one output unit: (B, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    kwargs.setdefault("max_steps", 8)
    return SafeTrainer(model, optimizer, loader, log_every=4, seed=0, progress_bar=False, **kwargs).fit()


def _broadcasts(result: FitResult) -> list[Finding]:
    return [f for f in result.findings if f.code == "loss-broadcast"]


def _only_broadcast(result: FitResult) -> Finding:
    found = _broadcasts(result)
    assert len(found) == 1, "\n".join(f"[{f.severity}] {f.code}: {f.message}" for f in result.findings)
    finding = found[0]
    assert finding.severity == "warning" and finding.step == 0 and finding.count == 1
    assert f"outputs of shape ({BATCH}, 1) and targets of shape ({BATCH},)" in finding.message
    assert f"broadcast to ({BATCH}, {BATCH})" in finding.message
    assert f"{BATCH * BATCH} pairs instead of {BATCH}" in finding.message
    assert "squeeze(-1)" in finding.suggestion
    return finding


def test_mse_loss_on_a_single_unit_head_reports_loss_broadcast_once():
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        result = _fit(_data(), loss_fn=nn.MSELoss())
    finding = _only_broadcast(result)  # the shape check and torch's warning: one finding
    assert finding.message.startswith("`MSELoss` got")
    assert "with the shapes aligned" in finding.message
    # torch's warning of the first batch became the finding; the 7 later batches warn as torch
    # always does (the diagnostics look at the first batch only)
    assert sum("broadcasting" in str(w.message) for w in shown) == result.global_step - 1 == 7


def test_a_lambda_loss_broadcasting_silently_reports_loss_broadcast():
    result = _fit(_data(), loss_fn=lambda o, y: ((o - y) ** 2).mean())
    finding = _only_broadcast(result)
    assert finding.message.startswith("`<lambda> at test_loss_broadcast.py:")
    assert "with the shapes aligned" in finding.message


# torch's warning silenced by the user: the finding comes all the same
@pytest.mark.filterwarnings("ignore:Using a target size")
def test_a_training_step_calling_l1_loss_is_caught_from_torch_warning():
    def training_step(model, batch):
        inputs, targets = batch
        return F.l1_loss(model(inputs), targets)  # the line the finding names

    result = _fit(_data(), training_step=training_step)
    finding = _only_broadcast(result)
    line = training_step.__code__.co_firstlineno + 2
    assert f"called at `test_loss_broadcast.py:{line}`" in finding.message


def test_aligned_shapes_report_no_broadcast_and_keep_user_warnings():
    def training_step(model, batch):
        warnings.warn("a warning of the user's own", UserWarning, stacklevel=1)
        inputs, targets = batch
        return F.mse_loss(model(inputs), targets)

    with pytest.warns(UserWarning, match="a warning of the user's own"):
        result = _fit(_data(column=True), training_step=training_step)
    assert _broadcasts(result) == []
    assert _broadcasts(_fit(_data(column=True), loss_fn=nn.MSELoss())) == []
    assert _broadcasts(_fit(_data(column=True), loss_fn=lambda o, y: ((o - y) ** 2).mean())) == []
