r"""Statistics of a study: intervals for the difference of two rows with seeds and prompts as random effects.

Data
----
For one row, one budget arm and one evaluation setting, the per-image results form a matrix
:math:`Y \in \mathbb{R}^{S \times N}` (training seeds x evaluation images). Every cell is evaluated on the same
images (same prompts, same noise), and images come in clusters: image :math:`i` belongs to prompt
:math:`p = \lfloor i / m \rfloor` (``evaluation.images_per_prompt`` = m; kind ``loss``: every sample is its own
cluster). The unit of analysis is the per-(seed, prompt) mean :math:`X_{sp}` (S x P); a per-prompt statistic such
as diversity is an :math:`X_{sp}` directly. A row's metric is the grand mean :math:`\bar X`, and the statistic is the
difference of two rows :math:`D = \bar X_A - \bar X_B`.

The target is the difference over the *populations* of training seeds and of prompts: both are random effects,
crossed (every seed sees every prompt). With :math:`X_{sp} = \mu + a_s + b_p + e_{sp}` (variances
:math:`\sigma_a^2, \sigma_b^2, \sigma_e^2`), :math:`\mathrm{Var}(\bar X) = \sigma_a^2/S + \sigma_b^2/P +
\sigma_e^2/(SP)`.

Paired seeds (both rows trained with the same seed list)
    :math:`X = X_A - X_B` (paired by seed and by image). Two-way ANOVA without replication, method of moments:
    :math:`MS_{seed} = P\,\mathrm{var}_s(\bar X_{s\cdot})`, :math:`MS_{prompt} = S\,\mathrm{var}_p(\bar X_{\cdot p})`,
    :math:`MS_{resid} = \sum_{sp} (X_{sp} - \bar X_{s\cdot} - \bar X_{\cdot p} + \bar X)^2 / ((S-1)(P-1))`, with
    expectations :math:`P\sigma_a^2 + \sigma_e^2`, :math:`S\sigma_b^2 + \sigma_e^2`, :math:`\sigma_e^2`, so

    .. math:: \widehat{\mathrm{Var}}(D) = \frac{MS_{seed} + MS_{prompt} - MS_{resid}}{SP}.

    Each variance component is clamped at 0 (conservative floor): the seed component
    :math:`MS_{seed} - MS_{resid}` and the prompt component :math:`MS_{prompt} - MS_{resid}`; a clamped component's
    terms leave the sum (e.g. a negative seed component gives :math:`MS_{prompt}/(SP)`). With one seed the
    estimate is :math:`\mathrm{var}_p(X_{1p})/P`.

Unpaired (different seed lists, e.g. against the base row, one untrained "seed")
    Per-prompt differences :math:`D_p = \bar X_{A,\cdot p} - \bar X_{B,\cdot p}` carry the prompt effects (shared
    prompts cancel) and the within-cell noise; each row adds its own seed component:

    .. math:: \widehat{\mathrm{Var}}(D) = \frac{\mathrm{var}_p(D_p)}{P} + \sum_{R \in \{A, B\}}
              \max\Big(0, \frac{MS_{seed,R} - MS_{resid,R}}{S_R P}\Big)

    (0 for a single-seed row: the base is a fixed model, not a draw of seeds).

Degrees of freedom: Welch-Satterthwaite over the mean-square terms :math:`c_k MS_k` that remain,
:math:`\nu = (\sum_k c_k MS_k)^2 / \sum_k (c_k MS_k)^2/\nu_k`, with :math:`\nu_k` = S-1, P-1, (S-1)(P-1).
Interval :math:`D \pm t_{\nu, 1-\alpha/2}\,SE`; two-sided p-value :math:`2\,P(T_\nu > |D|/SE)`; minimum detectable
effect at power :math:`1-\beta`: :math:`MDE = (t_{\nu,1-\alpha/2} + t_{\nu,1-\beta})\,SE`.

Verdicts: an interval *contains 0* when :math:`low \le \tau` and :math:`high \ge -\tau`, with
:math:`\tau = 10^{-9} \max(1, |low|, |high|)`: differences of pass/fail means lie on a lattice, and an endpoint that
is exactly 0 in exact arithmetic comes out of floating point as :math:`\pm 10^{-16}`.

Multiplicity: :func:`holm` adjusts the p-values of a family of comparisons (Holm's step-down).

Cross-check: :func:`cluster_bootstrap` resamples prompts as clusters (all images of a prompt together) and seeds
with replacement (shared by two rows with the same seeds), and inflates the seed component by the small-sample
factor :math:`S/(S-1)` (the bootstrap variance of a mean of S draws is :math:`(S-1)/S` times the unbiased one);
a percentile interval for statistics without a variance formula.

Student-t: CDF by the regularized incomplete beta function (Lentz continued fraction), quantiles by safeguarded
Newton
(numpy only; tests compare them with scipy).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

VERDICT_TOLERANCE = 1e-9


# ---------------------------------------------------------------------------------------------- Student t
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` (> 0, real) degrees of freedom."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if df > 1e7:  # the normal limit (|t - z| < 1e-6 there)
        return 0.5 * math.erfc(t / math.sqrt(2.0))
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def _t_pdf(t: float, df: float) -> float:
    if df > 1e7:
        return math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    lognorm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(lognorm - (df + 1) / 2 * math.log1p(t * t / df))


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t: safeguarded Newton on `t_sf` (bisection when a step leaves the bracket)."""
    if not 0 < q < 1:
        raise ValueError(f"quantile must be in (0, 1), got {q}")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_ppf(1 - q, df)
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > 1 - q:
        lo, hi = hi, hi * 2.0
    t = 0.5 * (lo + hi)
    for _ in range(100):
        f = (1 - q) - t_sf(t, df)  # increasing in t
        if f > 0:
            hi = t
        else:
            lo = t
        step = t - f / _t_pdf(t, df)
        new = step if lo < step < hi else 0.5 * (lo + hi)
        if abs(new - t) < 1e-13 * max(1.0, t):
            return new
        t = new
    return t


# ---------------------------------------------------------------------------------------------- results
def contains_zero(low: float, high: float) -> bool:
    """Exact at lattice endpoints: an endpoint within 1e-9 (relative) of 0 counts as 0 (module docstring)."""
    tol = VERDICT_TOLERANCE * max(1.0, abs(low), abs(high))
    return low <= tol and high >= -tol


@dataclass
class DiffCI:
    """Difference mean(A) - mean(B) with its interval. ``method``: ``crossed`` (paired seeds), ``unpaired``,
    ``bootstrap`` (cross-check) or ``bootstrap-images`` (the old image bootstrap of the shipped reports)."""

    diff: float
    low: float
    high: float
    confidence: float = 0.95
    se: float | None = None
    df: float | None = None
    p: float | None = None
    method: str = "crossed"
    num_resamples: int | None = None

    @property
    def within_noise(self) -> bool:
        return contains_zero(self.low, self.high)

    def mde(self, power: float = 0.8) -> float | None:
        """Minimum detectable effect (two-sided, at this interval's level) at `power`: (t_{1-a/2} + t_power) SE."""
        if self.se is None or self.df is None:
            return None
        return (t_ppf(1 - (1 - self.confidence) / 2, self.df) + t_ppf(power, self.df)) * self.se

    def to_dict(self) -> dict:
        return {**asdict(self), "within_noise": self.within_noise}


def mean_std(values: list[float] | np.ndarray) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


# ---------------------------------------------------------------------------------------------- clusters
def cluster_means(y: np.ndarray, groups: np.ndarray | list[int]) -> np.ndarray:
    """(S, N) per-image results -> (S, P) per-(seed, prompt) means; `groups[i]` is image i's prompt (0..P-1, each
    prompt with the same number of images, so the grand mean is unchanged)."""
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    g = np.asarray(groups)
    if g.shape != (y.shape[1],):
        raise ValueError(f"got {g.size} group ids for {y.shape[1]} images")
    ids, counts = np.unique(g, return_counts=True)
    if not np.array_equal(ids, np.arange(ids.size)):
        raise ValueError("group ids must be 0..P-1")
    if counts.min() != counts.max():
        raise ValueError(f"every prompt needs the same number of images, got {counts.min()} to {counts.max()}")
    onehot = (g[:, None] == ids[None, :]).astype(np.float64) / counts[None, :]
    return y @ onehot


def _anova(x: np.ndarray) -> tuple[float, float, float]:
    """(MS_seed, MS_prompt, MS_resid) of an (S, P) table, S, P >= 2."""
    s, p = x.shape
    row, col, grand = x.mean(1), x.mean(0), x.mean()
    ms_seed = p * float(((row - grand) ** 2).sum()) / (s - 1)
    ms_prompt = s * float(((col - grand) ** 2).sum()) / (p - 1)
    resid = x - row[:, None] - col[None, :] + grand
    ms_resid = float((resid**2).sum()) / ((s - 1) * (p - 1))
    return ms_seed, ms_prompt, ms_resid


def _interval(diff: float, terms: list[tuple[float, float]], confidence: float, method: str) -> DiffCI:
    """Interval from variance terms [(value, df)] (each value >= 0 is one c_k MS_k; negative ones subtract)."""
    var = sum(v for v, _ in terms)
    if var <= 0 or not math.isfinite(var):
        # identical rows (or no variation at all): a degenerate interval at the difference
        p = 1.0 if abs(diff) <= VERDICT_TOLERANCE else 0.0
        return DiffCI(diff, diff, diff, confidence, se=0.0, df=float("inf"), p=p, method=method)
    denom = sum(v * v / d for v, d in terms if v != 0)
    df = var * var / denom if denom > 0 else float("inf")
    se = math.sqrt(var)
    half = t_ppf(1 - (1 - confidence) / 2, df) * se
    p = min(1.0, 2 * t_sf(abs(diff) / se, df))
    return DiffCI(diff, diff - half, diff + half, confidence, se=se, df=df, p=p, method=method)


def _check(x: np.ndarray, name: str) -> np.ndarray:
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 2:
        raise ValueError(f"{name}: need a (seeds, prompts) table with >= 1 seed and >= 2 prompts, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: contains non-finite values")
    return x


def _seed_terms(x: np.ndarray) -> list[tuple[float, float]]:
    """One row's seed component var(a)/S = (MS_seed - MS_resid)/(S P) as Satterthwaite terms; [] when it is
    <= 0 (clamped) or the row has one seed."""
    s, p = x.shape
    if s < 2:
        return []
    ms_seed, _, ms_resid = _anova(x)
    if ms_seed <= ms_resid:
        return []
    return [(ms_seed / (s * p), s - 1), (-ms_resid / (s * p), (s - 1) * (p - 1))]


def crossed_diff(xa: np.ndarray, xb: np.ndarray, *, paired: bool | None = None, confidence: float = 0.95) -> DiffCI:
    """Interval for mean(xa) - mean(xb) from (S, P) per-(seed, prompt) tables (module docstring). `paired`
    defaults to "same number of seeds" (rows s of xa and xb share training seed s); the caller knows better."""
    xa, xb = _check(xa, "row A"), _check(xb, "row B")
    if xa.shape[1] != xb.shape[1]:
        raise ValueError(f"both rows need the same prompts, got {xa.shape[1]} and {xb.shape[1]}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if paired is None:
        paired = xa.shape[0] == xb.shape[0]
    if paired and xa.shape[0] != xb.shape[0]:
        raise ValueError(f"paired seeds need the same number of seeds, got {xa.shape[0]} and {xb.shape[0]}")
    diff = float(xa.mean() - xb.mean())
    p = xa.shape[1]
    if paired:
        x = xa - xb
        s = x.shape[0]
        if s == 1:
            return _interval(diff, [(float(x[0].var(ddof=1)) / p, p - 1)], confidence, "crossed")
        ms_seed, ms_prompt, ms_resid = _anova(x)
        sp = s * p
        keep_seed, keep_prompt = ms_seed > ms_resid, ms_prompt > ms_resid  # components clamped at 0
        resid_coef = 1 - keep_seed - keep_prompt  # Var = (MS_seed + MS_prompt - MS_resid) / SP when both kept
        terms = [(resid_coef * ms_resid / sp, (s - 1) * (p - 1))]
        if keep_seed:
            terms.append((ms_seed / sp, s - 1))
        if keep_prompt:
            terms.append((ms_prompt / sp, p - 1))
        return _interval(diff, [t for t in terms if t[0] != 0], confidence, "crossed")
    dp = xa.mean(0) - xb.mean(0)
    terms = [(float(dp.var(ddof=1)) / p, p - 1)] + _seed_terms(xa) + _seed_terms(xb)
    return _interval(diff, terms, confidence, "unpaired")


def diff_interval(
    a: np.ndarray,
    b: np.ndarray,
    groups: np.ndarray | list[int],
    *,
    paired: bool | None = None,
    confidence: float = 0.95,
) -> DiffCI:
    """`crossed_diff` of two (S, N) per-image matrices, clustered by `groups` (image -> prompt)."""
    return crossed_diff(cluster_means(a, groups), cluster_means(b, groups), paired=paired, confidence=confidence)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): p_(k) * (m - k + 1), made monotone, capped at 1."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = [0.0] * m
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * pvalues[i]))
        out[i] = running
    return out


# ---------------------------------------------------------------------------------------------- bootstrap
def cluster_bootstrap(
    xa: np.ndarray,
    xb: np.ndarray,
    *,
    paired: bool | None = None,
    num_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> DiffCI:
    """Percentile interval of mean(xa) - mean(xb) from (S, P) per-(seed, prompt) tables: prompts resampled as
    clusters (shared by both rows), seeds with replacement (shared when `paired`), and each row's resampled seed
    means spread about their mean by sqrt(S/(S-1)) (the small-sample correction of the seed component)."""
    xa, xb = _check(xa, "row A"), _check(xb, "row B")
    if xa.shape[1] != xb.shape[1]:
        raise ValueError(f"both rows need the same prompts, got {xa.shape[1]} and {xb.shape[1]}")
    if paired is None:
        paired = xa.shape[0] == xb.shape[0]
    rng = np.random.default_rng(seed)
    p = xa.shape[1]
    counts = np.stack([np.bincount(rng.integers(0, p, p), minlength=p) for _ in range(num_resamples)]) / p
    ma, mb = counts @ xa.T, counts @ xb.T  # (R, S_a), (R, S_b): seed means under the prompt resample

    def seed_level(m: np.ndarray, idx: np.ndarray) -> np.ndarray:
        s = m.shape[1]
        picked = np.take_along_axis(m, idx, 1).mean(1)
        if s < 2:
            return picked
        centre = m.mean(1)
        return centre + (picked - centre) * math.sqrt(s / (s - 1))

    sa = rng.integers(0, xa.shape[0], (num_resamples, xa.shape[0]))
    sb = sa if paired else rng.integers(0, xb.shape[0], (num_resamples, xb.shape[0]))
    deltas = seed_level(ma, sa) - seed_level(mb, sb)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(deltas, [alpha, 1 - alpha])
    return DiffCI(
        float(xa.mean() - xb.mean()),
        float(low),
        float(high),
        confidence,
        method="bootstrap",
        num_resamples=num_resamples,
    )
