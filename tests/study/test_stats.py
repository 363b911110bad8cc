"""Paired bootstrap against cases with known answers."""

import numpy as np
import pytest

from soarflow.study.stats import mean_std, paired_bootstrap


def test_identical_rows_give_a_zero_interval():
    a = np.random.default_rng(0).random((3, 50))
    ci = paired_bootstrap(a, a.copy(), num_resamples=500)
    assert (ci.diff, ci.low, ci.high) == (0.0, 0.0, 0.0)
    assert ci.within_noise


def test_a_huge_shift_excludes_zero_and_a_small_one_does_not():
    rng = np.random.default_rng(1)
    b = rng.normal(0, 1, (3, 40))
    big = paired_bootstrap(b + 5.0, b + rng.normal(0, 1, b.shape), num_resamples=500)
    assert big.low > 0 and not big.within_noise and big.diff == pytest.approx(5.0, abs=0.5)
    tiny = paired_bootstrap(b + rng.normal(0, 1, b.shape) + 0.01, b, num_resamples=500)
    assert tiny.within_noise


def test_pairing_removes_the_shared_per_image_difficulty():
    rng = np.random.default_rng(2)
    difficulty = rng.normal(0, 3, 60)  # shared by both rows: cancels in a paired difference
    a = difficulty + 0.5 + rng.normal(0, 0.2, (3, 60))
    b = difficulty + rng.normal(0, 0.2, (3, 60))
    ci = paired_bootstrap(a, b, num_resamples=500)
    assert 0.3 < ci.low < ci.diff < ci.high < 0.7


def test_coverage_is_close_to_nominal_on_synthetic_data():
    """95% intervals over 200 synthetic studies (3 seeds x 60 images, seed and image effects, true diff 0.2)
    cover the true difference about 95% of the time (a percentile bootstrap with 3 seeds under-covers a bit)."""
    rng = np.random.default_rng(3)
    hits = 0
    reps = 200
    for r in range(reps):
        image = rng.normal(0, 1, 60)
        seed_a, seed_b = rng.normal(0, 0.1, (3, 1)), rng.normal(0, 0.1, (3, 1))
        a = 0.2 + image + seed_a + rng.normal(0, 0.5, (3, 60))
        b = image + seed_b + rng.normal(0, 0.5, (3, 60))
        ci = paired_bootstrap(a, b, num_resamples=400, seed=r)
        hits += ci.low <= 0.2 <= ci.high
    assert 0.82 <= hits / reps <= 0.99


def test_unpaired_seeds_against_a_single_base_row():
    rng = np.random.default_rng(4)
    base = rng.random((1, 30))
    a = base + 0.3 + rng.normal(0, 0.05, (3, 30))
    ci = paired_bootstrap(a, base, num_resamples=300)
    assert ci.low > 0.2 and ci.high < 0.4


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap(np.zeros((2, 5)), np.zeros((2, 6)))
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(np.zeros((2, 5)), np.zeros((2, 5)), confidence=1.5)


def test_mean_std():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    assert mean_std([4.0]) == (4.0, 0.0)
