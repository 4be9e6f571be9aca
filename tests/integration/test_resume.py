"""Checkpoints written by fit and a resumed run that ends bitwise equal to an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from safeloop import CheckpointError, SafeTrainer
from tests.conftest import _reset_accelerate
from tests.helpers.models import classification_data, loader, mlp

SEED = 5


def _trainer(checkpoint_dir=None, **kwargs) -> tuple[SafeTrainer, nn.Module, torch.optim.Optimizer]:
    model = mlp(seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.7)
    trainer = SafeTrainer(
        model,
        optimizer,
        loader(classification_data(n=96), batch_size=8, shuffle=True),  # 12 batches: 6 steps an epoch
        loss_fn=nn.CrossEntropyLoss(),
        lr_scheduler=scheduler,
        gradient_accumulation_steps=2,
        seed=SEED,
        checkpoint_dir=checkpoint_dir,
        progress_bar=False,
        **kwargs,
    )
    return trainer, model, optimizer


def _optimizer_tensors(optimizer):
    state = optimizer.state_dict()["state"]
    return [
        state[k][name]
        for k in sorted(state)
        for name in sorted(state[k])
        if isinstance(state[k][name], torch.Tensor)
    ]


@pytest.mark.parametrize("async_checkpoint", [False, True], ids=["sync", "async"])
def test_resume_after_17_of_40_steps_equals_the_straight_run_bitwise(tmp_path, async_checkpoint):
    straight, straight_model, straight_opt = _trainer(max_steps=40, log_every=5)
    straight_result = straight.fit()
    _reset_accelerate()

    first, _, _ = _trainer(
        tmp_path, max_steps=17, checkpoint_every=5, log_every=5, async_checkpoint=async_checkpoint
    )
    first_result = first.fit()
    _reset_accelerate()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "findings.json",  # the run's findings, written at the end of fit
        "metrics.jsonl",  # the run's record, appended at each log step (docs/report.md)
        "step-00000010",
        "step-00000015",
        "step-00000017",
    ]
    # step 0: the state before the first step, kept as a rollback target
    assert [e.step for e in first_result.events if e.kind == "checkpoint"] == [0, 5, 10, 15, 17]

    resumed, model, optimizer = _trainer(
        tmp_path, max_steps=40, checkpoint_every=5, log_every=5, async_checkpoint=async_checkpoint
    )
    result = resumed.fit(resume_from="latest")

    assert result.global_step == 40
    for key, value in straight_model.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    ours, theirs = _optimizer_tensors(optimizer), _optimizer_tensors(straight_opt)
    assert len(ours) == len(theirs) > 0 and all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert optimizer.param_groups[0]["lr"] == straight_opt.param_groups[0]["lr"]
    resume = [e for e in result.events if e.kind == "resume"]
    assert len(resume) == 1 and resume[0].step == 17 and resume[0].detail["path"].endswith("step-00000017")
    # the history goes on from the checkpoint's: the first run's last entry (17) stays in it
    assert [h["step"] for h in result.history] == [5, 10, 15, 17, 20, 25, 30, 35, 40]
    assert result.history[-1]["loss"] == straight_result.history[-1]["loss"]


def test_checkpoints_rotate_and_the_final_one_is_not_written_twice(tmp_path):
    trainer, _, _ = _trainer(tmp_path, max_steps=12, checkpoint_every=3, keep_checkpoints=2)
    result = trainer.fit()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "findings.json",
        "metrics.jsonl",
        "step-00000009",
        "step-00000012",
    ]
    saved = [e.step for e in result.events if e.kind == "checkpoint"]
    assert saved == [0, 3, 6, 9, 12]
    manifest = json.loads((tmp_path / "step-00000012" / "manifest.json").read_text())
    assert set(manifest["files"]) == {
        "model.safetensors",
        "state.safetensors",
        "state.json",
        "rank-00000.safetensors",
    }


def test_resuming_a_checkpoint_already_at_max_steps_returns_at_once(tmp_path):
    trainer, _, _ = _trainer(tmp_path, max_steps=6, checkpoint_every=100)
    trainer.fit()
    _reset_accelerate()
    again, model, _ = _trainer(tmp_path, max_steps=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = []

    from safeloop import Callback

    class Count(Callback):
        def on_before_optimizer_step(self, trainer, optimizer):
            steps.append(trainer.global_step)

    again._callbacks.callbacks = (Count(),)
    result = again.fit(resume_from="latest")
    assert result.global_step == 6 and steps == []
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the checkpoint loaded


def test_a_run_resumed_from_a_periodic_checkpoint_logs_what_the_straight_run_logs(tmp_path):
    straight, _, _ = _trainer(max_steps=20, log_every=5)
    expected = straight.fit().history
    _reset_accelerate()
    first, _, _ = _trainer(tmp_path, max_steps=12, log_every=5, checkpoint_every=10)
    first.fit()
    _reset_accelerate()
    again, _, _ = _trainer(tmp_path, max_steps=20, log_every=5, checkpoint_every=10)
    history = again.fit(resume_from=str(tmp_path / "step-00000010")).history
    # the checkpoint of step 10 holds the log entry of steps 6-10 (it was logged before the save)
    assert [h["step"] for h in history] == [5, 10, 15, 20]
    assert [h["loss"] for h in history] == [h["loss"] for h in expected]


def test_resuming_from_another_folder_writes_the_resume_step_into_checkpoint_dir(tmp_path):
    first, _, _ = _trainer(tmp_path / "old", max_steps=6, checkpoint_every=100)
    first.fit()
    _reset_accelerate()
    again, _, _ = _trainer(tmp_path / "new", max_steps=8, checkpoint_every=100)
    result = again.fit(resume_from=str(tmp_path / "old" / "step-00000006"))
    # the rollback target before the first periodic save: the resume step, in the new folder
    kinds = [e.kind for e in result.events]
    resumed = kinds.index("resume")  # the events before it were restored with the first run's state
    assert [e.step for e in result.events[resumed:] if e.kind == "checkpoint"] == [6, 8]
    assert (tmp_path / "new" / "step-00000006" / "manifest.json").is_file()


def test_latest_with_no_complete_checkpoint_starts_fresh_with_an_info_finding(tmp_path):
    (tmp_path / "step-00000004").mkdir()  # a crash during the first save: no manifest
    trainer, _, _ = _trainer(tmp_path, max_steps=2)
    result = trainer.fit(resume_from="latest")
    assert result.global_step == 2
    assert [f.code for f in result.findings if f.severity == "info"] == ["resume-fresh-start"]


def test_an_explicit_resume_path_that_is_not_a_checkpoint_raises(tmp_path):
    trainer, _, _ = _trainer(tmp_path, max_steps=2)
    with pytest.raises(CheckpointError, match="is not a valid checkpoint"):
        trainer.fit(resume_from=tmp_path / "step-00000099")


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    trainer, _, _ = _trainer(tmp_path, max_steps=6, checkpoint_every=3)
    trainer.fit()
    _reset_accelerate()
    damaged = tmp_path / "step-00000006" / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    resumed, _, _ = _trainer(tmp_path, max_steps=6, checkpoint_every=3)
    result = resumed.fit(resume_from="latest")
    assert [e.step for e in result.events if e.kind == "resume"] == [3]
    assert result.global_step == 6


def test_a_pickle_payload_in_a_checkpoint_folder_is_never_executed(tmp_path):
    import pickle  # only to craft the hostile file in the test

    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "PWNED"), "w"))

    trainer, _, _ = _trainer(tmp_path, max_steps=3, checkpoint_every=3)
    trainer.fit()
    _reset_accelerate()
    folder = tmp_path / "step-00000003"
    for name in ("optimizer.pt", "pytorch_model.bin", "rng_state.pkl"):
        (folder / name).write_bytes(pickle.dumps(Boom()))
    resumed, _, _ = _trainer(tmp_path, max_steps=4)
    resumed.fit(resume_from="latest")
    assert not (tmp_path / "PWNED").exists()


def test_a_failed_asynchronous_save_surfaces_at_the_next_step_and_leaves_older_checkpoints(
    tmp_path, monkeypatch
):
    import safeloop.checkpoint.state as state_module

    real_save = state_module.save_file

    def flaky_save(tensors, path, metadata=None):
        if "step-00000004" in str(path) and path.endswith("model.safetensors"):
            raise OSError(28, "No space left on device")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(state_module, "save_file", flaky_save)
    trainer, _, _ = _trainer(tmp_path, max_steps=12, checkpoint_every=2, async_checkpoint=True)
    with pytest.raises(CheckpointError, match=r"asynchronous save of step 4 .*No space left on device"):
        trainer.fit()
    # raised at the first step boundary that sees the failed write, at the latest by the next save
    assert 4 <= trainer.global_step <= 6
    # nothing half written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "step-00000000", "step-00000002"]
