"""Study statistics against cases with known answers: exact lattice verdicts, the crossed random-effects variance
by hand, Student-t against scipy, Holm, the MDE, and the coverage of the 95% interval in simulated null studies."""

import math
import time

import numpy as np
import pytest

from soarflow.study.stats import (
    DiffCI,
    cluster_bootstrap,
    cluster_means,
    contains_zero,
    crossed_diff,
    diff_interval,
    holm,
    mean_std,
    t_ppf,
    t_sf,
)


def test_student_t_matches_scipy():
    st = pytest.importorskip("scipy.stats")
    for df in (0.7, 1.0, 2.0, 2.37, 5.5, 47.0, 1e4, 1e9):
        for q in (0.6, 0.8, 0.975, 0.999):
            assert t_ppf(q, df) == pytest.approx(st.t.ppf(q, df), rel=1e-7)
            assert t_ppf(1 - q, df) == pytest.approx(st.t.ppf(1 - q, df), rel=1e-7)
        for t in (-3.0, 0.0, 0.4, 2.0, 12.0):
            assert t_sf(t, df) == pytest.approx(st.t.sf(t, df), rel=1e-7, abs=1e-14)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_sf(1.0, 0.0)


def test_a_lattice_endpoint_that_is_exactly_zero_contains_zero():
    """study_claim's shipped 'sft_noise_matched vs base: +0.097 [+0.000, +0.222]': the lower endpoint is 0 on the
    pass/fail lattice (7/72) but came out of floating point as +2.8e-17 and was printed as excluding 0."""
    ci = DiffCI(diff=0.09722222222222227, low=2.7755575615628914e-17, high=0.22222222222222227)
    assert ci.low > 0  # the float endpoint: the old `low <= 0 <= high` said "excludes 0"
    assert ci.within_noise and ci.to_dict()["within_noise"]
    lattice_low = np.mean([1.0] * 7 + [0.0] * 65) - np.mean([0.1] * 70) / 0.1 * 7 / 70  # 7/72 - 7/72 via floats
    assert lattice_low != 0.0 and contains_zero(lattice_low, 0.2)
    assert contains_zero(-0.2, -1e-17) and contains_zero(0.0, 0.0)
    # an endpoint that is really above 0 (here one lattice step of 1/10,000) excludes it
    assert not contains_zero(1e-4, 0.2) and not contains_zero(-0.2, -1e-4)


def test_paired_variance_is_the_crossed_anova_by_hand():
    x = np.array([[1.0, 0.0, 0.5, 0.0], [0.5, 1.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0]])  # (S=3, P=4) A - B, equal rows
    s, p = x.shape
    row, col, g = x.mean(1), x.mean(0), x.mean()
    ms_seed = p * ((row - g) ** 2).sum() / (s - 1)
    ms_prompt = s * ((col - g) ** 2).sum() / (p - 1)
    ms_resid = ((x - row[:, None] - col[None, :] + g) ** 2).sum() / ((s - 1) * (p - 1))
    assert ms_seed < ms_resid < ms_prompt  # this table's seed component is clamped at 0: Var = MS_prompt / SP
    ci = crossed_diff(x, np.zeros_like(x), paired=True)
    assert ci.diff == pytest.approx(g)
    assert ci.se == pytest.approx(math.sqrt(ms_prompt / (s * p)))
    assert ci.df == pytest.approx(p - 1)
    assert ci.high - ci.diff == pytest.approx(t_ppf(0.975, p - 1) * ci.se)
    assert ci.p == pytest.approx(2 * t_sf(g / ci.se, p - 1))
    # a table with all three components: (MS_seed + MS_prompt - MS_resid) / SP, Satterthwaite df
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (4, 1)) + rng.normal(0, 1, (1, 30)) + rng.normal(0, 0.5, (4, 30))
    s, p = x.shape
    row, col, g = x.mean(1), x.mean(0), x.mean()
    ms = [
        p * ((row - g) ** 2).sum() / (s - 1),
        s * ((col - g) ** 2).sum() / (p - 1),
        ((x - row[:, None] - col[None, :] + g) ** 2).sum() / ((s - 1) * (p - 1)),
    ]
    assert ms[0] > ms[2] and ms[1] > ms[2]
    var = (ms[0] + ms[1] - ms[2]) / (s * p)
    df = (ms[0] + ms[1] - ms[2]) ** 2 / (ms[0] ** 2 / (s - 1) + ms[1] ** 2 / (p - 1) + ms[2] ** 2 / ((s - 1) * (p - 1)))
    ci = crossed_diff(x, np.zeros_like(x), paired=True)
    assert ci.se == pytest.approx(math.sqrt(var)) and ci.df == pytest.approx(df) and ci.method == "crossed"


def test_unpaired_against_a_single_seed_base():
    rng = np.random.default_rng(4)
    base = rng.random((1, 30))
    a = base + 0.3 + rng.normal(0, 0.05, (3, 30))
    ci = crossed_diff(a, base)
    assert ci.method == "unpaired" and ci.low > 0.2 and ci.high < 0.4
    # no seed variation in A beyond the per-cell noise: Var = var_p(D_p) / P exactly
    a = base + np.linspace(0, 0.5, 30)[None, :].repeat(3, 0)
    dp = a.mean(0) - base[0]
    ci = crossed_diff(a, base)
    assert ci.se == pytest.approx(math.sqrt(dp.var(ddof=1) / 30)) and ci.df == pytest.approx(29)


def test_identical_rows_and_clusters():
    y = (np.random.default_rng(0).random((3, 40)) < 0.5).astype(float)
    ci = diff_interval(y, y.copy(), np.arange(40) // 2)
    assert (ci.diff, ci.low, ci.high, ci.p) == (0.0, 0.0, 0.0, 1.0) and ci.within_noise
    x = cluster_means(y, np.arange(40) // 2)
    assert x.shape == (3, 20) and x.mean() == pytest.approx(y.mean())
    with pytest.raises(ValueError, match="same number of images"):
        cluster_means(y, [0] * 3 + list(range(1, 38)))
    with pytest.raises(ValueError, match="group ids for 40 images"):
        cluster_means(y, [0, 1])
    with pytest.raises(ValueError, match="same prompts"):
        crossed_diff(np.zeros((2, 5)), np.zeros((2, 6)))
    with pytest.raises(ValueError, match="confidence"):
        crossed_diff(np.zeros((2, 5)), np.zeros((2, 5)), confidence=1.5)


def test_holm_and_mde():
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.9, 0.8]) == [1.0, 1.0] and holm([0.02, 0.3]) == pytest.approx([0.04, 0.3]) and holm([]) == []
    ci = DiffCI(0.0, -1.0, 1.0, se=0.0286, df=1e9)
    assert ci.mde(0.8) == pytest.approx((1.959964 + 0.841621) * 0.0286, rel=1e-5)  # the 0.08
    assert DiffCI(0.0, -1.0, 1.0, se=0.1, df=4).mde() == pytest.approx((2.776445 + 0.940965) * 0.1, rel=1e-5)


def test_cluster_bootstrap_agrees_with_the_variance_formula_on_a_large_table():
    rng = np.random.default_rng(5)
    a = 0.2 + rng.normal(0, 0.1, (6, 1)) + rng.normal(0, 1, (1, 200)) + rng.normal(0, 0.5, (6, 200))
    b = rng.normal(0, 0.1, (6, 1)) + rng.normal(0, 1, (1, 200)) + rng.normal(0, 0.5, (6, 200))
    boot, exact = cluster_bootstrap(a, b, num_resamples=4000), crossed_diff(a, b)
    assert boot.diff == exact.diff and boot.method == "bootstrap"
    assert (boot.high - boot.low) == pytest.approx(exact.high - exact.low, rel=0.25)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def null_coverage(
    num_studies: int,
    *,
    unpaired: bool,
    seed: int,
    sd_seed: float = 0.3,
    mu: float = 0.4,
    sd_prompt: float = 1.5,
    sd_method_prompt: float = 0.5,
    seeds: int = 3,
) -> float:
    """Fraction of simulated null studies whose 95% interval contains 0. Each study: 48 prompts x 2 images,
    pass/fail drawn from p = sigmoid(mu + seed effect + prompt effect + method x prompt effect); row A has `seeds`
    training seeds. Paired: row B is another method with the same seeds, drawn from the same distribution.
    Unpaired: B is a fixed base (one model, no seed effect) whose per-prompt probability equals A's average over
    seeds (Gauss-Hermite), so the two rows' population means are equal."""
    rng = np.random.default_rng(seed)
    prompts, per = 48, 2
    nodes, weights = np.polynomial.hermite_e.hermegauss(40)
    weights = weights / weights.sum()
    groups = np.repeat(np.arange(prompts), per)
    hits = 0
    for _ in range(num_studies):
        prompt = rng.normal(0, sd_prompt, prompts)

        def trained(prompt=prompt):
            p = _sigmoid(mu + rng.normal(0, sd_seed, (seeds, 1)) + prompt + rng.normal(0, sd_method_prompt, prompts))
            return (rng.random((seeds, prompts * per)) < np.repeat(p, per, 1)).astype(float)

        a = trained()
        if unpaired:
            logit = mu + prompt + rng.normal(0, sd_method_prompt, prompts)
            p = (_sigmoid(logit[None, :] + sd_seed * nodes[:, None]) * weights[:, None]).sum(0)
            b = (rng.random((1, prompts * per)) < np.repeat(p, per)[None, :]).astype(float)
        else:
            b = trained()
        hits += diff_interval(a, b, groups).within_noise
    return hits / num_studies


@pytest.mark.parametrize("unpaired", [False, True], ids=["paired_seeds", "against_base"])
def test_the_95_interval_covers_0_in_93_to_97_percent_of_null_studies(unpaired):
    start = time.perf_counter()
    coverage = null_coverage(1000, unpaired=unpaired, seed=11)
    assert 0.93 <= coverage <= 0.97, coverage
    assert time.perf_counter() - start < 20


def test_mean_std():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert mean_std([4.0]) == (4.0, 0.0)
