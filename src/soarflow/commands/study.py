"""`soarflow study --config configs/study_claim.yaml [--quick] [--only ROW ...] [--seeds S ...] [--output_dir DIR]
[--jobs N] [--device cpu|cuda] [--cells_dir DIR] [--max_seconds S]`."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soarflow study",
        description=(
            "Run a grid of training cells (rows x seeds) from one base, cached per cell, evaluated at equal steps and "
            "equal wall-clock; writes report.md, results.json and plots. See docs/study.md."
        ),
    )
    p.add_argument("--config", required=True, help="study YAML (configs/study_*.yaml)")
    p.add_argument("--output_dir", help="study folder (default runs/study_<name>[_quick]); rerunning continues it")
    p.add_argument("--quick", action="store_true", help="the study file's quick: section (few steps, seeds, images)")
    p.add_argument("--only", nargs="+", metavar="ROW", help="run only rows matching these names / glob patterns")
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        metavar="S",
        help="run and report only these of the file's seeds: an interim report (e.g. the seeds a run cut short by "
        "--max_seconds finished; cells keep their cache hashes)",
    )
    p.add_argument("--estimate_only", action="store_true", help="print the estimated wall-clock and stop")
    p.add_argument("--no_estimate", action="store_true", help="skip the timing probe before running")
    p.add_argument("--keep_models", action="store_true", help="keep each cell's trained weights")
    p.add_argument(
        "--num_resamples",
        type=int,
        default=2000,
        help="resamples of the primary contrast's bootstrap cross-check (default 2000)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="cells run at once, each in its own worker process (default 1: "
        "in this process); CPU: each worker pinned to its own core(s); CUDA: workers share the GPU",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where cells train and evaluate (default cpu); cuda cells have their own cache hashes",
    )
    p.add_argument(
        "--cells_dir",
        help="also keep every finished cell's compact result (no weights) here, e.g. "
        "docs/results/<study>/cells, and reuse cells found there: a cache to commit",
    )
    p.add_argument(
        "--max_seconds",
        type=float,
        help="start no cell after the study has run this long (nor one "
        "predicted to end after it); running cells finish; exit status 75 if cells are left",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    import torch

    from ..study.report import PER_IMAGE_FILE, aggregate, markdown, plots, save_per_image
    from ..study.runner import DeviceUnavailable, run_configurations, run_study, spec_record
    from ..study.spec import load_study

    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        spec = load_study(args.config, quick=args.quick, only=args.only, seeds=args.seeds)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.num_resamples < 100:
        print(f"error: --num_resamples must be >= 100, got {args.num_resamples}", file=sys.stderr)
        return 2
    out = Path(args.output_dir or f"runs/study_{spec.name}{'_quick' if args.quick else ''}")
    from ..train.safety import EXIT_INTERRUPTED, Interrupted

    if args.jobs < 1:
        print(f"error: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    if args.max_seconds is not None and not args.max_seconds > 0:
        print(f"error: --max_seconds must be > 0, got {args.max_seconds}", file=sys.stderr)
        return 2
    cells_dir = Path(args.cells_dir) if args.cells_dir else None
    try:
        records = run_study(
            spec,
            out,
            estimate=not args.no_estimate,
            estimate_only=args.estimate_only,
            keep_models=args.keep_models,
            device=args.device,
            jobs=args.jobs,
            cells_dir=cells_dir,
            max_seconds=args.max_seconds,
        )
    except Interrupted as err:  # finished cells stay cached; the interrupted one reruns from step 0
        print(f"study stopped: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DeviceUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.estimate_only:
        return 0
    pending = [r for r in records if r.get("status") == "pending"]
    if pending:  # the time guard left cells: no report from part of the grid
        print(
            f"study stopped by --max_seconds {args.max_seconds:g}: {len(pending)} of {len(records)} cells pending; "
            f"rerun the same command to continue (finished cells are cached"
            + (f" in {cells_dir})" if cells_dir else ")"),
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    results = aggregate(spec, records, num_resamples=args.num_resamples)
    save_per_image(results.pop("_per_image"), out / PER_IMAGE_FILE)
    results["plots"] = plots(spec, results, out)
    command = "soarflow study " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch threads "
        f"{torch.get_num_threads()}; this invocation: --device {args.device}, --jobs {args.jobs}; cells ran on: "
        f"{run_configurations(records) or 'none'} (wall-clock arms compare only within one of these)"
    )
    wall = time.perf_counter() - start
    results.update(
        study=spec_record(spec),
        command=command,
        machine=machine,
        wall_seconds=round(wall, 1),
        run={
            "device": args.device,
            "jobs": args.jobs,
            "cells_dir": args.cells_dir,
            "max_seconds": args.max_seconds,
            "cells": run_configurations(records),
        },
    )
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    # the recorded (rounded) wall-clock, so that `soarflow study-report` rebuilds the same text from results.json
    (out / "report.md").write_text(markdown(spec, results, command, machine, results["wall_seconds"]))
    print(f"report: {out / 'report.md'}, results: {out / 'results.json'}, plots: {', '.join(results['plots'])}")
    return 1 if results["failed"] else 0
