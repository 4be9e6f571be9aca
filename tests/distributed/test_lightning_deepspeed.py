"""``SafeLoopCallback`` under DeepSpeed ZeRO (Lightning's ``DeepSpeedStrategy``) on 2 CPU processes (gloo).

One launch runs twelve fits in the same two processes (``scripts/lightning_deepspeed_ranks.py``);
DeepSpeed partitions each reduced gradient and each fp32 master weight over the two processes
(ZeRO-2, ZeRO-3), and Lightning calls the engine's own ``step`` after ``on_before_optimizer_step``:

- one process's loss goes NaN at step 3: the finite flag is agreed with the global norm, the
  engine refuses that step on both (DeepSpeed's own overflow path), the whole fp32 weights and
  Adam moments are bitwise as they were, and both end bitwise where a fit that never had that
  batch ends; at ZeRO-2, ZeRO-3 and ZeRO-0 (the flag read on the host, DeepSpeed having no
  overflow check there), in manual optimization, and with
  ``accumulate_grad_batches=2`` (DeepSpeed counts the window: the hooks of its first micro-batch
  take no step);
- a stuck all-zero weight is re-initialised at the first step, its whole fp32 master the Xavier
  draw an unsharded run makes; the per-layer gradient norms logged are those of the whole reduced
  gradients;
- one process's loss x1000 at step 25: both roll back in place to the checkpoint of step 20,
  whole fp32 weights and momentum bitwise those of step 20;
- the callback's own clipping: ``ConfigError`` at ``on_fit_start`` (DeepSpeed clips in its engine).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.distributed.test_fsdp import _run, by_fit

pytest.importorskip("lightning")
SCRIPT = Path(__file__).parent / "scripts" / "lightning_deepspeed_ranks.py"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]


@pytest.fixture(scope="module")
def fits(tmp_path_factory) -> dict[str, list[dict]]:
    """Each fit's two result lines (rank 0, rank 1), by fit name: one launch for the module."""
    return by_fit(_run(tmp_path_factory.mktemp("lightning-deepspeed") / "ranks", SCRIPT))


@pytest.mark.parametrize(
    ("fit", "reference", "steps"),
    [
        ("nan-2", "reference-2", 6),
        ("nan-manual-2", "reference-2", 6),
        ("nan-3", "reference-3", 6),
        ("nan-0", "reference-2", 6),  # ZeRO-0 partitions nothing: the same updates as ZeRO-2's
        ("nan-accumulate-2", "reference-accumulate-2", 4),
    ],
    ids=["zero-2", "zero-2-manual", "zero-3", "zero-0", "accumulation"],
)
def test_a_nan_on_one_process_is_refused_by_the_engine_on_both_as_if_the_batch_never_was(
    fits, fit, reference, steps
):
    ranks, refs = fits[fit], fits[reference]
    assert [r["rank"] for r in ranks] == [0, 1] == [r["rank"] for r in refs]
    for rank, ref in zip(ranks, refs, strict=True):
        assert "error" not in rank and "error" not in ref
        assert rank["steps"] == steps == ref["steps"] + 1  # the refused step counts
        assert rank["skipped"] == 1 and rank["events"] == [["checkpoint", 0], ["skip", 3]]
        assert rank["unchanged"] is True  # whole fp32 weights and Adam moments as before step 3
        assert rank["digest"] == ref["digest"]  # bitwise the fit that never saw that batch
    assert ranks[0]["findings"] == ranks[1]["findings"]  # agreed: rank 0's loss was finite
    assert ["nonfinite-loss", []] in ranks[0]["findings"]
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert fits["reference-2"][0]["digest"] == fits["reference-3"][0]["digest"]  # ZeRO-3 changes nothing
    # no hook sees a process's own gradient: said once, at INFO, in Lightning's terms
    [line] = [line for line in ranks[0]["info"] if "noise scale not measured" in line]
    assert "DeepSpeedStrategy" in line
    assert not any("noise scale" in line for line in ranks[1]["info"])


@pytest.mark.parametrize("fit", ["zero-2", "zero-3"])
def test_a_stuck_zero_weight_is_reinitialised_in_the_fp32_master_from_the_whole_draw(fits, fit):
    ranks = fits[fit]
    for rank in ranks:
        assert "error" not in rank
        assert rank["reinit"] == [{"param": "mid.weight", "shape": [16, 16], "method": "xavier"}]
        assert rank["first_step"] == {"mid_is_whole_draw": True}
        assert ["zero-params", ["mid.weight"]] in rank["findings"]
        assert ["zero-params", ["mid.bias"]] in rank["findings"]  # 1-D: reported, left alone
    assert ranks[0]["findings"] == ranks[1]["findings"] and ranks[0]["digest"] == ranks[1]["digest"]


@pytest.mark.parametrize("fit", ["zero-2", "zero-3"])
def test_the_logged_per_layer_gradient_norms_are_those_of_the_whole_reduced_gradients(fits, fit):
    rank0 = fits[fit][0]
    logged, whole = rank0["logged_grad_norms"], rank0["grad_norms"]
    assert sorted(logged) == ["1", "2", "3"]  # log_every=1: each step's own norms
    for step, norms in logged.items():
        assert norms.keys() == whole[step].keys()
        assert norms == pytest.approx(whole[step], rel=1e-5, abs=1e-7)
    assert all(value > 0 for value in logged["3"].values())


def test_a_spike_on_one_process_rolls_both_back_in_place_to_the_checkpoint(fits):
    ranks = fits["rollback-2"]
    for rank in ranks:
        assert "error" not in rank
        events = [e for e in rank["events"] if e[0] != "checkpoint"]
        assert events == [["rollback", 20], ["lr_scale", 20]]
        [rollback] = rank["rollbacks"]
        assert rollback["path"].endswith("rollback-2/step-00000020") and rollback["detected_at"] == 30
        # whole fp32 weights and momentum bitwise those of step 20, the learning rate halved
        assert rank["restored"] == [{"held": True, "at": 30, "lr": 0.025}]
        assert max(rank["losses"]) > 100
    assert ranks[0]["rollbacks"] == ranks[1]["rollbacks"] and ranks[0]["digest"] == ranks[1]["digest"]


def test_the_callbacks_own_clipping_is_refused_at_fit_start_on_both_processes(fits):
    for rank in fits["clip-2"]:
        assert rank["error"].startswith("SafeLoopCallback cannot guard this Trainer:")
        assert "`SafeLoopCallback(clip_grad_norm=1.0)` under DeepSpeedStrategy" in rank["error"]
        assert "Fix: `Trainer(gradient_clip_val=...)`" in rank["error"]
        assert rank["events"] == []
