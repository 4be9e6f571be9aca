"""The gradient noise scale under DDP and FSDP2 on 2 CPU processes (gloo): the closed form, accumulation.

One launch (``scripts/noise_scale_ranks.py``): each process's gradient before the all-reduce
(DDP) or at the reduce-scatter's input (FSDP2, 2 micro-batches of 8 per process) against the
reduced one must land within 20% of the regression's known ``B_simple``, agree with one process
accumulating the same two batch sizes (16 and 32 samples), and the hooks that read the local
gradients must leave DDP's and FSDP2's updates bit for bit as they were.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from safeloop import SafeTrainer
from tests.distributed.test_fsdp import _run
from tests.helpers.models import noisy_regression

SCRIPT = Path(__file__).parent / "scripts" / "noise_scale_ranks.py"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """The one launch: DDP, then FSDP2 (the Accelerate state stays FSDP after it is forced)."""
    return _run(tmp_path_factory.mktemp("noise") / "ranks", SCRIPT)


def test_ddp_measures_the_closed_form_noise_scale_and_agrees_with_accumulation(ranks):
    assert [r["rank"] for r in ranks] == [0, 1]
    # the values are averaged over processes in the log step's read: both hold the same estimate
    assert ranks[0]["value"] == ranks[1]["value"] and ranks[0]["codes"] == ranks[1]["codes"]
    ddp, true = ranks[0]["value"], ranks[0]["true"]
    assert ddp == pytest.approx(true, rel=0.2)
    assert ranks[0]["batch"] == 32 and ranks[0]["steps"] == 800 and "batch-size" in ranks[0]["codes"]
    assert ranks[0]["logged"][0] is None and ranks[0]["logged"][-1] == ddp
    # the hook reads each bucket and hands it to DDP's all-reduce: the updates are DDP's own
    assert ranks[0]["parity"] and ranks[1]["parity"]

    # one process accumulating 2 micro-batches of 16 measures the same two sizes
    dataset, model, _ = noisy_regression(n=65536)
    result = SafeTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        DataLoader(dataset, batch_size=16, shuffle=True),
        loss_fn=nn.MSELoss(),
        max_steps=800,
        gradient_accumulation_steps=2,
        seed=1,
        rollback=False,
        progress_bar=False,
        summary=False,
    ).fit()
    accumulated = result.gradient_noise_scale
    assert accumulated is not None and accumulated.batch_size == 32
    assert accumulated.value == pytest.approx(true, rel=0.2)
    assert accumulated.value == pytest.approx(ddp, rel=0.2)


def test_on_three_processes_the_hooked_updates_are_ddps_own_to_the_bit(tmp_path):
    # DDP without a hook multiplies each gradient by 1/3 as it copies it into the bucket; a hook
    # that divided by 3 instead (torch's allreduce_hook) would differ in the last bit
    ranks = _run(tmp_path / "ranks", SCRIPT, processes=3, PARITY_ONLY="1")
    assert [r["rank"] for r in ranks] == [0, 1, 2]
    assert all(r["parity"] for r in ranks)


def test_fsdp2_measures_the_closed_form_noise_scale_from_the_reduce_scatter_input(ranks):
    # under Accelerate's no_sync the sharded `.grad` is None until the window's last backward:
    # the small batch is each process's whole window (2 x 8), read where FSDP2 reduce-scatters it
    fsdp2, true = ranks[0]["fsdp2"], ranks[0]["true"]
    assert fsdp2 == ranks[1]["fsdp2"]  # averaged over processes at the log step: one estimate
    assert fsdp2["batch"] == 32 and fsdp2["steps"] == 800 and "batch-size" in fsdp2["codes"]
    assert fsdp2["value"] == pytest.approx(true, rel=0.2)
    assert fsdp2["value"] == pytest.approx(ranks[0]["value"], rel=0.2)  # DDP's, at the same two sizes
    assert fsdp2["logged"][0] is None and fsdp2["logged"][-1] == fsdp2["value"]
    # the measuring comm hands the buffer on unchanged: each process's shards after 12 steps are
    # bitwise those of the run without it, without and with gradient accumulation
    assert ranks[0]["fsdp2_parity"] == ranks[1]["fsdp2_parity"] == [True, True]
