"""Run a study's cells with a content-addressed cache: ``<output_dir>/cells/<hash>/result.json``.

* A cell whose result.json exists, finished ("ok") and records the same hash is reused; a result whose recorded
  hash differs is never reused (it is renamed ``result.mismatch.json`` and the cell reruns). Adding a row adds
  cells with new hashes: only those run. An interrupted cell (no result.json) restarts from its first step.
* A cell that raises is recorded with ``status: failed`` and its error, and the study goes on; failed cells are
  retried on the next invocation.
* Training clock: from the cell's first training forward pass, evaluation time excluded. A cell is evaluated
  when it reaches ``budget.steps`` (equal steps) and when its clock first reaches ``budget.seconds`` (equal
  wall-clock), and every ``evaluation.every_steps`` steps on the small curve set; it stops once both are done.
* Forward passes: a pre-forward hook on the trained model counts calls and rows during training only.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from ..train.safety import Interrupted
from .spec import BASE_ROW, Cell, StudySpec, expand_cells, identity_config

RESULT = "result.json"


# ---------------------------------------------------------------------------------------------- cache
def cell_dir(out: Path, cell: Cell) -> Path:
    return out / "cells" / cell.hash


def load_cached(out: Path, cell: Cell) -> dict | None:
    """The finished result of `cell`, or None (missing, failed, unreadable, or recorded under another hash)."""
    path = cell_dir(out, cell) / RESULT
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        result = {}
    if result.get("hash") != cell.hash or identity_config(result.get("config") or {}) != identity_config(cell.config):
        path.replace(path.with_name("result.mismatch.json"))  # kept for inspection, never reused
        return None
    return result if result.get("status") == "ok" else None


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------- one cell
class ForwardCounter:
    """Counts the model's forward calls and rows (batch entries) while `active`."""

    def __init__(self, model: torch.nn.Module):
        self.calls = 0
        self.rows = 0
        self.active = True
        self.first_call: float | None = None
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        if not self.active:
            return
        if self.first_call is None:
            self.first_call = time.perf_counter()
        self.calls += 1
        if args and torch.is_tensor(args[0]):
            self.rows += int(args[0].shape[0])


def weights_path(out: Path, cell: Cell, arm: str) -> Path | None:
    """The weights a chained cell starts from (saved by `cell` at its `arm` evaluation), or None if absent."""
    stem = cell_dir(out, cell) / f"weights_{arm}"
    return next((p for p in (stem, stem.with_suffix(".safetensors")) if p.exists()), None)


class CellRun:
    """The step callback of one training run: curve points, budget evaluations, stop decision."""

    def __init__(self, spec: StudySpec, evaluator, counter: ForwardCounter, images_per_step: int,
                 progress: Callable[[str], None], save: Callable[[str, Any], None] | None = None):
        self.spec, self.evaluator, self.counter = spec, evaluator, counter
        self.save = save  # save(arm, model): weights a chained row starts from
        self.images_per_step = images_per_step
        self.progress = progress
        self.eval_seconds = 0.0
        self.arms: dict[str, dict] = {}
        self.curve: list[dict] = []
        self.last_step = 0

    def clock(self) -> float:
        start = self.counter.first_call
        return 0.0 if start is None else time.perf_counter() - start - self.eval_seconds

    def _evaluate(self, fn, model):
        self.counter.active = False
        t0 = time.perf_counter()
        was_training = model.training
        try:
            with torch.random.fork_rng(), torch.no_grad():
                model.eval()
                return fn(model)
        finally:
            model.train(was_training)
            self.eval_seconds += time.perf_counter() - t0
            self.counter.active = True

    def record_arm(self, arm: str, step: int, model, capped: bool = False) -> None:
        clock = self.clock()
        calls, rows = self.counter.calls, self.counter.rows
        metrics = self._evaluate(self.evaluator.full, model)
        self.arms[arm] = {
            "step": step, "train_seconds": round(clock, 3), "capped": capped,
            "forwards_per_step": calls / max(step, 1),
            "sample_forwards_per_image": rows / max(step * self.images_per_step, 1),
            "metrics": metrics,
        }
        if self.save is not None:
            self.save(arm, model)

    def __call__(self, step: int, model) -> bool:
        self.last_step = step
        b, ev = self.spec.budget, self.spec.evaluation
        if ev.every_steps and step % ev.every_steps == 0:
            clock = self.clock()
            value = self._evaluate(self.evaluator.curve, model)
            self.curve.append({"step": step, "train_seconds": round(clock, 3), "value": value})
        if b.steps is not None and step == b.steps:
            self.record_arm("steps", step, model)
        if b.seconds is not None and "seconds" not in self.arms and self.clock() >= b.seconds:
            self.record_arm("seconds", step, model)
        every = max(1, (b.steps or 50) // 5)
        if step % every == 0:
            self.progress(f"step {step}, train clock {self.clock():.0f}s")
        return not all(a in self.arms for a in b.arms)


def run_cell(spec: StudySpec, cell: Cell, out: Path, evaluator, progress: Callable[[str], None],
             keep_models: bool = False, save_arms: frozenset[str] = frozenset()) -> dict:
    """Train (unless base) and evaluate one cell; returns its result record (status ok). ``save_arms``: arms
    whose weights a chained row starts from (written to cells/<hash>/weights_<arm>)."""
    from accelerate.utils import set_seed

    from ..train import TrainConfig, build_task, train

    cdir = cell_dir(out, cell)
    extra = {}
    if cell.init_from is not None:
        source = weights_path(out, cell.init_from, cell.init_arm)
        if source is None:
            raise FileNotFoundError(f"cell {cell.init_from.label} saved no {cell.init_arm}-arm weights to start "
                                    f"from (did it fail?)")
        extra["init_from"] = str(source)
    cfg = TrainConfig.from_dict({**cell.config, "output_dir": str(cdir / "run"), **extra})
    t0 = time.perf_counter()
    task = build_task(cfg)
    if cell.row == BASE_ROW:
        model = task.build_model().float().eval()
        counter = ForwardCounter(model)
        counter.active = False
        run = CellRun(spec, evaluator, counter, 1, progress)
        run.record_arm("steps", 0, model)
        for arm in spec.budget.arms:
            run.arms[arm] = {**run.arms["steps"], "train_seconds": 0.0}
        counter.handle.remove()
        return {"arms": run.arms, "curve": [{"step": 0, "train_seconds": 0.0,
                                              "value": run._evaluate(evaluator.curve, model)}],
                "wall_seconds": round(time.perf_counter() - t0, 2)}
    if (cdir / "run").exists():
        shutil.rmtree(cdir / "run")  # an interrupted attempt: start the cell over
    set_seed(cfg.seed)  # as train() does before building the model
    model = task.build_model()
    counter = ForwardCounter(model)

    def save(arm: str, m) -> None:
        if arm in save_arms:
            task.save_model(getattr(m, "module", m), cdir / f"weights_{arm}")

    run = CellRun(spec, evaluator, counter, cfg.train_batch_size * cfg.gradient_accumulation_steps, progress,
                  save=save if save_arms else None)
    try:
        result = train(cfg, task, model, step_callback=run)
    finally:
        counter.handle.remove()
    trained = result.model
    for arm in spec.budget.arms:  # the step cap ended training before this arm's budget
        if arm not in run.arms:
            run.record_arm(arm, result.global_step, trained, capped=True)
    if not keep_models and (cdir / "run").exists():
        shutil.rmtree(cdir / "run")
    return {"arms": run.arms, "curve": run.curve, "steps_trained": result.global_step,
            "history": result.history, "wall_seconds": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------------------------------------- estimate
def cell_seconds(spec: StudySpec, timing: dict) -> float:
    """Predicted wall-clock of one trained cell from per-row timings (step, setup, evaluation, curve seconds)."""
    b, ev = spec.budget, spec.evaluation
    steps_needed = max(b.steps or 0, math.ceil((b.seconds or 0) / max(timing["step"], 1e-6)))
    steps_needed = min(steps_needed, b.max_steps)
    curves = steps_needed // ev.every_steps if ev.every_steps else 0
    return (timing["setup"] + steps_needed * timing["step"] + len(b.arms) * timing["eval"]
            + curves * timing["curve"])


def calibrate(spec: StudySpec, cells: list[Cell], out: Path, evaluator, done: dict[str, dict],
              log: Callable[[str], None]) -> dict[str, dict]:
    """Per-row timings: from a finished cell of the row when there is one, else a 3-step probe run.
    Evaluation cost: measured once on the first model (same cost for every cell)."""
    from accelerate.utils import set_seed

    from ..train import TrainConfig, build_task, train

    timings: dict[str, dict] = {}
    eval_s = curve_s = None
    for c in cells:
        r = done.get(c.hash)
        if r and c.row != BASE_ROW and c.row not in timings:
            arm = next(iter(r["arms"].values()))
            metric_s = sum(m.get("eval_seconds", 0) for m in arm["metrics"].values())
            last = max(r["arms"].values(), key=lambda a: a["step"])
            timings[c.row] = {"step": last["train_seconds"] / max(last["step"], 1), "setup": 0.0, "eval": metric_s,
                              "curve": 0.0, "source": "finished cell"}
            eval_s = eval_s or metric_s
    for c in cells:
        if c.row == BASE_ROW or c.row in timings:
            continue
        probe_dir = out / "calibration" / c.hash
        shutil.rmtree(probe_dir, ignore_errors=True)
        cfg = TrainConfig.from_dict({**c.config, "output_dir": str(probe_dir), "max_train_steps": 3})
        t0 = time.perf_counter()
        task = build_task(cfg)
        set_seed(cfg.seed)
        model = task.build_model()
        stamps: list[float] = []
        train(cfg, task, model, step_callback=lambda step, m: stamps.append(time.perf_counter()) or None)
        step = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
        setup = (stamps[0] - t0) - step
        if eval_s is None:
            e0 = time.perf_counter()
            with torch.no_grad():
                model.eval()
                evaluator.full(model)
                eval_s = time.perf_counter() - e0
                e0 = time.perf_counter()
                evaluator.curve(model)
                curve_s = time.perf_counter() - e0
        timings[c.row] = {"step": step, "setup": max(setup, 0.0), "eval": eval_s, "curve": curve_s or 0.0,
                          "source": "3-step probe"}
        shutil.rmtree(probe_dir, ignore_errors=True)
        log(f"  calibrated {c.row}: {step:.2f}s/step")
    for t in timings.values():
        t["eval"] = t["eval"] or (eval_s or 0.0)
        t["curve"] = t["curve"] or (curve_s or 0.0)
    shutil.rmtree(out / "calibration", ignore_errors=True)
    return timings


# ---------------------------------------------------------------------------------------------- study
def _fmt_s(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_study(spec: StudySpec, out: Path, *, estimate: bool = True, estimate_only: bool = False,
              keep_models: bool = False, log: Callable[[str], None] | None = None) -> list[dict]:
    """Run every pending cell (cache: module docstring) and return all cell records (finished and failed)."""
    from ..train import TrainConfig, build_task

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    cells = expand_cells(spec)
    out.mkdir(parents=True, exist_ok=True)
    done = {c.hash: r for c in cells if (r := load_cached(out, c)) is not None}
    save_arms: dict[str, set[str]] = {}
    for c in cells:
        if c.init_from is not None:
            save_arms.setdefault(c.init_from.hash, set()).add(c.init_arm)
            if c.hash not in done and weights_path(out, c.init_from, c.init_arm) is None:
                done.pop(c.init_from.hash, None)  # a cached source without its weights reruns first
    pending = [c for c in cells if c.hash not in done]
    num_cached = len(done)
    log(f"[study {spec.name}] {len(cells)} cells ({len(done)} cached, {len(pending)} to run) -> {out}")

    first = TrainConfig.from_dict({**cells[0].config, "output_dir": str(out / "tmp")})
    from .evaluate import build_evaluator

    evaluator = build_evaluator(spec.evaluation, build_task(first) if spec.evaluation.kind == "loss" else None)

    predicted: dict[str, float] = {}
    if pending and (estimate or estimate_only):
        log(f"[study {spec.name}] estimating: timing each row (finished cells or a 3-step probe)")
        timings = calibrate(spec, cells, out, evaluator, done, log)
        base_eval = next(iter(timings.values()))["eval"] if timings else 0.0
        for c in pending:
            predicted[c.hash] = base_eval if c.row == BASE_ROW else cell_seconds(spec, timings[c.row])
        total = sum(predicted.values())
        log(f"[study {spec.name}] estimated total for {len(pending)} cells: {_fmt_s(total)} "
            f"(per cell: " + ", ".join(f"{r} {_fmt_s(cell_seconds(spec, t))}" for r, t in timings.items()) + ")")
        if estimate_only:
            return [done.get(c.hash) or {"row": c.row, "seed": c.seed, "hash": c.hash, "status": "pending",
                                         "estimated_seconds": predicted.get(c.hash)} for c in cells]

    started = time.perf_counter()
    finished_here = 0
    failed: dict[str, dict] = {}
    for i, cell in enumerate(pending):
        remaining = sum(predicted.get(c.hash, 0.0) for c in pending[i:])
        if finished_here and not predicted:
            remaining = (time.perf_counter() - started) / finished_here * (len(pending) - i)
        eta = _fmt_s(remaining) if (predicted or finished_here) else "?"
        prefix = f"[study {spec.name}] {num_cached + i}/{len(cells)} cells done, ETA {eta}, now: {cell.label}"
        log(prefix)
        record = {"row": cell.row, "seed": cell.seed, "hash": cell.hash, "config": cell.config}
        try:
            record.update(run_cell(spec, cell, out, evaluator, lambda msg: log(f"{prefix}: {msg}"), keep_models,
                                   frozenset(save_arms.get(cell.hash, ()))))
            if cell.init_from is not None:
                record["init_from"] = {"row": cell.init_from.row, "arm": cell.init_arm}
            record["status"] = "ok"
        except Interrupted:  # SIGTERM / Ctrl-C stop the whole study, not just this cell; the cell reruns next time
            log(f"[study {spec.name}] stopped by a signal in cell {cell.label}; rerun the same command to continue")
            raise
        except Exception as err:  # a crashing cell is recorded and the study goes on
            record.update(status="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
            log(f"[study {spec.name}] cell {cell.label} FAILED: {type(err).__name__}: {err}")
        _write_json(cell_dir(out, cell) / RESULT, record)
        (done if record["status"] == "ok" else failed)[cell.hash] = record
        finished_here += 1
    log(f"[study {spec.name}] {len(cells)}/{len(cells)} cells done in {_fmt_s(time.perf_counter() - started)}"
        + (f" ({len(failed)} failed)" if failed else ""))
    return [done.get(c.hash) or failed[c.hash] for c in cells]


def spec_record(spec: StudySpec) -> dict:
    return {"name": spec.name, "source": spec.source, "seeds": spec.seeds, "budget": asdict(spec.budget),
            "evaluation": asdict(spec.evaluation), "reference": spec.reference, "include_base": spec.include_base,
            "contrasts": [list(c) for c in spec.contrasts], "rows": [asdict(r) for r in spec.rows], "base": spec.base}
