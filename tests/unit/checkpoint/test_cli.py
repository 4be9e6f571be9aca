"""The `safeloop verify` and `safeloop inspect` commands."""

from __future__ import annotations

import torch
from torch import nn

from safeloop import SafeTrainer
from safeloop.cli import main
from tests.helpers.models import classification_data, loader, mlp


def _checkpoints(tmp_path):
    model = mlp()
    SafeTrainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05),
        loader(classification_data()),
        loss_fn=nn.CrossEntropyLoss(),
        max_steps=4,
        checkpoint_dir=tmp_path,
        checkpoint_every=2,
        progress_bar=False,
    ).fit()
    return tmp_path


def test_verify_passes_on_good_checkpoints_and_fails_naming_the_damaged_file(tmp_path, capsys):
    root = _checkpoints(tmp_path)
    assert main(["verify", str(root)]) == 0
    assert "3 checkpoints, 0 damaged" in capsys.readouterr().out
    target = root / "step-00000004" / "state.json"
    target.write_bytes(target.read_bytes() + b" ")
    assert main(["verify", str(root)]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED   step-00000004" in out and "state.json" in out and "1 damaged" in out


def test_inspect_shows_step_files_tensors_and_hyper_parameters(tmp_path, capsys):
    root = _checkpoints(tmp_path)
    assert main(["inspect", str(root / "step-00000004")]) == 0
    out = capsys.readouterr().out
    assert "step 4, epoch 0" in out
    assert "model.safetensors" in out and "0.weight" in out and "[16, 8]" in out
    assert '"weight_decay": 0.05' in out


def test_inspect_refuses_an_invalid_folder(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 1
    assert "not a valid checkpoint" in capsys.readouterr().out
