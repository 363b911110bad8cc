r"""Statistics of a study: mean ± std over seeds, and a paired bootstrap CI for the difference of two rows.

A row's per-image results form a matrix :math:`A \in \mathbb{R}^{S_A \times N}` (training seeds x evaluation
images); every cell is evaluated on the same N prompts with the same noise, so column i of two rows is the same
image slot. The statistic is the difference of grand means :math:`\Delta = \bar A - \bar B`.

Paired bootstrap (two-level): each of R resamples draws N image indices with replacement, *shared* by A and B
(paired by prompt + noise), and training seeds with replacement — the same seed indices for both rows when they
have the same seeds (paired by seed: same data order and objective noise), independently otherwise (e.g. against
the base row, which has one untrained "seed"). The CI is the percentile interval of the R resampled
:math:`\Delta`; a difference whose CI contains 0 is "within noise".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class DiffCI:
    diff: float  # point estimate: mean(A) - mean(B)
    low: float
    high: float
    confidence: float
    num_resamples: int

    @property
    def within_noise(self) -> bool:
        return self.low <= 0.0 <= self.high

    def to_dict(self) -> dict:
        return {**asdict(self), "within_noise": self.within_noise}


def mean_std(values: list[float] | np.ndarray) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    *,
    num_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    paired_seeds: bool | None = None,
) -> DiffCI:
    """Percentile CI of mean(a) - mean(b) for (seeds, images) matrices with the same image columns (module doc).

    `paired_seeds` defaults to "a and b have the same number of seed rows" (rows i of a and b share seed i)."""
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired bootstrap needs the same images in both rows, got {a.shape[1]} and {b.shape[1]}")
    if a.shape[1] == 0 or a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError("paired bootstrap needs at least one seed and one image per row")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if paired_seeds is None:
        paired_seeds = a.shape[0] == b.shape[0]
    rng = np.random.default_rng(seed)
    n = a.shape[1]
    # Resample images, then seeds. Image means per seed row under an image resample: a[:, idx].mean(1), computed
    # for all resamples at once via counts (R, N) @ (N, S).
    counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(num_resamples)]) / n
    ma, mb = counts @ a.T, counts @ b.T  # (R, S_a), (R, S_b)
    sa = rng.integers(0, a.shape[0], (num_resamples, a.shape[0]))
    sb = sa if paired_seeds else rng.integers(0, b.shape[0], (num_resamples, b.shape[0]))
    da = np.take_along_axis(ma, sa, 1).mean(1)
    db = np.take_along_axis(mb, sb, 1).mean(1)
    deltas = da - db
    alpha = (1 - confidence) / 2
    low, high = np.quantile(deltas, [alpha, 1 - alpha])
    return DiffCI(float(a.mean() - b.mean()), float(low), float(high), confidence, num_resamples)
