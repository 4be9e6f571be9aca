"""MetricBuffer.record: one float32 row per step, whatever shapes and dtypes the values come in."""

from __future__ import annotations

import math

import torch

from safeloop.metrics import MetricBuffer


def _row(buffer: MetricBuffer) -> list[float]:
    return buffer._rows[-1].tolist()


def test_row_layout_with_the_guard_and_without() -> None:
    buffer = MetricBuffer(capacity=4)
    norms = torch.tensor([0.5, float("nan"), 2.0])
    buffer.record(torch.tensor(2.5), torch.tensor(3.0), torch.tensor(1.0), norms)
    row = _row(buffer)
    assert buffer._rows[-1].dtype == torch.float32
    assert row[:4] == [2.5, 3.0, 1.0, 0.0] and row[4] == 0.5 and math.isnan(row[5]) and row[6] == 2.0
    buffer.record(torch.tensor(2.5), torch.tensor(3.0), torch.tensor(0.0), norms, overflow=torch.tensor(1.0))
    assert _row(buffer)[2:4] == [0.0, 1.0]
    buffer.record(torch.tensor(1.5), torch.tensor(4.0))  # guard off: loss and norm only
    assert _row(buffer) == [1.5, 4.0]


def test_other_shapes_and_dtypes_take_the_careful_path_to_the_same_row() -> None:
    buffer = MetricBuffer(capacity=4)
    norms = torch.tensor([0.5, 2.0], dtype=torch.float64)
    # a (1,)-shaped bf16 loss, an int flag and a (1,)-shaped overflow: stack refuses the shapes
    buffer.record(
        torch.tensor([2.5], dtype=torch.bfloat16),
        torch.tensor(3.0),
        torch.tensor(1, dtype=torch.int32),
        norms,
        overflow=torch.tensor([0.0]),
    )
    assert buffer._rows[-1].dtype == torch.float32
    assert _row(buffer) == [2.5, 3.0, 1.0, 0.0, 0.5, 2.0]


def test_buffer_never_grows_past_its_capacity() -> None:
    buffer = MetricBuffer(capacity=2)
    for step in range(5):
        buffer.record(torch.tensor(float(step)), torch.tensor(1.0))
    assert len(buffer) == 2 and _row(buffer) == [4.0, 1.0]
