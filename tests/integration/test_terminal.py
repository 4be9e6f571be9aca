"""What reaches the terminal: findings logged while the bar is drawn stay on lines of their own."""

from __future__ import annotations

import logging
import re
import sys

import torch
from torch import nn

from safeloop import SafeTrainer
from tests.helpers.models import WithUnused, classification_data, loader, mlp


def test_a_finding_logged_during_the_run_is_not_glued_to_the_progress_bar(capsys):
    handler = logging.StreamHandler(sys.stderr)  # a user's console logging, as basicConfig sets up
    package = logging.getLogger("safeloop")
    package.addHandler(handler)
    try:
        model = WithUnused(mlp(seed=0))
        SafeTrainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            loader(classification_data(n=64), batch_size=8),
            loss_fn=nn.CrossEntropyLoss(),
            max_steps=30,
            summary=False,
        ).fit()
    finally:
        package.removeHandler(handler)
    assert handler not in package.handlers  # the user's handler is back, alone
    err = capsys.readouterr().err
    segments = re.split(r"[\r\n]", err)
    assert any("/30 [" in s for s in segments)  # the bar was drawn
    logged = [s for s in segments if "safeloop [" in s]
    assert logged and all(s.lstrip().startswith("safeloop [unused-params]") for s in logged), logged
