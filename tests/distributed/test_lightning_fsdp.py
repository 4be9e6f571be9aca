"""``SafeLoopCallback`` under FSDP2 (Lightning's ``ModelParallelStrategy``) on 2 CPU processes (gloo).

One launch runs six fits in the same two processes (``scripts/lightning_fsdp_ranks.py``); every
parameter is a DTensor sharded by rows over the two processes (``fully_shard`` in
``configure_model``):

- one process's loss goes NaN at step 3: the finite flag is agreed, both skip that step, it
  leaves each process's local shards and Adam state bitwise as they were, and each process ends
  bitwise where a fit that never had that batch ends (the reference, without the callback);
- a stuck all-zero weight is re-initialised at the first step, each process keeping its rows of
  the same whole Xavier draw an unsharded run makes; a weight that is zero on one process's shard
  only is left alone (the decision is global); the per-layer gradient norms logged are those of
  the reduced gradients;
- one process's loss x1000 at step 25: both roll back in place to their own shards of the
  checkpoint of step 20: local shards bitwise the checkpoint's file and those held at step 20,
  momentum buffers those of step 20, the optimizer still over the module's parameter objects;
- ``tensor_parallel_size=2``, and a module without ``fully_shard``: ``ConfigError`` at
  ``on_fit_start`` on both processes, saying why and what to do;
- the gradient noise scale of ``noisy_regression`` from each process's gradient at FSDP2's
  reduce-scatter: within 20% of the closed form, the same on both; the measuring comm leaves the
  updates bitwise alone; with accumulation it is not measured, said at INFO.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.test_fsdp import _run, by_fit

pytest.importorskip("lightning")

SCRIPT = Path(__file__).parent / "scripts" / "lightning_fsdp_ranks.py"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fits(tmp_path_factory) -> dict[str, list[dict]]:
    """Each fit's two result lines (rank 0, rank 1), by fit name: one launch for the module."""
    return by_fit(_run(tmp_path_factory.mktemp("lightning-fsdp") / "ranks", SCRIPT))


@pytest.mark.parametrize(
    ("fit", "reference"),
    [
        ("nan", "reference"),
        # manual_backward and opt.step() in training_step; the callback clips the DTensor
        # gradients to norm 0.05, the reference (no callback) clips them by hand
        ("nan-manual", "reference-manual"),
        # accumulate_grad_batches=2: the NaN in a window's first micro-batch; the reference never
        # had that window (both its micro-batches left out)
        ("nan-accumulate", "reference-accumulate"),
    ],
    ids=["automatic", "manual-with-clipping", "accumulation"],
)
def test_a_nan_on_one_process_is_skipped_on_both_and_leaves_the_shards_as_without_that_batch(
    fits, fit, reference
):
    ranks, refs = fits[fit], fits[reference]
    assert [r["rank"] for r in ranks] == [0, 1] == [r["rank"] for r in refs]
    for rank, ref in zip(ranks, refs, strict=True):
        assert "error" not in rank and "error" not in ref
        assert rank["skipped"] == 1 and rank["events"] == [["checkpoint", 0], ["skip", 3]]
        assert rank["unchanged"] is True  # local shards and optimizer state as before step 3
        # bitwise the fit that never saw step 3's batch: the skip changed nothing, anywhere
        assert rank["digest"] == ref["digest"]
    assert ranks[0]["digest"] != ranks[1]["digest"]  # each holds its own rows (the test would be moot)
    assert ranks[0]["findings"] == ranks[1]["findings"]  # agreed: rank 0's loss was finite
    assert ["nonfinite-loss", []] in ranks[0]["findings"]
    if fit == "nan":
        assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == 3
    if fit == "nan-manual":  # the clip acted: the automatic fit, which does not clip, ends elsewhere
        assert ranks[0]["digest"] != fits["nan"][0]["digest"]


def test_a_stuck_zero_weight_is_reinitialised_from_the_whole_draw_and_a_zero_shard_alone_is_not(fits):
    ranks = fits["zero"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for rank in ranks:
        assert "error" not in rank
        # mid.weight only: first.weight is zero in rank 0's rows, not as a whole
        assert rank["reinit"] == [{"param": "mid.weight", "shape": [16, 16], "method": "xavier"}]
        assert rank["first_step"]["mid_is_whole_draw"] is True  # its rows of the unsharded draw
    assert ranks[0]["first_step"]["first_shard_zero"] is True  # not re-initialised per shard
    assert ranks[0]["findings"] == ranks[1]["findings"]
    assert ["zero-params", ["mid.weight"]] in ranks[0]["findings"]
    assert ranks[0]["digest"] != ranks[1]["digest"]


def test_the_logged_per_layer_gradient_norms_are_those_of_the_reduced_gradients(fits):
    rank0 = fits["zero"][0]
    logged, reduced = rank0["logged_grad_norms"], rank0["grad_norms"]
    assert sorted(logged) == ["1", "2", "3"]  # log_every=1: each step's own norms
    for step, norms in logged.items():
        assert norms.keys() == reduced[step].keys()
        assert norms == pytest.approx(reduced[step], rel=1e-5, abs=1e-7)
    assert any(value > 0 for value in logged["3"].values())


@pytest.mark.parametrize(
    ("name", "target", "detected", "hook"),
    [("rollback", 20, 30, "on_train_batch_end"), ("rollback-end", 30, 33, "on_train_end")],
    ids=["at-a-log-step", "at-the-end-of-training"],
)
def test_a_spike_on_one_process_rolls_both_back_to_their_own_shards_of_the_checkpoint(
    fits, name, target, detected, hook
):
    ranks = fits[name]
    assert [r["rank"] for r in ranks] == [0, 1]
    for rank in ranks:
        assert "error" not in rank
        events = [e for e in rank["events"] if e[0] != "checkpoint"]
        assert events == [["rollback", target], ["lr_scale", target]]
        [rollback] = rank["rollbacks"]
        assert rollback["path"].endswith(f"{name}/step-{target:08d}") and rollback["detected_at"] == detected
        [restored] = rank["restored"]
        # bitwise this process's shard file, and the shards and momentum it held at the target step;
        # at the end of training: the module the fit leaves
        assert restored == {
            "file": True,
            "shards": True,
            "momentum": True,
            "same_objects": True,
            "at": detected,
            "hook": hook,
            "lr": 0.025,
        }
        assert max(rank["losses"]) > 100
    assert ranks[0]["rollbacks"] == ranks[1]["rollbacks"] and ranks[0]["findings"] == ranks[1]["findings"]


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("tensor-parallel", ["tensor_parallel_size=2", "tensor_parallel_size=1)"]),
        ("not-sharded", ["are not DTensors", "fully_shard", "configure_model"]),
    ],
)
def test_what_cannot_be_guarded_is_refused_at_fit_start_on_both_processes(fits, name, says):
    ranks = fits[name]
    assert [r["rank"] for r in ranks] == [0, 1]
    for rank in ranks:
        assert rank["error"].startswith("SafeLoopCallback cannot guard this Trainer:")
        for words in says:
            assert words in rank["error"]
        assert rank["events"] == []  # nothing ran: no checkpoint, no step


def test_fsdp2_measures_the_closed_form_noise_scale_at_the_reduce_scatter(fits):
    ranks = fits["noise"]
    assert [r["rank"] for r in ranks] == [0, 1]
    # averaged over processes in the log step's read: both hold the same estimate
    assert ranks[0]["value"] == ranks[1]["value"] and ranks[0]["codes"] == ranks[1]["codes"]
    assert ranks[0]["value"] == pytest.approx(ranks[0]["true"], rel=0.2)
    assert (ranks[0]["batch"], ranks[0]["steps"]) == (32, 600) and "batch-size" in ranks[0]["codes"]
    assert ranks[0]["logged"][0] is None and ranks[0]["logged"][-1] == ranks[0]["value"]
    assert ranks[0]["unmeasured"] == ranks[1]["unmeasured"] == []


def test_the_measuring_comm_leaves_the_updates_alone_and_accumulation_is_said_at_info(fits):
    # `nan` measured through the comm of each layer's FSDP module (the root holds no parameter of
    # its own, so no reduce-scatter), and its digest is the reference's
    # (test_a_nan_on_one_process_...): the comm hands FSDP2's buffers on unchanged
    for rank in fits["nan"]:
        assert rank["measuring_comm"] == [True] * 3 and rank["unmeasured"] == []
    for rank in fits["nan-accumulate"]:
        assert rank["measuring_comm"] == [False] * 3 and rank["noise"] is None
    main, other = fits["nan-accumulate"]
    [line] = main["unmeasured"]
    assert "`accumulate_grad_batches` > 1 every micro-batch reduce-scatters its own gradient" in line
    assert other["unmeasured"] == []  # said once, by the main process
