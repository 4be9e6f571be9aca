"""Train/eval comparison on the first batches: leaked samples and an eval set left un-normalised
are reported with counts, names and numbers; random halves of one dataset never are."""

from __future__ import annotations

import pytest
import torch

from safeloop.diagnostics.data import MAX_FEATURES, MIN_SAMPLES, DataProfile
from safeloop.diagnostics.data_compare import compare_profiles

pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _standardise(x: torch.Tensor) -> torch.Tensor:
    dims = [0, *range(2, x.dim())]  # per column, or per channel for images
    return (x - x.mean(dims, keepdim=True)) / x.std(dims, keepdim=True)


def _profile(x: torch.Tensor, batch_size: int = 32, key: str | None = None, **kwargs) -> DataProfile:
    profile = DataProfile(**kwargs)
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size]
        labels = torch.zeros(len(chunk), dtype=torch.long)
        if not profile.add({key: chunk, "labels": labels} if key else (chunk, labels)):
            break
    return profile


def _loud(findings):
    return [f for f in findings if f.severity != "info"]


def _datasets(gen: torch.Generator, n: int = 1024):
    """Standardised datasets of several shapes and tails, as a user's pipeline makes them."""
    yield torch.randn(n, 12, generator=gen)
    t3 = torch.distributions.StudentT(3.0).sample((n, 6))
    yield torch.cat([t3, torch.randn(n, 2, generator=gen)], 1)
    yield torch.cat([torch.randn(n, 6, generator=gen).exp(), torch.randn(n, 1, generator=gen)], 1)
    sparse = (torch.rand(n, 6, generator=gen) < 0.1) * torch.randn(n, 6, generator=gen).mul(1.5).exp()
    yield torch.cat([sparse * 1000, torch.randn(n, 2, generator=gen)], 1)  # zero-inflated, heavy tail
    yield torch.rand(n, 3, 8, 8, generator=gen) ** torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    yield torch.randn(n, generator=gen).exp()  # a single skewed feature


# -- healthy: no finding -------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("batch_size", [2, 64])
def test_random_halves_of_one_dataset_never_trigger(seed, batch_size):
    gen = _gen(seed)
    torch.manual_seed(seed)
    for data in _datasets(gen):
        data = _standardise(data)
        order = torch.randperm(len(data), generator=gen)
        half = len(data) // 2
        train = _profile(data[order[:half]], batch_size)
        eval_ = _profile(data[order[half:]], batch_size)
        assert train.n_samples >= MIN_SAMPLES and eval_.n_samples >= MIN_SAMPLES
        assert _loud(compare_profiles(train, eval_)) == [], tuple(data.shape)


def test_unshuffled_eval_sorted_by_label_is_not_a_normalisation_mismatch():
    gen = _gen()
    centres = 0.7 * torch.randn(3, 10, generator=gen)
    labels = torch.randint(0, 3, (4000,), generator=gen)
    data = _standardise(centres[labels] + torch.randn(4000, 10, generator=gen))
    sorted_eval = data[2000:][labels[2000:].argsort()]  # the first eval batches hold one class
    assert compare_profiles(_profile(data[:2000]), _profile(sorted_eval)) == []


def test_integer_token_batches_are_quiet():
    gen = _gen()
    batches = [
        {
            "input_ids": torch.randint(0, 30000, (8, 64), generator=gen),
            "attention_mask": torch.ones(8, 64),  # a float mask is not a feature either
            "labels": torch.randint(0, 2, (8,), generator=gen),
        }
        for _ in range(16)
    ]
    train, eval_ = DataProfile(), DataProfile()
    for batch in batches[:8]:
        train.add(batch)
    for batch in batches[8:]:
        eval_.add(batch)
    assert train.feature_names == [] and compare_profiles(train, eval_) == []


# -- eval-train-overlap --------------------------------------------------------------------


def test_eval_rows_copied_from_train():
    data = torch.randn(600, 5, generator=_gen())
    train = data[:300]
    eval_ = torch.cat([data[300:500], train[40:60]])  # 20 train rows slipped into eval
    [finding] = compare_profiles(_profile(train, 50), _profile(eval_, 50))
    assert finding.code == "eval-train-overlap" and finding.severity == "warning"
    assert "20 of the first 220 eval samples (9.1%)" in finding.message
    assert "among the first 300 train samples" in finding.message
    assert "eval batch 4 row 0 = train batch 0 row 40" in finding.message


def test_labels_do_not_hide_a_duplicate_input():
    x = torch.randn(64, 4, generator=_gen())
    train, eval_ = DataProfile(), DataProfile()
    train.add({"x": x[:32], "labels": torch.zeros(32)})
    eval_.add({"x": x[:32], "labels": torch.ones(32)})
    [finding] = compare_profiles(train, eval_)
    assert finding.code == "eval-train-overlap" and "32 of the first 32" in finding.message


def test_one_shared_sample_is_only_info():
    data = torch.randn(200, 5, generator=_gen())
    eval_ = torch.cat([data[100:199], data[:1]])
    [finding] = compare_profiles(_profile(data[:100]), _profile(eval_))
    assert finding.severity == "info" and "natural duplicate" in finding.message


def test_low_variety_inputs_overlap_only_as_info():
    # two binary features: train and eval share rows by nature, and train repeats itself as much
    data = torch.randint(0, 2, (400, 2), generator=_gen()).float()
    [finding] = compare_profiles(_profile(data[:200]), _profile(data[200:]))
    assert finding.code == "eval-train-overlap" and finding.severity == "info"
    assert "have a twin" in finding.message


def test_a_small_train_set_in_its_second_epoch_is_not_taken_for_natural_duplicates():
    data = torch.randn(100, 5, generator=_gen())
    train = data[:48]  # 3 batches of 16 an epoch: the profile's 8 batches would span 3 epochs
    epochs = torch.cat([train, train[torch.randperm(48, generator=_gen(1))], train])
    profile = _profile(epochs, 16)
    assert profile.done and profile.n_batches == 3 and profile.n_samples == 48  # stopped at the wrap
    [finding] = compare_profiles(profile, _profile(torch.cat([data[48:], train[:10]]), 16))
    assert finding.severity == "warning" and "10 of the first 62 eval samples" in finding.message
    assert "among the first 48 train samples" in finding.message and "twin" not in finding.message


def test_dynamic_padding_does_not_hide_a_duplicate():
    tokens = torch.randint(1, 30000, (4, 10), generator=_gen())

    def padded(length: int) -> dict[str, torch.Tensor]:
        ids = torch.zeros(4, length, dtype=torch.long)
        ids[:, :10] = tokens
        mask = (ids != 0).long()
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(4, dtype=torch.long)}

    train, eval_ = DataProfile(), DataProfile()
    train.add(padded(12))
    eval_.add(padded(16))
    [finding] = compare_profiles(train, eval_)
    assert "4 of the first 4 eval samples" in finding.message


# -- normalization-mismatch ----------------------------------------------------------------


def test_eval_set_not_standardised():
    gen = _gen()
    raw = torch.randn(1000, 6, generator=gen) * torch.tensor([10.0, 2, 300, 1, 5, 50]) + torch.tensor(
        [40.0, 3, 1500, 0, 20, 100]
    )
    mean, std = raw[:500].mean(0), raw[:500].std(0)
    train, eval_ = _profile((raw[:500] - mean) / std), _profile(raw[500:])
    [finding] = compare_profiles(train, eval_)
    assert finding.code == "normalization-mismatch" and finding.severity == "warning"
    assert "5 of 6 features are off" in finding.message  # column 3 is already mean 0, std 1
    assert finding.params[0] == "inputs[:, 2]"  # the column with the largest raw scale
    assert "train mean" in finding.message and "eval mean" in finding.message


def test_raw_pixels_against_standardised_train():
    pixels = torch.randint(0, 256, (512, 3, 16, 16), generator=_gen()).float()
    train = _profile(_standardise(pixels[:256]), key="pixel_values")
    eval_ = _profile(pixels[256:], key="pixel_values")
    [finding] = compare_profiles(train, eval_)
    assert finding.code == "normalization-mismatch"
    assert set(finding.params) == {f"pixel_values[:, {c}, ...]" for c in range(3)}
    assert "3 of 3 features are off" in finding.message


def test_mnist_style_unit_range_eval_against_normalised_train():
    gen = _gen()
    digits = (torch.rand(512, 1, 28, 28, generator=gen) < 0.19) * torch.rand(512, 1, 28, 28, generator=gen)
    train = _profile((digits[:256] - 0.1307) / 0.3081)  # transforms.Normalize only in the train pipeline
    [finding] = compare_profiles(train, _profile(digits[256:]))
    assert finding.code == "normalization-mismatch" and "std ratio 0.3" in finding.message


def test_too_few_samples_are_not_compared():
    data = torch.randn(60, 4, generator=_gen())
    assert compare_profiles(_profile(data[:30], 30), _profile(data[30:] * 100, 30)) == []


# -- profile mechanics ---------------------------------------------------------------------


def test_limits_and_fixed_size_exports():
    data = torch.randn(1000, 4, generator=_gen())
    profile = _profile(data, 100, max_samples=250)
    assert profile.done and profile.n_samples == 250 and profile.n_batches == 3
    assert profile.hash_tensor().shape == (250, 4)
    small = _profile(data, 2)  # 8 batches give 16 samples: it goes on to MIN_SAMPLES
    assert small.n_batches == MIN_SAMPLES // 2
    assert small.add((data[:2], 0)) is False


def test_wide_inputs_are_bucketed():
    data = torch.randn(64, 3 * 32 * 32, generator=_gen())
    profile = _profile(data)
    assert len(profile.feature_names) == MAX_FEATURES
    assert profile.feature_names[0] == "inputs[:, 0] .. inputs[:, 2]"


def test_nan_inputs_do_not_poison_the_statistics():
    data = torch.randn(256, 4, generator=_gen())
    dirty = data.clone()
    dirty[::10, 1] = float("nan")
    assert _loud(compare_profiles(_profile(data[:128]), _profile(dirty[128:]))) == []


def test_merge_across_processes_matches_one_process():
    data = _standardise(torch.rand(256, 3, 8, 8, generator=_gen()))
    whole = _profile(data, 32, max_batches=8)
    ranks = [_profile(data[r::2], 16, max_batches=8) for r in range(2)]
    stats = [p.stats_tensor() for p in ranks]
    hashes = torch.cat([p.hash_tensor(rank=r) for r, p in enumerate(ranks)])
    names = ranks[0].feature_names
    summed = DataProfile.from_tensors(stats[0] + stats[1], hashes, feature_names=names)
    gathered = DataProfile.from_tensors(torch.stack(stats), hashes, feature_names=names)
    for merged in (summed, gathered):
        assert merged.n_samples == 256 and merged.feature_names == whole.feature_names
        torch.testing.assert_close(merged._stats, whole._stats)
        assert sorted(h for h, *_ in merged._hashes) == sorted(h for h, *_ in whole._hashes)
    # eval rows that sit in process 1's train batches are named there
    [finding] = compare_profiles(summed, _profile(data[1:64:2]))
    assert "on process 1" in finding.message


def test_processes_with_different_layouts_fall_back_to_pooled_statistics():
    gen = _gen()
    short, long = torch.randn(64, 5, 3, generator=gen), torch.randn(64, 7, 3, generator=gen)
    ranks = [_profile(short), _profile(long)]  # (N, T, D) padded to another T on each process
    merged = DataProfile.from_tensors(
        ranks[0].stats_tensor() + ranks[1].stats_tensor(),
        torch.cat([p.hash_tensor(rank=r) for r, p in enumerate(ranks)]),
        feature_names=ranks[0].feature_names,
    )
    assert merged.feature_names == [] and merged.n_samples == 128
    [finding] = compare_profiles(merged, _profile(torch.randn(64, 5, 3, generator=gen) * 50 + 100))
    assert finding.code == "normalization-mismatch" and finding.params == ()


def test_layout_change_between_batches_keeps_pooled_statistics():
    gen = _gen()
    profile = DataProfile()
    profile.add((torch.randn(32, 5, 3, generator=gen), 0))
    profile.add((torch.randn(32, 9, 3, generator=gen), 0))
    assert profile.feature_names == [] and profile.n_samples == 64
    [finding] = compare_profiles(profile, _profile(torch.randn(64, 5, 3, generator=gen) * 50 + 100))
    assert finding.code == "normalization-mismatch"
