r"""Metrics beside the ShapesEval score: fidelity (Frechet distance), per-prompt diversity, exposure bias.

Features (`features`, deterministic, no learned weights), for an image batch in [-1, 1] of side S, the
concatenation of (D = 192 + 8 + 3 + 7 = 210):

* the image average-pooled to 8 x 8 (adaptive average pooling), flattened: 192 values in [-1, 1];
* the fraction of pixels in each scorer pixel class (background + 7 palette colors), times 8;
* the number of detected objects of each shape (circle, square, triangle);
* the number of detected objects of each color (palette order).

Frechet distance (`frechet_distance`): with means :math:`\mu_a, \mu_b` and (unbiased) covariances
:math:`C_a, C_b` of the two feature sets,
:math:`FD = \lVert\mu_a - \mu_b\rVert^2 + \mathrm{Tr}(C_a + C_b) - 2\,\mathrm{Tr}\big((C_a^{1/2} C_b C_a^{1/2})^{1/2}\big)`
(float64, eigendecompositions, negative eigenvalues clipped to 0). Like FID it is biased upwards at small sample
sizes, so compare values computed with the same numbers of images.

Diversity (`diversity`): for each group (images of one prompt) with n >= 2 members, the mean L2 distance over the
n(n-1)/2 pairs of feature vectors (or of raw pixel vectors divided by sqrt(3 H W), with ``space="pixels"``);
averaged over groups with equal weight.

Exposure bias (`exposure_bias`): see its docstring.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from ..flow import sigma_schedule
from ..sampling import guided_velocity, integrate
from .scorer import COLOR_NAMES, detect, pixel_classes, validate_images
from .grammar import SHAPES

FEATURE_POOL = 8


def features(images: torch.Tensor) -> torch.Tensor:
    """(B, 210) float32 features of (B, 3, H, W) images in [-1, 1] (see module doc)."""
    images = validate_images(images)
    b = images.shape[0]
    pooled = torch.nn.functional.adaptive_avg_pool2d(images, FEATURE_POOL).reshape(b, -1)
    classes = pixel_classes(images).reshape(b, -1)
    hist = torch.stack([(classes == k).float().mean(1) for k in range(len(COLOR_NAMES) + 1)], dim=1) * 8
    objs = detect(images)
    shape_counts = torch.tensor([[sum(o.shape == s for o in os) for s in SHAPES] for os in objs], dtype=torch.float32)
    color_counts = torch.tensor(
        [[sum(o.color == c for o in os) for c in COLOR_NAMES] for os in objs], dtype=torch.float32
    )
    return torch.cat([pooled, hist, shape_counts.reshape(b, -1), color_counts.reshape(b, -1)], dim=1)


def _sqrtm_psd(c: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(c)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def frechet_distance_from_features(fa: torch.Tensor, fb: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets (N >= 2 each)."""
    if fa.ndim != 2 or fb.ndim != 2 or fa.shape[1] != fb.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with equal D, got {tuple(fa.shape)} and {tuple(fb.shape)}")
    if min(fa.shape[0], fb.shape[0]) < 2:
        raise ValueError(f"need at least 2 samples per set, got {fa.shape[0]} and {fb.shape[0]}")
    fa, fb = fa.double(), fb.double()
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    ca, cb = torch.cov(fa.T).reshape(fa.shape[1], -1), torch.cov(fb.T).reshape(fb.shape[1], -1)
    sa = _sqrtm_psd(ca)
    cross = torch.linalg.eigvalsh(sa @ cb @ sa).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + torch.trace(ca) + torch.trace(cb) - 2 * cross
    return max(0.0, float(fd))


def frechet_distance(images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """Frechet distance between `features` of two image sets (B, 3, H, W) in [-1, 1], same H, W."""
    if images_a.shape[1:] != images_b.shape[1:]:
        raise ValueError(f"image sets differ in shape: {tuple(images_a.shape)} vs {tuple(images_b.shape)}")
    return frechet_distance_from_features(features(images_a), features(images_b))


def diversity_per_group(
    images: torch.Tensor, group_ids: Sequence[int] | torch.Tensor, space: str = "features"
) -> dict[int, float]:
    """Mean within-group pairwise L2 distance of each group of >= 2 images, keyed by group id (sorted)."""
    images = validate_images(images)
    groups = torch.as_tensor(group_ids).reshape(-1)
    if groups.numel() != images.shape[0]:
        raise ValueError(f"got {groups.numel()} group ids for {images.shape[0]} images")
    if space == "features":
        vecs = features(images).double()
    elif space == "pixels":
        vecs = images.reshape(images.shape[0], -1).double() / images[0].numel() ** 0.5
    else:
        raise ValueError(f"space must be 'features' or 'pixels', got {space!r}")
    per_group = {}
    for g in torch.unique(groups):
        v = vecs[groups == g]
        if v.shape[0] < 2:
            continue
        n = v.shape[0]
        per_group[int(g)] = float(torch.cdist(v, v).sum() / (n * (n - 1)))
    if not per_group:
        raise ValueError("diversity needs at least one group with two or more images")
    return per_group


def diversity(images: torch.Tensor, group_ids: Sequence[int] | torch.Tensor, space: str = "features") -> float:
    """Mean within-group pairwise L2 distance, averaged over groups of >= 2 images (see module doc)."""
    per_group = diversity_per_group(images, group_ids, space)
    return float(sum(per_group.values()) / len(per_group))


# ------------------------------------------------------------------------------------------ exposure bias
@dataclass
class ExposureBin:
    sigma_low: float
    sigma_high: float
    num_points: int  # visited sigmas in (sigma_low, sigma_high]
    ideal_error: float
    rollout_error: float
    gap: float


@dataclass
class ExposureBiasReport:
    sigmas: list[float]  # the visited noise levels sigma_1 .. sigma_{S-1}
    ideal_errors: list[float]
    rollout_errors: list[float]
    bins: list[ExposureBin]
    mean_gap: float
    num_steps: int
    start_sigma: float
    guidance_scale: float
    shift: float

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        lines = [f"{'sigma bin':<13}{'n':>5} {'ideal':>10} {'rollout':>10} {'gap':>10}"]
        for b in self.bins:
            lines.append(
                f"({b.sigma_low:.2f}, {b.sigma_high:.2f}] {b.num_points:>4}"
                f" {b.ideal_error:>10.4g} {b.rollout_error:>10.4g} {b.gap:>10.4g}"
            )
        lines.append(f"mean gap {self.mean_gap:.4g}")
        return "\n".join(lines)


def _x0_error(model, x, sigma: float, x0, cond, null_cond, guidance_scale) -> torch.Tensor:
    """Per-sample mean squared error of x0_hat = x - sigma * v_cfg(x, sigma) against x0, shape (B,)."""
    v = guided_velocity(model, x, sigma, cond, null_cond, guidance_scale)
    x0_hat = x.float() - sigma * v.float()
    return (x0_hat - x0.float()).square().flatten(1).mean(1)


@torch.no_grad()
def exposure_bias(
    model,
    x0: torch.Tensor,
    cond: Any,
    *,
    null_cond: Any = None,
    num_steps: int = 10,
    guidance_scale: float = 1.0,
    shift: float = 1.0,
    start_sigma: float = 0.75,
    num_bins: int = 4,
    generator: torch.Generator | None = None,
) -> ExposureBiasReport:
    r"""The gap between a velocity model's x0-prediction error on ideal states and on its own sampler's states.

    1. Grid: :math:`\sigma_0 > \dots > \sigma_S = 0`, the entries of ``sigma_schedule(num_steps, shift)`` that are
       <= ``start_sigma``.
    2. Draw :math:`z_1 \sim N(0, I)` (``generator``), start at the ideal state
       :math:`x_{\sigma_0} = (1-\sigma_0) x_0 + \sigma_0 z_1` and run the Euler ODE sampler
       (`soarflow.sampling.integrate`, same ``guidance_scale`` / ``null_cond``) over the grid: states
       :math:`\tilde x_i` at :math:`\sigma_i`. The trajectory is coupled to :math:`x_0` through :math:`z_1`.
    3. At each reached noise level :math:`\sigma_i` (i = 1..S-1, i.e. every visited level except the exact start
       and :math:`\sigma = 0`), with :math:`\hat x_0(x, \sigma) = x - \sigma\, v_{cfg}(x, \sigma, c)`:
       rollout error :math:`e^{roll}_i = \mathrm{mean}_b \tfrac1d\lVert\hat x_0(\tilde x_i, \sigma_i) - x_0\rVert^2`,
       ideal error :math:`e^{ideal}_i` the same on :math:`x_i = (1-\sigma_i) x_0 + \sigma_i z_1` (same :math:`z_1`),
       where d is the number of elements per sample.
    4. Bins: ``num_bins`` equal-width intervals of (0, start_sigma]; per bin the mean of the errors of the levels
       falling in it (bins with none are dropped) and gap = rollout - ideal. ``mean_gap`` is the mean over all
       reached levels of :math:`e^{roll}_i - e^{ideal}_i`.

    A model that is exact on straight paths (v = z1 - x0 along every coupled line) has zero gap; positive gap is
    error the model makes only on the off-trajectory states its own sampler visits."""
    if not 0 < start_sigma <= 1:
        raise ValueError(f"start_sigma must be in (0, 1], got {start_sigma}")
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    full = sigma_schedule(num_steps, shift, device=x0.device)
    grid = full[full <= start_sigma + 1e-6]
    if len(grid) < 3:
        raise ValueError(
            f"the {num_steps}-step schedule (shift={shift}) has fewer than 2 steps below start_sigma={start_sigma}"
        )
    z1 = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    ideal = lambda s: (1 - s) * x0 + s * z1  # noqa: E731
    _, traj = integrate(
        model, ideal(grid[0]), grid, cond, null_cond=null_cond, guidance_scale=guidance_scale, return_trajectory=True
    )
    sigmas, e_ideal, e_roll = [], [], []
    for i in range(1, len(grid) - 1):
        s = float(grid[i])
        sigmas.append(s)
        e_ideal.append(float(_x0_error(model, ideal(grid[i]), s, x0, cond, null_cond, guidance_scale).mean()))
        e_roll.append(float(_x0_error(model, traj[i], s, x0, cond, null_cond, guidance_scale).mean()))
    edges = torch.linspace(0, start_sigma, num_bins + 1).tolist()
    bins = []
    for lo, hi in zip(edges, edges[1:]):
        idx = [j for j, s in enumerate(sigmas) if lo < s <= hi + 1e-6]
        if idx:
            ei = sum(e_ideal[j] for j in idx) / len(idx)
            er = sum(e_roll[j] for j in idx) / len(idx)
            bins.append(ExposureBin(lo, hi, len(idx), ei, er, er - ei))
    mean_gap = sum(r - i for r, i in zip(e_roll, e_ideal)) / len(sigmas)
    return ExposureBiasReport(sigmas, e_ideal, e_roll, bins, mean_gap, num_steps, start_sigma, guidance_scale, shift)
