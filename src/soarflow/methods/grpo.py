r"""Flow-GRPO (arXiv 2505.05470): reward RL for flow models through per-step Gaussian log-probabilities.

Conventions follow the public Flow-GRPO release (docs/methods.md has the derivation):

* **Policy.** Sampling runs S steps on the grid :math:`\sigma_0 = 1 > \dots > \sigma_S = 0`
  (:func:`soarflow.flow.sigma_schedule`). Steps :math:`i = 0..S-2` are stochastic, each a Gaussian
  :math:`x_{i+1} \sim \mathcal N(\mu_\theta(x_i), s_i^2 I)` from :func:`soarflow.sampling.step_distribution`:

  - ``flow_sde``: :math:`g_i = a\sqrt{\sigma_i/(1-\sigma_i)}` (a = ``noise_scale`` = 0.7),
    :math:`\mu = x_i + [v + \tfrac{g_i^2}{2\sigma_i}(x_i + (1-\sigma_i) v)](\sigma_{i+1} - \sigma_i)`,
    :math:`s_i = g_i\sqrt{\sigma_i - \sigma_{i+1}}`;
  - ``cps``: :math:`\mu = (1-\sigma_{i+1})\hat x_0 + \sigma_{i+1}\cos(\tfrac{\pi a}{2})\hat z_1`,
    :math:`s_i = \sigma_{i+1}\sin(\tfrac{\pi a}{2})`;

  with :math:`v` the guided velocity :math:`v_u + w(v_c - v_u)`. The last step is the deterministic Euler step
  (its image carries no fresh noise), so it has no log-probability and is never trained.
* **Log-probability** of a step, averaged over the D dimensions of a sample (as the release does):
  :math:`\ell_\theta = \frac1D\sum_d \left[-\frac{(x_{i+1,d}-\mu_d)^2}{2 s_i^2} - \log s_i - \tfrac12\log 2\pi\right]`.
* **Advantages** per prompt, as the release's ``PerPromptStatTracker``: the rewards of all images of one prompt
  (its group of G, merged with any other group of the same prompt text in the batch, and gathered across processes
  in training) give :math:`A = \mathrm{clip}((r - \bar r_p)/(\mathrm{std} + \epsilon), \pm A_{max})` with
  :math:`\epsilon = 10^{-4}` and a population std that is that of every reward in the batch (``global_std: true``,
  the release's default and GenEval config) or the prompt's own (``global_std: false``).
* **Loss** on T trained steps per image: :math:`\rho = \exp(\ell_\theta - \ell_{old})`,
  :math:`L_{pg} = \mathrm{mean}\,\max(-A\rho, -A\,\mathrm{clip}(\rho, 1-\varepsilon, 1+\varepsilon))`, plus
  :math:`\beta\,\mathrm{KL}` to the frozen reference model, in one of two forms (``kl_form``):

  - ``release`` (default): the release's term :math:`\frac1D\lVert\mu_\theta - \mu_{ref}\rVert^2 / (2 c_i^2)` with
    :math:`c_i` its ``std_dev_t``: :math:`c_i = g_i = a\sqrt{\sigma_i/(1-\sigma_i)}` for ``flow_sde`` (no step size)
    and :math:`c_i = s_i` for ``cps``;
  - ``exact_gaussian``: the exact per-dimension KL of the two step Gaussians,
    :math:`\frac1D\lVert\mu_\theta - \mu_{ref}\rVert^2 / (2 s_i^2)`; for ``flow_sde`` that is
    :math:`1/(\sigma_i - \sigma_{i+1})` times the release's term (10x on a uniform 10-step grid), the same for ``cps``.

  So :math:`\beta` weighs the release's surrogate, not the KL, unless ``kl_form: exact_gaussian``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from ..conditioning import cond_expand_null, cond_repeat
from ..flow import VelocityModel, sigma_schedule
from ..objective import _forward_rows
from ..sampling import guided_velocity, step_distribution

KL_FORMS = ("release", "exact_gaussian")


def _f(default: Any = None, help: str = "", factory: Any = None) -> Any:
    meta = {"help": help}
    return (
        field(default_factory=factory, metadata=meta) if factory is not None else field(default=default, metadata=meta)
    )


@dataclass
class GRPOConfig:
    """``grpo:`` — Flow-GRPO settings. Defaults are the release's SD3.5 GenEval config (10 training steps, noise 0.7,
    guidance 4.5, clip 1e-4, advantages clipped to 5, global std, beta 0.04 on its KL form) except ``group_size``
    (24 there; 4 here, CPU-sized); docs/methods.md."""

    FORMER_KEYS: ClassVar[dict[str, str]] = {"cfg_scale": "guidance_scale", "noise_level": "noise_scale"}

    group_size: int = _f(4, "G: images per prompt; advantages are normalised within each group")
    num_steps: int = _f(10, "S: sampling steps of the training rollouts (evaluation uses the ODE sampler)")
    train_timesteps: int | None = _f(None, "T: stochastic steps trained per image, drawn at random (null: all S-1)")
    sde_kind: Literal["flow_sde", "cps"] = _f("flow_sde", "stochastic step: flow_sde (Flow-GRPO) or cps")
    noise_scale: float = _f(0.7, "a: flow_sde g = a sqrt(sigma/(1-sigma)); cps angle pi a / 2")
    guidance_scale: float = _f(4.5, "guidance scale in the rollouts and the trained log-probabilities")
    clip_range: float = _f(1e-4, "PPO clip epsilon of the probability ratio")
    adv_clip_max: float = _f(5.0, "advantages are clipped to +-this")
    beta: float = _f(
        0.04, "weight of the KL term to the frozen reference model, in the form kl_form names (0: no reference forward)"
    )
    kl_form: Literal["release", "exact_gaussian"] = _f(
        "release",
        "release: ||mu - mu_ref||^2 / (2 std_dev_t^2), std_dev_t = a sqrt(sigma/(1-sigma)) without the step "
        "size (Flow-GRPO's code); exact_gaussian: the exact KL of the step Gaussians (1/|dsigma| x larger "
        "for flow_sde)",
    )
    global_std: bool = _f(
        True,
        "advantages divided by the std of all rewards of the step on every process "
        "(Flow-GRPO's sample.global_std, true in its base and GenEval configs); false: by "
        "each prompt's own std",
    )
    chunk_size: int | None = _f(
        None,
        "max rows per forward of the trained model; the T*B (x2 with guidance) rows of "
        "the loss then run as activation-checkpointed chunks (bounded memory, one "
        "extra forward in backward); null: one forward",
    )
    sample_reuse: int = _f(1, "optimizer steps per rollout batch (1: on-policy; >1 makes the ratio clip active)")
    reward: str = _f("auto", "'auto' (shapes: soarflow.shapes:reward) or 'package.module:callable'")
    reward_kwargs: dict[str, Any] = _f(
        help="if given, reward names a factory called with these to build the reward", factory=dict
    )

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ValueError(f"config key '{key}': {why} (got {getattr(self, key)!r})")

        need(isinstance(self.group_size, int) and self.group_size >= 2, "group_size", "must be an integer >= 2")
        need(isinstance(self.num_steps, int) and self.num_steps >= 2, "num_steps", "must be an integer >= 2")
        need(
            self.train_timesteps is None or 1 <= self.train_timesteps <= self.num_steps - 1,
            "train_timesteps",
            f"must be null or in [1, num_steps - 1 = {self.num_steps - 1}]",
        )
        need(self.sde_kind in ("flow_sde", "cps"), "sde_kind", "must be flow_sde or cps")
        need(
            0 < self.noise_scale and (self.sde_kind != "cps" or self.noise_scale <= 1),
            "noise_scale",
            "must be > 0 (and <= 1 for cps)",
        )
        need(math.isfinite(self.guidance_scale), "guidance_scale", "must be finite")
        need(0 < self.clip_range < 1, "clip_range", "must be in (0, 1)")
        need(self.adv_clip_max > 0, "adv_clip_max", "must be > 0")
        need(self.beta >= 0 and math.isfinite(self.beta), "beta", "must be >= 0")
        need(self.kl_form in KL_FORMS, "kl_form", f"must be one of {', '.join(KL_FORMS)}")
        need(isinstance(self.global_std, bool), "global_std", "must be true or false")
        need(
            self.chunk_size is None or (isinstance(self.chunk_size, int) and self.chunk_size >= 1),
            "chunk_size",
            "must be null or an integer >= 1",
        )
        need(isinstance(self.sample_reuse, int) and self.sample_reuse >= 1, "sample_reuse", "must be an integer >= 1")
        need(bool(self.reward), "reward", "must not be empty")

    @property
    def trained_steps(self) -> int:
        return self.train_timesteps or self.num_steps - 1


# ---------------------------------------------------------------------------------------------- math


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    r"""Per-sample mean over dimensions of :math:`\log\mathcal N(x; \mu, s^2)` (float32, shape (B,))."""
    std = std.float()
    lp = -((x.float() - mean.float()) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


def gaussian_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    r""":math:`\frac1D\lVert\mu - \mu_{ref}\rVert^2 / (2 s^2)`: (B,). With the step's std this is
    :math:`\mathrm{KL}(\mathcal N(\mu, s^2)\,\|\,\mathcal N(\mu_{ref}, s^2))` per dimension; the release passes
    its ``std_dev_t`` instead (:func:`kl_scale`)."""
    return ((mean.float() - mean_ref.float()) ** 2 / (2 * std.float() ** 2)).flatten(1).mean(1)


def kl_scale(kind: str, std: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, form: str) -> torch.Tensor:
    r"""The std :math:`c` that divides :math:`\lVert\mu - \mu_{ref}\rVert^2/2` in the KL term (module doc).

    ``exact_gaussian``: the step's std :math:`s`. ``release``: Flow-GRPO's ``std_dev_t``, for ``flow_sde``
    :math:`g = s/\sqrt{\sigma - \sigma_{next}}` (the step std without its :math:`\sqrt{|d\sigma|}`), for ``cps`` :math:`s`.
    ``std`` is (B, 1, ..., 1) as :func:`soarflow.sampling.step_distribution` returns it; ``sigma``, ``sigma_next`` (B,)."""
    if form not in KL_FORMS:
        raise ValueError(f"kl_form must be one of {', '.join(KL_FORMS)}, got {form!r}")
    if form == "exact_gaussian" or kind == "cps":
        return std
    ds = (sigma.float() - sigma_next.float()).reshape(-1, *([1] * (std.ndim - 1)))
    return std / ds.sqrt()


def gaussian_entropy(std: torch.Tensor) -> torch.Tensor:
    r"""Per-dimension entropy :math:`\tfrac12\log(2\pi e s^2)` of the step distribution (shape of std, squeezed)."""
    return 0.5 * torch.log(2 * math.pi * math.e * std.float().flatten(1)[:, 0] ** 2)


def group_advantages(
    rewards: torch.Tensor, group_size: int, clip: float, eps: float = 1e-4, *, global_std: bool = False
) -> torch.Tensor:
    """Rewards (B,) laid out as B/G consecutive groups of G -> clipped advantages (B,): each group's mean
    subtracted, divided by the group's population std (or, ``global_std``, by that of all B rewards) + eps."""
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"rewards: expected shape (B,) with B a multiple of group_size {group_size}, got {tuple(rewards.shape)}"
        )
    r = rewards.double().reshape(-1, group_size)
    std = r.std(unbiased=False) if global_std else r.std(1, unbiased=False, keepdim=True)
    adv = (r - r.mean(1, keepdim=True)) / (std + eps)
    return adv.clamp(-clip, clip).reshape(-1).to(torch.float32)


def prompt_advantages(
    prompts: list[str], rewards: torch.Tensor, clip: float, eps: float = 1e-4, *, global_std: bool = False
) -> torch.Tensor:
    r"""Flow-GRPO's per-prompt statistics: every reward of the batch whose prompt text is ``p`` forms p's group;
    :math:`A = \mathrm{clip}((r - \bar r_p) / (\mathrm{std} + \epsilon), \pm clip)` with the population std of p's
    rewards (or, ``global_std``, of all rewards). Computed in float64 (the release uses numpy float64); (B,) float32.

    In training the batch is the all-gathered one of every process, so a prompt whose images lie on several
    processes has one mean (:func:`gather_prompt_advantages`)."""
    if rewards.ndim != 1 or len(prompts) != rewards.shape[0]:
        raise ValueError(f"rewards: expected shape ({len(prompts)},), one per prompt, got {tuple(rewards.shape)}")
    r = rewards.double()
    ids: dict[str, int] = {}
    group = torch.tensor([ids.setdefault(p, len(ids)) for p in prompts], device=r.device)
    n = len(ids)
    count = torch.zeros(n, dtype=r.dtype, device=r.device).index_add_(0, group, torch.ones_like(r))
    mean = torch.zeros(n, dtype=r.dtype, device=r.device).index_add_(0, group, r) / count
    centred = r - mean[group]
    if global_std:
        std = r.std(unbiased=False).expand(n)
    else:
        std = (torch.zeros(n, dtype=r.dtype, device=r.device).index_add_(0, group, centred**2) / count).sqrt()
    return (centred / (std[group] + eps)).clamp(-clip, clip).to(torch.float32)


def gather_prompt_advantages(
    prompts: list[str], rewards: torch.Tensor, clip: float, eps: float = 1e-4, *, global_std: bool = False
) -> torch.Tensor:
    """:func:`prompt_advantages` over the batch of every process (``torch.distributed`` all-gather of the prompts
    and rewards, as Flow-GRPO gathers them before its stat tracker); this process's rows. Without an initialised
    process group (or with one process) it is :func:`prompt_advantages` on the local batch. Processes may hold
    different numbers of rows."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return prompt_advantages(prompts, rewards, clip, eps, global_std=global_std)
    if len(prompts) != rewards.shape[0]:
        raise ValueError(f"rewards: expected {len(prompts)} values, one per prompt, got {tuple(rewards.shape)}")
    mine = (list(prompts), rewards.detach().double().cpu().tolist())
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    start = sum(len(p) for p, _ in everyone[: dist.get_rank()])
    all_prompts = [q for p, _ in everyone for q in p]
    all_rewards = torch.tensor([x for _, r in everyone for x in r], dtype=torch.float64)
    adv = prompt_advantages(all_prompts, all_rewards, clip, eps, global_std=global_std)
    return adv[start : start + len(prompts)].to(rewards.device)


def ppo_clip_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-row :math:`\max(-A\rho, -A\,\mathrm{clip}(\rho, 1\pm\varepsilon))` and whether the clip was active."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), ((ratio - 1).abs() > clip_range).float()


# ---------------------------------------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    """Trajectories of B images: ``states`` (S+1, B, ...) from noise to image, ``log_probs`` (S-1, B) of the
    stochastic steps under the sampling policy, ``sigmas`` (S+1,)."""

    states: torch.Tensor
    log_probs: torch.Tensor
    sigmas: torch.Tensor

    @property
    def images(self) -> torch.Tensor:
        return self.states[-1]


@torch.no_grad()
def sample_with_log_probs(
    model: VelocityModel,
    noise: torch.Tensor,
    cond: Any,
    *,
    null_cond: Any,
    config: GRPOConfig,
    shift: float,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Run the S-step stochastic sampler from ``noise`` (sigma = 1), recording each state and the
    log-probability of every stochastic step (the last step is the deterministic Euler step)."""
    sigmas = sigma_schedule(config.num_steps, shift, device=noise.device)
    x = noise
    states, log_probs = [x], []
    batch = x.shape[0]
    for i in range(config.num_steps):
        s, sn = sigmas[i].expand(batch), sigmas[i + 1].expand(batch)
        v = guided_velocity(model, x, s, cond, null_cond, config.guidance_scale)
        last = i == config.num_steps - 1
        mean, std = step_distribution("ode" if last else config.sde_kind, x, s, sn, v, noise_scale=config.noise_scale)
        if last:
            x = mean.to(x.dtype)
        else:
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
            x = (mean + std * eps).to(x.dtype)
            log_probs.append(gaussian_log_prob(x, mean, std))
        states.append(x)
    return Rollout(torch.stack(states), torch.stack(log_probs), sigmas)


def choose_timesteps(batch: int, config: GRPOConfig, generator: torch.Generator | None, device) -> torch.Tensor:
    """(T, B) indices of the trained stochastic steps: an independent random subset of size T per image."""
    n = config.num_steps - 1
    keys = torch.rand((batch, n), generator=generator, device=device)
    return keys.argsort(dim=1)[:, : config.trained_steps].T.contiguous()


@dataclass
class GRPOOutput:
    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl: torch.Tensor
    clip_frac: torch.Tensor
    approx_kl_old: torch.Tensor  # 0.5 mean (log rho)^2: how far the policy moved since the rollout
    entropy: torch.Tensor  # mean per-dimension entropy of the trained step distributions


def grpo_loss(
    model: VelocityModel,
    rollout: Rollout,
    advantages: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Any,
    *,
    null_cond: Any,
    config: GRPOConfig,
    reference: VelocityModel | None = None,
) -> GRPOOutput:
    """The Flow-GRPO loss (module doc) on the (T, B) ``timesteps`` of ``rollout``: one fused forward of the
    T*B trained states (doubled for guidance), plus one no-grad reference forward when ``beta > 0``."""
    T, B = timesteps.shape
    cols = torch.arange(B, device=timesteps.device).expand(T, B)
    flat = lambda t: t.reshape(T * B, *t.shape[2:])  # noqa: E731  (row k*B + b: timestep k of image b)
    x = flat(rollout.states[timesteps, cols])
    x_next = flat(rollout.states[timesteps + 1, cols])
    old = rollout.log_probs[timesteps, cols].reshape(-1)
    sig = rollout.sigmas[timesteps].reshape(-1)
    sig_next = rollout.sigmas[timesteps + 1].reshape(-1)
    cond_t = cond_repeat(cond, T)
    null_t = cond_repeat(cond_expand_null(null_cond, B), T) if null_cond is not None else None
    kind, a = config.sde_kind, config.noise_scale

    chunked = (
        model if config.chunk_size is None else (lambda xs, ss, cs: _forward_rows(model, xs, ss, cs, config.chunk_size))
    )
    v = guided_velocity(chunked, x, sig, cond_t, null_t, config.guidance_scale)
    mean, std = step_distribution(kind, x, sig, sig_next, v, noise_scale=a)
    log_prob = gaussian_log_prob(x_next, mean, std)
    per_row, clipped = ppo_clip_loss(log_prob, old, advantages.float().repeat(T), config.clip_range)
    policy_loss = per_row.mean()
    if config.beta > 0 and reference is not None:
        with torch.no_grad():
            v_ref = guided_velocity(reference, x, sig, cond_t, null_t, config.guidance_scale)
            mean_ref, _ = step_distribution(kind, x, sig, sig_next, v_ref, noise_scale=a)
        kl = gaussian_kl(mean, mean_ref, kl_scale(kind, std, sig, sig_next, config.kl_form)).mean()
    else:
        kl = torch.zeros((), device=x.device)
    loss = policy_loss + config.beta * kl
    log_ratio = (log_prob - old).detach()
    return GRPOOutput(
        loss=loss,
        policy_loss=policy_loss.detach(),
        kl=kl.detach(),
        clip_frac=clipped.mean(),
        approx_kl_old=0.5 * (log_ratio**2).mean(),
        entropy=gaussian_entropy(std).mean(),
    )


def check_rewards(rewards: Any, batch: int, name: str, step: int) -> torch.Tensor:
    """The reward's output as a float32 (B,) tensor; ValueError naming the reward and step otherwise."""
    where = f"reward {name!r} at step {step}"
    if not isinstance(rewards, torch.Tensor):
        try:
            rewards = torch.as_tensor(rewards)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"{where}: returned {type(rewards).__name__}, expected a tensor of shape ({batch},)"
            ) from None
    if tuple(rewards.shape) != (batch,):
        raise ValueError(f"{where}: returned shape {tuple(rewards.shape)}, expected ({batch},)")
    rewards = rewards.float()
    if not bool(torch.isfinite(rewards).all()):
        bad = int((~torch.isfinite(rewards)).sum())
        raise ValueError(f"{where}: returned {bad} non-finite value(s) (NaN/inf) out of {batch}")
    return rewards


__all__ = [
    "KL_FORMS",
    "GRPOConfig",
    "GRPOOutput",
    "Rollout",
    "check_rewards",
    "choose_timesteps",
    "gaussian_entropy",
    "gaussian_kl",
    "gaussian_log_prob",
    "gather_prompt_advantages",
    "group_advantages",
    "kl_scale",
    "prompt_advantages",
    "grpo_loss",
    "ppo_clip_loss",
    "sample_with_log_probs",
]
