r"""The training loop shared by every method (SFT, SOAR) and model family, on accelerate.

One optimizer step = ``gradient_accumulation_steps`` micro-batches of ``train_batch_size`` samples per process.
The loop only moves data and calls the method (:mod:`soarflow.train.methods`: sft, soar, grpo, scheduled_sampling,
input_perturbation); the method's module owns the math.

Randomness is chosen so that a run does not depend on how it is executed:

* the data order is a permutation seeded by (seed, epoch); the global batch of step k is the same samples for
  any number of processes (process p takes rows ``[p B, (p+1) B)`` of it);
* the objective's random numbers (noise :math:`z_1`, times :math:`t`, condition dropout, stochastic-path noise,
  :math:`\sigma'`: :func:`soarflow.objective.draw_randomness`) are drawn for the whole global batch from a
  generator seeded by (seed, micro-step) and sliced per process, so the loss and gradient equal those of one
  process on the global batch; only grpo's rollouts use a per-process generator seeded by (seed, micro-step, rank);
* nothing else needs saving to resume exactly: the step counter fixes every seed; accelerate restores the
  optimizer, scheduler, EMA and the global RNGs (model dropout, augmentation with ``dataloader_num_workers=0``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..tasks.registry import build_task
from . import checkpoint as ckpt
from . import distributed, export, safety, trackers
from .config import TrainConfig, resolved_for_device
from .ema import copy_ema_to, create_ema, ema_weights, trainable_parameters, update_ema
from .methods import StepContext, TrainMethod, build_method, compute_loss, load_init_weights, resolve_init_from  # noqa: F401

logger = logging.getLogger(__name__)

METRIC_KEYS = ("loss", "main_loss", "aux_loss", "num_aux_points", "mean_sigma", "mean_aux_sigma", "rollout_deviation")
# Each method (train/methods.py) names its own metric keys; every one logs loss, forwards per sample and step time.


@dataclass
class TrainResult:
    model: nn.Module  # unwrapped; holds the EMA weights when use_ema
    global_step: int
    wall_time_s: float
    history: list[dict[str, float]]  # one entry per logged step: step, loss, main_loss, aux_loss, lr, ...
    output_dir: Path
    model_path: Path | None = None  # where task.save_model wrote the final weights
    resumed_from: Path | None = None
    num_processes: int = 1
    validation_images: list[Path] = field(default_factory=list)
    data_summary: str | None = None  # the task's data report (e.g. how many bad samples were skipped)


# ---------------------------------------------------------------------------------------------- seeds & data


def _seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy SeedSequence), so (seed, step) pairs never collide."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def _local_batches(
    num_samples: int, global_batch: int, batch: int, rank: int, epoch: int, seed: int
) -> list[list[int]]:
    """This process's sample indices for every step of `epoch` (drop_last over the global batch)."""
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(_seed(seed, epoch, 17))).tolist()
    steps = num_samples // global_batch
    return [perm[s * global_batch + rank * batch : s * global_batch + (rank + 1) * batch] for s in range(steps)]


def _epoch_loader(dataset, task, config: TrainConfig, epoch: int, start: int, rank: int, world: int):
    batch, global_batch = config.train_batch_size, config.train_batch_size * world
    # A task may choose the epoch's global batches itself (e.g. one aspect-ratio bucket per batch).
    chosen = task.batch_indices(dataset, global_batch, config.seed, epoch)
    if chosen is not None:
        batches = [g[rank * batch : (rank + 1) * batch] for g in chosen if len(g) == global_batch]
    else:
        batches = _local_batches(len(dataset), global_batch, batch, rank, epoch, config.seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches[start:],
        collate_fn=task.collate,
        num_workers=config.dataloader_num_workers,
        generator=torch.Generator().manual_seed(_seed(config.seed, epoch, start, 23)),
    )


# ---------------------------------------------------------------------------------------------- setup helpers


def _make_optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError(
                "use_8bit_adam: bitsandbytes is not installed (pip install bitsandbytes), or set use_8bit_adam: false"
            ) from None
        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(
        params,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )


def lr_lambda(name: str, warmup: int, total: int):
    """Multiplier of the base LR at scheduler step n — the formulas of diffusers' `get_scheduler`
    (linear warm-up over `warmup` steps, then constant, linear decay to 0 at `total`, or half-cosine to 0)."""

    def factor(n: int) -> float:
        if name == "constant":
            return 1.0
        if n < warmup:
            return n / max(1, warmup)
        if name == "constant_with_warmup":
            return 1.0
        progress = (n - warmup) / max(1, total - warmup)
        if name == "linear":
            return max(0.0, 1.0 - progress)
        if name == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        raise ValueError(f"config key 'lr_scheduler': unknown schedule {name!r}")

    return factor


def _make_scheduler(config: TrainConfig, optimizer, num_processes: int):
    # accelerate's prepared scheduler steps once per process per optimizer step (diffusers' convention), so
    # warm-up and length are counted in process-steps.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lr_lambda(config.lr_scheduler, config.lr_warmup_steps * num_processes, config.max_train_steps * num_processes),
    )


def _make_accelerator(config: TrainConfig, output_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=trackers.log_with(config.report_to),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )


def _process_state_type():
    """The launch's distributed type before an `Accelerator` turns it into FSDP / DEEPSPEED (it starts the
    process group exactly as `Accelerator()` would)."""
    from accelerate.state import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).distributed_type


def _reset_accelerate_state(process_type=None) -> None:
    """Let a later `train()` in the same process use other accelerate settings (e.g. mixed precision). The
    process group (PartialState) is kept, with its distributed type as the launch set it (`process_type`):
    accelerate overwrites it with FSDP / DEEPSPEED, and a second `Accelerator` would then get no plugin."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    if process_type is not None and PartialState._shared_state:
        PartialState._shared_state["distributed_type"] = process_type


def _tracker_config(config: TrainConfig) -> dict[str, Any]:
    """Flat scalar hyper-parameters for tensorboard's hparams (nested sections as dotted keys)."""
    flat: dict[str, Any] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float, str, bool)):
                flat[prefix + k] = v
            else:
                flat[prefix + k] = str(v)

    walk(config.to_dict(), "")
    return flat


# ---------------------------------------------------------------------------------------------- validation


def _validate(accelerator, task, model: nn.Module, ema, step: int, output_dir: Path) -> Path | None:
    """Sample the task's validation grid (EMA weights if any); the main process writes it to
    validation/step_XXXXXX.png and tensorboard and returns the path (None elsewhere). Called on the processes
    :func:`distributed.validates` names (all of them when the weights are sharded). Runs under `fork_rng` so
    validation never changes the training randomness."""
    from ..utils.images import save_image_grid

    path = output_dir / "validation" / f"step_{step:06d}.png"
    was_training = model.training
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), ema_weights(ema, model):
        model.eval()
        try:
            images, captions = task.validation_images(model, accelerator.device)
        finally:
            model.train(was_training)
            distributed.reshard(model)  # before the EMA's weights are swapped out again
    if not distributed.writes_files(accelerator):
        return None
    save_image_grid(images, captions, path)
    trackers.log_validation_images(accelerator, images, captions, step)
    return path


# ---------------------------------------------------------------------------------------------- train


def train(
    config: TrainConfig,
    task: Any = None,
    model: nn.Module | None = None,
    reward: Any = None,
    step_callback: Callable[[int, nn.Module], bool | None] | None = None,
) -> TrainResult:
    """Train `model` (default ``task.build_model()``) with ``config.method`` for ``config.max_train_steps`` steps.

    ``reward(images, prompts) -> (B,)`` overrides ``grpo.reward`` for method grpo. With ``init_from`` the
    model's weights are first replaced by that run's / file's (the task's ``load_model_weights``).

    `task` defaults to the registry's ``TaskClass.from_config(model=config.model, data=config.data, train_config=config)``.
    Writes ``config.yaml``, ``checkpoint-{step}`` folders, ``logs/`` (tensorboard), ``validation/step_*.png``
    and the final weights (``task.save_model(model, output_dir / "model")``) into ``config.output_dir``.
    `step_callback(global_step, model)` runs after every optimizer step (e.g. `soarflow study`'s evaluations and
    time budget) on the weights the run would save at that step (the EMA weights when ``use_ema``; the training
    weights come back after it); returning False ends training there, as if max_train_steps had been reached.
    """
    config.validate()
    output_dir = Path(config.output_dir)
    resume_from = ckpt.resolve_resume(output_dir, config.resume_from_checkpoint)
    ckpt.check_output_dir(config, resume_from)
    if resume_from is not None:
        ckpt.read_trainer_state(resume_from)  # fail before any work if it is unreadable
    if config.init_from:
        resolve_init_from(config.init_from)  # fail before any work on a missing path
    task = task if task is not None else build_task(config)
    method = build_method(config, reward)  # with its reward resolved: fails before any work
    trackers.check_installed(config.report_to)

    process_type = _process_state_type()
    accelerator = _make_accelerator(config, output_dir)
    try:
        with safety.StopSignals() as signals:
            return _run(config, task, model, method, accelerator, output_dir, resume_from, signals, step_callback)
    finally:
        accelerator.end_training()
        _reset_accelerate_state(process_type)


def _run(
    config,
    task,
    model,
    method: TrainMethod,
    accelerator,
    output_dir: Path,
    resume_from: Path | None,
    signals: safety.StopSignals,
    step_callback=None,
) -> TrainResult:
    from accelerate.utils import set_seed

    start_time = time.perf_counter()
    set_seed(config.seed)  # model initialisation (when the task builds it)
    world = accelerator.num_processes
    layout = distributed.layout_of(accelerator)
    distributed.check_supported(layout, accelerator, config)

    model = _build_model(config, task, model, accelerator.device)
    dataset = task.train_dataset()
    batches_per_epoch = len(dataset) // (config.train_batch_size * world)
    if batches_per_epoch == 0:
        raise ValueError(
            f"train_batch_size: {config.train_batch_size} x {world} process(es) exceeds the dataset size {len(dataset)}"
        )
    optimizer = _make_optimizer(config, trainable_parameters(model))
    lr_scheduler = _make_scheduler(config, optimizer, world)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    unwrapped = accelerator.unwrap_model(model)
    # after prepare: FSDP2 replaces the parameters by this process's shards (DTensors), which the optimizer, the
    # gradient clipping and the EMA must use; with DDP they are the same objects as before
    params = trainable_parameters(unwrapped)
    ema = create_ema(unwrapped, config.ema_decay, config.ema_device) if config.use_ema else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    ckpt.register_trainable_state_hooks(accelerator, layout)
    method.setup(
        unwrapped, task, accelerator.device
    )  # before a checkpoint is restored: a KL reference is the start model

    global_step = 0
    if resume_from is not None:
        global_step = ckpt.load_checkpoint(accelerator, resume_from)
        logger.info("resumed from %s at step %d", resume_from, global_step)
    _start_outputs(config, accelerator, output_dir)

    loop = _Loop(
        config,
        task,
        method,
        accelerator,
        layout,
        output_dir,
        signals,
        step_callback,
        model=model,
        unwrapped=unwrapped,
        params=params,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        ema=ema,
        dataset=dataset,
        batches_per_epoch=batches_per_epoch,
        global_step=global_step,
        resume_from=resume_from,
    )
    loop.run()
    model_path = _save_final(config, task, accelerator, loop)
    return TrainResult(
        model=unwrapped,
        global_step=loop.global_step,
        wall_time_s=time.perf_counter() - start_time,
        history=loop.history,
        output_dir=output_dir,
        model_path=model_path,
        resumed_from=resume_from,
        num_processes=world,
        validation_images=loop.grids,
        data_summary=task.data_summary(),
    )


def _build_model(config: TrainConfig, task, model: nn.Module | None, device: torch.device) -> nn.Module:
    """The task's model (or the one passed in) with init_from, gradient checkpointing, on `device`, in train mode."""
    if model is None:
        model = task.build_model()
    if config.init_from:
        logger.info("init_from: loaded %s", load_init_weights(task, model, config.init_from))
    if config.gradient_checkpointing:
        task.enable_gradient_checkpointing(model)
    model.to(device)
    model.train()
    if not trainable_parameters(model):
        raise ValueError("the model has no trainable parameters (requires_grad=False everywhere)")
    return model


def _start_outputs(config: TrainConfig, accelerator, output_dir: Path) -> None:
    """config.yaml and the trackers, once every process has checked output_dir."""
    # config.yaml and the tracker record the layout `soar.reuse_main_output: auto` resolves to on this device type,
    # so `soarflow train --config <run>/config.yaml` computes the same thing on any device
    recorded = resolved_for_device(config, accelerator.device)
    accelerator.wait_for_everyone()  # every process has checked output_dir before anything is written
    if distributed.writes_files(accelerator):
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_config(recorded, output_dir)
    accelerator.wait_for_everyone()
    trackers.init_trackers(accelerator, config.report_to, _tracker_config(recorded), output_dir)


class _Loop:
    """The optimizer-step loop of one `train()` call: its counters, the step's data and what follows each step
    (logging, checkpoints, stops, validation)."""

    def __init__(
        self,
        config: TrainConfig,
        task,
        method: TrainMethod,
        accelerator,
        layout: distributed.Layout,
        output_dir: Path,
        signals: safety.StopSignals,
        step_callback,
        *,
        model,
        unwrapped,
        params,
        optimizer,
        lr_scheduler,
        ema,
        dataset,
        batches_per_epoch: int,
        global_step: int,
        resume_from: Path | None,
    ):
        self.config, self.task, self.method, self.accelerator, self.layout = config, task, method, accelerator, layout
        self.output_dir, self.signals, self.step_callback = output_dir, signals, step_callback
        self.model, self.unwrapped, self.params, self.ema = model, unwrapped, params, ema
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.dataset, self.batches_per_epoch = dataset, batches_per_epoch
        self.global_step = global_step
        self.micro = global_step * config.gradient_accumulation_steps
        self.rank, self.world, self.device = accelerator.process_index, accelerator.num_processes, accelerator.device
        self.history: list[dict[str, float]] = []
        self.grids: list[Path] = []
        self.shared = torch.Generator(device=self.device)
        self.local = torch.Generator(device=self.device)
        self.step_metrics: list[dict[str, float]] = []
        self.grad_norm = float("nan")
        skipped = int(ckpt.read_trainer_state(resume_from).get("skipped_nonfinite_steps", 0)) if resume_from else 0
        # fp16 loss scaling produces inf gradients on purpose and skips those steps itself
        self.guard = safety.StepGuard(
            config.skip_nonfinite_steps,
            self.device,
            check_grads=accelerator.scaler is None,
            can_skip=layout.can_skip_updates,
            skipped=skipped,
            last_good=resume_from,
        )
        self.step_start = 0.0
        self.loop_start = 0.0
        self.progress = None

    # -- the loop -------------------------------------------------------------------------------------------
    def run(self) -> None:
        from tqdm.auto import tqdm

        config = self.config
        self.progress = tqdm(
            total=config.max_train_steps,
            initial=self.global_step,
            desc=f"{config.method} ({config.task})",
            dynamic_ncols=True,
            disable=not (config.show_progress and self.accelerator.is_local_main_process),
        )
        stopped = False  # step_callback returned False, or max_train_seconds is reached
        self.loop_start = time.perf_counter()
        while self.global_step < config.max_train_steps and not stopped:
            epoch, offset = divmod(self.micro, self.batches_per_epoch)
            for batch in _epoch_loader(self.dataset, self.task, config, epoch, offset, self.rank, self.world):
                skip, stop_now = self._micro_step(batch)
                if not self.accelerator.sync_gradients:
                    continue
                stopped = self._after_step(epoch, skip, stop_now)
                if self.global_step >= config.max_train_steps or stopped:
                    break
        self.progress.close()

    def _micro_step(self, batch) -> tuple[bool, bool]:
        """Forward/backward of one micro-batch; at the last one of a step, the skip decision and the update.
        Returns (update skipped, stop requested) — both False between optimizer steps."""
        accelerator, config = self.accelerator, self.config
        if not self.step_metrics:
            self.step_start = time.perf_counter()  # seconds per optimizer step: its micro-batches' work
        self.shared.manual_seed(_seed(config.seed, self.micro, 0))
        self.local.manual_seed(_seed(config.seed, self.micro, 1 + self.rank))
        skip = stop_now = False
        with accelerator.accumulate(self.model):
            out = self.method.compute_loss(
                self.model,
                self.task,
                batch,
                StepContext(self.device, self.shared, self.local, self.rank, self.world, self.global_step, self.micro),
            )
            self.guard.saw_loss(out.loss)
            accelerator.backward(out.loss)
            if accelerator.sync_gradients:
                if config.max_grad_norm is not None:
                    norm = accelerator.clip_grad_norm_(self.params, config.max_grad_norm)
                else:
                    norm = safety.grad_norm(self.params)
                # every process decides alike: gradients are all-reduced, flags are combined
                norm = distributed.scalar(norm)  # None under DeepSpeed before its first step
                skip, stop_now = self.guard.decide(
                    accelerator, norm, self.signals.received is not None, self.global_step + 1
                )
                self.grad_norm = float("nan") if norm is None else float(norm)
            if not skip:
                self.optimizer.step()
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro += 1
        self.step_metrics.append(out.metrics)
        return skip, stop_now

    def _after_step(self, epoch: int, skip: bool, stop_now: bool) -> bool:
        """EMA, logging, checkpoint, stop and validation after optimizer step ``global_step``; True to end."""
        config, accelerator = self.config, self.accelerator
        self.global_step += 1
        step = self.global_step
        if self.ema is not None and not skip:
            update_ema(self.ema, self.unwrapped)
        if step % config.logging_steps == 0 or step == config.max_train_steps:
            self._log(epoch)
        self.step_metrics = []
        self.progress.update(1)

        saved_now = False
        if config.checkpointing_steps and step % config.checkpointing_steps == 0:
            self.save(step)
            saved_now = True
        if stop_now:
            self.progress.close()
            if not saved_now:
                self.save(step)
            name = self.signals.received or "a stop signal (another process)"
            raise safety.Interrupted(
                f"stopped by {name} after step {step}; saved {self.guard.last_good}. Continue with: "
                f"soarflow train --config {self.output_dir / ckpt.CONFIG_FILE} --resume_from_checkpoint latest",
                step,
                self.guard.last_good,
                name,
            )
        if self.step_callback is not None:
            # the callback sees the weights the run would save now: the EMA's when use_ema (a study's evaluation)
            with ema_weights(self.ema, self.unwrapped) as current:
                stopped = self.step_callback(step, current) is False
        else:
            stopped = False
        stopped = _out_of_time(accelerator, config.max_train_seconds, self.loop_start) or stopped
        is_last = step >= config.max_train_steps or stopped
        if config.validation_steps and (step % config.validation_steps == 0 or is_last):
            if distributed.validates(self.layout, accelerator):
                grid = _validate(accelerator, self.task, self.unwrapped, self.ema, step, self.output_dir)
                if grid is not None:
                    self.grids.append(grid)
            accelerator.wait_for_everyone()
        return stopped

    def _log(self, epoch: int) -> None:
        lr = self.lr_scheduler.get_last_lr()[0]
        method = self.method
        entry = _reduce_metrics(self.accelerator, self.step_metrics, method.metric_keys, method.summed_keys)
        entry.update(step=self.global_step, lr=lr, epoch=epoch, step_time_s=time.perf_counter() - self.step_start)
        if self.config.max_grad_norm is not None:
            entry["grad_norm"] = self.grad_norm
        if self.guard.skipped:
            entry["skipped_nonfinite_steps"] = self.guard.skipped
        self.history.append(entry)
        self.accelerator.log({k: v for k, v in entry.items() if k != "step"}, step=self.global_step)
        self.progress.set_postfix(**{k: f"{entry[k]:.4f}" for k in method.progress_keys}, lr=f"{lr:.2e}", refresh=False)

    def finite(self, tensors) -> bool:
        return distributed.all_finite(self.accelerator, tensors)

    def save(self, step: int) -> Path:
        """checkpoint-{step} (every process calls it), after checking that the weights are finite."""
        tensors = list(self.params) + (list(self.ema.shadow_params) if self.ema is not None else [])
        self.guard.check_weights(tensors, step, "the weights are non-finite", finite=self.finite)
        path = ckpt.save_checkpoint(
            self.accelerator,
            self.output_dir,
            step,
            self.config.checkpoints_total_limit,
            state={"skipped_nonfinite_steps": self.guard.skipped},
        )
        if self.config.checkpoint_model and self.layout.sharded:  # gathered, with the EMA weights swapped in
            with torch.no_grad(), ema_weights(self.ema, self.unwrapped):
                whole = distributed.gathered_model(self.accelerator, self.layout, self.model, self.task.build_model)
            if distributed.writes_files(self.accelerator):
                self.task.save_model(whole, path / ckpt.MODEL_DIR)
            self.accelerator.wait_for_everyone()
        elif self.config.checkpoint_model:
            export.export_checkpoint_model(self.accelerator, self.task, self.unwrapped, self.ema, path)
        self.guard.last_good = path
        return path


def _save_final(config: TrainConfig, task, accelerator, loop: _Loop) -> Path:
    """Put the EMA weights in (if any), check they are finite and write ``output_dir/model`` (whole weights,
    gathered when sharded); returns its path."""
    accelerator.wait_for_everyone()
    if loop.ema is not None:
        copy_ema_to(loop.ema, loop.unwrapped)
    output_dir = loop.output_dir
    model_path = output_dir / ckpt.MODEL_DIR
    loop.guard.check_weights(
        trainable_parameters(loop.unwrapped), loop.global_step, "the final weights are non-finite", finite=loop.finite
    )
    # sharded weights are gathered into a freshly built model on the main process (collective)
    whole = distributed.gathered_model(accelerator, loop.layout, loop.model, task.build_model)
    if distributed.writes_files(accelerator):
        written = task.save_model(whole, model_path)
        # the task picks the format: a folder, or a file with its own extension (model.safetensors)
        model_path = Path(written) if written is not None else (ckpt.find_final_model(output_dir) or model_path)
    accelerator.wait_for_everyone()
    return model_path


def _out_of_time(accelerator, max_seconds: float | None, start: float) -> bool:
    """Whether any process has trained for `max_seconds` (so that every process stops after the same step)."""
    if max_seconds is None:
        return False
    late = torch.tensor(float(time.perf_counter() - start >= max_seconds), device=accelerator.device)
    if accelerator.num_processes > 1:
        late = accelerator.reduce(late, reduction="sum")
    return bool(late > 0)


def _reduce_metrics(
    accelerator, per_micro: list[dict[str, float]], keys=METRIC_KEYS, summed=("num_aux_points",)
) -> dict[str, float]:
    """Mean over this step's micro-batches, then over processes (each process's loss is already scaled so
    that the mean over processes is the global-batch loss); `summed` keys are per-process counts -> global."""
    values = torch.tensor([[m[k] for k in keys] for m in per_micro], dtype=torch.float32).mean(0)
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values.to(accelerator.device), reduction="mean").cpu()
    out = {k: float(v) for k, v in zip(keys, values)}
    for k in summed:
        out[k] *= accelerator.num_processes
    return out


def _write_config(config: TrainConfig, output_dir: Path) -> None:
    """Write the resolved config; on resume a changed setting keeps the old file as config.N.yaml. Where the run
    lives and how it was started (output_dir spelling, resume_from_checkpoint) is not a change."""
    from .config import LOCATION_KEYS, config_differences, upgrade_former_names

    path = output_dir / ckpt.CONFIG_FILE
    text = config.to_yaml()
    if path.exists():
        try:
            previous = upgrade_former_names(TrainConfig, ckpt._read_yaml(path))
        except ValueError:
            previous = {}
        if not [d for d in config_differences(previous, config.to_dict()) if d.split(":")[0] not in LOCATION_KEYS]:
            return
        n = 1
        while (output_dir / f"config.{n}.yaml").exists():
            n += 1
        path.rename(output_dir / f"config.{n}.yaml")
    path.write_text(text)
