r"""The SOAR objective (arXiv 2604.12617) and plain flow matching (SFT), for any velocity model.

For a batch :math:`(x_0, c)` of B real samples (conventions in :mod:`soarflow.flow`):

1. draw :math:`z_1 \sim \mathcal N(0, I)` and :math:`t_0` (``t_density``); :math:`\sigma_0 = \sigma(t_0)`,
   :math:`x_{\sigma_0} = (1-\sigma_0) x_0 + \sigma_0 z_1`;
2. main (SFT) term :math:`\ell_b = \lVert v_\theta(x_{\sigma_0}, \sigma_0, c) - (z_1 - x_0)\rVert^2`;
3. rollout without gradient: one step of the N-step inference schedule with guidance (in the ``reuse`` layout,
   the default on a CPU, :math:`v_c` is the main term's detached output, so only :math:`v_u` needs a forward),
   :math:`t_1 = \max(t_0 - 1/N, 0)`, :math:`\sigma_1 = \sigma(t_1)`,
   :math:`z' = x_{\sigma_0} + (\sigma_1 - \sigma_0)\,(v_u + w(v_c - v_u))` (path 0, ODE); optional extra paths
   replace the Euler step by a stochastic step (:mod:`soarflow.sampling`), and samples with :math:`t_1 = 0` keep
   only the ODE path;
4. re-noise toward the same endpoint: for K points per path :math:`\sigma' \sim U[\sigma_1, \sigma_{up}]`
   (:math:`\sigma_{up} = 1`, or :math:`\min(r\sigma_0, 1)`), :math:`\alpha = (\sigma' - \sigma_1)/(1 - \sigma_1)`,
   :math:`z_{aux} = (1-\alpha) z' + \alpha z_1`;
5. correction target :math:`v_{corr} = (z_{aux} - x_0)/\sigma'`: following it from :math:`z_{aux}` for
   :math:`\sigma'` reaches :math:`x_0` exactly. :math:`\sigma'` is floored at ``sigma_floor`` *before*
   :math:`z_{aux}` is built, so the division is safe and that identity still holds exactly;
6. auxiliary term :math:`a_p = \lVert v_\theta(z_{aux}, \sigma', c) - v_{corr}\rVert^2` (with gradient);
7. :math:`L = (\sum_b w(\sigma_0)\ell_b + \lambda \sum_p w(\sigma'_p) a_p) / (B + \lambda P)`.

Squared errors are averaged over non-batch dimensions; :math:`w` is the SD3 loss weighting. With
:math:`\lambda = 0` or K = 0 this is exactly the flow-matching loss. When ``torch.distributed`` is initialised
the denominator counts every rank's terms and the loss is scaled by the world size, so after data-parallel
gradient averaging the gradient equals that of one process on the global batch.
"""

from __future__ import annotations

import dataclasses
import math
import time
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from .conditioning import cond_batch_size, cond_cat, cond_expand_null, cond_index, cond_repeat, cond_where
from .flow import (
    T_DENSITIES,
    WEIGHTINGS,
    VelocityModel,
    append_dims,
    interpolate,
    loss_weight,
    per_sample_mse,
    sample_t,
    shift_sigma,
    velocity_target,
)
from .sampling import RENAMED_STEP_KINDS, STEP_KINDS, guided_velocity, renamed_kind_hint, step


def _key(default: Any, help: str, set_by: str | None = None) -> Any:
    """A SOARConfig field with its help (``soarflow train --help``). ``set_by`` names the top-level trainer key
    that fills the field (the ``soar:`` section does not accept it)."""
    metadata = {"help": help, **({"set_by": set_by} if set_by else {})}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class SOARConfig:
    """Hyper-parameters of the SOAR objective (paper defaults), and the trainer's ``soar:`` section.
    ``lambda_aux = 0`` or ``num_aux = 0`` is SFT.

    The controls of docs/objective.md ("Controls") are fields here: ``points_per_sample`` (compute-matched SFT),
    ``rollout="none"`` (no deviation: isolates the correction), ``rollout="none"`` with ``aux_noise="fresh"``
    (noise-level-matched SFT), ``aux_sigma_density`` (the sigma' distribution) and the condition-dropout order
    (``cond_dropout_mode``, ``rollout_uses_dropped_cond``). The fields with ``set_by`` (the t density, loss
    weighting and condition dropout) come from the trainer's top-level keys, which every method shares."""

    num_aux: int = _key(6, "K: auxiliary re-noised points per rollout path (0 = SFT)")
    lambda_aux: float = _key(1.0, "weight of the auxiliary term (0 = SFT)")
    rollout_steps: int = _key(40, "N: the rollout takes one step of the N-step inference schedule (1/N in t)")
    guidance_scale: float = _key(4.5, "guidance scale of the rollout step (1 = conditional velocity only)")
    num_rollout_paths: int = _key(1, "M: path 0 is the ODE step, paths 1..M-1 are stochastic")
    rollout_kind: Literal["euler_noise", "constant_sde", "flow_sde", "cps"] = _key(
        "flow_sde", "step of the stochastic paths (soarflow.sampling; official 'sde' = cps, noise scale 1)"
    )
    rollout_noise_scale: float = _key(0.5, "noise scale of the stochastic paths")
    sigma_upper: Literal["one", "ratio"] = _key("one", "upper bound of sigma': 1 or min(ratio * sigma0, 1)")
    sigma_upper_ratio: float = _key(1.5, "ratio for sigma_upper='ratio'")
    sigma_floor: float = _key(1e-3, "sigma' >= floor, so v_corr = (z_aux - x0) / sigma' stays finite")
    shift: float = _key(3.0, "time shift s: sigma(t) = s t / (1 + (s - 1) t) (SD3.5: 3); every method's")
    t_density: Literal["logit_normal", "uniform", "mode", "cosmap"] = _key(
        "logit_normal", "density of the training time t", set_by="weighting_scheme"
    )
    logit_mean: float = _key(0.0, "mean of the logit-normal t density", set_by="logit_mean")
    logit_std: float = _key(1.0, "std of the logit-normal t density", set_by="logit_std")
    mode_scale: float = _key(1.29, "scale of the 'mode' t density", set_by="mode_scale")
    uniform_fraction: float = _key(
        0.0, "share of t drawn from U(0, 1) instead of t_density (flow.sample_t)", set_by="uniform_fraction"
    )
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = _key("none", "SD3 loss weighting", set_by="weighting_scheme")
    cond_dropout: float = _key(
        0.0, "probability of training a sample on null_cond (enables guidance)", set_by="cond_dropout"
    )
    aux_chunk_size: int | None = _key(None, "max rows per forward; larger fused batches run checkpointed in chunks")
    fuse_forward: bool = _key(
        True, "one fused forward for the main and auxiliary terms (false: one per term, as in the reference code)"
    )
    # --- speed: layout of the gradient forwards (identical loss; see docs/objective.md "Cost")
    reuse_main_output: bool | Literal["auto"] = _key(
        "auto",
        "the main term's output is the rollout's conditional velocity (saves B rows): true ('reuse' "
        "layout), false ('fused'; 'loop' with fuse_forward: false) or auto (by device type: resolve_layout)",
    )
    forward_batch_size: int | Literal["auto", "probe"] | None = _key(
        "auto", "rows per forward call of the gradient terms: auto (one call), probe (timed once), N, null"
    )
    # --- controls (issue 12): what SOAR's gain is made of
    points_per_sample: int = _key(1, "method sft: P standard draws (fresh noise and t) per image (compute-matched SFT)")
    rollout: Literal["guided", "none"] = _key("guided", "none: z' = x_sigma1 exactly, no deviation (control)")
    aux_noise: Literal["shared", "fresh"] = _key("shared", "fresh (with rollout none): noise-level-matched SFT")
    aux_sigma_density: Literal["uniform", "t_density"] = _key(
        "uniform", "sigma' ~ U[sigma1, upper] (paper) or the training t density restricted to it"
    )
    cond_dropout_mode: Literal["per_sample", "per_batch"] = _key(
        "per_sample", "condition dropout per sample, or one draw for the whole batch"
    )
    rollout_uses_dropped_cond: bool = _key(False, "a dropped sample rolls out unconditionally (official order)")

    # Former names, still read from config files with a warning (soarflow.train.config.rename_former_keys).
    FORMER_KEYS: ClassVar[dict[str, str]] = {"rollout_cfg": "guidance_scale"}
    FORMER_VALUES: ClassVar[dict[str, dict[str, str]]] = {"rollout_kind": RENAMED_STEP_KINDS}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"config key 'soar.{field}': {why} (got {getattr(self, field)!r})")

        if not isinstance(self.num_aux, int) or self.num_aux < 0:
            raise bad("num_aux", "must be an integer >= 0")
        if not (isinstance(self.lambda_aux, (int, float)) and self.lambda_aux >= 0 and math.isfinite(self.lambda_aux)):
            raise bad("lambda_aux", "must be a finite number >= 0")
        if not isinstance(self.rollout_steps, int) or self.rollout_steps < 1:
            raise bad("rollout_steps", "must be an integer >= 1")
        if not (isinstance(self.guidance_scale, (int, float)) and math.isfinite(self.guidance_scale)):
            raise bad("guidance_scale", "must be a finite number")
        if not isinstance(self.num_rollout_paths, int) or self.num_rollout_paths < 1:
            raise bad("num_rollout_paths", "must be an integer >= 1")
        if self.rollout_kind not in STEP_KINDS or self.rollout_kind == "ode":
            raise bad(
                "rollout_kind",
                "must be one of euler_noise, constant_sde, flow_sde, cps" + renamed_kind_hint(self.rollout_kind),
            )
        if not self.rollout_noise_scale >= 0:
            raise bad("rollout_noise_scale", "must be >= 0")
        if self.sigma_upper not in ("one", "ratio"):
            raise bad("sigma_upper", "must be 'one' or 'ratio'")
        if not self.sigma_upper_ratio >= 1:
            raise bad("sigma_upper_ratio", "must be >= 1 so that the upper bound is >= sigma1")
        if not 0 < self.sigma_floor < 1:
            raise bad("sigma_floor", "must be in (0, 1)")
        if not self.shift > 0:
            raise bad("shift", "must be > 0")
        if self.t_density not in T_DENSITIES:
            raise bad("t_density", f"must be one of {T_DENSITIES}")
        if not self.logit_std > 0:
            raise bad("logit_std", "must be > 0")
        if not 0 <= self.uniform_fraction <= 1:
            raise bad("uniform_fraction", "must be in [0, 1]")
        if self.uniform_fraction > 0 and self.aux_sigma_density == "t_density":
            raise bad(
                "uniform_fraction", "aux_sigma_density='t_density' needs the plain t_density (uniform_fraction 0)"
            )
        if self.weighting not in WEIGHTINGS:
            raise bad("weighting", f"must be one of {WEIGHTINGS}")
        if not 0 <= self.cond_dropout < 1:
            raise bad("cond_dropout", "must be in [0, 1)")
        if self.aux_chunk_size is not None and (not isinstance(self.aux_chunk_size, int) or self.aux_chunk_size < 1):
            raise bad("aux_chunk_size", "must be None or an integer >= 1")
        if self.reuse_main_output not in (True, False, "auto"):
            raise bad("reuse_main_output", "must be true, false or 'auto'")
        fbs = self.forward_batch_size
        if not (
            fbs is None or fbs in ("auto", "probe") or (isinstance(fbs, int) and not isinstance(fbs, bool) and fbs >= 1)
        ):
            raise bad("forward_batch_size", "must be 'auto', 'probe', None or an integer >= 1")
        if not isinstance(self.points_per_sample, int) or self.points_per_sample < 1:
            raise bad("points_per_sample", "must be an integer >= 1")
        if self.rollout not in ("guided", "none"):
            raise bad("rollout", "must be 'guided' or 'none'")
        if self.rollout == "none" and self.num_rollout_paths != 1:
            raise bad("rollout", "'none' has a single (exact) path: set num_rollout_paths to 1")
        if self.aux_noise not in ("shared", "fresh"):
            raise bad("aux_noise", "must be 'shared' or 'fresh'")
        if self.aux_noise == "fresh" and self.rollout != "none":
            raise bad("aux_noise", "'fresh' needs rollout='none' (a rollout state lies on the shared noise)")
        if self.aux_sigma_density not in ("uniform", "t_density"):
            raise bad("aux_sigma_density", "must be 'uniform' or 't_density'")
        if self.cond_dropout_mode not in ("per_sample", "per_batch"):
            raise bad("cond_dropout_mode", "must be 'per_sample' or 'per_batch'")

    def replace(self, **changes: Any) -> "SOARConfig":
        return dataclasses.replace(self, **changes)

    @property
    def is_sft(self) -> bool:
        return self.num_aux == 0 or self.lambda_aux == 0


# Device types on which ``reuse_main_output: auto`` picks the fused layout (fewest forward calls). Measured with
# bench/step_cost.py (docs/performance.md): on an H200 the fused layout was 1.4-1.9x faster than the reuse layout
# on the small model, which is launch-bound there; on the CPU the reuse layout (fewest FLOPs) was faster at every K.
# Every other device type (mps, xpu, ...) keeps the reuse layout until it is measured.
FUSED_DEVICE_TYPES: tuple[str, ...] = ("cuda",)


def resolve_layout(config: SOARConfig, device: torch.device | str) -> SOARConfig:
    """``config`` with ``reuse_main_output: auto`` made concrete for ``device``: false (fused) on a device type in
    :data:`FUSED_DEVICE_TYPES`, true (reuse) elsewhere, and false whenever ``fuse_forward`` is false (the per-term
    loop asked for). A function of the device *type* only (no timing), so two runs on the same kind of device
    compute the same thing; an explicit true/false is returned unchanged. Every layout computes the same loss and
    gradient (tests/core/test_objective.py); only float rounding and speed differ."""
    if config.reuse_main_output != "auto":
        return config
    fused = torch.device(device).type in FUSED_DEVICE_TYPES or not config.fuse_forward
    return config.replace(reuse_main_output=not fused)


def layout_name(config: SOARConfig) -> str:
    """The forward layout a (resolved) config runs: reuse, fused or loop; ``auto`` before :func:`resolve_layout`."""
    if config.reuse_main_output == "auto":
        return "auto"
    if config.reuse_main_output:
        return "reuse"
    return "fused" if config.fuse_forward else "loop"


@dataclass
class ObjectiveOutput:
    """`loss` is differentiable; everything else is detached (tensors, so no device sync until `metrics()`)."""

    loss: torch.Tensor
    main_loss: torch.Tensor  # mean unweighted main squared error over the B samples
    aux_loss: torch.Tensor  # mean unweighted auxiliary squared error per point (0 if none)
    num_aux_points: int  # P on this process
    mean_sigma: torch.Tensor  # mean sigma0
    mean_aux_sigma: torch.Tensor  # mean sigma' (nan if no aux point)
    rollout_deviation: torch.Tensor  # mean RMS distance ||z' - x_sigma1|| of the ODE rollout (nan if none)

    def metrics(self) -> dict[str, float]:
        return {
            "loss": float(self.loss.detach()),
            "main_loss": float(self.main_loss),
            "aux_loss": float(self.aux_loss),
            "num_aux_points": float(self.num_aux_points),
            "mean_sigma": float(self.mean_sigma),
            "mean_aux_sigma": float(self.mean_aux_sigma),
            "rollout_deviation": float(self.rollout_deviation),
        }


# ---------------------------------------------------------------------------------------------- helpers


def _check_inputs(x0: torch.Tensor, cond: Any, noise, t) -> int:
    if not isinstance(x0, torch.Tensor) or x0.ndim < 2:
        raise ValueError(
            f"x0: expected a tensor with a batch dimension, got {type(x0).__name__} {tuple(getattr(x0, 'shape', ()))}"
        )
    batch = x0.shape[0]
    cb = cond_batch_size(cond)
    if cb is not None and cb != batch:
        raise ValueError(f"cond: batch size {cb} does not match x0 batch size {batch}")
    if noise is not None and tuple(noise.shape) != tuple(x0.shape):
        raise ValueError(f"noise: shape {tuple(noise.shape)} does not match x0 shape {tuple(x0.shape)}")
    if t is not None:
        if tuple(t.shape) != (batch,):
            raise ValueError(f"t: expected shape ({batch},), got {tuple(t.shape)}")
        if bool((t < 0).any()) or bool((t > 1).any()):
            raise ValueError("t: values must lie in [0, 1]")
    return batch


# ---------------------------------------------------------------------------------------------- random draws


@dataclass
class Draws:
    r"""Every random number of one loss evaluation, each with its batch axis at a known place, so that the
    draws of a global batch can be sliced per process (:meth:`rows`). P = ``points_per_sample`` (1 for SOAR),
    M = ``num_rollout_paths``, K = ``num_aux``; a field is None where the config does not use it.

    * ``noise`` :math:`z_1` (P, B, ...) and ``t`` (P, B): the training points of the main (SFT) term;
    * ``drop_u`` (P, B): row b trains on ``null_cond`` where ``drop_u < cond_dropout`` (``per_batch``: one
      uniform, repeated over the batch);
    * ``path_noise`` (M-1, B, ...): the :math:`\epsilon` of the stochastic rollout paths 1..M-1;
    * ``aux_u`` (M, K, B): uniforms mapped to :math:`\sigma'` by :func:`aux_sigmas_from_uniform`;
    * ``aux_noise`` (M, K, B, ...): the endpoints of the aux points with ``aux_noise="fresh"``."""

    noise: torch.Tensor
    t: torch.Tensor
    drop_u: torch.Tensor | None = None
    path_noise: torch.Tensor | None = None
    aux_u: torch.Tensor | None = None
    aux_noise: torch.Tensor | None = None

    # the batch axis of each field
    _BATCH_AXIS = {"noise": 1, "t": 1, "drop_u": 1, "path_noise": 1, "aux_u": 2, "aux_noise": 2}

    def rows(self, index: slice) -> "Draws":
        """The draws of rows ``index`` of the batch (a process's share of a global batch)."""

        def take(name: str) -> torch.Tensor | None:
            value = getattr(self, name)
            if value is None:
                return None
            return value[(slice(None),) * self._BATCH_AXIS[name] + (index,)]

        return Draws(**{name: take(name) for name in self._BATCH_AXIS})


def draw_randomness(
    config: "SOARConfig",
    shape: tuple[int, ...] | torch.Size,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    noise: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    sft: bool | None = None,
) -> Draws:
    """The :class:`Draws` of :func:`sft_loss` (``sft``, default ``config.is_sft``) or :func:`soar_loss` for a
    batch of ``shape`` (B, ...), from one generator.

    Given ``noise`` / ``t`` are the first draw (not drawn). The order is fixed — noise, t (the first draw, then the
    other P - 1), dropout, stochastic-path noise, sigma' uniforms, fresh aux noise — so a draw that a config does
    not use leaves the others alone. The trainer calls this for the global batch and slices it per process, so
    the loss does not depend on the number of processes."""
    shape = tuple(shape)
    batch = shape[0]
    sft = config.is_sft if sft is None else sft

    def normal(*lead: int, dtype: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(lead + shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    def times(n: int) -> torch.Tensor:
        return sample_t(
            n,
            density=config.t_density,
            logit_mean=config.logit_mean,
            logit_std=config.logit_std,
            mode_scale=config.mode_scale,
            uniform_fraction=config.uniform_fraction,
            generator=generator,
            device=device,
        )

    noise = normal() if noise is None else noise.to(device=device, dtype=dtype)
    t = times(batch) if t is None else t.to(device=device, dtype=torch.float32)
    P = config.points_per_sample if sft else 1
    noise, t = noise[None], t[None]
    if P > 1:
        noise = torch.cat([noise, normal(P - 1)])
        t = torch.cat([t, times((P - 1) * batch).reshape(P - 1, batch)])
    drop_u = None
    if config.cond_dropout > 0:
        drop_u = torch.rand(P * batch, generator=generator, device=device)
        if config.cond_dropout_mode == "per_batch":
            drop_u = drop_u[:1].expand(P * batch)
        drop_u = drop_u.reshape(P, batch)
    if sft:
        return Draws(noise, t, drop_u)
    M, K = config.num_rollout_paths, config.num_aux
    path_noise = normal(M - 1, dtype=torch.float32) if M > 1 else None  # the step computes in float32
    aux_u = torch.rand((M, K, batch), generator=generator, device=device)
    aux_noise = normal(M, K) if config.aux_noise == "fresh" else None
    return Draws(noise, t, drop_u, path_noise, aux_u, aux_noise)


def apply_cond_dropout(cond, null_cond, drop_u: torch.Tensor | None, config: SOARConfig, batch: int, device):
    """``(train_cond, dropped)``: the condition each row trains on and the (B,) mask of rows put on null_cond.

    ``per_sample`` draws one Bernoulli(p) per row; ``per_batch`` one draw for the whole batch (the official
    SOAR code's order). Both consume B uniforms (:func:`draw_randomness`), so switching mode leaves later draws
    alone."""
    if drop_u is None:
        return cond, torch.zeros(batch, dtype=torch.bool, device=device)
    if null_cond is None:
        raise ValueError("null_cond is required when cond_dropout > 0")
    drop = drop_u.reshape(batch) < config.cond_dropout
    return cond_where(drop, cond_expand_null(null_cond, batch), cond), drop


def _global_counts(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum the per-process term counts over ranks; returns (counts, world_size)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        total = local.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total, dist.get_world_size()
    return local, 1


def _forward_rows(model: VelocityModel, x, sigma, cond, chunk: int | None, micro: int | None = None) -> torch.Tensor:
    """Evaluate the model over a (possibly large) batch.

    Above ``chunk`` rows (``aux_chunk_size``), chunks run under activation checkpointing so stored activations stay
    bounded by one chunk (costs one extra forward in backward). Otherwise, above ``micro`` rows
    (``forward_batch_size``), rows run in plain calls of ``micro`` rows: the same values and the same memory, but
    smaller matrices, which is faster where one large call is not (CPUs)."""
    n = x.shape[0]
    if not torch.is_grad_enabled():
        return model(x, sigma, cond)
    size, wrap = (chunk, True) if chunk is not None else (micro, False)
    if size is None or n <= size:
        return model(x, sigma, cond)
    outs = []
    for start in range(0, n, size):
        idx = slice(start, min(start + size, n))
        args = (x[idx], sigma[idx], cond_index(cond, idx))
        outs.append(checkpoint(model, *args, use_reentrant=False) if wrap else model(*args))
    return torch.cat(outs)


# Per model: {(rows, batch, row shape, dtype, device): chosen rows per call}. Weak keys: no model is kept alive.
_PROBE_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _probe_forward_batch(model: VelocityModel, x, sigma, cond, batch: int) -> int | None:
    """Time forward+backward of ``x`` as one call and in calls of ``batch`` / ``2 batch`` rows; keep the fastest.

    Once per (model, shape, dtype, device). Gradients go to ``torch.autograd.grad`` (no ``.grad`` is touched) and
    the RNG state is restored, so the probe leaves training unchanged. A DistributedDataParallel wrapper is
    bypassed (its reducer expects one backward per forward)."""
    target = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    key = (x.shape[0], batch, tuple(x.shape[1:]), x.dtype, str(x.device))
    try:
        cache = _PROBE_CACHE.setdefault(target, {})
    except TypeError:  # not weak-referenceable: a plain function, nothing to cache against
        return batch
    if key in cache:
        return cache[key]
    params = [p for p in target.parameters() if p.requires_grad] if isinstance(target, torch.nn.Module) else []
    candidates: list[int | None] = [None] + [m for m in (batch, 2 * batch) if m < x.shape[0]]
    devices = [x.device] if x.device.type == "cuda" else []
    timings: dict[int | None, float] = {c: float("inf") for c in candidates}
    with torch.random.fork_rng(devices=devices):
        for rep in range(3):  # rep 0 warms up
            for c in candidates:
                if x.device.type == "cuda":
                    torch.cuda.synchronize(x.device)
                t0 = time.perf_counter()
                xi = x.detach().requires_grad_(not params)
                out = _forward_rows(target, xi, sigma, cond, None, c)
                torch.autograd.grad(out.float().square().sum(), params or [xi], allow_unused=True)
                if x.device.type == "cuda":
                    torch.cuda.synchronize(x.device)
                if rep:
                    timings[c] = min(timings[c], time.perf_counter() - t0)
    cache[key] = min(candidates, key=lambda c: timings[c])
    return cache[key]


def _resolve_forward_batch(model, x, sigma, cond, batch: int, config: SOARConfig) -> int | None:
    """Rows per plain forward call of the gradient terms (``forward_batch_size``).

    ``auto``: one call for all rows, on every device: in bench/step_cost.py on the 2-core CPU, one call was as
    fast as or faster than calls of B rows in 5 of 6 cases (docs/performance.md), and an accelerator only gains
    from larger calls. ``probe``: a one-time timing probe (:func:`_probe_forward_batch`)."""
    choice = config.forward_batch_size
    if choice == "auto":
        return None
    if choice == "probe":
        if x.shape[0] <= batch or not torch.is_grad_enabled():
            return None
        return _probe_forward_batch(model, x, sigma, cond, batch)
    return choice


def _normalise(main_sum, aux_sum, batch, num_points, lam, device):
    counts, world = _global_counts(torch.tensor([float(batch), float(num_points)], device=device))
    denom = counts[0] + lam * counts[1]
    return (main_sum + lam * aux_sum) * world / denom


def renoise(z_prime: torch.Tensor, z1: torch.Tensor, sigma1: torch.Tensor, sigma_aux: torch.Tensor) -> torch.Tensor:
    r""":math:`z_{aux} = (1-\alpha) z' + \alpha z_1`, :math:`\alpha = (\sigma' - \sigma_1)/(1 - \sigma_1)`.

    ``sigma1`` and ``sigma_aux`` broadcast over the leading (non-feature) dimensions of ``z_prime``; their
    trailing dimension is the batch. At :math:`\sigma' = \sigma_1` this is :math:`z'`, at 1 it is :math:`z_1`."""
    alpha = ((sigma_aux - sigma1) / (1.0 - sigma1).clamp_min(1e-6)).clamp(0.0, 1.0)
    a = alpha.reshape(alpha.shape + (1,) * (z_prime.ndim - alpha.ndim)).to(z_prime.dtype)
    return (1 - a) * z_prime + a * z1


def correction_target(z_aux: torch.Tensor, x0: torch.Tensor, sigma_aux: torch.Tensor) -> torch.Tensor:
    r""":math:`v_{corr} = (z_{aux} - x_0)/\sigma'` (float32), so that :math:`z_{aux} - \sigma' v_{corr} = x_0`."""
    return (z_aux.float() - x0.float()) / append_dims(sigma_aux.float(), z_aux.ndim)


def _t_of_u(u: torch.Tensor, config: SOARConfig) -> torch.Tensor:
    """The training density's increasing map from a uniform u in [0, 1] to t (:func:`soarflow.flow.sample_t`)."""
    if config.t_density == "logit_normal":
        return torch.sigmoid(config.logit_mean + config.logit_std * torch.special.ndtri(u))
    if config.t_density == "uniform":
        return u
    if config.t_density == "mode":  # SD3's map is decreasing in its u; use 1 - u
        v = 1.0 - u
        return 1.0 - v - config.mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1.0 + v)
    return 1.0 - 1.0 / (torch.tan(math.pi * u / 2) + 1.0)


def _u_of_t(t: torch.Tensor, config: SOARConfig, iters: int = 60) -> torch.Tensor:
    """Inverse of :func:`_t_of_u` (the training CDF of t) by bisection in float64: exact to ~1e-16."""
    lo, hi = torch.zeros_like(t), torch.ones_like(t)
    for _ in range(iters):
        mid = (lo + hi) / 2
        below = _t_of_u(mid, config) < t
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


def _unshift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    r"""Inverse of :func:`soarflow.flow.shift_sigma`: :math:`t = \sigma / (s - (s-1)\sigma)`."""
    return sigma / (shift - (shift - 1.0) * sigma)


def rollout_sigmas(t: torch.Tensor, config: SOARConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""``(sigma0, sigma1, upper)`` of samples drawn at ``t`` (B,): :math:`\sigma_0 = \sigma(t)`, the rollout
    target :math:`\sigma_1 = \sigma(\max(t - 1/N, 0))` (one step of the N-step schedule) and the upper bound of
    :math:`\sigma'`: :math:`\sigma_{up} = 1` (``sigma_upper="one"``) or :math:`\min(r\sigma_0, 1)` (``"ratio"``)."""
    sigma0 = shift_sigma(t, config.shift)
    sigma1 = shift_sigma((t - 1.0 / config.rollout_steps).clamp_min(0.0), config.shift)
    upper = (
        torch.ones_like(sigma0) if config.sigma_upper == "one" else (config.sigma_upper_ratio * sigma0).clamp(max=1.0)
    )
    return sigma0, sigma1, upper


def aux_sigmas_from_uniform(t: torch.Tensor, config: SOARConfig, u: torch.Tensor) -> torch.Tensor:
    r"""Map uniforms ``u`` (shape (..., B)) to the auxiliary levels :math:`\sigma' \in [\sigma_1, \sigma_{up}]`
    of samples drawn at ``t`` (B,) (bounds: :func:`rollout_sigmas`):

    * ``aux_sigma_density="uniform"`` (paper): :math:`\sigma' = \sigma_1 + u(\sigma_{up} - \sigma_1)`;
    * ``"t_density"``: the training density of t restricted to :math:`[t_1, t_{up}]`,
      :math:`t_{up} = \sigma^{-1}(\sigma_{up})`, by inverse CDF:
      :math:`t' = F^{-1}(F(t_1) + u(F(t_{up}) - F(t_1)))`, :math:`\sigma' = \sigma(t')`.

    Not floored at ``sigma_floor`` (:func:`aux_sigma_levels` floors after any override)."""
    _, sigma1, upper = rollout_sigmas(t, config)
    if config.aux_sigma_density == "uniform":
        return sigma1 + u * (upper - sigma1)
    t1 = (t - 1.0 / config.rollout_steps).clamp_min(0.0)
    t_up = _unshift_sigma(upper.double(), config.shift)
    lo, hi = _u_of_t(t1.double(), config), _u_of_t(t_up, config)
    t_aux = _t_of_u(lo + u.double() * (hi - lo), config).clamp(t1.double(), t_up)
    return shift_sigma(t_aux, config.shift).float().clamp(sigma1, upper)


def aux_sigma_levels(t: torch.Tensor, u: torch.Tensor, config: SOARConfig, ode_override: torch.Tensor | None = None):
    r"""The auxiliary levels :math:`\sigma'` (M, K, B), floored at ``sigma_floor``, from the uniforms ``u``
    (M, K, B); ``ode_override`` (K, B) replaces those of path 0 (checked to lie in :math:`[\sigma_1, \sigma_{up}]`).
    The floor comes *before* :math:`z_{aux}` is built, so :math:`z_{aux} - \sigma' v_{corr} = x_0` stays exact."""
    sig_aux = aux_sigmas_from_uniform(t, config, u)
    if ode_override is not None:
        K, batch = u.shape[1:]
        ode_override = ode_override.to(device=u.device, dtype=torch.float32)
        if tuple(ode_override.shape) != (K, batch):
            raise ValueError(
                f"aux_sigmas: expected shape ({K}, {batch}) = (num_aux, B), got {tuple(ode_override.shape)}"
            )
        _, sigma1, upper = rollout_sigmas(t, config)
        tol = 1e-5
        if bool((ode_override < sigma1 - tol).any()) or bool((ode_override > upper + tol).any()):
            raise ValueError("aux_sigmas: every sigma' must lie in [sigma1, sigma_upper] of its sample")
        sig_aux = torch.cat([ode_override[None], sig_aux[1:]])
    return sig_aux.clamp_min(config.sigma_floor)


# ---------------------------------------------------------------------------------------------- losses


def _resolve_draws(draws, config, x0, generator, noise, t, sft: bool) -> Draws:
    if draws is None:
        return draw_randomness(
            config, x0.shape, generator=generator, device=x0.device, dtype=x0.dtype, noise=noise, t=t, sft=sft
        )
    if noise is not None or t is not None:
        raise ValueError("draws: given together with noise / t; pass one or the other")
    P = config.points_per_sample if sft else 1
    if tuple(draws.noise.shape) != (P, *x0.shape) or tuple(draws.t.shape) != (P, x0.shape[0]):
        raise ValueError(
            f"draws: noise {tuple(draws.noise.shape)} / t {tuple(draws.t.shape)} do not match "
            f"(P={P}, x0 shape {tuple(x0.shape)})"
        )
    return draws


def sft_loss(
    model: VelocityModel,
    x0: torch.Tensor,
    cond: Any,
    *,
    config: SOARConfig | None = None,
    null_cond: Any = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    draws: Draws | None = None,
) -> ObjectiveOutput:
    r"""Plain flow matching: :math:`\sum_r w(\sigma_r)\lVert v_\theta(x_{\sigma_r},\sigma_r,c_r) - (z_r - x_0)\rVert^2 / (PB)`
    over P = ``points_per_sample`` draws per image (compute-matched SFT when P > 1).

    The random numbers are ``draws`` (:func:`draw_randomness`), or drawn from ``generator``: ``noise``/``t``
    fix the first draw, the other P - 1 draws (noise, then t) follow, then condition dropout per row (per draw)."""
    config = config or SOARConfig(num_aux=0)
    batch = _check_inputs(x0, cond, noise, t)
    draws = _resolve_draws(draws, config, x0, generator, noise, t, sft=True)
    P = config.points_per_sample
    if P > 1:
        x0 = x0.repeat((P,) + (1,) * (x0.ndim - 1))
        cond = cond_repeat(cond, P)
        if null_cond is not None and cond_batch_size(null_cond) == batch != 1:  # a per-row null_cond tiles too
            null_cond = cond_repeat(null_cond, P)
    rows = P * batch
    noise, t = draws.noise.reshape(x0.shape), draws.t.reshape(rows)
    train_cond, _ = apply_cond_dropout(cond, null_cond, draws.drop_u, config, rows, x0.device)
    sigma0 = shift_sigma(t, config.shift)
    x_t = interpolate(x0, noise, sigma0)
    err = per_sample_mse(model(x_t, sigma0, train_cond), velocity_target(x0, noise))
    main_sum = (loss_weight(sigma0, config.weighting) * err).sum()
    loss = _normalise(main_sum, main_sum.new_zeros(()), rows, 0, 0.0, x0.device)
    nan = torch.tensor(float("nan"), device=x0.device)
    return ObjectiveOutput(
        loss=loss,
        main_loss=err.detach().mean(),
        aux_loss=torch.zeros((), device=x0.device),
        num_aux_points=0,
        mean_sigma=sigma0.mean(),
        mean_aux_sigma=nan,
        rollout_deviation=nan,
    )


def _guided_from_main(model, v_main, x_t, sigma0, rollout_cond, null_cond, need_cond, guidance_scale) -> torch.Tensor:
    r"""The rollout's guided velocity :math:`v_u + w(v_c - v_u)` with :math:`v_c` taken from the main term's
    detached output ``v_main`` wherever the main term saw the rollout's condition; rows in ``need_cond`` (main
    caption dropped, rollout undropped) get their :math:`v_c` from the same no-grad forward as :math:`v_u`."""
    batch = x_t.shape[0]
    idx = need_cond.nonzero().flatten()
    xs, ss, cs = [], [], []
    if guidance_scale != 1.0:
        xs, ss, cs = [x_t], [sigma0], [cond_expand_null(null_cond, batch)]
    if idx.numel():
        xs.append(x_t[idx])
        ss.append(sigma0[idx])
        cs.append(cond_index(rollout_cond, idx))
    v_cond = v_main.detach()
    if not xs:
        return v_cond
    v = model(torch.cat(xs), torch.cat(ss), cond_cat(cs))
    if idx.numel():
        v_cond = v_cond.clone()
        v_cond[idx] = v[v.shape[0] - idx.numel() :]
    if guidance_scale == 1.0:
        return v_cond
    v_uncond = v[:batch]
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def soar_loss(
    model: VelocityModel,
    x0: torch.Tensor,
    cond: Any,
    *,
    null_cond: Any,
    config: SOARConfig | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    aux_sigmas: torch.Tensor | None = None,
    draws: Draws | None = None,
) -> ObjectiveOutput:
    """The SOAR loss (module docstring). The random numbers are ``draws`` (:func:`draw_randomness`), or drawn
    from ``generator``. ``noise`` (shape of x0), ``t`` (B,) and ``aux_sigmas`` (K, B), the sigma' of the ODE
    path, override the random draws: with an ODE-only rollout the loss is then a pure function of its inputs."""
    config = config or SOARConfig()
    if config.is_sft:
        if aux_sigmas is not None and aux_sigmas.numel() > 0:
            raise ValueError("aux_sigmas: given, but the config has no auxiliary term (num_aux or lambda_aux is 0)")
        return sft_loss(
            model, x0, cond, config=config, null_cond=null_cond, generator=generator, noise=noise, t=t, draws=draws
        )
    if config.points_per_sample != 1:
        raise ValueError(
            f"points_per_sample: {config.points_per_sample} draws per image is an SFT control; "
            "SOAR uses 1 (set num_aux=0 or method sft)"
        )

    batch = _check_inputs(x0, cond, noise, t)
    config = resolve_layout(config, x0.device)
    guided = config.rollout == "guided"
    if guided and config.guidance_scale != 1.0 and null_cond is None:
        raise ValueError(f"null_cond is required for the guided rollout (guidance_scale={config.guidance_scale})")
    # 1. z1, t0 (and every other random number), condition dropout, sigma0 and the rollout's target sigma1.
    draws = _resolve_draws(draws, config, x0, generator, noise, t, sft=False)
    noise, t = draws.noise[0], draws.t[0]
    train_cond, dropped = apply_cond_dropout(cond, null_cond, draws.drop_u, config, batch, x0.device)
    sigma0, sigma1, _ = rollout_sigmas(t, config)
    x_t = interpolate(x0, noise, sigma0)

    # 2. Main term first when its output feeds the rollout (it is the conditional half of the guided step).
    v_main = model(x_t, sigma0, train_cond) if guided and config.reuse_main_output else None
    # 3. Rollout: z' of each path, and how far the ODE path lands from the training trajectory.
    with torch.no_grad():
        x_sigma1 = interpolate(x0, noise, sigma1)
        if guided:
            rollout_cond = train_cond if config.rollout_uses_dropped_cond else cond
            # rows whose main term saw the null condition but whose rollout uses the caption need their own v_c
            need_cond = dropped & (not config.rollout_uses_dropped_cond)
            z_paths = rollout(
                model,
                x_t,
                sigma0,
                sigma1,
                rollout_cond,
                null_cond,
                config,
                draws.path_noise,
                v_main=v_main,
                need_cond=need_cond,
            )
        else:
            z_paths = x_sigma1[None]
        deviation = per_sample_mse(z_paths[0], x_sigma1).sqrt().mean()
    # 4-5. Auxiliary points z_aux at sigma' and their correction targets.
    sig_aux = aux_sigma_levels(t, draws.aux_u, config, aux_sigmas)
    z_aux, s_aux, sample_of, valid = aux_points(z_paths, x0, noise, sigma1, sig_aux, draws.aux_noise)
    v_corr = correction_target(z_aux, x0[sample_of], s_aux)
    # 2 + 6. The gradient forwards of the main and auxiliary terms.
    aux_cond = _index_cond(train_cond, sample_of, batch, valid.shape[0] * valid.shape[1], valid)
    v_main, v_aux = _main_and_aux_velocities(model, v_main, x_t, sigma0, train_cond, z_aux, s_aux, aux_cond, config)
    # 7. L = (sum_b w(sigma0) l_b + lambda sum_p w(sigma'_p) a_p) / (B + lambda P)
    main_err = per_sample_mse(v_main, velocity_target(x0, noise))
    aux_err = per_sample_mse(v_aux, v_corr)
    main_sum = (loss_weight(sigma0, config.weighting) * main_err).sum()
    aux_sum = (loss_weight(s_aux, config.weighting) * aux_err).sum()
    loss = _normalise(main_sum, aux_sum, batch, z_aux.shape[0], float(config.lambda_aux), x0.device)
    return ObjectiveOutput(
        loss=loss,
        main_loss=main_err.detach().mean(),
        aux_loss=aux_err.detach().mean(),
        num_aux_points=z_aux.shape[0],
        mean_sigma=sigma0.mean(),
        mean_aux_sigma=s_aux.mean(),
        rollout_deviation=deviation,
    )


@torch.no_grad()
def rollout(
    model: VelocityModel,
    x_t,
    sigma0,
    sigma1,
    cond,
    null_cond,
    config: SOARConfig,
    path_noise: torch.Tensor | None = None,
    *,
    v_main: torch.Tensor | None = None,
    need_cond: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The rolled-out states :math:`z'` (M, B, ...): one gradient-free step of the inference schedule from
    :math:`x_{\sigma_0}` to :math:`\sigma_1` with the guided velocity :math:`v = v_u + w(v_c - v_u)`.

    Path 0 is the Euler (ODE) step :math:`z' = x_{\sigma_0} + (\sigma_1 - \sigma_0) v`; paths 1..M-1 take the
    stochastic step ``rollout_kind`` (:mod:`soarflow.sampling`) with the noise ``path_noise`` (M-1, B, ...).
    With ``v_main`` (the main term's output) :math:`v_c` is its detached value, except on rows ``need_cond``."""
    if v_main is not None:
        v = _guided_from_main(model, v_main, x_t, sigma0, cond, null_cond, need_cond, config.guidance_scale)
    else:
        v = guided_velocity(model, x_t, sigma0, cond, null_cond, config.guidance_scale)
    paths = [step("ode", x_t, sigma0, sigma1, v)]
    for eps in path_noise if path_noise is not None else ():
        paths.append(step(config.rollout_kind, x_t, sigma0, sigma1, v, noise_scale=config.rollout_noise_scale, eps=eps))
    return torch.stack(paths)


def aux_points(
    z_paths: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigma1: torch.Tensor,
    sig_aux: torch.Tensor,
    fresh_noise: torch.Tensor | None = None,
):
    r"""Re-noise each path's :math:`z'` toward the same endpoint :math:`z_1`:
    :math:`z_{aux} = (1-\alpha) z' + \alpha z_1`, :math:`\alpha = (\sigma' - \sigma_1)/(1 - \sigma_1)`
    (:func:`renoise`), for the K levels ``sig_aux`` (M, K, B) of each path. With ``fresh_noise`` (M, K, B, ...)
    (``aux_noise="fresh"``) every point lies on its own noise instead: :math:`(1-\sigma') x_0 + \sigma' z_{pk}`.

    A stochastic path (1..M-1) of a sample whose rollout reached :math:`\sigma_1 = 0` is dropped (its step is
    undefined). Returns ``(z_aux, s_aux, sample_of, valid)``: the P kept points (P, ...) in (path, point, sample)
    order, their :math:`\sigma'` (P,), the sample each belongs to (P,), and the (M, K, B) mask of kept points."""
    M, K, batch = sig_aux.shape
    valid = torch.ones((M, K, batch), dtype=torch.bool, device=x0.device)
    valid[1:] &= (sigma1 > 0)[None, None, :]
    if fresh_noise is not None:
        z_aux = renoise(x0.expand_as(fresh_noise), fresh_noise, torch.zeros_like(sigma1), sig_aux)
    else:
        z_aux = renoise(z_paths[:, None], noise[None, None], sigma1, sig_aux)  # (M, K, B, ...)
    sample_of = torch.arange(batch, device=x0.device).expand(M, K, batch)[valid]
    return z_aux[valid].reshape(-1, *x0.shape[1:]), sig_aux[valid], sample_of, valid


def _main_and_aux_velocities(model, v_main, x_t, sigma0, train_cond, z_aux, s_aux, aux_cond, config: SOARConfig):
    """The gradient forwards: the aux rows alone when the main term already ran (``v_main``), else main and aux
    fused into one forward/backward (``fuse_forward``), else one forward per term (the reference code's layout)."""
    batch = x_t.shape[0]
    if v_main is not None:
        micro = _resolve_forward_batch(model, z_aux, s_aux, aux_cond, batch, config)
        return v_main, _forward_rows(model, z_aux, s_aux, aux_cond, config.aux_chunk_size, micro)
    if config.fuse_forward:
        x_all, s_all, c_all = torch.cat([x_t, z_aux]), torch.cat([sigma0, s_aux]), cond_cat([train_cond, aux_cond])
        micro = _resolve_forward_batch(model, x_all, s_all, c_all, batch, config)
        v_all = _forward_rows(model, x_all, s_all, c_all, config.aux_chunk_size, micro)
        return v_all[:batch], v_all[batch:]
    v_main = model(x_t, sigma0, train_cond)
    v_aux = torch.cat(
        [
            model(z_aux[i : i + batch], s_aux[i : i + batch], cond_index(aux_cond, slice(i, i + batch)))
            for i in range(0, z_aux.shape[0], batch)
        ]
    )
    return v_main, v_aux


def _index_cond(cond: Any, sample_of: torch.Tensor, batch: int, groups: int, valid: torch.Tensor) -> Any:
    """The condition of every auxiliary row; a plain repeat when every row is valid (no gather copy)."""
    if bool(valid.all()):
        return cond_repeat(cond, groups)
    return cond_index(cond, sample_of)
