"""Training configuration: a typed dataclass tree, loaded from YAML and overridden from the command line.

Flag names follow diffusers' SD3 training examples (``learning_rate``, ``train_batch_size``, ``max_train_steps``,
``weighting_scheme``, ...); the SOAR-specific hyper-parameters live in the ``soar:`` section, and ``model:`` /
``data:`` are free-form dicts that the task validates itself (with :func:`from_dict`). Every setting lives in
exactly one place; :meth:`TrainConfig.objective_config` combines them into a
:class:`soarflow.objective.SOARConfig`.

``weighting_scheme`` follows diffusers: ``logit_normal`` and ``mode`` choose the density of the training time t
(loss weight 1); ``sigma_sqrt`` and ``cosmap`` choose the loss weighting with uniform t; ``none`` is uniform t
and weight 1.

    cfg = load_config("configs/shapes_soar.yaml", ["--soar.num_aux", "4", "--learning_rate=1e-4"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union

import yaml

from ..methods import GRPOConfig, InputPerturbationConfig, ScheduledSamplingConfig
from ..objective import SOARConfig

T = TypeVar("T")

TASK_NAMES = ("shapes", "sd3", "flux")
WEIGHTING_SCHEMES = ("logit_normal", "sigma_sqrt", "mode", "cosmap", "none")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")
MIXED_PRECISION = ("no", "fp16", "bf16")
REPORT_TO = ("tensorboard", "none")
METHOD_NAMES = ("sft", "soar", "grpo", "scheduled_sampling", "input_perturbation")
# Sections that belong to one method (soar: is shared: its `shift` is every method's time shift).
METHOD_SECTIONS = ("grpo", "scheduled_sampling", "input_perturbation")

# Keys that change how a run is executed or reported, not what it computes: a finished or interrupted run
# may be resumed with different values (e.g. a larger max_train_steps) without counting as a different run.
NON_DEFINING_KEYS = frozenset({
    "resume_from_checkpoint", "max_train_steps", "checkpointing_steps", "checkpoints_total_limit",
    "validation_steps", "report_to", "logging_steps", "dataloader_num_workers", "show_progress",
    "skip_nonfinite_steps", "max_train_seconds", "write_manifest",
})
# Keys that say where a run lives or how it was started, not what it is: ignored when comparing a resumed run's
# config with the one in its folder (a run may be moved or its folder spelled differently).
LOCATION_KEYS = frozenset({"output_dir", "resume_from_checkpoint"})


def _f(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a help string (shown by `soarflow train --help`)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class SOARSection:
    """``soar:`` — the SOAR-specific fields of :class:`soarflow.objective.SOARConfig` (``method: soar`` uses them;
    ``shift`` is also the SFT time shift). See docs/objective.md for the math."""

    num_aux: int = _f(6, "K: auxiliary re-noised points per rollout path (0 = SFT)")
    lambda_aux: float = _f(1.0, "weight of the auxiliary term (0 = SFT)")
    rollout_steps: int = _f(40, "N: the rollout takes one step of the N-step inference schedule")
    rollout_cfg: float = _f(4.5, "guidance scale of the rollout step (1 = conditional velocity only)")
    num_rollout_paths: int = _f(1, "M: path 0 is the ODE step, paths 1..M-1 are stochastic")
    rollout_kind: Literal["simple", "sde", "flow_sde", "cps"] = _f("flow_sde", "kind of the stochastic paths")
    rollout_noise_scale: float = _f(0.5, "noise scale of the stochastic paths")
    sigma_upper: Literal["one", "ratio"] = _f("one", "upper bound of sigma': 1 or min(ratio * sigma0, 1)")
    sigma_upper_ratio: float = _f(1.5, "ratio for sigma_upper='ratio'")
    sigma_floor: float = _f(1e-3, "sigma' >= floor so the correction target stays finite")
    shift: float = _f(3.0, "time shift s: sigma(t) = s t / (1 + (s - 1) t) (SD3.5: 3)")
    aux_chunk_size: int | None = _f(None, "max rows per forward; larger fused batches run checkpointed in chunks")
    fuse_forward: bool = _f(True, "one fused forward for the main and auxiliary terms")
    reuse_main_output: bool = _f(True, "the main term's output is the rollout's conditional velocity (saves B rows)")
    forward_batch_size: int | Literal["auto", "probe"] | None = _f(
        "auto", "rows per forward call of the gradient terms: auto (one call), probe (timed once), N, null")
    points_per_sample: int = _f(1, "method sft: P standard draws (fresh noise and t) per image (compute-matched SFT)")
    rollout: Literal["guided", "none"] = _f("guided", "none: z' = x_sigma1 exactly, no deviation (control)")
    aux_noise: Literal["shared", "fresh"] = _f("shared", "fresh (with rollout none): noise-level-matched SFT")
    aux_sigma_density: Literal["uniform", "t_density"] = _f(
        "uniform", "sigma' ~ U[sigma1, upper] (paper) or the training t density restricted to it")
    cond_dropout_mode: Literal["per_sample", "per_batch"] = _f("per_sample", "condition dropout per sample or batch")
    rollout_uses_dropped_cond: bool = _f(False, "a dropped sample rolls out unconditionally (official order)")


@dataclass
class TrainConfig:
    """Everything a training run needs. Field names follow diffusers' SD3 training examples."""

    task: str = _f("shapes", "model family: shapes | sd3 | flux (or 'package.module:TaskClass')")
    method: Literal["sft", "soar", "grpo", "scheduled_sampling", "input_perturbation"] = _f(
        "soar", "training method: sft | soar | grpo | scheduled_sampling | input_perturbation (docs/methods.md)")
    init_from: str | None = _f(None, "start from these weights: a finished run folder, a model folder or a file")
    output_dir: str = _f("runs/soarflow", "where checkpoints, logs, validation grids and the final model go")
    seed: int = _f(0, "seed of the model init, data order and objective noise")
    learning_rate: float = _f(1e-4, "AdamW learning rate")
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = _f("constant", "LR schedule")
    lr_warmup_steps: int = _f(0, "linear warmup steps (constant_with_warmup, cosine, linear)")
    train_batch_size: int = _f(8, "batch size per process (global batch = this x processes)")
    max_train_steps: int = _f(1000, "optimizer steps")
    max_train_seconds: float | None = _f(None, "also stop after this much training time (null: no limit; "
                                               "equal-wall-clock comparisons)")
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
    resume_from_checkpoint: str | None = _f(None, "null, 'latest', or a checkpoint folder")
    validation_steps: int = _f(0, "write a validation grid every N steps and at the end (0: never)")
    report_to: Literal["tensorboard", "none"] = _f("tensorboard", "metric logger")
    logging_steps: int = _f(1, "log metrics every N steps")
    dataloader_num_workers: int = _f(0, "DataLoader worker processes")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    weighting_scheme: Literal["logit_normal", "sigma_sqrt", "mode", "cosmap", "none"] = _f(
        "logit_normal", "t density (logit_normal, mode) or loss weighting with uniform t (sigma_sqrt, cosmap)")
    logit_mean: float = _f(0.0, "mean of the logit-normal t density")
    logit_std: float = _f(1.0, "std of the logit-normal t density")
    mode_scale: float = _f(1.29, "scale of the 'mode' t density")
    uniform_fraction: float = _f(0.0, "share of training times t drawn from U(0, 1) instead of the density above "
                                      "(pretraining: 0.25, keeps the high-noise levels in the mix)")
    use_ema: bool = _f(False, "keep an EMA of the trainable weights; the final model gets the EMA weights")
    ema_decay: float = _f(0.999, "EMA decay (diffusers EMAModel's rule; warms up as (1+m)/(10+m), m = n - 1)")
    cond_dropout: float = _f(0.0, "probability of training a sample on the null condition")
    show_progress: bool = _f(True, "tqdm progress bar")
    write_manifest: bool = _f(False, "soarflow train/pretrain: write manifest.json beside the final model (command, "
                                     "steps, loss, wall clock, machine, the task's evaluation of the final model)")
    skip_nonfinite_steps: int = _f(0, "skip up to N updates with a non-finite loss or gradient norm "
                                      "(0: stop at the first, naming the last good checkpoint)")
    soar: SOARSection = _f(help="SOAR objective settings", factory=SOARSection)
    grpo: GRPOConfig = _f(help="Flow-GRPO settings (method: grpo)", factory=GRPOConfig)
    scheduled_sampling: ScheduledSamplingConfig = _f(help="method: scheduled_sampling settings",
                                                     factory=ScheduledSamplingConfig)
    input_perturbation: InputPerturbationConfig = _f(help="method: input_perturbation settings",
                                                     factory=InputPerturbationConfig)
    model: dict[str, Any] = _f(help="model section, validated by the task", factory=dict)
    data: dict[str, Any] = _f(help="data section, validated by the task", factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ValueError(f"config key '{key}': {why} (got {getattr(self, key)!r})")

        need(self.task in TASK_NAMES or ":" in self.task, "task",
             f"must be one of {', '.join(TASK_NAMES)} or 'package.module:TaskClass'")
        need(self.method in METHOD_NAMES, "method", f"must be one of {', '.join(METHOD_NAMES)}")
        need(self.init_from is None or bool(self.init_from), "init_from", "must be a path or null")
        self._check_method_sections()
        if self.method == "grpo" and self.train_batch_size % self.grpo.group_size:
            raise ValueError(f"config key 'train_batch_size': must be a multiple of grpo.group_size "
                             f"{self.grpo.group_size} (got {self.train_batch_size})")
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
        need(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1, "checkpoints_total_limit",
             "must be >= 1 or null")
        need(self.validation_steps >= 0, "validation_steps", "must be >= 0 (0: no validation)")
        need(self.report_to in REPORT_TO, "report_to", f"must be one of {', '.join(REPORT_TO)}")
        need(self.logging_steps >= 1, "logging_steps", "must be >= 1")
        need(self.skip_nonfinite_steps >= 0, "skip_nonfinite_steps", "must be >= 0")
        need(self.dataloader_num_workers >= 0, "dataloader_num_workers", "must be >= 0")
        need(self.weighting_scheme in WEIGHTING_SCHEMES, "weighting_scheme",
             f"must be one of {', '.join(WEIGHTING_SCHEMES)}")
        need(self.logit_std > 0, "logit_std", "must be > 0")
        need(0 <= self.uniform_fraction <= 1, "uniform_fraction", "must be in [0, 1]")
        need(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)")
        need(0 <= self.cond_dropout < 1, "cond_dropout", "must be in [0, 1)")
        self.objective_config()  # range checks of the SOAR fields, reported with their config key

    def _check_method_sections(self) -> None:
        """A method's own section may differ from its defaults only under that method; name the first key set."""
        for section in METHOD_SECTIONS:
            if section == self.method:
                continue
            value, default = getattr(self, section), type(getattr(self, section))()
            for f in dataclasses.fields(value):
                if getattr(value, f.name) != getattr(default, f.name):
                    raise ValueError(f"config key '{section}.{f.name}' applies only to method '{section}', but method "
                                     f"is '{self.method}'; remove it or set method: {section}")

    # ------------------------------------------------------------------------------------------ views
    def objective_config(self) -> SOARConfig:
        """The :class:`SOARConfig` of this run (``weighting_scheme`` mapped to t density + loss weighting)."""
        density, weighting = {
            "logit_normal": ("logit_normal", "none"),
            "mode": ("mode", "none"),
            "sigma_sqrt": ("uniform", "sigma_sqrt"),
            "cosmap": ("uniform", "cosmap"),
            "none": ("uniform", "none"),
        }[self.weighting_scheme]
        soar = dataclasses.asdict(self.soar)
        try:
            return SOARConfig(
                **soar,
                t_density=density,
                weighting=weighting,
                logit_mean=self.logit_mean,
                logit_std=self.logit_std,
                mode_scale=self.mode_scale,
                uniform_fraction=self.uniform_fraction,
                cond_dropout=self.cond_dropout,
            )
        except ValueError as err:
            # SOARConfig names its own field ("SOARConfig.num_aux: ..."); report the config key instead.
            msg = str(err)
            for name in soar:
                msg = msg.replace(f"SOARConfig.{name}:", f"config key 'soar.{name}':")
            msg = msg.replace("SOARConfig.uniform_fraction:", "config key 'uniform_fraction':")
            raise ValueError(msg) from None

    def to_dict(self) -> dict[str, Any]:
        """All keys, without the sections of other methods (they hold only defaults)."""
        d = dataclasses.asdict(self)
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


def check_method_keys(d: Any) -> None:
    """In a raw config mapping, a key inside another method's section (even one set to its default) is an error."""
    if not isinstance(d, dict):
        return
    method = d.get("method", TrainConfig.method)
    for section in METHOD_SECTIONS:
        keys = d.get(section)
        if section != method and isinstance(keys, dict) and keys:
            key = next(iter(keys))
            raise ValueError(f"config key '{section}.{key}' applies only to method '{section}', but method is "
                             f"'{method}'; remove it or set method: {section}")


# ---------------------------------------------------------------------------------------------- parsing


class _Text(str):
    """A value typed on the command line: converted according to the target field's type."""


_NONE_WORDS = {"none", "null", "~"}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert/validate `value` for type annotation `tp`; ValueError naming `key` on mismatch."""
    def bad() -> ValueError:
        return ValueError(f"config key '{key}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")

    if tp is Any:
        # Free-form sections (model/data): command-line text is read as YAML, at any nesting depth.
        if isinstance(value, _Text):
            return yaml.safe_load(value)
        if isinstance(value, dict):
            return {k: _coerce(v, Any, f"{key}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [_coerce(v, Any, f"{key}[{i}]") for i, v in enumerate(value)]
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, _Text) and value.lower() in _NONE_WORDS):
            if type(None) in args:
                return None
            raise bad()
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ValueError:
                continue
        raise bad()
    if origin is Literal:
        if isinstance(value, _Text):
            value = str(value)
        if value not in args:
            raise ValueError(f"config key '{key}': must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"config key '{key}': expected a section (mapping), got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, _Text):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise bad()
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if isinstance(value, _Text):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise bad()
        inner = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, inner, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, _Text) and value.lower() in _TRUE_WORDS | _FALSE_WORDS:
            return value.lower() in _TRUE_WORDS
        raise bad()
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # also YAML's "1e-4", which PyYAML reads as a string
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return str(value)
        raise bad()
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise bad()
    return value


def from_dict(cls: type[T], d: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, converting and checking each value against the field's type.

    Raises ValueError naming the dotted key (``prefix.key``) for unknown keys (with a suggestion), ill-typed
    values, and the range checks the dataclass does itself in ``__post_init__``."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        where = f"section '{prefix}'" if prefix else "the config"
        raise ValueError(f"{where}: expected a mapping of keys to values, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in d.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ValueError(f"unknown config key '{dotted}'{hint}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except ValueError as err:
        msg = str(err)
        if prefix and "config key '" in msg and f"config key '{prefix}." not in msg:
            msg = msg.replace("config key '", f"config key '{prefix}.")
        raise ValueError(msg) from None


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, _Text | None]]:
    """``["--soar.num_aux", "4", "--learning_rate=1e-4", "--use_ema"]`` -> [(key, text or None)].

    A flag without a value (followed by another flag or the end) is None: True for a boolean key."""
    pairs: list[tuple[str, _Text | None]] = []
    items = list(overrides)
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--") or len(item) <= 2:
            raise ValueError(f"expected a --key or --key=value override, got {item!r}")
        body = item[2:]
        if "=" in body:
            key, value = body.split("=", 1)
            pairs.append((key, _Text(value)))
            i += 1
        elif i + 1 < len(items) and not (items[i + 1].startswith("--") and len(items[i + 1]) > 2):
            pairs.append((body, _Text(items[i + 1])))
            i += 2
        else:
            pairs.append((body, None))
            i += 1
    return pairs


def _field_type(path: list[str]) -> Any:
    """Type annotation of the dotted key `path` in TrainConfig (None if unknown / inside a free-form dict)."""
    tp: Any = TrainConfig
    for part in path:
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def apply_overrides(d: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of the raw config mapping `d` with the dotted command-line overrides applied."""
    out = yaml.safe_load(yaml.safe_dump(d)) if d else {}
    for key, text in parse_overrides(overrides):
        path = key.replace("-", "_").split(".") if not key.startswith(("model.", "data.")) else key.split(".")
        if any(not p for p in path):
            raise ValueError(f"malformed override key {key!r}")
        if text is None:
            if _field_type(path) is not bool:
                raise ValueError(f"override --{key} needs a value")
            text = _Text("true")
        set_dotted(out, key, path, text)
    return out


def set_dotted(mapping: dict[str, Any], key: str, path: Sequence[str], value: Any) -> None:
    """Set ``mapping[path[0]]...[path[-1]] = value``, creating sections; `key` names the key in errors."""
    node = mapping
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"config key '{key}': '{part}' is not a section")
        node = nxt
    node[path[-1]] = value


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


def config_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config mappings, as 'key: a -> b'."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        dotted = f"{prefix}.{key}" if prefix else str(key)
        va, vb = a.get(key, "<unset>"), b.get(key, "<unset>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_differences(va, vb, dotted)
        elif va != vb:
            out.append(f"{dotted}: {va!r} -> {vb!r}")
    return out


def describe_fields(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """One help line per config key (for `soarflow train --help`)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"  {dotted}: section — {f.metadata.get('help', '')}")
            lines += describe_fields(tp, prefix=f"{dotted}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  --{dotted:<28} {_type_name(tp):<32} default {default!r}: {f.metadata.get('help', '')}")
    return lines
