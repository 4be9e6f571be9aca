"""SafeTrainer under DeepSpeed ZeRO-0/1/2/3 on two CPU processes (gloo), against the same run under DDP.

safeloop calls the engine's backward and step apart (Accelerate's ``backward`` runs both at
once), so the per-parameter statistics come from each process's partition of the reduced
gradients, before the step, and the NaN/Inf guard decides before DeepSpeed updates anything.
Skipped where DeepSpeed is not installed (it is in the ``test`` extra).
"""

from __future__ import annotations

import collections
import importlib.util
import json
import math
from pathlib import Path

import pytest

from tests.distributed.test_fsdp import _assert_same_as_ddp, _run, _warnings

SCRIPT = Path(__file__).parent / "scripts" / "train_deepspeed_ranks.py"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]


def _launch(out_dir: Path, **env: str) -> list[dict]:
    """Run the script on 2 ranks; each rank's record (written to a file: it holds the weights)."""
    records = []
    for line in _run(out_dir, SCRIPT, **env):
        with open(line["file"]) as fh:
            records.append(json.load(fh))
    return records


def _ds(out_dir: Path, stage: int, **env: str) -> list[dict]:
    return _launch(out_dir, MODE="ds", STAGE=str(stage), **env)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[list[dict], Path]:
    out_dir = tmp_path_factory.mktemp("reference") / "ddp"
    return _launch(out_dir, MODE="ddp"), out_dir


def test_the_baseline_loss_counts_the_targets_of_both_processes(ddp_run):
    ddp, _ = ddp_run
    targets = [t for record in ddp for t in record["first_targets"]]
    frequencies = [count / len(targets) for count in collections.Counter(targets).values()]
    expected = -sum(p * math.log(p) for p in frequencies)
    assert len(ddp[0]["first_targets"]) == len(ddp[1]["first_targets"]) > 0
    assert ddp[0]["baseline"] == ddp[1]["baseline"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_logs_the_per_layer_norms_update_ratios_and_findings_of_ddp(tmp_path, ddp_run, stage):
    ddp, ddp_dir = ddp_run
    results = _ds(tmp_path / "ds", stage)
    # statistics from this process's partitions, summed over the 2 processes
    assert [r["layout"] for r in results] == [[2, True, True]] * 2
    _assert_same_as_ddp(results, tmp_path / "ds", ddp, ddp_dir, kind="DEEPSPEED")
    assert [r["baseline"] for r in results] == [ddp[0]["baseline"]] * 2
    # the updates themselves are DDP's, bit for bit (taking the step apart from the backward
    # changes nothing), and so are the losses
    assert results[0]["weights"] == ddp[0]["weights"]
    assert results[0]["losses"] == ddp[0]["losses"]


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_with_gradient_accumulation_applies_the_hand_written_accelerate_loops_updates(tmp_path, stage):
    # the trainer sets the engine's accumulation boundary from Accelerate's `sync_gradients`, as
    # Accelerate's `backward` does, then steps the engine itself: the same updates, bit for bit
    loop = _ds(tmp_path / "loop", stage, ACCUM="2", MAX_STEPS="6", LOOP="hand-written")
    results = _ds(tmp_path / "ds", stage, ACCUM="2", MAX_STEPS="6")
    assert [r["steps"] for r in results + loop] == [6, 6, 6, 6]
    assert results[0]["weights"] == loop[0]["weights"]


def test_zero_follows_the_trainers_lr_scheduler_as_ddp_does(tmp_path):
    # the scheduler (not prepared) sets the lr in the param groups ZeRO's optimizer steps with
    ddp = _launch(tmp_path / "ddp", MODE="ddp", SCHEDULER="1", MAX_STEPS="6")
    results = _ds(tmp_path / "ds", 2, SCHEDULER="1", MAX_STEPS="6")
    constant = _ds(tmp_path / "constant", 2, MAX_STEPS="6")
    assert results[0]["weights"] == ddp[0]["weights"]
    assert results[0]["weights"] != constant[0]["weights"]  # the schedule did change the updates


def test_zero_stage_0_is_measured_as_an_unsharded_run(tmp_path, ddp_run):
    ddp, ddp_dir = ddp_run
    results = _ds(tmp_path / "ds", 0)
    assert [r["layout"] for r in results] == [[None, True, False]] * 2
    _assert_same_as_ddp(results, tmp_path / "ds", ddp, ddp_dir, kind="DEEPSPEED")


@pytest.fixture(scope="module")
def ddp_nan_loss(tmp_path_factory) -> list[dict]:
    return _launch(tmp_path_factory.mktemp("reference") / "ddp", MODE="ddp", FAULT="nanloss", MAX_STEPS="6")


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_nan_loss_with_finite_gradients_is_skipped_before_deepspeed_applies_it(
    tmp_path, ddp_nan_loss, stage
):
    # DeepSpeed's own overflow check looks at gradients only: it would apply this step
    results = _ds(tmp_path / "ds", stage, FAULT="nanloss", MAX_STEPS="6")
    for result in results:
        assert (result["steps"], result["skipped"]) == (6, 1)
        assert ["skip", 3] in result["events"]
    # the skipped step changed nothing: the weights are those of DDP, whose guard skipped it too
    assert results[0]["weights"] == ddp_nan_loss[0]["weights"]


def test_non_finite_gradients_are_skipped_and_counted_once(tmp_path, ddp_nan_loss):
    results = _ds(tmp_path / "ds", 2, FAULT="nangrad", MAX_STEPS="6")
    for result in results:
        assert (result["steps"], result["skipped"]) == (6, 1)
        assert ["skip", 3] in result["events"]
    assert results[0]["weights"] == ddp_nan_loss[0]["weights"]


def test_nan_guard_raise_stops_before_deepspeed_updates_anything(tmp_path):
    ddp = _launch(tmp_path / "ddp", MODE="ddp", FAULT="nanloss", GUARD="raise")
    results = _ds(tmp_path / "ds", 3, FAULT="nanloss", GUARD="raise")
    for result in results + ddp:
        assert (result["error"], result["steps"]) == ("NonFiniteError", 2)
    # the weights after step 2: the refused step 3 left them alone, as under DDP
    assert results[0]["weights"] == ddp[0]["weights"]


def test_zero_3_names_an_unused_layer_from_gradient_hooks(tmp_path):
    # `.grad` stays None for every parameter under ZeRO: hooks on gradient accumulation tell
    results = _ds(tmp_path / "ds", 3, UNUSED="1", MAX_STEPS="2")
    for result in results:
        assert ("unused-params", ["aux.weight", "aux.bias"], 0) in _warnings(result)


@pytest.fixture(scope="module")
def ddp_zero_weights(tmp_path_factory) -> list[dict]:
    return _launch(tmp_path_factory.mktemp("reference") / "ddp", MODE="ddp", MODEL="zero", MAX_STEPS="4")


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_reinitialises_a_stuck_zero_weight_in_its_partitions_as_ddp_does(
    tmp_path, ddp_zero_weights, stage
):
    ddp = ddp_zero_weights
    results = _ds(tmp_path / "ds", stage, MODEL="zero", MAX_STEPS="4")
    for result in results + ddp:
        assert result["reinit"] == [{"param": "0.weight", "shape": [5, 8], "method": "xavier"}]
        zero = [
            (code, severity, params)
            for code, severity, params, _ in result["findings"]
            if code == "zero-params"
        ]
        assert zero == [("zero-params", "warning", ["0.weight"]), ("zero-params", "info", ["2.weight"])]
    # the same draw, kept partition by partition: bit for bit DDP's weights after 4 steps
    assert results[0]["weights"] == ddp[0]["weights"]


def test_an_optimizer_of_another_model_instance_is_named_before_deepspeed_fails_on_it(tmp_path):
    # ZeRO swaps the optimizer's param groups for flat partitions in `prepare`, and stops there
    # with a bare `KeyError: Parameter containing: tensor(...)` on a tensor not in the model:
    # the check runs before `prepare`
    with pytest.raises(AssertionError) as failed:
        _ds(tmp_path / "ds", 2, OPTIMIZER="other-model", MAX_STEPS="2")
    assert "ConfigError" in str(failed.value) and "optimizer-foreign-params" in str(failed.value)
    assert "KeyError" not in str(failed.value)


def test_clipping_that_deepspeed_would_not_apply_is_a_config_error(tmp_path):
    with pytest.raises(
        AssertionError, match=r"clip_grad_norm=1\.0, while the DeepSpeed config's gradient_clipping"
    ):
        _ds(tmp_path / "ds", 2, CLIP="1.0", MAX_STEPS="2")
    # the same value in the DeepSpeed config: DeepSpeed clips, and the run goes on
    results = _ds(tmp_path / "ok", 2, CLIP="1.0", DS_CLIP="1.0", MAX_STEPS="2")
    assert [r["steps"] for r in results] == [2, 2]
