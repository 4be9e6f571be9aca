"""The run's record written by real runs: a skip, a rollback and a re-initialisation in it and in
its report, a killed run read up to its last log step, a resumed run continuing the same file."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from safeloop import Callback, SafeTrainer
from safeloop.report.data import assemble, records_from_memory
from safeloop.report.format import RECORD_FILE
from safeloop.report.reading import read_lines, read_run
from safeloop.testing import nonfinite_loss, spiking_loss
from tests.conftest import _reset_accelerate


def _data(n: int = 512, seed: int = 0) -> TensorDataset:
    """A noisy linear target, the same for every ``seed`` (which draws other inputs)."""
    weights = torch.randn(16, 1, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=gen)
    return TensorDataset(x, x @ weights + 0.1 * torch.randn(n, 1, generator=gen))


def _model(zero_first: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    if zero_first:  # the output layer at zero leaves the first one's zero weight no gradient: re-initialised
        nn.init.zeros_(model[0].weight)
        nn.init.zeros_(model[2].weight)
    return model


def _trainer(model, loss_fn=None, **kwargs) -> SafeTrainer:
    kwargs.setdefault("log_every", 5)
    return SafeTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.002),
        DataLoader(_data(), batch_size=32, shuffle=True),
        loss_fn=loss_fn or nn.MSELoss(),
        seed=1,
        progress_bar=False,
        summary=False,
        **kwargs,
    )


def _lines(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / RECORD_FILE).read_text().splitlines()]


def test_a_run_with_a_skip_a_rollback_and_a_reinit_has_each_in_its_record_and_its_report(tmp_path):
    pytest.importorskip("matplotlib")
    import numpy as np

    from safeloop.report.panels import draw_panel, panels_for
    from safeloop.report.series import layer_matrix

    loss_fn = nonfinite_loss(spiking_loss(nn.MSELoss(), at_calls=range(40, 46), factor=30.0), at_calls={5})
    evaluations = []

    class Evaluations(Callback):
        def on_validation_end(self, trainer, eval_loss):
            evaluations.append([trainer.global_step, eval_loss])

    trainer = _trainer(
        _model(zero_first=True), loss_fn, max_epochs=4, checkpoint_dir=tmp_path, checkpoint_every=15,
        eval_dataloader=DataLoader(_data(128, seed=1), batch_size=64), callbacks=[Evaluations()],
    )  # fmt: skip
    result = trainer.fit()
    kinds = {e.kind for e in result.events}
    assert {"reinit", "skip", "rollback", "lr_scale"} <= kinds, kinds

    lines = _lines(tmp_path)
    assert all(line["v"] == 1 for line in lines) and lines[0]["type"] == "fit" and lines[-1]["type"] == "end"
    logged = [line for line in lines if line["type"] == "log"]
    assert [line["step"] for line in logged] == [entry["step"] for entry in result.history]  # abandoned too
    assert len(logged[0]["grad_norms"]) == 4 and len(logged[0]["update_ratios"]) == 2
    assert [[line["step"], line["loss"]] for line in lines if line["type"] == "eval"] == evaluations

    data = read_run(tmp_path)
    rollback = next(e for e in result.events if e.kind == "rollback")
    (branch,) = data.branches
    abandoned = [e["step"] for e in result.history if e["rollbacks"] == 0 and e["step"] > rollback.step]
    assert branch.at == rollback.step and [e["step"] for e in branch.entries] == abandoned and abandoned
    assert [e["step"] for e in data.history] == sorted({e["step"] for e in result.history})
    assert data.grad_norms.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    cut = next(i for i, line in enumerate(lines) if line["type"] == "event" and line["kind"] == "rollback")
    live = [
        (line["step"], line["loss"])
        for i, line in enumerate(lines)
        if line["type"] == "eval" and (i > cut or line["step"] <= branch.at)
    ]
    assert data.evals == live and len(live) < len(
        evaluations
    )  # the abandoned branch's evaluation is set apart
    assert data.status == "completed" and data.baseline_loss == result.baseline_loss  # None: a wrapped loss

    figure = draw_panel(panels_for(data)[0], data)
    gids = {artist.get_gid() for artist in figure.findobj()}
    assert {"safeloop-skip", "safeloop-rollback", "safeloop-abandoned", "safeloop-reinit"} <= gids
    assert "safeloop-eval" in gids

    memory = result.plot(tmp_path / "result.png")  # the same marks from memory
    assert {
        "safeloop-skip",
        "safeloop-rollback",
        "safeloop-abandoned",
        "safeloop-reinit",
        "safeloop-eval",
    } <= {artist.get_gid() for artist in memory.findobj()}
    assert (tmp_path / "result.png").stat().st_size > 10_000
    # and the run from memory is the run from the file: live steps, branch, evaluations, layer tables
    lines = records_from_memory(
        history=result.history, events=[e.to_dict() for e in result.events], findings=[],
        global_step=result.global_step, status=result.status, eval_loss=result.eval_loss,
        baseline_loss=result.baseline_loss, trace=result.trace,
    )  # fmt: skip
    kept = assemble(lines, source="memory")
    assert [e["step"] for e in kept.history] == [e["step"] for e in data.history]
    assert [e["step"] for e in kept.branches[0].entries] == abandoned
    assert kept.evals == data.evals and kept.settings["clip_grad_norm"] == data.settings["clip_grad_norm"]
    for kind in ("grad_norms", "update_ratios"):
        names, steps, matrix = layer_matrix(getattr(kept, kind))
        file_names, file_steps, file_matrix = layer_matrix(getattr(data, kind))
        assert names == file_names and steps.tolist() == file_steps.tolist()
        assert np.allclose(matrix, file_matrix, rtol=1e-5, equal_nan=True)  # the file keeps 6 digits
        branch_steps = layer_matrix(getattr(kept.branches[0], kind))[1]
        assert branch_steps.tolist() == layer_matrix(getattr(branch, kind))[1].tolist()


def test_fit_result_plot_without_a_checkpoint_dir_has_a_heat_map_row_per_layer_and_the_eval_curve(tmp_path):
    pytest.importorskip("matplotlib")
    trainer = _trainer(
        _model(),
        max_epochs=3,
        clip_grad_norm=5.0,
        eval_dataloader=DataLoader(_data(128, seed=1), batch_size=64),
    )
    result = trainer.fit()
    assert not list(tmp_path.rglob(RECORD_FILE))
    figure = result.plot(tmp_path / "run.png")
    meshes = {a.get_gid(): a for a in figure.findobj() if str(a.get_gid()).startswith("safeloop-heatmap-")}
    assert meshes["safeloop-heatmap-grad_norms"].get_array().shape == (4, len(result.history))
    assert meshes["safeloop-heatmap-update_ratios"].get_array().shape == (2, len(result.history))
    labels = [t.get_text() for t in meshes["safeloop-heatmap-grad_norms"].axes.get_yticklabels()]
    assert labels == ["0.weight", "0.bias", "2.weight", "2.bias"]
    (evals,) = [a for a in figure.findobj() if a.get_gid() == "safeloop-eval"]
    assert evals.get_xdata().tolist() == [16, 32, 48]  # one evaluation per epoch of 16 steps
    assert evals.get_ydata()[-1] == result.eval_loss
    (clip,) = [a for a in figure.findobj() if a.get_gid() == "safeloop-clip"]  # the run's own threshold
    assert clip.get_ydata()[0] == 5.0
    assert (tmp_path / "run.png").stat().st_size > 10_000


def test_a_killed_runs_record_parses_up_to_its_last_log_step(tmp_path):
    _trainer(_model(), max_steps=20, checkpoint_dir=tmp_path).fit()
    path = tmp_path / RECORD_FILE
    text = path.read_text()
    last_log = text.rindex('{"v":1,"type":"log"')
    path.write_text(text[: last_log + 40])  # killed while writing the log line of step 20
    found, notes = read_lines(path)
    data = assemble(found, source=str(path), notes=notes)
    assert [e["step"] for e in data.history] == [5, 10, 15] and data.status is None
    assert any("was cut" in note for note in notes)


def test_a_resumed_run_continues_the_same_file_and_its_abandoned_steps_are_set_apart(tmp_path):
    _trainer(_model(), max_steps=30, checkpoint_dir=tmp_path, checkpoint_every=10, keep_checkpoints=5).fit()
    before = (tmp_path / RECORD_FILE).read_text()
    _reset_accelerate()
    # as if the run had been killed after step 30 and resumed from its checkpoint of step 20
    _trainer(_model(), max_steps=40, checkpoint_dir=tmp_path, checkpoint_every=10).fit(
        resume_from=tmp_path / "step-00000020"
    )
    after = (tmp_path / RECORD_FILE).read_text()
    assert after.startswith(before)  # appended, never rewritten
    added = [json.loads(line) for line in after[len(before) :].splitlines()]
    assert (
        added[0]["type"] == "fit"
        and added[0]["step"] == 20
        and added[0]["resumed_from"].endswith("step-00000020")
    )
    assert [line["step"] for line in added if line["type"] == "log"] == [25, 30, 35, 40]
    assert not [
        line for line in added if line["type"] == "event" and line["step"] <= 20 and line["kind"] != "resume"
    ]

    data = read_run(tmp_path)
    assert [e["step"] for e in data.history] == [5, 10, 15, 20, 25, 30, 35, 40]  # each step once
    (branch,) = data.branches
    assert (branch.kind, branch.at, [e["step"] for e in branch.entries]) == ("resume", 20, [25, 30])
    assert [e["kind"] for e in data.events_of("resume")] == ["resume"] and data.status == "completed"


def test_without_a_checkpoint_dir_nothing_is_written(tmp_path):
    _trainer(_model(), max_steps=10).fit()
    assert not list(tmp_path.rglob(RECORD_FILE))


def test_a_range_test_before_fit_is_in_the_record_and_a_five_step_run_is_drawn_whole(tmp_path):
    pytest.importorskip("matplotlib")
    from safeloop.report.render import write_report

    trainer = _trainer(_model(), max_steps=5, log_every=1, checkpoint_dir=tmp_path)
    sweep = trainer.find_lr(num_steps=10)
    trainer.fit()
    assert [line["type"] for line in _lines(tmp_path)][:2] == ["lr_find", "fit"]
    data = read_run(tmp_path)
    assert data.lr_find is not None and data.lr_find["lrs"] == sweep.lrs
    assert [e["step"] for e in data.history] == [1, 2, 3, 4, 5]
    files = write_report(tmp_path)
    assert [p.name for p in files.images] == [
        "report-loss.png", "report-lr.png", "report-grad-norm.png", "report-layer-grad-norm.png",
        "report-update-ratio.png", "report-lr-find.png",
    ]  # fmt: skip


def test_a_fit_that_raises_ends_its_record_with_the_error(tmp_path):
    from safeloop import DivergenceError

    loss_fn = spiking_loss(nn.MSELoss(), at_calls=range(40, 46), factor=30.0)
    trainer = _trainer(_model(), loss_fn, max_epochs=4, checkpoint_dir=tmp_path, max_rollbacks=0)
    with pytest.raises(DivergenceError):
        trainer.fit()
    end = _lines(tmp_path)[-1]
    assert end["type"] == "end" and end["status"] == "error" and end["error"].startswith("DivergenceError: ")
    assert read_run(tmp_path).status == "error"


def test_a_run_resumed_from_another_folder_starts_its_record_with_the_checkpoints_history(tmp_path):
    _trainer(_model(), max_steps=20, checkpoint_dir=tmp_path / "a", checkpoint_every=10).fit()
    _reset_accelerate()
    _trainer(_model(), max_steps=30, checkpoint_dir=tmp_path / "b").fit(
        resume_from=tmp_path / "a" / "step-00000020"
    )
    logged = [line for line in _lines(tmp_path / "b") if line["type"] == "log"]
    assert [(line["step"], line.get("source")) for line in logged] == [
        (5, "checkpoint"), (10, "checkpoint"), (15, "checkpoint"), (20, "checkpoint"), (25, None), (30, None)
    ]  # fmt: skip
    assert [e["step"] for e in read_run(tmp_path / "b").history] == [5, 10, 15, 20, 25, 30]
