"""``SafeLoopCallback`` under Lightning's DDP on 2 CPU processes (gloo), launched by torchrun.

One process's loss goes NaN at step 3: the finite flag is agreed, so both processes skip that
step, it changes nothing on either, and they end with the same parameters and findings. A layer
that gets no gradient is named on both, and under plain ``"ddp"`` both stop with the
``ConfigError`` that names Lightning's fix instead of DDP's reduction error at the next step.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.test_fsdp import _run

pytest.importorskip("lightning")

SCRIPT = Path(__file__).parent / "scripts" / "lightning_ddp_ranks.py"
pytestmark = pytest.mark.slow


def test_a_nan_on_one_process_is_skipped_on_both_and_changes_nothing(tmp_path):
    ranks = _run(tmp_path / "ranks", SCRIPT)
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world_size"] == 2
    for rank in ranks:
        assert "error" not in rank
        assert rank["skipped"] == 1 and rank["events"] == [["skip", 3]]
        assert rank["unchanged"] is True  # parameters and AdamW state as before step 3
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["findings"] == ranks[1]["findings"]  # agreed: each saw its own loss
    codes = {code for code, _ in ranks[0]["findings"]}
    assert {"unused-params", "nonfinite-loss"} <= codes
    assert ["unused-params", ["aux.weight", "aux.bias"]] in ranks[0]["findings"]
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == 3  # means over both


def test_an_unused_layer_under_plain_ddp_stops_both_processes_with_lightnings_fix(tmp_path):
    ranks = _run(tmp_path / "ranks", SCRIPT, STRICT="1")
    assert [r["rank"] for r in ranks] == [0, 1]
    for rank in ranks:
        assert rank["error"].startswith("Under DDP every trainable parameter must receive a gradient")
        assert 'Trainer(strategy="ddp_find_unused_parameters_true")' in rank["error"]
        assert "`aux` (weight, bias)" in rank["error"]
