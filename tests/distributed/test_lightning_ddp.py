"""``SafeLoopCallback`` under Lightning's DDP on 2 CPU processes (gloo), launched by torchrun.

One launch runs four fits in the same two processes (``scripts/lightning_ddp_ranks.py``):

- one process's loss goes NaN at step 3, in automatic and in manual optimization: the finite flag
  is agreed, so both processes skip that step, it changes nothing on either, and they end with the
  same parameters and findings; a layer that gets no gradient is named on both;
- one process's loss is multiplied by 1000 at step 25, in automatic and in manual optimization:
  the mean loss spikes on both, both roll back in place to the checkpoint of step 20, their
  parameters right after it are bitwise the checkpoint's, and they train on to the same weights;
- the same at steps 31-33 of 33, confirmed by the last log step in ``on_train_end``: both roll
  back there, and leave the fit with the checkpoint's weights;
- the same at step 31 with two ``opt.step()`` per ``training_step``: found at the boundary of
  step 35, inside step 36, both roll back at the end of that batch;
- the gradient noise scale of ``noisy_regression`` from SafeTrainer's communication hook on
  Lightning's DDP module: within 20% of the closed form, the same on both processes.

A second launch, under plain ``"ddp"``: both stop with the ``ConfigError`` that names Lightning's
fix instead of DDP's reduction error at the next step.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.test_fsdp import _run, by_fit

pytest.importorskip("lightning")

SCRIPT = Path(__file__).parent / "scripts" / "lightning_ddp_ranks.py"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fits(tmp_path_factory) -> dict[str, list[dict]]:
    """Each fit's two result lines (rank 0, rank 1), by fit name: one launch for the module."""
    return by_fit(_run(tmp_path_factory.mktemp("lightning") / "ranks", SCRIPT))


@pytest.mark.parametrize("name", ["automatic", "manual"])
def test_a_nan_on_one_process_is_skipped_on_both_and_changes_nothing(fits, name):
    ranks = fits[name]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world_size"] == 2
    for rank in ranks:
        assert "error" not in rank
        assert rank["skipped"] == 1 and rank["events"] == [["checkpoint", 0], ["skip", 3]]
        assert rank["unchanged"] is True  # parameters and Adam state as before step 3
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["findings"] == ranks[1]["findings"]  # agreed: each saw its own loss
    codes = {code for code, _ in ranks[0]["findings"]}
    assert {"unused-params", "nonfinite-loss"} <= codes and "direct-backward" not in codes
    assert ["unused-params", ["aux.weight", "aux.bias"]] in ranks[0]["findings"]
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == 3  # means over both


@pytest.mark.parametrize("name", ["rollback", "rollback-manual"])
def test_a_spike_on_one_process_rolls_both_back_to_the_same_checkpoint(fits, name):
    ranks = fits[name]
    assert [r["rank"] for r in ranks] == [0, 1]
    for rank in ranks:
        assert "error" not in rank
        kinds = [event for event in rank["events"] if event[0] != "checkpoint"]
        assert kinds == [["rollback", 20], ["lr_scale", 20]]
        [rollback] = rank["rollbacks"]
        assert rollback["path"].endswith(f"{name}/step-00000020") and rollback["detected_at"] == 30
        assert rank["restored"] == [True]  # bitwise the checkpoint's parameters, on each process
        assert rank["restored_at"] == [["on_train_batch_end", 30]]
        assert rank["lr_after"] == [0.025]  # 0.05 x rollback_lr_factor
        assert max(rank["losses"][-3:]) < 1.0 < 100 < max(rank["losses"])  # the spike, then trained on
    assert ranks[0]["rollbacks"] == ranks[1]["rollbacks"]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # the same weights after it
    assert ranks[0]["losses"] == ranks[1]["losses"] and ranks[0]["findings"] == ranks[1]["findings"]


@pytest.mark.parametrize(
    ("name", "hook", "at", "detected"),
    [("rollback-end", "on_train_end", 33, 33), ("rollback-two-steps", "on_train_batch_end", 36, 35)],
    ids=["at-the-end-of-training", "inside-a-step"],
)
def test_a_spike_found_in_on_train_end_or_inside_a_step_rolls_both_back(fits, name, hook, at, detected):
    ranks = fits[name]
    assert [r["rank"] for r in ranks] == [0, 1]
    for rank in ranks:
        assert "error" not in rank
        assert [event for event in rank["events"] if event[0] != "checkpoint"] == [
            ["rollback", 30],
            ["lr_scale", 30],
        ]
        [rollback] = rank["rollbacks"]
        assert rollback["path"].endswith(f"{name}/step-00000030") and rollback["detected_at"] == detected
        # made at that hook, after the batch's last update; bitwise the checkpoint's parameters
        assert rank["restored_at"] == [[hook, at]] and rank["restored"] == [True]
        assert rank["lr_after"] == [0.025]
    assert ranks[0]["rollbacks"] == ranks[1]["rollbacks"]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # the same weights after it (the checkpoint's at the end)


def test_ddp_measures_the_closed_form_noise_scale_through_the_communication_hook(fits):
    ranks = fits["noise-ddp"]
    assert [r["rank"] for r in ranks] == [0, 1]
    # the values are averaged over processes in the log step's read: both hold the same estimate
    assert ranks[0]["value"] == ranks[1]["value"] and ranks[0]["codes"] == ranks[1]["codes"]
    assert ranks[0]["value"] == pytest.approx(ranks[0]["true"], rel=0.2)
    assert (ranks[0]["batch"], ranks[0]["steps"]) == (32, 600) and "batch-size" in ranks[0]["codes"]
    assert ranks[0]["logged"][0] is None and ranks[0]["logged"][-1] == ranks[0]["value"]


def test_an_unused_layer_under_plain_ddp_stops_both_processes_with_lightnings_fix(tmp_path):
    ranks = _run(tmp_path / "ranks", SCRIPT, STRICT="1")
    assert [r["rank"] for r in ranks] == [0, 1]
    for rank in ranks:
        assert rank["error"].startswith("Under DDP every trainable parameter must receive a gradient")
        assert 'Trainer(strategy="ddp_find_unused_parameters_true")' in rank["error"]
        assert "`aux` (weight, bias)" in rank["error"]
