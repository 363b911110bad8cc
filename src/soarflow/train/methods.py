r"""The method registry: ``TrainConfig.method`` -> a :class:`TrainMethod` the trainer calls once per micro-batch.

The math lives in :mod:`soarflow.objective` (sft, soar) and :mod:`soarflow.methods` (grpo, scheduled_sampling,
input_perturbation); a TrainMethod only draws the randomness the trainer's way (the objective's draws for the
global batch from the ``shared`` generator, sliced per process; only grpo's rollouts use the per-process ``local``
generator), counts model forwards, and reports metrics. Every method reports ``loss``, its loss parts,
``forwards_per_sample`` (rows the model evaluated per training sample, with and without gradient) and
``grad_forwards_per_sample`` (rows with gradient); the trainer adds ``step_time_s``.

    method = build_method(config)                   # fails on a bad method / reward before anything runs
    method.setup(model, task, device)               # e.g. the frozen KL reference of grpo
    out = method.compute_loss(model, task, batch, ctx)
"""

from __future__ import annotations

import copy
import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..conditioning import cond_index
from ..flow import shift_sigma
from ..methods import grpo as grpo_math
from ..methods.input_perturbation import input_perturbation_loss
from ..methods.scheduled_sampling import draw_offsets, max_offsets, scheduled_sampling_loss
from ..objective import Draws, SOARConfig, apply_cond_dropout, draw_randomness, sft_loss, soar_loss
from ..shapes.generate import GUIDANCE_SCALE as SHAPES_GUIDANCE_SCALE


@dataclass
class StepContext:
    """What the trainer hands a method for one micro-batch."""

    device: torch.device
    shared: torch.Generator  # seeded identically on every process (global-batch draws)
    local: torch.Generator  # seeded per process
    rank: int
    world: int
    step: int  # optimizer steps done so far
    micro: int  # micro-batches done so far


@dataclass
class MethodOutput:
    loss: torch.Tensor
    metrics: dict[str, float]


class ForwardCounter:
    """Calls the model and counts the rows it evaluated (with / without gradient)."""

    def __init__(self, model: Callable):
        self.model, self.rows, self.grad_rows = model, 0, 0

    def __call__(self, x, sigma, cond):
        self.rows += x.shape[0]
        if torch.is_grad_enabled():
            self.grad_rows += x.shape[0]
        return self.model(x, sigma, cond)

    def metrics(self, batch: int) -> dict[str, float]:
        return {"forwards_per_sample": self.rows / batch, "grad_forwards_per_sample": self.grad_rows / batch}


def process_draws(config: SOARConfig, x0: torch.Tensor, ctx: StepContext) -> Draws:
    """The objective's random draws (:func:`soarflow.objective.draw_randomness`) for the whole global batch from
    the shared generator; this process's rows. The loss then does not depend on the number of processes."""
    b = x0.shape[0]
    draws = draw_randomness(
        config, (ctx.world * b, *x0.shape[1:]), generator=ctx.shared, device=ctx.device, dtype=x0.dtype
    )
    return draws.rows(slice(ctx.rank * b, (ctx.rank + 1) * b))


def compute_loss(model, task, batch, config: SOARConfig, ctx: StepContext):
    """SFT (``config.is_sft``) / SOAR on one micro-batch with global-batch draws (the trainer's module docstring);
    returns the objective's :class:`~soarflow.objective.ObjectiveOutput`."""
    x0, cond = task.encode_batch(batch, ctx.device)
    draws = process_draws(config, x0, ctx)
    loss = sft_loss if config.is_sft else soar_loss
    return loss(model, x0, cond, config=config, null_cond=task.null_cond(x0.shape[0], ctx.device), draws=draws)


# ---------------------------------------------------------------------------------------------- methods


class TrainMethod:
    """Base class: one training method as the trainer sees it."""

    name: ClassVar[str] = ""
    metric_keys: ClassVar[tuple[str, ...]] = ("loss",)
    progress_keys: ClassVar[tuple[str, ...]] = ("loss",)
    # keys summed (not averaged) over processes after the per-step mean
    summed_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any):
        self.config = config
        # sft trains on the soar: section's shared keys (shift, t density, dropout, points_per_sample) only
        self.objective = config.soar.replace(num_aux=0) if config.method == "sft" else config.soar

    def setup(self, model: nn.Module, task: Any, device: torch.device) -> None:
        """Called once, after the model is built and before a checkpoint is restored."""

    def compute_loss(self, model: Any, task: Any, batch: Any, ctx: StepContext) -> MethodOutput:
        raise NotImplementedError


COMMON_KEYS = ("forwards_per_sample", "grad_forwards_per_sample")


class MainTermMethod(TrainMethod):
    """A method whose flow-matching term draws its noise, t and dropout as SFT does (one point per image)."""

    def __init__(self, config: Any):
        super().__init__(config)
        self.main_term = config.soar.replace(num_aux=0, points_per_sample=1)


class FlowMatchingMethod(TrainMethod):
    """sft and soar: :func:`soarflow.objective.sft_loss` / ``soar_loss``."""

    metric_keys = (
        "loss",
        "main_loss",
        "aux_loss",
        "num_aux_points",
        "mean_sigma",
        "mean_aux_sigma",
        "rollout_deviation",
    ) + COMMON_KEYS
    progress_keys = ("loss", "main_loss", "aux_loss")
    summed_keys = ("num_aux_points",)

    def compute_loss(self, model, task, batch, ctx):
        counter = ForwardCounter(model)
        out = compute_loss(counter, task, batch, self.objective, ctx)
        return MethodOutput(out.loss, {**out.metrics(), **counter.metrics(self.config.train_batch_size)})


class SFTMethod(FlowMatchingMethod):
    name = "sft"


class SOARMethod(FlowMatchingMethod):
    name = "soar"


class InputPerturbationMethod(MainTermMethod):
    name = "input_perturbation"
    metric_keys = ("loss", "flow_loss", "mean_sigma") + COMMON_KEYS
    progress_keys = ("loss",)

    def compute_loss(self, model, task, batch, ctx):
        x0, cond = task.encode_batch(batch, ctx.device)
        draws = process_draws(self.main_term, x0, ctx)
        noise, t = draws.noise[0], draws.t[0]
        b = x0.shape[0]
        rows = slice(ctx.rank * b, (ctx.rank + 1) * b)
        xi = torch.randn((ctx.world * b, *x0.shape[1:]), generator=ctx.shared, device=ctx.device, dtype=torch.float32)[
            rows
        ].to(x0.dtype)
        cond, _ = apply_cond_dropout(cond, task.null_cond(b, ctx.device), draws.drop_u, self.main_term, b, ctx.device)
        counter = ForwardCounter(model)
        out = input_perturbation_loss(
            counter,
            x0,
            cond,
            noise=noise,
            perturbation=xi,
            sigma=shift_sigma(t, self.objective.shift),
            gamma=self.config.input_perturbation.gamma,
            weighting=self.objective.weighting,
        )
        return MethodOutput(
            out.loss,
            {
                "loss": float(out.loss.detach()),
                "flow_loss": float(out.flow_loss),
                "mean_sigma": float(out.mean_sigma),
                **counter.metrics(b),
            },
        )


class ScheduledSamplingMethod(MainTermMethod):
    name = "scheduled_sampling"
    metric_keys = (
        "loss",
        "flow_loss",
        "mean_offset",
        "rollout_deviation",
        "rollout_probability",
        "mean_sigma",
    ) + COMMON_KEYS
    progress_keys = ("loss", "mean_offset")

    def compute_loss(self, model, task, batch, ctx):
        ss = self.config.scheduled_sampling
        x0, cond = task.encode_batch(batch, ctx.device)
        draws = process_draws(self.main_term, x0, ctx)
        noise, t = draws.noise[0], draws.t[0]
        b = x0.shape[0]
        rows = slice(ctx.rank * b, (ctx.rank + 1) * b)
        p = ss.probability_at(ctx.step)
        # offsets for the global batch from the shared generator, so they do not depend on the process count
        # k for the whole global batch from the shared generator (independent of the process count), then capped
        offsets = draw_offsets(torch.zeros(ctx.world * b, device=ctx.device), ss, p, ctx.shared)[rows]
        offsets = torch.minimum(offsets, max_offsets(t, ss.num_steps))
        null = task.null_cond(b, ctx.device)
        cond, _ = apply_cond_dropout(cond, null, draws.drop_u, self.main_term, b, ctx.device)
        counter = ForwardCounter(model)
        out = scheduled_sampling_loss(
            counter,
            x0,
            cond,
            noise=noise,
            t=t,
            offsets=offsets,
            null_cond=null,
            config=ss,
            shift=self.objective.shift,
            weighting=self.objective.weighting,
        )
        return MethodOutput(
            out.loss,
            {
                "loss": float(out.loss.detach()),
                "flow_loss": float(out.flow_loss),
                "mean_offset": float(out.mean_offset),
                "rollout_deviation": float(out.rollout_deviation),
                "rollout_probability": p,
                "mean_sigma": float(out.mean_sigma),
                **counter.metrics(b),
            },
        )


# ---------------------------------------------------------------------------------------------- grpo


def resolve_reward(spec: str, kwargs: dict[str, Any], task_name: str) -> tuple[Callable, str]:
    """The reward callable ``reward(images in [-1, 1] (B, 3, H, W), prompts) -> (B,)`` named by ``grpo.reward``
    (and its display name): ``auto`` (the task's default: shapes only), ``package.module:callable`` (a factory
    or class called with ``grpo.reward_kwargs`` when they are given or it is a class), or a bare scorer name of
    ``soarflow eval`` (``soarflow.scorers.build_scorer(name, **reward_kwargs)``)."""
    if spec == "auto":
        if task_name != "shapes":
            raise ValueError(
                f"config key 'grpo.reward': task {task_name!r} has no default reward; name a scorer of "
                "`soarflow eval` (e.g. clip_score) or a 'package.module:callable' (e.g. "
                "soarflow.scorers:CLIPScorer.from_pretrained with grpo.reward_kwargs: {path: ...})"
            )
        spec = "soarflow.shapes:reward"
    module_name, sep, attr = spec.partition(":")
    if not sep:
        return _scorer_by_name(spec, kwargs), spec
    if not attr:
        raise ValueError(f"config key 'grpo.reward': expected 'package.module:callable' or a scorer name, got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"config key 'grpo.reward': could not import {module_name} ({err})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"config key 'grpo.reward': {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if kwargs or isinstance(obj, type):
        obj = obj(**kwargs)
    if not callable(obj):
        raise ValueError(f"config key 'grpo.reward': {spec} is not callable")
    return obj, spec


def _scorer_by_name(name: str, kwargs: dict[str, Any]) -> Callable:
    """A scorer of ``soarflow eval`` by name, through the scorer registry (``soarflow.scorers.build_scorer``)."""
    scorers = importlib.import_module("soarflow.scorers")
    build = getattr(scorers, "build_scorer", None)
    if build is None:
        raise ValueError(
            f"config key 'grpo.reward': {name!r} is not 'package.module:callable', and this soarflow has "
            "no scorer registry (soarflow.scorers.build_scorer) to look the name up in"
        )
    try:
        scorer = build(name, **kwargs)
    except (KeyError, ValueError, ImportError, OSError) as err:  # unknown name, missing package or weights
        raise ValueError(f"config key 'grpo.reward': {err}") from None
    if not callable(scorer):
        raise ValueError(f"config key 'grpo.reward': scorer {name!r} is not callable as scorer(images, prompts)")
    return scorer


def _accepts_keyword(fn: Callable, name: str) -> bool:
    """Whether ``fn`` can be called with the keyword ``name``."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


@contextmanager
def _adapters_disabled(transformer: nn.Module):
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def _lora_transformer(model: nn.Module) -> nn.Module | None:
    transformer = getattr(model, "transformer", None)
    return transformer if transformer is not None and getattr(transformer, "peft_config", None) else None


def decode_images(task: Any, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Images in [-1, 1] from the model's space: the task's VAE decoder, or the samples themselves (pixels)."""
    with task.frozen_on(device):
        return task.decode(x)


class GRPOMethod(TrainMethod):
    """Flow-GRPO (:mod:`soarflow.methods.grpo`). Each micro-batch of B rows takes the first B/G captions of the
    data batch, samples G images for each with the SDE sampler, scores them, computes per-prompt advantages over the
    prompts and rewards gathered from every process (Flow-GRPO's stat tracker) and trains on T steps per image.
    The KL reference is the model at the start of training: for a LoRA model without ``init_from``, the
    transformer with its adapters disabled; otherwise a frozen copy."""

    name = "grpo"
    metric_keys = (
        "loss",
        "policy_loss",
        "kl",
        "reward_mean",
        "reward_std",
        "clip_frac",
        "approx_kl_old",
        "entropy",
        "advantage_abs",
    ) + COMMON_KEYS
    progress_keys = ("loss", "reward_mean", "kl")

    def __init__(self, config: Any, reward: Callable | None = None):
        super().__init__(config)
        self.grpo = config.grpo
        if reward is not None:
            self.reward, self.reward_name = reward, getattr(reward, "__name__", type(reward).__name__)
        else:
            self.reward, self.reward_name = resolve_reward(
                config.grpo.reward, dict(config.grpo.reward_kwargs), config.task
            )
        self.reference: Callable | None = None
        self._cache: dict[int, tuple] = {}
        self._reward_takes_metadata = _accepts_keyword(self.reward, "metadata")

    def setup(self, model, task, device):
        if self.grpo.beta == 0:
            return
        transformer = _lora_transformer(model)
        if transformer is not None and not self.config.init_from:

            def reference(x, sigma, cond):
                with _adapters_disabled(transformer):
                    return model(x, sigma, cond)

            self.reference = reference
        else:
            frozen = copy.deepcopy(model).requires_grad_(False).eval()
            self.reference = frozen

    def _captions(self, batch: Any) -> list[str]:
        captions = batch.get("caption") if isinstance(batch, dict) else None
        if captions is None:
            raise ValueError("grpo: the task's batches carry no 'caption' list, which the reward needs")
        return [str(c) for c in list(captions)]

    @torch.no_grad()
    def _rollout(self, model, task, batch, ctx: StepContext):
        g = self.grpo.group_size
        captions = self._captions(batch)
        b = len(captions)
        if b % g:
            raise ValueError(f"train_batch_size {b} is not a multiple of grpo.group_size {g}")
        # the first B/G prompts, G rows each; the task encodes their text only (no image is encoded)
        shape, cond = task.encode_prompts(batch, b // g, ctx.device)
        pick = torch.arange(b // g, device=ctx.device).repeat_interleave(g)
        prompts = [p for p in captions[: b // g] for _ in range(g)]
        cond = cond_index(cond, pick)
        null = task.null_cond(b, ctx.device)
        noise = torch.randn((b, *shape), generator=ctx.local, device=ctx.device, dtype=torch.float32)
        rollout = grpo_math.sample_with_log_probs(
            model, noise, cond, null_cond=null, config=self.grpo, shift=self.objective.shift, generator=ctx.local
        )
        images = decode_images(task, rollout.images, ctx.device)
        metadata = batch.get("metadata") if isinstance(batch, dict) else None
        if metadata is not None and self._reward_takes_metadata and all(m is not None for m in metadata[: b // g]):
            # a .jsonl prompt file's lines (e.g. GenEval's include clauses) for rewards that read them
            meta = [m for m in list(metadata)[: b // g] for _ in range(g)]
            raw = self.reward(images, prompts, metadata=meta)
        else:
            raw = self.reward(images, prompts)
        rewards = grpo_math.check_rewards(raw, b, self.reward_name, ctx.step)
        rewards = rewards.to(ctx.device)
        # Flow-GRPO's stat tracker: per-prompt mean (and std) over the prompts and rewards of every process
        adv = grpo_math.gather_prompt_advantages(
            prompts, rewards, self.grpo.adv_clip_max, global_std=self.grpo.global_std
        )
        return rollout, cond, null, rewards, adv

    def compute_loss(self, model, task, batch, ctx):
        counter = ForwardCounter(model)
        slot = ctx.micro % self.config.gradient_accumulation_steps
        fresh = ctx.step % self.grpo.sample_reuse == 0 or slot not in self._cache
        if fresh:
            self._cache[slot] = self._rollout(counter, task, batch, ctx)
        rollout, cond, null, rewards, adv = self._cache[slot]
        b = rewards.shape[0]
        steps = grpo_math.choose_timesteps(b, self.grpo, ctx.local, ctx.device)
        reference = ForwardCounter(self.reference) if self.reference is not None else None
        out = grpo_math.grpo_loss(
            counter, rollout, adv, steps, cond, null_cond=null, config=self.grpo, reference=reference
        )
        metrics = counter.metrics(b)
        if reference is not None:
            metrics["forwards_per_sample"] += reference.rows / b
        return MethodOutput(
            out.loss,
            {
                "loss": float(out.loss.detach()),
                "policy_loss": float(out.policy_loss),
                "kl": float(out.kl),
                "reward_mean": float(rewards.mean()),
                "reward_std": float(rewards.std(unbiased=False)),
                "clip_frac": float(out.clip_frac),
                "approx_kl_old": float(out.approx_kl_old),
                "entropy": float(out.entropy),
                "advantage_abs": float(adv.abs().mean()),
                **metrics,
            },
        )


# ---------------------------------------------------------------------------------------------- registry

METHODS: dict[str, type[TrainMethod]] = {
    "sft": SFTMethod,
    "soar": SOARMethod,
    "grpo": GRPOMethod,
    "scheduled_sampling": ScheduledSamplingMethod,
    "input_perturbation": InputPerturbationMethod,
}
METHOD_NAMES = tuple(METHODS)


def build_method(config: Any, reward: Callable | None = None) -> TrainMethod:
    """The TrainMethod of ``config.method`` (``reward`` overrides ``grpo.reward`` in the Python API)."""
    if config.method not in METHODS:
        raise ValueError(f"config key 'method': unknown method {config.method!r}; choose one of {', '.join(METHODS)}")
    if reward is not None and config.method != "grpo":
        raise ValueError(f"reward: given, but method {config.method!r} uses no reward (only grpo does)")
    cls = METHODS[config.method]
    return cls(config, reward=reward) if cls is GRPOMethod else cls(config)


# ---------------------------------------------------------------------------------------------- init_from


def resolve_init_from(path: str | Path) -> Path:
    """``init_from``: a run folder (its final ``model`` / ``model.<ext>``), a model folder or a weights file."""
    from .checkpoint import CONFIG_FILE, find_final_model

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config key 'init_from': {p} does not exist")
    if p.is_dir() and (p / CONFIG_FILE).is_file():
        final = find_final_model(p)
        if final is None:
            raise ValueError(f"config key 'init_from': run folder {p} holds no final model (did the run finish?)")
        return final
    return p


def load_init_weights(task: Any, model: nn.Module, path: str | Path) -> Path:
    """Load the ``init_from`` weights into the freshly built `model` with the task's own loader."""
    resolved = resolve_init_from(path)
    try:
        task.load_model_weights(model, resolved)
    except (KeyError, RuntimeError) as err:
        raise ValueError(f"config key 'init_from': {resolved} does not match the model ({err})") from None
    return resolved


# ---------------------------------------------------------------------------------------------- recipes

# The method-specific settings of the shipped shapes recipes (configs/shapes_<method>.yaml), for callers that
# build configs programmatically (e.g. a demo comparing methods on the same base and data budget).
SHAPES_RECIPES: dict[str, dict[str, Any]] = {
    "sft": {},
    "soar": {
        "soar.num_aux": 4,
        "soar.rollout_steps": 40,
        "soar.guidance_scale": SHAPES_GUIDANCE_SCALE,
        "soar.num_rollout_paths": 1,
    },
    "grpo": {
        "grpo.group_size": 4,
        "grpo.num_steps": 10,
        "grpo.train_timesteps": 3,
        "grpo.guidance_scale": SHAPES_GUIDANCE_SCALE,
        "grpo.beta": 0.04,
        "grpo.kl_form": "release",
        "grpo.global_std": True,
        "grpo.sample_reuse": 1,
        "cond_dropout": 0.0,
    },
    "scheduled_sampling": {
        "scheduled_sampling.max_step_offset": 3,
        "scheduled_sampling.num_steps": 40,
        "scheduled_sampling.guidance_scale": SHAPES_GUIDANCE_SCALE,
    },
    "input_perturbation": {"input_perturbation.gamma": 0.1},
}


def method_config(method: str, common: dict[str, Any] | None = None) -> Any:
    """A TrainConfig for `method` on the shapes task: `common` (dotted keys -> values shared by every method:
    output_dir, seed, learning_rate, train_batch_size, max_train_steps, model.pretrained, ...) plus the
    method's recipe settings (SHAPES_RECIPES; a key in `common` wins)."""
    import json

    from .config import load_config

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    values = {"task": "shapes", "soar.shift": 1.0, **SHAPES_RECIPES[method], **(common or {}), "method": method}
    argv = [f"--{k}={json.dumps(v) if isinstance(v, (list, dict)) or v is None else v}" for k, v in values.items()]
    return load_config(None, argv)
