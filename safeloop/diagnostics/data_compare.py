"""Train/eval comparison of two data profiles: leaked samples, inputs on another scale.

:func:`compare_profiles` compares the :class:`~safeloop.diagnostics.data.DataProfile` of the first
train batches with the one of the first eval batches; it runs once per ``fit``, on the merged
profiles of all processes. It owns the two findings and their thresholds: ``eval-train-overlap``
(eval samples whose input bytes hash like train samples') and ``normalization-mismatch`` (eval
inputs whose per-feature or pooled mean and std are significantly off the train ones). It reads the
profiles' power sums and hashes and makes no collective call.
"""

from __future__ import annotations

import math

import torch

# _K is the row count of the profile's power sums: this module reads the profile's private sums and
# hashes (_stats, _pooled, _hashes), the comparison being their only reader besides the profile
from safeloop.diagnostics.data import _K, MIN_SAMPLES, DataProfile
from safeloop.results import Finding

__all__ = [
    "compare_profiles",
    "MEAN_SHIFT",
    "STD_RATIO",
    "SIGNIFICANCE",
    "OVERLAP_MIN_COUNT",
]

# A feature is off when its eval mean sits more than MEAN_SHIFT train stds from the train mean, or
# its std differs by more than STD_RATIO x, each also beyond SIGNIFICANCE standard errors (the one of
# the log std ratio uses the kurtosis seen, so heavy-tailed or zero-inflated features need far more
# evidence). The finding needs more than half of the features off, or all elements pooled off.
# Random halves of one dataset stay well below (Gaussian, t3, log-normal, zero-inflated, one-hot
# features), so do first batches of an eval set sorted by label (an extreme 5% tail is ~2 stds off
# on features that follow the sort key). A missed normalisation moves means by tens of stds (0..255
# pixels) or scales stds by 3.2x (MNIST, std 0.3081) to 4.4x (ImageNet, std ~0.226).
MEAN_SHIFT = 1.5
STD_RATIO = 3.0
SIGNIFICANCE = 5.0
# One shared sample can be a natural duplicate (a blank image, a common short sentence): info. So
# is an overlap no larger than 3x what the train sample's own duplicates predict (low-entropy inputs).
OVERLAP_MIN_COUNT = 2

_EXAMPLES = 3  # features or samples named


def _moments(stats: torch.Tensor, samples: int) -> tuple[torch.Tensor, ...]:
    """Mean, (Bessel) std, kurtosis and sample count per column of float64 power sums ``(5, F)``."""
    count, s1, s2, s3, s4 = stats
    mean = s1 / count
    m2 = (s2 / count - mean**2).clamp_min(0)
    m4 = (s4 - 4 * mean * s3 + 6 * mean**2 * s2) / count - 3 * mean**4
    std = torch.where(count > 1, (m2 * count / (count - 1)).sqrt(), math.nan)
    kurtosis = (m4 / m2**2).nan_to_num(1.0, 1e9, 1.0).clamp(1.0, None)
    return mean, std, kurtosis, count.clamp(max=samples)  # elements of one sample are not independent


def _off(train: tuple[torch.Tensor, ...], eval_: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Mean shift (train stds), log std ratio, and whether each column is significantly off."""
    (mean_t, std_t, kurt_t, n_t), (mean_e, std_e, kurt_e, n_e) = train, eval_
    shift = (mean_e - mean_t).abs() / std_t
    shift_z = (mean_e - mean_t).abs() / (std_t**2 / n_t + std_e**2 / n_e).sqrt()
    log_ratio = (std_e / std_t).log()
    ratio_z = log_ratio.abs() / ((kurt_t - 1) / (4 * n_t) + (kurt_e - 1) / (4 * n_e)).sqrt()
    off = ((shift > MEAN_SHIFT) & (shift_z > SIGNIFICANCE)) | (
        (log_ratio.abs() > math.log(STD_RATIO)) & (ratio_z > SIGNIFICANCE)
    )
    return shift, log_ratio, off


def compare_profiles(train: DataProfile, eval_: DataProfile) -> list[Finding]:
    """Compare the train and eval profiles.

    Args:
        train (`DataProfile`): the first training batches.
        eval_ (`DataProfile`): the first evaluation batches.

    Returns:
        `list[Finding]`: ``eval-train-overlap`` (warning; info when it may be natural duplicates:
        a single shared sample, or no more than the train sample's own repeats predict) and
        ``normalization-mismatch`` (warning).
    """
    return [f for f in (_overlap(train, eval_), _normalisation(train, eval_)) if f is not None]


def _where(rank: int, batch: int, row: int) -> str:
    return f"batch {batch} row {row}" + (f" on process {rank}" if rank else "")


def _overlap(train: DataProfile, eval_: DataProfile) -> Finding | None:
    first: dict[int, tuple[int, int, int]] = {}
    repeats: dict[int, int] = {}
    for value, *where in train._hashes:
        first.setdefault(value, tuple(where))  # type: ignore[arg-type]
        repeats[value] = repeats.get(value, 0) + 1
    matches = [(tuple(where), first[value]) for value, *where in eval_._hashes if value in first]
    if not matches:
        return None
    count, total, n_train = len(matches), len(eval_._hashes), len(train._hashes)
    own = sum(c for c in repeats.values() if c > 1)  # train rows that have a twin in train
    natural = count < OVERLAP_MIN_COUNT or count <= 3 * own / n_train * total
    examples = "; ".join(f"eval {_where(*e)} = train {_where(*t)}" for e, t in matches[:_EXAMPLES])
    message = (
        f"{count} of the first {total} eval samples ({count / total:.1%}) have inputs byte-identical to "
        f"samples among the first {n_train} train samples (e.g. {examples}): the eval loss partly "
        "measures memorisation, not generalisation (data leakage). Only the first batches were "
        "compared, so the whole sets likely share more samples."
    )
    if natural:
        message += (
            f" The train samples themselves repeat ({own} of {n_train} have a twin), so these may be "
            "natural duplicates of low-variety inputs."
            if own
            else " One shared sample may be a natural duplicate."
        )
    suggestion = (
        "Split once, before any augmentation or oversampling, and deduplicate (hash the rows); make "
        "sure the eval indices are disjoint from the train ones (e.g. one `random_split` with a fixed "
        "generator). If eval is the train set on purpose (an overfitting check), ignore this."
    )
    return Finding("eval-train-overlap", "info" if natural else "warning", message, (), 0, suggestion)


def _constant(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    # float64 sums leave an std of ~1e-8 |mean| on a constant feature
    return ~(std > 1e-6 * mean.abs())


def _numbers(train: tuple[torch.Tensor, ...], eval_: tuple[torch.Tensor, ...], i: int = 0) -> str:
    (mean_t, std_t, *_), (mean_e, std_e, *_) = train, eval_
    return (
        f"train mean {float(mean_t[i]):.3g} std {float(std_t[i]):.3g}, "
        f"eval mean {float(mean_e[i]):.3g} std {float(std_e[i]):.3g}"
    )


def _per_feature(train: DataProfile, eval_: DataProfile) -> tuple[bool, str, tuple[str, ...]]:
    """Whether most features are off, their description, and the worst features' names."""
    if train._stats is None or eval_._stats is None or train.feature_names != eval_.feature_names:
        return False, "", ()
    per_t, per_e = _moments(train._stats, train.n_samples), _moments(eval_._stats, eval_.n_samples)
    usable = ~_constant(per_t[0], per_t[1]) & ~_constant(per_e[0], per_e[1]) & (per_t[3] > 1) & (per_e[3] > 1)
    shift, log_ratio, each = (v[usable] for v in _off(per_t, per_e))
    if not len(shift):
        return False, "", ()
    score = torch.maximum(shift / MEAN_SHIFT, log_ratio.abs() / math.log(STD_RATIO))
    top = [int(usable.nonzero()[j]) for j in score.argsort(descending=True)[:_EXAMPLES]]
    text = (
        f"; {int(each.sum())} of {len(shift)} features are off, median shift {float(shift.median()):.3g} "
        f"train stds, median std ratio {math.exp(float(log_ratio.median())):.3g}. Worst: "
        + "; ".join(f"`{train.feature_names[i]}` {_numbers(per_t, per_e, i)}" for i in top)
    )
    return 2 * int(each.sum()) > len(shift), text, tuple(train.feature_names[i] for i in top)


def _normalisation(train: DataProfile, eval_: DataProfile) -> Finding | None:
    if min(train.n_samples, eval_.n_samples) < MIN_SAMPLES or min(train._pooled[0], eval_._pooled[0]) < 2:
        return None
    pooled_t = _moments(train._pooled.view(_K, 1), train.n_samples)
    pooled_e = _moments(eval_._pooled.view(_K, 1), eval_.n_samples)
    if _constant(pooled_t[0], pooled_t[1]).item():
        return None  # nothing to measure a scale against
    shift, log_ratio, pooled_off = (float(v) for v in _off(pooled_t, pooled_e))
    if _constant(pooled_e[0], pooled_e[1]).item():
        log_ratio, pooled_off = 0.0, shift > MEAN_SHIFT
    features_off, features, names = _per_feature(train, eval_)
    if not (pooled_off or features_off):
        return None
    message = (
        f"Eval inputs are on another scale than train inputs (first {eval_.n_samples} eval vs "
        f"{train.n_samples} train samples). All elements pooled: {_numbers(pooled_t, pooled_e)} (shift "
        f"{shift:.3g} train stds, std ratio {math.exp(log_ratio):.3g}){features}. The model is "
        "evaluated on inputs unlike the ones it trained on. Likely cause: the normalisation "
        "(`transforms.Normalize`, a fitted scaler, `/ 255`) is applied in one pipeline only, or twice; "
        "or the first eval batches are not representative (an unshuffled eval set sorted by label)."
    )
    suggestion = (
        "Apply the same preprocessing to train and eval, with statistics computed on the train set "
        "(fit the scaler on train, then transform eval with it)."
    )
    return Finding("normalization-mismatch", "warning", message, names, 0, suggestion)
