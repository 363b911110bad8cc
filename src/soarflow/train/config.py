"""Training configuration: a typed dataclass tree, loaded from YAML and overridden from the command line.

Flag names follow diffusers' SD3 training examples (``learning_rate``, ``train_batch_size``, ``max_train_steps``,
``weighting_scheme``, ...); the SOAR-specific hyper-parameters live in the ``soar:`` section, and ``model:`` /
``data:`` are free-form dicts that the task validates itself (with :func:`from_dict`). The ``soar:`` section is
:class:`soarflow.objective.SOARConfig` itself; its t density, loss weighting and condition dropout are filled
from the top-level keys that every method shares (``weighting_scheme``, ``logit_*``, ``mode_scale``,
``cond_dropout``), so ``config.soar`` is the objective's whole config.

``weighting_scheme`` follows diffusers: ``logit_normal`` and ``mode`` choose the density of the training time t
(loss weight 1); ``sigma_sqrt`` and ``cosmap`` choose the loss weighting with uniform t; ``none`` is uniform t
and weight 1.

The general-purpose half (YAML and dotted overrides into typed dataclasses, errors naming the key, help lines) is
:mod:`soarflow.train.config_parsing`; this module is the schema.

    config = load_config("configs/shapes_soar.yaml", ["--soar.num_aux", "4", "--learning_rate=1e-4"])
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from ..methods import GRPOConfig, InputPerturbationConfig, ScheduledSamplingConfig
from ..objective import SOARConfig, resolve_layout
from ..utils import config_parsing
from ..utils.config_parsing import as_dict, config_differences, from_dict, parse_overrides  # noqa: F401
from ..utils.config_parsing import upgrade_former_names  # noqa: F401

TASK_NAMES = ("shapes", "sd3", "flux")
WEIGHTING_SCHEMES = ("logit_normal", "sigma_sqrt", "mode", "cosmap", "none")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")
MIXED_PRECISION = ("no", "fp16", "bf16")
REPORT_TO = ("tensorboard", "wandb", "all", "none")
METHOD_NAMES = ("sft", "soar", "grpo", "scheduled_sampling", "input_perturbation")
# Sections that belong to one method (soar: is shared: its `shift` is every method's time shift).
METHOD_SECTIONS = ("grpo", "scheduled_sampling", "input_perturbation")

# weighting_scheme -> (SOARConfig.t_density, SOARConfig.weighting): logit_normal and mode choose the density of t
# (loss weight 1); sigma_sqrt and cosmap choose the loss weighting with uniform t.
WEIGHTING_SCHEME_TO_OBJECTIVE = {
    "logit_normal": ("logit_normal", "none"),
    "mode": ("mode", "none"),
    "sigma_sqrt": ("uniform", "sigma_sqrt"),
    "cosmap": ("uniform", "cosmap"),
    "none": ("uniform", "none"),
}

# Keys that change how a run is executed or reported, not what it computes: a finished or interrupted run
# may be resumed with different values (e.g. a larger max_train_steps) without counting as a different run.
NON_DEFINING_KEYS = frozenset(
    {
        "resume_from_checkpoint",
        "max_train_steps",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "validation_steps",
        "report_to",
        "logging_steps",
        "dataloader_num_workers",
        "show_progress",
        "skip_nonfinite_steps",
        "max_train_seconds",
        "write_manifest",
        "ema_device",
        "checkpoint_model",
    }
)
# Keys that say where a run lives or how it was started, not what it is: ignored when comparing a resumed run's
# config with the one in its folder (a run may be moved or its folder spelled differently).
LOCATION_KEYS = frozenset({"output_dir", "resume_from_checkpoint"})


def _f(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a help string (shown by `soarflow train --help`)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a training run needs. Field names follow diffusers' SD3 training examples."""

    task: str = _f("shapes", "model family: shapes | sd3 | flux (or 'package.module:TaskClass')")
    method: Literal["sft", "soar", "grpo", "scheduled_sampling", "input_perturbation"] = _f(
        "soar", "training method: sft | soar | grpo | scheduled_sampling | input_perturbation (docs/methods.md)"
    )
    init_from: str | None = _f(None, "start from these weights: a finished run folder, a model folder or a file")
    output_dir: str = _f("runs/soarflow", "where checkpoints, logs, validation grids and the final model go")
    seed: int = _f(0, "seed of the model init, data order and objective noise")
    learning_rate: float = _f(1e-4, "AdamW learning rate")
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = _f("constant", "LR schedule")
    lr_warmup_steps: int = _f(0, "linear warmup steps (constant_with_warmup, cosine, linear)")
    train_batch_size: int = _f(8, "batch size per process (global batch = this x processes)")
    max_train_steps: int = _f(1000, "optimizer steps")
    max_train_seconds: float | None = _f(
        None, "also stop after this much training time (null: no limit; equal-wall-clock comparisons)"
    )
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    max_grad_norm: float | None = _f(1.0, "gradient clipping norm (null: no clipping)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_weight_decay: float = _f(1e-4, "AdamW weight decay")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    use_8bit_adam: bool = _f(False, "bitsandbytes 8-bit AdamW (needs bitsandbytes)")
    mixed_precision: Literal["no", "fp16", "bf16"] = _f("no", "autocast precision of the forward passes")
    checkpointing_steps: int = _f(500, "save a resumable checkpoint every N steps (0: never)")
    checkpoints_total_limit: int | None = _f(None, "keep at most this many checkpoints (null: all)")
    checkpoint_model: bool = _f(
        True,
        "also write the model as the final save does (EMA weights, the task's format: "
        "diffusers loads it) into every checkpoint-N/model",
    )
    resume_from_checkpoint: str | None = _f(None, "null, 'latest', or a checkpoint folder")
    validation_steps: int = _f(0, "write a validation grid every N steps and at the end (0: never)")
    report_to: Literal["tensorboard", "wandb", "all", "none"] = _f(
        "tensorboard", "metrics and validation images to: tensorboard | wandb | all (both) | none"
    )
    logging_steps: int = _f(1, "log metrics every N steps")
    dataloader_num_workers: int = _f(0, "DataLoader worker processes")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    weighting_scheme: Literal["logit_normal", "sigma_sqrt", "mode", "cosmap", "none"] = _f(
        "logit_normal", "t density (logit_normal, mode) or loss weighting with uniform t (sigma_sqrt, cosmap)"
    )
    logit_mean: float = _f(0.0, "mean of the logit-normal t density")
    logit_std: float = _f(1.0, "std of the logit-normal t density")
    mode_scale: float = _f(1.29, "scale of the 'mode' t density")
    uniform_fraction: float = _f(
        0.0,
        "share of training times t drawn from U(0, 1) instead of the density above "
        "(pretraining: 0.25, keeps the high-noise levels in the mix)",
    )
    use_ema: bool = _f(False, "keep an EMA of the trainable weights; the final model gets the EMA weights")
    ema_decay: float = _f(0.999, "EMA decay (diffusers EMAModel's rule; warms up as (1+m)/(10+m), m = n - 1)")
    ema_device: Literal["accelerator", "cpu"] = _f(
        "accelerator",
        "where the EMA weights live: accelerator (the "
        "training device) or cpu (host memory; updated from the device "
        "weights after every step)",
    )
    cond_dropout: float = _f(0.0, "probability of training a sample on the null condition")
    show_progress: bool = _f(True, "tqdm progress bar")
    write_manifest: bool = _f(
        False,
        "soarflow train/pretrain: write manifest.json beside the final model (command, "
        "steps, loss, wall clock, machine, the task's evaluation of the final model)",
    )
    skip_nonfinite_steps: int = _f(
        0,
        "skip up to N updates with a non-finite loss or gradient norm "
        "(0: stop at the first, naming the last good checkpoint)",
    )
    soar: SOARConfig = _f(
        help="SOAR objective settings (method soar; shift is every method's time shift)", factory=SOARConfig
    )
    grpo: GRPOConfig = _f(help="Flow-GRPO settings (method: grpo)", factory=GRPOConfig)
    scheduled_sampling: ScheduledSamplingConfig = _f(
        help="method: scheduled_sampling settings", factory=ScheduledSamplingConfig
    )
    input_perturbation: InputPerturbationConfig = _f(
        help="method: input_perturbation settings", factory=InputPerturbationConfig
    )
    model: dict[str, Any] = _f(help="model section, validated by the task", factory=dict)
    data: dict[str, Any] = _f(help="data section, validated by the task", factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ValueError(f"config key '{key}': {why} (got {getattr(self, key)!r})")

        need(
            self.task in TASK_NAMES or ":" in self.task,
            "task",
            f"must be one of {', '.join(TASK_NAMES)} or 'package.module:TaskClass'",
        )
        need(self.method in METHOD_NAMES, "method", f"must be one of {', '.join(METHOD_NAMES)}")
        need(self.init_from is None or bool(self.init_from), "init_from", "must be a path or null")
        self._check_method_sections()
        if self.method == "grpo" and self.train_batch_size % self.grpo.group_size:
            raise ValueError(
                f"config key 'train_batch_size': must be a multiple of grpo.group_size "
                f"{self.grpo.group_size} (got {self.train_batch_size})"
            )
        need(bool(self.output_dir), "output_dir", "must not be empty")
        need(self.seed >= 0, "seed", "must be >= 0")
        need(self.learning_rate > 0 and math.isfinite(self.learning_rate), "learning_rate", "must be > 0")
        need(self.lr_scheduler in LR_SCHEDULERS, "lr_scheduler", f"must be one of {', '.join(LR_SCHEDULERS)}")
        need(self.lr_warmup_steps >= 0, "lr_warmup_steps", "must be >= 0")
        need(self.train_batch_size >= 1, "train_batch_size", "must be >= 1")
        need(self.max_train_steps >= 1, "max_train_steps", "must be >= 1")
        need(self.max_train_seconds is None or self.max_train_seconds > 0, "max_train_seconds", "must be > 0 or null")
        need(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
        need(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "must be > 0 or null")
        need(0 <= self.adam_beta1 < 1, "adam_beta1", "must be in [0, 1)")
        need(0 <= self.adam_beta2 < 1, "adam_beta2", "must be in [0, 1)")
        need(self.adam_weight_decay >= 0, "adam_weight_decay", "must be >= 0")
        need(self.adam_epsilon > 0, "adam_epsilon", "must be > 0")
        need(self.mixed_precision in MIXED_PRECISION, "mixed_precision", f"must be one of {', '.join(MIXED_PRECISION)}")
        need(self.checkpointing_steps >= 0, "checkpointing_steps", "must be >= 0 (0: no checkpoints)")
        need(
            self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
            "checkpoints_total_limit",
            "must be >= 1 or null",
        )
        need(self.validation_steps >= 0, "validation_steps", "must be >= 0 (0: no validation)")
        need(self.report_to in REPORT_TO, "report_to", f"must be one of {', '.join(REPORT_TO)}")
        need(self.logging_steps >= 1, "logging_steps", "must be >= 1")
        need(self.skip_nonfinite_steps >= 0, "skip_nonfinite_steps", "must be >= 0")
        need(self.dataloader_num_workers >= 0, "dataloader_num_workers", "must be >= 0")
        need(
            self.weighting_scheme in WEIGHTING_SCHEMES,
            "weighting_scheme",
            f"must be one of {', '.join(WEIGHTING_SCHEMES)}",
        )
        need(self.logit_std > 0, "logit_std", "must be > 0")
        need(0 <= self.uniform_fraction <= 1, "uniform_fraction", "must be in [0, 1]")
        need(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)")
        need(self.ema_device in ("accelerator", "cpu"), "ema_device", "must be accelerator or cpu")
        need(0 <= self.cond_dropout < 1, "cond_dropout", "must be in [0, 1)")
        # The objective's t density, weighting and dropout are these top-level keys (shared by every method).
        density, weighting = WEIGHTING_SCHEME_TO_OBJECTIVE[self.weighting_scheme]
        try:
            self.soar = dataclasses.replace(
                self.soar,
                t_density=density,
                weighting=weighting,
                logit_mean=self.logit_mean,
                logit_std=self.logit_std,
                mode_scale=self.mode_scale,
                uniform_fraction=self.uniform_fraction,
                cond_dropout=self.cond_dropout,
            )
        except ValueError as err:  # a soar field filled from a top-level key: name the key the user set
            msg = str(err)
            for f in dataclasses.fields(SOARConfig):
                if "set_by" in f.metadata:
                    msg = msg.replace(f"config key 'soar.{f.name}'", f"config key '{f.metadata['set_by']}'")
            raise ValueError(msg) from None

    def _check_method_sections(self) -> None:
        """A method's own section may differ from its defaults only under that method; name the first key set."""
        for section in METHOD_SECTIONS:
            if section == self.method:
                continue
            value, default = getattr(self, section), type(getattr(self, section))()
            for f in dataclasses.fields(value):
                if getattr(value, f.name) != getattr(default, f.name):
                    raise ValueError(
                        f"config key '{section}.{f.name}' applies only to method '{section}', but method "
                        f"is '{self.method}'; remove it or set method: {section}"
                    )

    # ------------------------------------------------------------------------------------------ views
    def to_dict(self) -> dict[str, Any]:
        """All keys, without the sections of other methods (they hold only defaults)."""
        d = as_dict(self)
        for section in METHOD_SECTIONS:
            if section != self.method:
                d.pop(section)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        check_method_keys(d)
        return from_dict(cls, d)


def resolved_for_device(config: TrainConfig, device: Any) -> TrainConfig:
    """A copy of ``config`` with the device-dependent defaults made concrete (``soar.reuse_main_output: auto``,
    :func:`soarflow.objective.resolve_layout`): what the run computes on ``device``, for config.yaml and the
    manifest. ``config`` itself is not changed."""
    resolved = copy.copy(config)
    resolved.soar = resolve_layout(config.soar, device)
    return resolved


def check_method_keys(d: Any) -> None:
    """In a raw config mapping, a key inside another method's section (even one set to its default) is an error."""
    if not isinstance(d, dict):
        return
    method = d.get("method", TrainConfig.method)
    for section in METHOD_SECTIONS:
        keys = d.get(section)
        if section != method and isinstance(keys, dict) and keys:
            key = next(iter(keys))
            raise ValueError(
                f"config key '{section}.{key}' applies only to method '{section}', but method is "
                f"'{method}'; remove it or set method: {section}"
            )


# ---------------------------------------------------------------------------------------------- loading

FREE_FORM_SECTIONS = ("model", "data")  # validated by the task; keys below them keep their dashes


def set_dotted(mapping: dict[str, Any], key: str, path: Sequence[str], value: Any) -> None:
    """:func:`config_parsing.set_dotted` in a raw TrainConfig mapping (a former key name sets the current key)."""
    config_parsing.set_dotted(mapping, key, path, value, root=TrainConfig)


def apply_overrides(d: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of the raw TrainConfig mapping `d` with the dotted command-line overrides applied."""
    return config_parsing.apply_overrides(TrainConfig, d, overrides, free_form=FREE_FORM_SECTIONS)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """TrainConfig from a YAML file (or the defaults when `path` is None) plus dotted overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ValueError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path}: expected a mapping at the top level, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    try:
        check_method_keys(raw)
        return from_dict(TrainConfig, raw)
    except ValueError as err:  # name the file: the bad key may come from it
        if path is None:
            raise
        raise ValueError(f"config file {path}: {err}") from None


def describe_fields(cls: type | None = None) -> list[str]:
    """One help line per config key (``soarflow train --help``), TrainConfig's by default."""
    return config_parsing.describe_fields(cls or TrainConfig)
