"""``SafeLoopCallback`` under FSDP1 (Lightning's ``FSDPStrategy``) on 2 CPU processes (gloo).

One launch runs eight fits in the same two processes (``scripts/lightning_fsdp1_ranks.py``); every
``Linear`` is its own FSDP1 unit with ``use_orig_params=True``, so each parameter is a flat view
of this process's slice of it (rank 0's bias slices are empty):

- one process's loss goes NaN at step 3: the finite flag is agreed, both skip that step, it
  leaves each process's slices and Adam state bitwise as they were, and with the callback's
  ``clip_grad_norm=0.05`` each process ends bitwise where a fit that never had that batch, clipped
  by FSDP1's own ``clip_grad_norm_``, ends; in manual optimization too, where FSDP1's own clip
  cannot run (``training_step`` is the root's forward), and with bf16 parameters and gradients
  (``precision="bf16-true"``), where FSDP1 casts its clip coefficient to bf16;
- a stuck all-zero weight is re-initialised at the first step, gathered whole the Xavier draw an
  unsharded run makes; a weight that is zero in one process's slice only is left alone; the
  per-layer gradient norms logged are those of the whole reduced gradients;
- one process's loss x1000 at step 25: both roll back in place to their own shards of the
  checkpoint of step 20 (FSDP1's sharded state dict, safetensors): slices and momentum bitwise
  those held at step 20, the shard file's rows those of the whole parameters then;
- ``use_orig_params=False``: ``ConfigError`` at ``on_fit_start`` on both processes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.test_fsdp import _run, by_fit

pytest.importorskip("lightning")

SCRIPT = Path(__file__).parent / "scripts" / "lightning_fsdp1_ranks.py"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fits(tmp_path_factory) -> dict[str, list[dict]]:
    """Each fit's two result lines (rank 0, rank 1), by fit name: one launch for the module."""
    return by_fit(_run(tmp_path_factory.mktemp("lightning-fsdp1") / "ranks", SCRIPT))


@pytest.mark.parametrize(
    ("fit", "reference"),
    [("nan", "reference"), ("nan-manual", "reference"), ("nan-bf16", "reference-bf16")],
    # bf16: FSDP1 casts the clip coefficient to the gradient's dtype before multiplying
    ids=["automatic", "manual", "bf16-true"],
)
def test_a_nan_on_one_process_is_skipped_on_both_and_the_clip_is_fsdp1s_own(fits, fit, reference):
    ranks, refs = fits[fit], fits[reference]
    assert [r["rank"] for r in ranks] == [0, 1] == [r["rank"] for r in refs]
    for rank, ref in zip(ranks, refs, strict=True):
        assert "error" not in rank and "error" not in ref
        assert rank["skipped"] == 1 and rank["events"] == [["checkpoint", 0], ["skip", 3]]
        assert rank["unchanged"] is True  # slices and optimizer state as before step 3
        # bitwise the fit that never saw step 3's batch, clipped by the root's clip_grad_norm_
        assert rank["digest"] == ref["digest"]
        # the clip acted: every logged global norm (before clipping) is past the bound of 0.05
        assert len(rank["global_norms"]) == 3 and min(rank["global_norms"]) > 0.05
    assert ranks[0]["digest"] != ranks[1]["digest"]  # each holds its own slices (else moot)
    assert ranks[0]["findings"] == ranks[1]["findings"]  # agreed: rank 0's loss was finite
    assert ["nonfinite-loss", []] in ranks[0]["findings"]
    assert ranks[0]["losses"] == ranks[1]["losses"]
    if fit == "nan-manual":  # the same steps as automatic optimization's
        assert ranks[0]["losses"] == fits["nan"][0]["losses"]
    # FSDP1 has no hook that sees a process's own gradient: said once, at INFO, in Lightning's terms
    [line] = [line for line in ranks[0]["info"] if "noise scale not measured" in line]
    assert "FSDPStrategy (FSDP1)" in line and "ModelParallelStrategy" in line
    assert not any("noise scale" in line for line in ranks[1]["info"])


def test_a_stuck_zero_weight_is_reinitialised_from_the_whole_draw_and_a_zero_slice_alone_is_not(fits):
    ranks = fits["zero"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for rank in ranks:
        assert "error" not in rank
        # mid.weight only: first.weight is zero in rank 0's slice, not as a whole; mid.bias is 1-D
        assert rank["reinit"] == [{"param": "mid.weight", "shape": [16, 16], "method": "xavier"}]
        assert rank["first_step"]["mid_is_whole_draw"] is True  # gathered: the unsharded draw
        assert ["zero-params", ["mid.weight"]] in rank["findings"]
        assert ["zero-params", ["mid.bias"]] in rank["findings"]
    assert ranks[0]["first_step"]["first_slice_zero"] is True  # not re-initialised per slice
    assert ranks[0]["findings"] == ranks[1]["findings"]


def test_the_logged_per_layer_gradient_norms_are_those_of_the_whole_reduced_gradients(fits):
    rank0 = fits["zero"][0]
    logged, whole = rank0["logged_grad_norms"], rank0["grad_norms"]
    assert sorted(logged) == ["1", "2", "3"]  # log_every=1: each step's own norms
    for step, norms in logged.items():
        # named as the module names them, without FSDP1's `_fsdp_wrapped_module.`
        assert (
            sorted(norms)
            == sorted(whole[step])
            == sorted(f"{layer}.{kind}" for layer in ("first", "mid", "last") for kind in ("weight", "bias"))
        )
        assert norms == pytest.approx(whole[step], rel=1e-5, abs=1e-7)
    assert all(value > 0 for value in logged["3"].values())


def test_a_spike_on_one_process_rolls_both_back_to_their_own_shards_of_the_checkpoint(fits):
    ranks = fits["rollback"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for rank in ranks:
        assert "error" not in rank
        events = [e for e in rank["events"] if e[0] != "checkpoint"]
        assert events == [["rollback", 20], ["lr_scale", 20]]
        [rollback] = rank["rollbacks"]
        assert rollback["path"].endswith("rollback/step-00000020") and rollback["detected_at"] == 30
        # slices and momentum bitwise those held at step 20; the file's rows those of the whole
        assert rank["restored"] == [{"held": True, "file": True, "at": 30, "lr": 0.025}]
        assert max(rank["losses"]) > 100
    assert ranks[0]["rollbacks"] == ranks[1]["rollbacks"] and ranks[0]["findings"] == ranks[1]["findings"]


def test_flat_parameters_are_refused_at_fit_start_on_both_processes(fits):
    ranks = fits["orig-false"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for rank in ranks:
        assert rank["error"].startswith("SafeLoopCallback cannot guard this Trainer:")
        assert "`use_orig_params=False`" in rank["error"]
        assert "Fix: `FSDPStrategy(use_orig_params=True)`" in rank["error"]
        assert rank["events"] == []  # nothing ran: no checkpoint, no step
