"""WindowMedian and sample_variance agree with the statistics module they replace on the log step."""

from __future__ import annotations

import random
import statistics
from collections import deque

import pytest

from safeloop.diagnostics.window_stats import WindowMedian, sample_variance


@pytest.mark.parametrize("size", [1, 2, 7, 1000])
def test_median_equals_statistics_median_of_the_same_window(size: int) -> None:
    rng = random.Random(size)
    window, reference = WindowMedian(size), deque(maxlen=size)
    for check in range(300):
        # batches of a log interval: repeated values, ties, negatives, huge and tiny magnitudes
        batch = [rng.choice([rng.gauss(0, 1), 1.0, 0.0, 1e30, -1e-30, rng.random()]) for _ in range(10)]
        if check % 37 == 0:
            batch = []  # an interval whose norms were all non-finite
        window.extend(batch)
        reference.extend(batch)
        assert len(window) == len(reference)
        if reference:
            assert window.median() == statistics.median(reference)


def test_empty_window_and_bad_size_are_refused() -> None:
    window = WindowMedian(3)
    with pytest.raises(ValueError, match="empty window"):
        window.median()
    window.extend([2.0, 4.0])
    assert window.median() == 3.0
    window.clear()
    assert len(window) == 0
    with pytest.raises(ValueError, match="at least 1"):
        WindowMedian(0)


def test_sample_variance_matches_statistics_variance() -> None:
    rng = random.Random(0)
    for n in (2, 3, 10, 200):
        values = [rng.gauss(2.3, 0.01) for _ in range(n)]
        assert sample_variance(values) == pytest.approx(statistics.variance(values), rel=1e-12)
    assert sample_variance([2.0, 2.0, 2.0]) == 0.0
    assert sample_variance([1e8 + 1, 1e8 + 2, 1e8 + 3]) == pytest.approx(1.0, rel=1e-9)  # no cancellation
    with pytest.raises(ValueError, match="at least two"):
        sample_variance([1.0])
