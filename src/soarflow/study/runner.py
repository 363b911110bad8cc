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
* ``cells_dir`` (:mod:`soarflow.study.cache`): every finished cell is also written there in a compact form, and a
  cell found there (same hash and config) is reused: a committed cache that survives a fresh machine. Weights and
  run folders stay in ``<output_dir>``.
* ``device``: ``cpu`` or ``cuda`` (train and evaluate there). A cell's hash covers the device when it is not the
  CPU (its wall-clock arm and its arithmetic depend on it), so CPU and GPU cells never mix in one report.
* ``jobs`` > 1 (:mod:`soarflow.study.parallel`): that many cells at once, each in its own worker process.
* ``max_seconds``: no cell starts after the study has run this long (nor one predicted to end after it: by the
  last finished cell of its row here, else the ``--estimate`` prediction, else the slowest cell so far); cells
  already running finish, the rest stay pending for the next invocation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from ..train.safety import Interrupted
from .cache import load_committed, write_committed
from .spec import BASE_ROW, Cell, StudySpec, expand_cells, identity_config

RESULT = "result.json"
DEVICES = ("cpu", "cuda")


class DeviceUnavailable(RuntimeError):
    """The requested device cannot run the cells that need running (e.g. --device cuda without a GPU)."""


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


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def read_result(out: Path, cell: Cell) -> dict | None:
    """The record a worker wrote for `cell` (finished or failed), or None if there is none for this hash."""
    try:
        record = json.loads((cell_dir(out, cell) / RESULT).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("hash") == cell.hash else None


def device_hashes(cells: list[Cell], device: str) -> None:
    """Make each cell's hash cover the device (in place) when it is not the CPU; CPU hashes stay as they were."""
    if device == "cpu":
        return
    for c in cells:
        c.hash = hashlib.sha256(f"{c.hash}:{device}".encode()).hexdigest()[:16]


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

    def __init__(
        self,
        spec: StudySpec,
        evaluator,
        counter: ForwardCounter,
        images_per_step: int,
        progress: Callable[[str], None],
        save: Callable[[str, Any], None] | None = None,
    ):
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
            "step": step,
            "train_seconds": round(clock, 3),
            "capped": capped,
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


def run_cell(
    spec: StudySpec,
    cell: Cell,
    out: Path,
    evaluator,
    progress: Callable[[str], None],
    keep_models: bool = False,
    save_arms: frozenset[str] = frozenset(),
    device: str = "cpu",
) -> dict:
    """Train (unless base) and evaluate one cell on `device`; returns its result record (status ok).
    ``save_arms``: arms whose weights a chained row starts from (written to cells/<hash>/weights_<arm>).
    The trainer's accelerator picks the device (the runner hides CUDA for ``cpu``); the result is checked."""
    from accelerate.utils import set_seed

    from ..train import TrainConfig, build_task, train

    cdir = cell_dir(out, cell)
    extra = {}
    if cell.init_from is not None:
        source = weights_path(out, cell.init_from, cell.init_arm)
        if source is None:
            raise FileNotFoundError(
                f"cell {cell.init_from.label} saved no {cell.init_arm}-arm weights to start from (did it fail?)"
            )
        extra["init_from"] = str(source)
    cfg = TrainConfig.from_dict({**cell.config, "output_dir": str(cdir / "run"), **extra})
    t0 = time.perf_counter()
    task = build_task(cfg)
    if cell.row == BASE_ROW:
        model = task.build_model().float().eval().to(device)
        counter = ForwardCounter(model)
        counter.active = False
        run = CellRun(spec, evaluator, counter, 1, progress)
        run.record_arm("steps", 0, model)
        for arm in spec.budget.arms:
            run.arms[arm] = {**run.arms["steps"], "train_seconds": 0.0}
        counter.handle.remove()
        return {
            "arms": run.arms,
            "curve": [{"step": 0, "train_seconds": 0.0, "value": run._evaluate(evaluator.curve, model)}],
            "wall_seconds": round(time.perf_counter() - t0, 2),
        }
    if (cdir / "run").exists():
        shutil.rmtree(cdir / "run")  # an interrupted attempt: start the cell over
    set_seed(cfg.seed)  # as train() does before building the model
    model = task.build_model()
    counter = ForwardCounter(model)

    def save(arm: str, m) -> None:
        if arm in save_arms:
            task.save_model(getattr(m, "module", m), cdir / f"weights_{arm}")

    run = CellRun(
        spec,
        evaluator,
        counter,
        cfg.train_batch_size * cfg.gradient_accumulation_steps,
        progress,
        save=save if save_arms else None,
    )
    try:
        result = train(cfg, task, model, step_callback=run)
    finally:
        counter.handle.remove()
    trained = result.model
    where = next(trained.parameters()).device.type
    if where != device:
        raise DeviceUnavailable(
            f"cell {cell.label} trained on {where}, not on the requested device {device!r} "
            f"(accelerate chose it; is ACCELERATE_USE_CPU or CUDA_VISIBLE_DEVICES set?)"
        )
    for arm in spec.budget.arms:  # the step cap ended training before this arm's budget
        if arm not in run.arms:
            run.record_arm(arm, result.global_step, trained, capped=True)
    if not keep_models and (cdir / "run").exists():
        shutil.rmtree(cdir / "run")
    return {
        "arms": run.arms,
        "curve": run.curve,
        "steps_trained": result.global_step,
        "history": result.history,
        "wall_seconds": round(time.perf_counter() - t0, 2),
    }


# ---------------------------------------------------------------------------------------------- estimate
def cell_seconds(spec: StudySpec, timing: dict) -> float:
    """Predicted wall-clock of one trained cell from per-row timings (step, setup, evaluation, curve seconds)."""
    b, ev = spec.budget, spec.evaluation
    steps_needed = max(b.steps or 0, math.ceil((b.seconds or 0) / max(timing["step"], 1e-6)))
    steps_needed = min(steps_needed, b.max_steps)
    curves = steps_needed // ev.every_steps if ev.every_steps else 0
    return timing["setup"] + steps_needed * timing["step"] + len(b.arms) * timing["eval"] + curves * timing["curve"]


def calibrate(
    spec: StudySpec, cells: list[Cell], out: Path, evaluator, done: dict[str, dict], log: Callable[[str], None]
) -> dict[str, dict]:
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
            timings[c.row] = {
                "step": last["train_seconds"] / max(last["step"], 1),
                "setup": 0.0,
                "eval": metric_s,
                "curve": 0.0,
                "source": "finished cell",
            }
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
        timings[c.row] = {
            "step": step,
            "setup": max(setup, 0.0),
            "eval": eval_s,
            "curve": curve_s or 0.0,
            "source": "3-step probe",
        }
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


def failed_record(cell: Cell, error: str, run_info: dict | None = None, tb: str | None = None) -> dict:
    record = {
        "row": cell.row,
        "seed": cell.seed,
        "hash": cell.hash,
        "config": cell.config,
        "status": "failed",
        "error": error,
    }
    if tb:
        record["traceback"] = tb
    if run_info:
        record["run"] = run_info
    return record


def build_study_evaluator(spec: StudySpec, first_config: dict, out: Path):
    """The study's evaluator (the same for every cell; kind ``loss`` reads the first cell's task's data)."""
    from ..train import TrainConfig, build_task
    from .evaluate import build_evaluator

    first = TrainConfig.from_dict({**first_config, "output_dir": str(out / "tmp")})
    return build_evaluator(spec.evaluation, build_task(first) if spec.evaluation.kind == "loss" else None)


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    import platform

    return platform.processor() or platform.machine()


def execute_cell(
    spec: StudySpec,
    cell: Cell,
    out: Path,
    evaluator,
    log: Callable[[str], None],
    *,
    keep_models: bool = False,
    save_arms: frozenset[str] = frozenset(),
    cells_dir: Path | None = None,
    device: str = "cpu",
    run_info: dict | None = None,
    first_config: dict | None = None,
) -> dict:
    """Run one cell and record it, finished or failed, in ``<out>/cells/<hash>/result.json`` (and, finished, in
    `cells_dir`); returns the record. `evaluator` None: built here. A signal (Interrupted) records nothing."""
    record: dict[str, Any] = {"row": cell.row, "seed": cell.seed, "hash": cell.hash, "config": cell.config}
    run = {**(run_info or {}), "device": device}
    try:
        run.update(device_name=_device_name(device), threads=torch.get_num_threads())
        if evaluator is None:
            evaluator = build_study_evaluator(spec, first_config or cell.config, out)
        record.update(run_cell(spec, cell, out, evaluator, log, keep_models, save_arms, device=device))
        if cell.init_from is not None:
            record["init_from"] = {"row": cell.init_from.row, "arm": cell.init_arm}
        record["status"] = "ok"
    except Interrupted:  # SIGTERM / Ctrl-C stop the whole study, not just this cell; the cell reruns next time
        log("stopped by a signal; rerun the same command to continue")
        raise
    except Exception as err:  # a crashing cell is recorded and the study goes on
        record.update(status="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        log(f"FAILED: {type(err).__name__}: {err}")
    record["run"] = run
    write_json(cell_dir(out, cell) / RESULT, record)
    if cells_dir is not None and record["status"] == "ok":
        write_committed(cells_dir, record)
    return record


class _DeviceEnv:
    """In-process cells on the CPU: make accelerate pick the CPU even where a GPU is visible (restored after)."""

    def __init__(self, device: str):
        self.device, self.previous = device, None

    def __enter__(self):
        if self.device == "cpu":
            self.previous = os.environ.get("ACCELERATE_USE_CPU")
            os.environ["ACCELERATE_USE_CPU"] = "true"
        return self

    def __exit__(self, *exc):
        if self.device == "cpu":
            if self.previous is None:
                os.environ.pop("ACCELERATE_USE_CPU", None)
            else:
                os.environ["ACCELERATE_USE_CPU"] = self.previous


def run_study(
    spec: StudySpec,
    out: Path,
    *,
    estimate: bool = True,
    estimate_only: bool = False,
    keep_models: bool = False,
    log: Callable[[str], None] | None = None,
    device: str = "cpu",
    jobs: int = 1,
    cells_dir: Path | None = None,
    max_seconds: float | None = None,
    quiet_workers: bool = False,
) -> list[dict]:
    """Run every pending cell (cache, devices, jobs, time guard: module docstring) and return all cell records:
    finished, failed, and (time guard) ``status: pending``."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
    started = time.perf_counter()
    cells = expand_cells(spec)
    device_hashes(cells, device)
    out.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    from_dir = 0
    for c in cells:
        r = load_cached(out, c)
        if r is not None and cells_dir is not None and load_committed(cells_dir, c.hash, c.config) is None:
            write_committed(cells_dir, r)  # finished before --cells_dir was given: committed now
        if r is None and (r := load_committed(cells_dir, c.hash, c.config)) is not None:
            from_dir += 1
        if r is not None:
            done[c.hash] = r
    save_arms: dict[str, set[str]] = {}
    for c in cells:
        if c.init_from is not None:
            save_arms.setdefault(c.init_from.hash, set()).add(c.init_arm)
            if c.hash not in done and weights_path(out, c.init_from, c.init_arm) is None:
                done.pop(c.init_from.hash, None)  # a cached source without its weights reruns first
    # seed-major (base, then every row of seed 0, then seed 1, ...): a run cut short by --max_seconds leaves whole
    # seeds, from which `--seeds` makes an interim report; a chained cell still follows its source (same seed)
    rank = {id(c): i for i, c in enumerate(cells)}
    pending = sorted(
        (c for c in cells if c.hash not in done), key=lambda c: (c.seed is not None, c.seed or 0, rank[id(c)])
    )
    num_cached = len(done)
    log(
        f"[study {spec.name}] {len(cells)} cells ({len(done)} cached"
        + (f", {from_dir} of them from {cells_dir}" if from_dir else "")
        + f", {len(pending)} to run) -> {out}"
        + (f" on {device}, {jobs} at once" if pending else "")
    )
    if pending and device == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"--device cuda: no CUDA device is visible (torch.cuda.is_available() is False) and "
            f"{len(pending)} cell(s) must run; finished cells need no device"
        )

    evaluator = None

    def get_evaluator():
        nonlocal evaluator
        if evaluator is None:
            evaluator = build_study_evaluator(spec, cells[0].config, out)
        return evaluator

    predicted: dict[str, float] = {}
    with _DeviceEnv(device):
        if pending and (estimate or estimate_only):
            log(f"[study {spec.name}] estimating: timing each row (finished cells or a 3-step probe)")
            timings = calibrate(spec, cells, out, get_evaluator(), done, log)
            base_eval = next(iter(timings.values()))["eval"] if timings else 0.0
            for c in pending:
                predicted[c.hash] = base_eval if c.row == BASE_ROW else cell_seconds(spec, timings[c.row])
            total = sum(predicted.values())
            log(
                f"[study {spec.name}] estimated total for {len(pending)} cells: {_fmt_s(total)}"
                + (f" of cell time, about {_fmt_s(total / jobs)} with {jobs} at once" if jobs > 1 else "")
                + " (per cell: "
                + ", ".join(f"{r} {_fmt_s(cell_seconds(spec, t))}" for r, t in timings.items())
                + ")"
            )
            if estimate_only:
                return [
                    done.get(c.hash)
                    or {
                        "row": c.row,
                        "seed": c.seed,
                        "hash": c.hash,
                        "status": "pending",
                        "estimated_seconds": predicted.get(c.hash),
                    }
                    for c in cells
                ]

    loop_start = time.perf_counter()
    failed: dict[str, dict] = {}
    observed: dict[str, float] = {}  # row -> wall seconds of its last cell finished here (contention included)
    not_started: set[str] = set()
    run_info = {"jobs": jobs}

    def may_start(cell: Cell) -> bool:
        if cell.init_from is not None and cell.init_from.hash in not_started:
            not_started.add(cell.hash)
            return False
        if max_seconds is None:
            return True
        elapsed = time.perf_counter() - started
        # a row not timed yet (no cell of it finished here, no --estimate) may be the slowest: assume the slowest
        # cell so far rather than 0, or a cell of hours starts just before the deadline
        need = observed.get(cell.row, predicted.get(cell.hash, max(observed.values(), default=0.0)))
        if elapsed + need > max_seconds:
            log(
                f"[study {spec.name}] --max_seconds {max_seconds:g}: not starting {cell.label} ({_fmt_s(elapsed)} "
                f"elapsed, {_fmt_s(need)} needed); it stays pending"
            )
            not_started.add(cell.hash)
            return False
        return True

    def progress_prefix(cell: Cell, where: str = "") -> str:
        finished = len(done) + len(failed) - num_cached
        left = [c for c in pending if c.hash not in done and c.hash not in failed]
        if predicted:
            eta = _fmt_s(sum(predicted.get(c.hash, 0.0) for c in left) / jobs)
        elif finished:
            eta = _fmt_s((time.perf_counter() - loop_start) / finished * len(left))
        else:
            eta = "?"
        return (
            f"[study {spec.name}] {len(done) + len(failed)}/{len(cells)} cells done, ETA {eta}, now: "
            f"{cell.label}{where}"
        )

    def finish(cell: Cell, record: dict) -> None:
        (done if record.get("status") == "ok" else failed)[cell.hash] = record
        if record.get("wall_seconds") is not None:
            observed[cell.row] = float(record["wall_seconds"])
        if jobs > 1:
            log(
                f"[study {spec.name}] {cell.label}: {record.get('status')}"
                + (f" ({record['error']})" if record.get("error") else "")
                + f"; {len(done) + len(failed)}/{len(cells)} cells done"
            )

    if jobs == 1:
        with _DeviceEnv(device):
            for cell in pending:
                if not may_start(cell):
                    continue
                prefix = progress_prefix(cell)
                log(prefix)
                finish(
                    cell,
                    execute_cell(
                        spec,
                        cell,
                        out,
                        get_evaluator(),
                        lambda msg, p=prefix: log(f"{p}: {msg}"),
                        keep_models=keep_models,
                        save_arms=frozenset(save_arms.get(cell.hash, ())),
                        cells_dir=cells_dir,
                        device=device,
                        run_info=run_info,
                    ),
                )
    else:
        from .parallel import run_parallel

        run_parallel(
            spec,
            pending,
            out,
            device=device,
            jobs=jobs,
            cells_dir=cells_dir,
            keep_models=keep_models,
            save_arms=save_arms,
            run_info=run_info,
            first_config=cells[0].config,
            may_start=may_start,
            on_start=lambda cell, slot: _logged(
                log,
                progress_prefix(cell, f" on {slot.describe()}"),
                f"[study {spec.name}] {cell.label} ({slot.describe()})",
            ),
            on_finish=finish,
            log=log,
            quiet=quiet_workers,
        )
    left = [c for c in pending if c.hash not in done and c.hash not in failed]
    log(
        f"[study {spec.name}] {len(cells) - len(left)}/{len(cells)} cells done in "
        f"{_fmt_s(time.perf_counter() - loop_start)}"
        + (f" ({len(failed)} failed)" if failed else "")
        + (f"; {len(left)} pending (--max_seconds {max_seconds:g}): rerun the same command to continue" if left else "")
    )
    return [
        done.get(c.hash) or failed.get(c.hash) or {"row": c.row, "seed": c.seed, "hash": c.hash, "status": "pending"}
        for c in cells
    ]


def _logged(log: Callable[[str], None], msg: str, prefix: str) -> str:
    """Log a worker's start line; return the shorter prefix of its own progress lines."""
    log(msg)
    return prefix


def run_configurations(records: list[dict]) -> str:
    """How the finished cells were run, e.g. ``cuda (NVIDIA H100) x 8 jobs: 40 cells; cpu x 1 job: 2 cells``
    (wall-clock arms compare only within one such configuration)."""
    from collections import Counter

    counts: Counter = Counter()
    for r in records:
        if r.get("status") != "ok":
            continue
        run = r.get("run") or {}
        if "device" not in run:
            counts["not recorded"] += 1
            continue
        name = f" ({run['device_name']})" if run.get("device_name") else ""
        jobs = run.get("jobs", 1)
        counts[f"{run['device']}{name} x {jobs} job{'s' * (jobs != 1)}"] += 1
    return "; ".join(f"{k}: {n} cell{'s' * (n != 1)}" for k, n in counts.items())


def spec_record(spec: StudySpec) -> dict:
    return {
        "name": spec.name,
        "source": spec.source,
        "seeds": spec.seeds,
        **({"declared_seeds": spec.declared_seeds} if spec.interim else {}),
        "budget": asdict(spec.budget),
        "evaluation": asdict(spec.evaluation),
        "reference": spec.reference,
        "include_base": spec.include_base,
        "contrasts": [list(c) for c in spec.contrasts],
        "rows": [asdict(r) for r in spec.rows],
        "base": spec.base,
    }
