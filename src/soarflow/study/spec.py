"""A study file: a base training config, rows of dotted-key overrides, seeds, a compute budget and an evaluation.

    name: claim
    base_config: shapes_soar.yaml        # optional, relative to this file: the `soarflow train --config` format
    base: {method: sft, learning_rate: 5.0e-5, soar.shift: 1.0}   # merged over base_config (dotted keys allowed)
    seeds: [0, 1, 2]
    budget: {steps: 100, seconds: 60, max_steps: 2000}
    evaluation: {kind: shapes, num_steps: [10, 40], guidance_scales: [1.0, 4.0], prompts_per_family: 4, ...}
    include_base: true                   # evaluate the untrained base as a row named "base"
    reference: sft                       # rows are compared to this row and to the base
    contrasts:                           # more paired comparisons, each [row, against]: a table of their own
      - [soar, sft_noise_matched]        # e.g. SOAR against its noise-level-matched control
    primary: {row: soar, against: sft_noise_matched, setting: steps40_cfg4, arm: steps}   # the one pre-declared
                                         # contrast the report leads with (metric: overall by default)
    rows:
      - {name: sft, set: {method: sft}}
      - {name: soar_k, set: {method: soar}, sweep: {soar.num_aux: [1, 2, 4]}}   # one row per value
    quick: {seeds: [0], budget: {steps: 3}, evaluation: {...}, rows: [sft, soar_k*], primary: {setting: ...}}

A cell is (row, seed): its training config is ``base`` + the row's ``set`` (+ one sweep point) + the seed and
the budget, validated with the trainer's own config checks (:func:`soarflow.train.config.from_dict`) before the
first cell runs, so an unknown method or key fails naming the row and the key.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from ..train.config import TrainConfig, from_dict, set_dotted

BASE_ROW = "base"
# Execution settings every cell gets: the study owns output folders, logging and evaluation.
CELL_FIXED = {"report_to": "none", "show_progress": False, "checkpointing_steps": 0, "validation_steps": 0}


@dataclass
class Budget:
    """Equal compute. ``steps``: every cell is evaluated after this many optimizer steps (equal steps).
    ``seconds``: every cell is also evaluated when its training clock (evaluation excluded) first reaches this
    many seconds (equal wall-clock); a cell trains until both are reached, at most ``max_steps`` steps."""

    steps: int | None = 100
    seconds: float | None = None
    max_steps: int = 100_000

    def __post_init__(self) -> None:
        if self.steps is None and self.seconds is None:
            raise ValueError("budget: give steps, seconds or both")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"budget.steps must be >= 1, got {self.steps}")
        if self.seconds is not None and not self.seconds > 0:
            raise ValueError(f"budget.seconds must be > 0, got {self.seconds}")
        if self.max_steps < (self.steps or 1):
            raise ValueError(f"budget.max_steps ({self.max_steps}) must be >= budget.steps ({self.steps})")

    @property
    def arms(self) -> list[str]:
        return [a for a, v in (("steps", self.steps), ("seconds", self.seconds)) if v is not None]

    @property
    def train_steps(self) -> int:
        """The trainer's max_train_steps: exactly `steps` without a time budget, else the cap."""
        return self.steps if self.seconds is None else self.max_steps


@dataclass
class EvalSpec:
    """``evaluation:``. kind ``shapes``: ShapesEval at every (num_steps, guidance_scale), FD / diversity against real
    renders, exposure gap; kind ``loss`` (any task, e.g. diffusers): per-sample flow-matching loss at fixed noise
    and sigmas on the first ``num_samples`` training samples, plus the exposure gap. Every cell uses the same
    prompts and noise (``seed``), so two cells' per-image results are paired."""

    FORMER_KEYS: ClassVar[dict[str, str]] = {"cfg_scales": "guidance_scales", "curve_cfg_scale": "curve_guidance_scale"}

    kind: str = "shapes"
    seed: int = 1234
    num_steps: list[int] = field(default_factory=lambda: [10, 40])
    guidance_scales: list[float] = field(default_factory=lambda: [1.0, 4.0])
    prompts_per_family: int = 4
    images_per_prompt: int = 2
    exposure_images: int = 32
    num_samples: int = 8  # kind "loss"
    loss_sigmas: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])  # kind "loss"
    shift: float = 1.0  # sampler time shift (shapes: 1; SD3: 3)
    every_steps: int = 0  # score-vs-wall-clock curve: a small evaluation every M steps (0: none)
    curve_num_steps: int = 10
    curve_guidance_scale: float = 4.0
    curve_prompts_per_family: int = 2

    def __post_init__(self) -> None:
        if self.kind not in ("shapes", "loss"):
            raise ValueError(f"evaluation.kind must be 'shapes' or 'loss', got {self.kind!r}")
        for key in (
            "prompts_per_family",
            "images_per_prompt",
            "exposure_images",
            "num_samples",
            "curve_num_steps",
            "curve_prompts_per_family",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"evaluation.{key} must be >= 1, got {getattr(self, key)}")
        if self.kind == "shapes" and self.images_per_prompt < 2:
            # diversity is the spread among images of one prompt: a single image per prompt has none
            raise ValueError(
                f"evaluation.images_per_prompt must be >= 2 for kind 'shapes' (diversity compares images "
                f"of the same prompt), got {self.images_per_prompt}"
            )
        if not self.num_steps or any(n < 2 for n in self.num_steps):
            raise ValueError(f"evaluation.num_steps must be a non-empty list of values >= 2, got {self.num_steps}")
        if not self.guidance_scales or any(c <= 0 for c in self.guidance_scales):
            raise ValueError(
                f"evaluation.guidance_scales must be a non-empty list of values > 0, got {self.guidance_scales}"
            )
        if self.every_steps < 0:
            raise ValueError(f"evaluation.every_steps must be >= 0, got {self.every_steps}")

    @property
    def settings(self) -> list[tuple[int, float]]:
        return [(n, float(c)) for n in self.num_steps for c in self.guidance_scales]


# Per-image (per-prompt for diversity) metrics: the ones with intervals; the first is the kind's headline metric.
INTERVAL_METRICS = {"shapes": ["overall", "reward", "diversity"], "loss": ["fm_loss"]}


@dataclass
class Primary:
    """``primary:``: the study's one pre-declared contrast, ``row`` minus ``against`` at one evaluation
    ``setting`` (e.g. steps40_cfg4) and budget ``arm`` (steps | seconds), on ``metric`` (default: the kind's
    headline metric, overall or fm_loss). The report leads with it; every other interval is secondary."""

    row: str
    against: str
    setting: str
    arm: str
    metric: str | None = None


def setting_key(num_steps: int, guidance_scale: float) -> str:
    return f"steps{num_steps}_cfg{float(guidance_scale):g}"


@dataclass
class Row:
    name: str
    overrides: dict[str, Any]  # dotted key -> value, applied over the base
    # Chaining (e.g. SOAR -> GRPO): each cell starts from the weights the same seed's cell of `init_from_row`
    # had at its `init_from_arm` evaluation ("steps" or "seconds"); that stage's budget comes on top of this one's.
    init_from_row: str | None = None
    init_from_arm: str | None = None


@dataclass
class Cell:
    row: str
    seed: int | None  # None for the base row (no training)
    config: dict[str, Any]  # the validated training config (TrainConfig.to_dict()), output_dir blanked
    hash: str = ""
    init_from: "Cell | None" = None  # the cell whose `init_arm` weights this one starts from (Row.init_from_row)
    init_arm: str | None = None

    @property
    def label(self) -> str:
        return self.row if self.seed is None else f"{self.row} seed {self.seed}"


@dataclass
class StudySpec:
    name: str
    base: dict[str, Any]  # raw training-config mapping (nested)
    rows: list[Row]
    seeds: list[int]
    budget: Budget
    evaluation: EvalSpec
    include_base: bool = True
    reference: str | None = "sft"
    contrasts: list[tuple[str, str]] = field(default_factory=list)  # (row, against): extra paired comparisons
    primary: Primary | None = None
    source: str = ""
    declared_seeds: list[int] | None = None  # set by `seeds=`: the file's seeds, of which `seeds` is a subset

    @property
    def interim(self) -> bool:
        """A report from some of the declared seeds (`soarflow study --seeds`), not the study as declared."""
        return self.declared_seeds is not None and self.declared_seeds != self.seeds

    def row_names(self) -> list[str]:
        return ([BASE_ROW] if self.include_base else []) + [r.name for r in self.rows]


def _load_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"study file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"study file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"study file {path}: expected a mapping at the top level")
    return raw


def with_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of the config mapping `raw` with dotted keys (``soar.num_aux: 4``) set to their (YAML-typed) values;
    the trainer's `from_dict` then checks every key and value."""
    out = copy.deepcopy(raw)
    for key, value in overrides.items():
        path = str(key).split(".")
        if any(not p for p in path):
            raise ValueError(f"malformed config key {key!r}")
        set_dotted(out, key, path, copy.deepcopy(value))
    return out


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


STUDY_KEYS = {
    "name",
    "description",
    "base_config",
    "base",
    "seeds",
    "budget",
    "evaluation",
    "include_base",
    "reference",
    "contrasts",
    "primary",
    "rows",
    "quick",
}


def load_study(
    path: str | Path, quick: bool = False, only: list[str] | None = None, seeds: list[int] | None = None
) -> StudySpec:
    """Parse and validate a study file (every cell's training config included); see the module docstring.
    `seeds`: run (and report) only these of the file's seeds, an interim report (cells keep their hashes)."""
    path = Path(path)
    raw = _load_yaml(path)
    unknown = set(raw) - STUDY_KEYS
    if unknown:
        raise ValueError(
            f"study file {path}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(STUDY_KEYS))})"
        )
    if quick:
        q = raw.get("quick") or {}
        if not isinstance(q, dict):
            raise ValueError(f"study file {path}: 'quick' must be a mapping")
        bad = set(q) - {"seeds", "budget", "evaluation", "rows", "base", "primary"}
        if bad:
            raise ValueError(f"study file {path}: unknown key(s) in 'quick': {', '.join(sorted(bad))}")
        for key in ("seeds", "budget", "evaluation", "base", "primary"):
            if key in q:
                raw[key] = _merge(raw.get(key) or {}, q[key]) if isinstance(q[key], dict) else q[key]
        if "rows" in q:
            only = list(q["rows"]) + ([BASE_ROW] if raw.get("include_base", True) else []) if only is None else only
    base: dict[str, Any] = {}
    if raw.get("base_config"):
        base_path = (path.parent / raw["base_config"]).resolve()
        base = _load_yaml(base_path)
    if not isinstance(raw.get("base") or {}, dict):
        raise ValueError(f"study file {path}: 'base' must be a mapping of (dotted) config keys")
    base = with_overrides(base, raw.get("base") or {})
    subset, seeds = seeds, raw.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ValueError(f"study file {path}: 'seeds' must be a non-empty list of integers >= 0, got {seeds!r}")
    declared_seeds = None
    if subset is not None:
        if not subset or len(set(subset)) != len(subset):
            raise ValueError(f"--seeds must list distinct seeds, got {subset}")
        extra = [s for s in subset if s not in seeds]
        if extra:
            raise ValueError(f"--seeds {extra} not among the seeds of {path}: {seeds}")
        declared_seeds, seeds = seeds, [s for s in seeds if s in subset]
    budget = from_dict(Budget, raw.get("budget") or {}, prefix="budget")
    evaluation = from_dict(EvalSpec, raw.get("evaluation") or {}, prefix="evaluation")
    rows = _expand_rows(raw.get("rows") or [], path)
    _check_chains(rows, budget, path)
    include_base = bool(raw.get("include_base", True))
    names = [r.name for r in rows] + ([BASE_ROW] if include_base else [])
    if only:

        def hit(name: str, pat: str) -> bool:  # exact names first: "soar[num_aux=1]" is not a glob class
            return name == pat or fnmatch.fnmatchcase(name, pat)

        keep = {n for n in names if any(hit(n, pat) for pat in only)}
        for pat in only:
            if not any(hit(n, pat) for n in names):
                raise ValueError(f"--only {pat!r} matches no row of {path} (rows: {', '.join(names)})")
        for r in rows:  # a chained row needs its source row
            if r.name in keep and r.init_from_row:
                keep.add(r.init_from_row)
        rows = [r for r in rows if r.name in keep]
        include_base = include_base and BASE_ROW in keep
    reference = raw.get("reference", "sft")
    if reference is not None and reference not in [r.name for r in rows]:
        reference = None  # the reference row is filtered out (or absent): compare to the base only
    contrasts = _contrasts(raw.get("contrasts") or [], names, [r.name for r in rows] + [BASE_ROW] * include_base, path)
    primary = _primary(raw.get("primary"), names, budget, evaluation, path)
    spec = StudySpec(
        name=str(raw.get("name") or path.stem),
        base=base,
        rows=rows,
        seeds=seeds,
        budget=budget,
        evaluation=evaluation,
        include_base=include_base,
        reference=reference,
        contrasts=contrasts,
        primary=primary,
        source=str(path),
        declared_seeds=declared_seeds,
    )
    if not spec.rows and not spec.include_base:
        raise ValueError(f"study file {path}: no rows to run")
    expand_cells(spec)  # validates every cell before anything runs
    return spec


def _primary(item: Any, names: list[str], budget: Budget, evaluation: EvalSpec, path: Path) -> Primary | None:
    """Validate ``primary`` against every row of the file, the evaluated settings, the budget arms and the kind's
    interval metrics; errors name the key. (``--only`` may filter its rows out: the report then says so.)"""
    if item is None:
        return None
    where = f"study file {path}: primary"
    if not isinstance(item, dict):
        raise ValueError(f"{where} must be a mapping {{row, against, setting, arm[, metric]}}, got {item!r}")
    unknown = set(item) - {"row", "against", "setting", "arm", "metric"}
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: row, against, setting, arm, metric)"
        )
    for key in ("row", "against", "setting", "arm"):
        if not isinstance(item.get(key), str):
            raise ValueError(f"{where}.{key} is required (a string), got {item.get(key)!r}")
    for key in ("row", "against"):
        if item[key] not in names:
            raise ValueError(f"{where}.{key}: unknown row {item[key]!r} (rows: {', '.join(names)})")
    if item["row"] == item["against"]:
        raise ValueError(f"{where}: row and against are the same row {item['row']!r}")
    settings = [setting_key(n, w) for n, w in evaluation.settings]
    if item["setting"] not in settings:
        raise ValueError(f"{where}.setting: {item['setting']!r} is not evaluated (settings: {', '.join(settings)})")
    if item["arm"] not in budget.arms:
        raise ValueError(f"{where}.arm: {item['arm']!r} is not a budget arm (arms: {', '.join(budget.arms)})")
    metrics = INTERVAL_METRICS[evaluation.kind]
    metric = item.get("metric")
    if metric is not None and metric not in metrics:
        raise ValueError(
            f"{where}.metric: {metric!r} has no interval for kind {evaluation.kind!r} (metrics: {', '.join(metrics)})"
        )
    return Primary(item["row"], item["against"], item["setting"], item["arm"], metric)


def _contrasts(items: Any, names: list[str], kept: list[str], path: Path) -> list[tuple[str, str]]:
    """Validate `contrasts` ([row, against] pairs) against every row of the file; keep the pairs whose two rows
    both run (``--only`` may filter one out, as it may the reference)."""
    if not isinstance(items, list):
        raise ValueError(f"study file {path}: 'contrasts' must be a list of [row, against] pairs")
    out = []
    for item in items:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(n, str) for n in item)):
            raise ValueError(f"study file {path}: contrast {item!r} must be a pair [row, against]")
        for n in item:
            if n not in names:
                raise ValueError(
                    f"study file {path}: contrast {list(item)} names unknown row {n!r} (rows: {', '.join(names)})"
                )
        if item[0] == item[1]:
            raise ValueError(f"study file {path}: contrast {list(item)} compares a row with itself")
        if item[0] in kept and item[1] in kept:
            out.append((item[0], item[1]))
    return out


def _expand_rows(items: list, path: Path) -> list[Row]:
    rows: list[Row] = []
    if not isinstance(items, list):
        raise ValueError(f"study file {path}: 'rows' must be a list")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "name" not in item:
            raise ValueError(f"study file {path}: rows[{i}] must be a mapping with a 'name'")
        bad = set(item) - {"name", "set", "sweep", "sweep_mode", "init_from_row", "init_from_arm"}
        if bad:
            raise ValueError(
                f"study row '{item['name']}': unknown key(s) {', '.join(sorted(bad))} "
                "(known: name, set, sweep, sweep_mode, init_from_row, init_from_arm)"
            )
        chain = {"init_from_row": item.get("init_from_row"), "init_from_arm": item.get("init_from_arm")}
        base_set = dict(item.get("set") or {})
        sweep = dict(item.get("sweep") or {})
        mode = item.get("sweep_mode", "product")
        if mode not in ("product", "one_at_a_time"):
            raise ValueError(f"study row '{item['name']}': sweep_mode must be 'product' or 'one_at_a_time'")
        if not sweep:
            rows.append(Row(str(item["name"]), base_set, **chain))
            continue
        for key, values in sweep.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"study row '{item['name']}': sweep.{key} must be a non-empty list")
        if mode == "product":
            points = [dict(zip(sweep, combo)) for combo in itertools.product(*sweep.values())]
        else:  # vary one key at a time around `set`
            points = [{k: v} for k, vals in sweep.items() for v in vals]
        for point in points:
            label = ",".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())
            rows.append(Row(f"{item['name']}[{label}]", {**base_set, **point}, **chain))
    seen = set()
    for r in rows:
        if r.name in seen or r.name == BASE_ROW:
            raise ValueError(f"study file {path}: duplicate row name {r.name!r}")
        seen.add(r.name)
    return rows


def _check_chains(rows: list[Row], budget: Budget, path: Path) -> None:
    """init_from_row names an earlier, unchained row; init_from_arm (default: the wall-clock arm if any) is an arm."""
    earlier: dict[str, Row] = {}
    for r in rows:
        if r.init_from_row is None:
            if r.init_from_arm is not None:
                raise ValueError(f"study row '{r.name}': init_from_arm needs init_from_row")
        else:
            src = earlier.get(r.init_from_row)
            if src is None:
                raise ValueError(
                    f"study row '{r.name}': init_from_row {r.init_from_row!r} must name a row listed "
                    f"before it (rows: {', '.join(x.name for x in rows)})"
                )
            if src.init_from_row is not None:
                raise ValueError(
                    f"study row '{r.name}': init_from_row {src.name!r} is itself chained; chain from an unchained row"
                )
            r.init_from_arm = r.init_from_arm or budget.arms[-1]
            if r.init_from_arm not in budget.arms:
                raise ValueError(
                    f"study row '{r.name}': init_from_arm must be one of {budget.arms}, got {r.init_from_arm!r}"
                )
        earlier[r.name] = r


def cell_config(spec: StudySpec, row: Row, seed: int) -> TrainConfig:
    """The validated training config of one cell (output_dir set later by the runner)."""
    fixed = {**CELL_FIXED, "seed": seed, "max_train_steps": spec.budget.train_steps}
    try:
        raw = with_overrides(spec.base, {**row.overrides, **fixed})
        return from_dict(TrainConfig, raw)
    except ValueError as err:
        raise ValueError(f"study row '{row.name}': {err}") from None


def expand_cells(spec: StudySpec) -> list[Cell]:
    """Every cell of the grid, each validated and hashed; the base row (if any) first."""
    cells = []
    if spec.include_base:
        # The base row is evaluated, never trained: its config is the base's (seed 0) for the model section only.
        cfg = cell_config(spec, Row(BASE_ROW, {}), 0)
        cells.append(Cell(BASE_ROW, None, _blank(cfg)))
    by_key: dict[tuple[str, int], Cell] = {}
    for row in spec.rows:
        for seed in spec.seeds:
            cell = Cell(row.name, seed, _blank(cell_config(spec, row, seed)))
            if row.init_from_row is not None:
                cell.init_from, cell.init_arm = by_key[(row.init_from_row, seed)], row.init_from_arm
            by_key[(row.name, seed)] = cell
            cells.append(cell)
    for c in cells:  # sources come first, so a chained cell's hash covers its source's
        c.hash = cell_hash(spec, c)
    return cells


def _blank(cfg: TrainConfig) -> dict:
    d = cfg.to_dict()
    d["output_dir"] = ""
    return d


def _base_model_fingerprint(config: dict) -> str:
    """Content hash of the shapes task's starting checkpoint (so replacing the shipped base invalidates the cache);
    for other tasks the model section itself is the fingerprint."""
    if config.get("task") == "shapes":
        from ..models.embedded import resolve_checkpoint

        pretrained = (config.get("model") or {}).get("pretrained", "base")
        if pretrained is not None:
            p = resolve_checkpoint(pretrained)
            if p.is_file():
                return hashlib.sha256(p.read_bytes()).hexdigest()
    return ""


_FINGERPRINTS: dict[str, str] = {}


# Config keys added after cell hashes were first committed (format 1), with the value that reproduces what cells
# did before the key existed. At that value a key is left out of a cell's identity, so adding a key does not
# invalidate every cached and committed cell; any other value is part of the identity. A new training-config key
# belongs here (tests/study/test_spec.py pins a reference hash).
NEUTRAL_LATER_KEYS: dict[str, Any] = {
    "checkpoint_model": True,  # checkpoints also hold a loadable model (exports only)
    "ema_device": "accelerator",  # where the EMA shadow lives (same numbers)
}


def identity_config(config: dict) -> dict:
    """The cell config as its identity (hash and cache check): keys of :data:`NEUTRAL_LATER_KEYS` at their
    neutral values are left out. ``soar.reuse_main_output`` only picks the forward layout (the same loss and
    gradients; tests/core/test_objective.py), and its default ``auto`` resolves by device type at run time; it
    counts as ``true``, the value the key had before ``auto`` existed, so cells cached before stay valid and a cell
    is the same cell on a CPU and on a GPU (as it always was: the device is not part of a cell's identity
    either)."""
    out = copy.deepcopy(config)
    for dotted, neutral in NEUTRAL_LATER_KEYS.items():
        *parents, leaf = dotted.split(".")
        section = out
        for p in parents:
            section = section.get(p) if isinstance(section, dict) else None
        if isinstance(section, dict) and leaf in section and section[leaf] == neutral:
            del section[leaf]
    soar = out.get("soar")
    if isinstance(soar, dict) and soar.get("reuse_main_output") == "auto":
        soar["reuse_main_output"] = True
    return out


def cell_hash(spec: StudySpec, cell: Cell) -> str:
    """sha256 (16 hex) of everything that defines a cell's result: training config (or, for the base row, only
    the task/model/data), budget, evaluation, base checkpoint content."""
    cfg = identity_config(cell.config)
    if cell.row == BASE_ROW:
        cfg = {k: cfg[k] for k in ("task", "model", "data")}
        budget = None
    else:
        budget = asdict(spec.budget)
    key = json.dumps(cfg, sort_keys=True, default=str)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = _base_model_fingerprint(cfg)
    payload = {
        "config": cfg,
        "budget": budget,
        "evaluation": asdict(spec.evaluation),
        "base_model": _FINGERPRINTS[key],
        "format": 1,
    }
    if cfg.get("use_ema"):  # EMA cells are evaluated on their EMA weights since 2026-12-06 (before: the raw ones)
        payload["evaluated_on"] = "ema"
    if cell.init_from is not None:  # only chained cells carry the key, so other hashes stay as they were
        payload["init_from"] = [cell.init_from.hash, cell.init_arm]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
