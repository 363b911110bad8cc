"""Several study cells at once (``soarflow study --jobs N``): each cell runs in its own spawned worker process.

* **CPU** (``--device cpu``): the usable cores (``os.sched_getaffinity``) are split into N disjoint groups, one per
  worker slot; a worker is pinned to its group (``os.sched_setaffinity``) and runs ``len(group)`` torch threads
  (``OMP_NUM_THREADS`` likewise). With N >= cores every worker gets one core and one thread (slot i: core
  i mod cores), so two cores run two cells without slowing each other; more jobs than cores share cores.
  The worker hides CUDA (``CUDA_VISIBLE_DEVICES=""``, ``ACCELERATE_USE_CPU``).
* **CUDA** (``--device cuda``): slot i uses visible GPU i mod GPUs; several workers share one GPU, each with its
  own process and CUDA context; each runs cores / N torch threads for its CPU-side work.

A worker builds the study's evaluator, runs the cell (:func:`soarflow.study.runner.execute_cell`, which writes
its result.json, and the committed copy with ``--cells_dir``) and exits. The parent starts a chained cell only
after its source cell finished. A worker that dies without a result (killed, out of memory) is recorded as a
failed cell. A stop signal (Ctrl-C, SIGTERM) stops every worker (SIGTERM; killed after a grace period) and
raises :class:`~soarflow.train.safety.Interrupted`; finished cells stay cached.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

from ..train.safety import EXIT_INTERRUPTED, Interrupted, StopSignals
from .spec import Cell, StudySpec

STOP_GRACE_SECONDS = 30.0
# exit statuses that mean "stopped by a signal", not "the cell failed"
INTERRUPTED_CODES = {EXIT_INTERRUPTED, -signal.SIGINT, -signal.SIGTERM, 128 + signal.SIGINT, 128 + signal.SIGTERM}


@dataclass(frozen=True)
class Slot:
    """Where one worker runs: ``cores`` it is pinned to (CPU; None: not pinned), torch ``threads``, and its
    ``gpu`` (the CUDA_VISIBLE_DEVICES entry; None on CPU)."""

    index: int
    threads: int
    cores: tuple[int, ...] | None = None
    gpu: str | None = None

    def describe(self) -> str:
        where = (
            f"gpu {self.gpu}"
            if self.gpu is not None
            else f"core{'s' * (len(self.cores or ()) > 1)} " + ",".join(map(str, self.cores or ()))
        )
        return f"worker {self.index} ({where}, {self.threads} thread{'s' * (self.threads > 1)})"


def usable_cores() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def visible_gpus() -> list[str]:
    """The CUDA_VISIBLE_DEVICES entries a worker may be given (all of torch's devices when unset)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None and env.strip():
        return [g.strip() for g in env.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(max(torch.cuda.device_count(), 1))]


def plan_slots(jobs: int, device: str, cores: list[int] | None = None) -> list[Slot]:
    """One :class:`Slot` per job (module docstring)."""
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    cores = cores if cores is not None else usable_cores()
    if device == "cuda":
        gpus = visible_gpus()
        threads = max(1, len(cores) // jobs)
        return [Slot(i, threads, None, gpus[i % len(gpus)]) for i in range(jobs)]
    if device != "cpu":
        raise ValueError(f"--device must be 'cpu' or 'cuda', got {device!r}")
    if jobs >= len(cores):
        return [Slot(i, 1, (cores[i % len(cores)],)) for i in range(jobs)]
    size = len(cores) // jobs
    return [Slot(i, size, tuple(cores[i * size : (i + 1) * size])) for i in range(jobs)]


@dataclass
class CellJob:
    """Everything a worker needs (pickled into the spawned process)."""

    spec: StudySpec
    cell: Cell
    out: Path
    cells_dir: Path | None
    device: str
    slot: Slot
    keep_models: bool
    save_arms: frozenset[str]
    run_info: dict
    prefix: str
    first_config: dict
    quiet: bool = False


def _setup_process(device: str, slot: Slot) -> None:
    """Threads, core pinning and device visibility of a worker; before anything touches CUDA."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(slot.threads)
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["ACCELERATE_USE_CPU"] = "true"
    elif slot.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot.gpu
    if slot.cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(slot.cores))
    import torch

    torch.set_num_threads(slot.threads)


def cell_worker(job: CellJob) -> None:
    """Entry point of a spawned worker: one cell, then exit (0: a result.json was written; EXIT_INTERRUPTED: stopped
    by a signal)."""
    _setup_process(job.device, job.slot)
    from .runner import execute_cell

    def log(msg: str) -> None:
        if not job.quiet:
            print(f"{job.prefix}: {msg}", file=sys.stderr, flush=True)

    try:
        execute_cell(
            job.spec,
            job.cell,
            job.out,
            None,
            log,
            keep_models=job.keep_models,
            save_arms=job.save_arms,
            cells_dir=job.cells_dir,
            device=job.device,
            run_info=job.run_info,
            first_config=job.first_config,
        )
    except (Interrupted, KeyboardInterrupt):
        sys.exit(EXIT_INTERRUPTED)


def run_parallel(
    spec: StudySpec,
    cells: list[Cell],
    out: Path,
    *,
    device: str,
    jobs: int,
    cells_dir: Path | None,
    keep_models: bool,
    save_arms: dict[str, set[str]],
    run_info: dict,
    first_config: dict,
    may_start: Callable[[Cell], bool],
    on_start: Callable[[Cell, Slot], str],
    on_finish: Callable[[Cell, dict], None],
    log: Callable[[str], None],
    quiet: bool = False,
) -> None:
    """Run `cells` on `jobs` worker processes (module docstring). ``may_start(cell)``: False leaves the cell
    pending (the study's time guard); ``on_start`` returns the cell's log prefix; ``on_finish(cell, record)``
    gets every finished or failed record. Cells never started (time guard, or a source that never ran) are
    simply not reported."""
    from .runner import RESULT, cell_dir, failed_record, read_result, write_json

    ctx = multiprocessing.get_context("spawn")
    free = plan_slots(jobs, device)
    queue = list(cells)
    waiting_on = {c.hash for c in cells}  # not finished yet (chained cells wait for their source)
    running: dict[int, tuple] = {}  # sentinel -> (process, cell, slot)

    def stop_all(reason: str) -> None:
        log(f"[study {spec.name}] {reason}: stopping {len(running)} running cell(s); finished cells are kept")
        for proc, _, _ in running.values():
            if proc.is_alive():
                proc.terminate()
        end = time.monotonic() + STOP_GRACE_SECONDS
        for proc, _, _ in running.values():
            proc.join(max(0.0, end - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        running.clear()

    try:
        with StopSignals() as signals:
            while queue or running:
                if signals.received:
                    stop_all(f"stopped by {signals.received}")
                    raise Interrupted(f"stopped by {signals.received}", 0, None, signals.received)
                for cell in list(queue):
                    if not free:
                        break
                    if cell.init_from is not None and cell.init_from.hash in waiting_on:
                        continue
                    queue.remove(cell)
                    if not may_start(cell):
                        continue
                    slot = free.pop(0)
                    stale = cell_dir(out, cell) / RESULT
                    stale.unlink(missing_ok=True)  # a failed earlier attempt: the worker writes a fresh one
                    job = CellJob(
                        spec,
                        cell,
                        out,
                        cells_dir,
                        device,
                        slot,
                        keep_models,
                        frozenset(save_arms.get(cell.hash, ())),
                        run_info,
                        on_start(cell, slot),
                        first_config,
                        quiet,
                    )
                    proc = ctx.Process(target=cell_worker, args=(job,), name=f"soarflow-cell-{cell.hash}")
                    proc.start()
                    running[proc.sentinel] = (proc, cell, slot)
                if not running:
                    break  # what is left waits on a source that will not run (time guard)
                for sentinel in wait(list(running), timeout=1.0):
                    if signals.received:
                        break  # a Ctrl-C reached the workers too: do not record their exits as failures
                    proc, cell, slot = running.pop(sentinel)
                    proc.join()
                    free.append(slot)
                    free.sort(key=lambda s: s.index)
                    record = read_result(out, cell)
                    if record is None:
                        if proc.exitcode in INTERRUPTED_CODES:
                            stop_all(f"cell {cell.label} was stopped by a signal (exit {proc.exitcode})")
                            raise Interrupted(f"cell {cell.label} was stopped by a signal", 0, None, "SIGTERM")
                        record = failed_record(
                            cell,
                            f"worker process exited with code {proc.exitcode} "
                            f"without a result (killed? out of memory?)",
                            run_info,
                        )
                        write_json(cell_dir(out, cell) / RESULT, record)
                    waiting_on.discard(cell.hash)
                    on_finish(cell, record)
    finally:
        for proc, _, _ in list(running.values()):  # an error in the parent: leave no worker behind
            if proc.is_alive():
                proc.kill()
            proc.join()
