"""`soarflow study-report FOLDER --config STUDY.yaml [--quick] [--only ROW ...] [--seeds S ...]`: rebuild a study
report's intervals.

Reads ``FOLDER/results.json`` (scalars, curves, cells) and ``FOLDER/per_image.npz`` (the per-image results the
intervals come from), recomputes every interval, the primary contrast, its MDE and the Holm adjustment with the
study file's current ``primary``/``contrasts``/``reference``, and rewrites results.json and report.md in place
(``--output_dir`` to write elsewhere). No cell is trained or evaluated. Pass the same ``--quick`` / ``--only`` /
``--seeds`` as the run that made the folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soarflow study-report",
        description=(
            "Rebuild every interval of a study report from its per_image.npz (no training). See docs/study.md."
        ),
    )
    p.add_argument("folder", help="study folder with results.json and per_image.npz (e.g. docs/results/study_x)")
    p.add_argument("--config", required=True, help="the study YAML the folder was made from")
    p.add_argument("--quick", action="store_true", help="the folder was made with --quick")
    p.add_argument("--only", nargs="+", metavar="ROW", help="the folder was made with --only ROW ...")
    p.add_argument("--seeds", nargs="+", type=int, metavar="S", help="the folder was made with --seeds S ...")
    p.add_argument("--output_dir", help="write results.json and report.md here instead of FOLDER")
    p.add_argument("--num_resamples", type=int, default=2000, help="bootstrap cross-check resamples (default 2000)")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..study.report import markdown, rebuild
    from ..study.spec import load_study

    args = build_parser().parse_args(argv)
    try:
        spec = load_study(args.config, quick=args.quick, only=args.only, seeds=args.seeds)
        results = rebuild(spec, Path(args.folder), num_resamples=args.num_resamples)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.output_dir or args.folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "report.md").write_text(
        markdown(
            spec, results, results.get("command", "?"), results.get("machine", "?"), results.get("wall_seconds", 0.0)
        )
    )
    print(f"rebuilt: {out / 'report.md'}, {out / 'results.json'}")
    return 0
