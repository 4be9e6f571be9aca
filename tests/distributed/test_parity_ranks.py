"""Bitwise parity with the hand-written Accelerate loop on two CPU processes (DDP over gloo).

The single-process parity is in ``tests/integration/test_parity.py``; here the trainer and
Accelerate's documented loop run under torchrun, with gradient accumulation, and the final
weights must be equal bit for bit, though the trainer ran ``find_lr`` first. The script is the
DeepSpeed test's (``MODE=ddp`` needs no DeepSpeed).
"""

from __future__ import annotations

import pytest

from tests.distributed.test_deepspeed import _launch

pytestmark = pytest.mark.slow


def test_two_processes_with_accumulation_apply_the_hand_written_loops_updates(tmp_path):
    # the trainer runs a learning-rate range test first (shuffled data, accumulation 2): restored
    # bitwise, its fit still applies exactly the hand-written loop's updates
    loop = _launch(tmp_path / "loop", MODE="ddp", ACCUM="2", MAX_STEPS="6", LOOP="hand-written")
    trainer = _launch(tmp_path / "trainer", MODE="ddp", ACCUM="2", MAX_STEPS="6", FIND_LR="20")
    assert [r["steps"] for r in loop + trainer] == [6, 6, 6, 6]
    assert trainer[0]["weights"] == loop[0]["weights"] and trainer[1]["weights"] == loop[1]["weights"]
    # one curve, one decision: the loss is averaged over both processes before anything is decided
    found = [record["find_lr"] for record in trainer]
    assert found[0] == found[1] and len(found[0]["lrs"]) >= 10
    assert found[0]["passes"] > 1  # 4 windows per pass on each process: the loader was cycled
