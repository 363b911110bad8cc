"""Coverage of the study's 95% intervals in simulated null studies, over seed-effect sizes and seed counts.

    PYTHONPATH=src python bench/study_coverage.py [--studies 1000]

Uses the simulation of tests/study/test_stats.py (`null_coverage`: 48 prompts x 2 images, pass/fail from
sigmoid(mu + seed + prompt + method x prompt), paired seeds or against a fixed base); prints one line per case.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "study"))

from test_stats import null_coverage  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--studies", type=int, default=1000)
    args = p.parse_args()
    print("| comparison | seeds | seed sd (logit) | coverage |")
    print("|---|---|---|---|")
    for unpaired in (False, True):
        for seeds, sd in ((3, 0.0), (3, 0.3), (3, 0.6), (3, 1.0), (5, 0.6), (5, 1.0)):
            cov = null_coverage(args.studies, unpaired=unpaired, seed=11, sd_seed=sd, seeds=seeds)
            name = "against a fixed base" if unpaired else "paired seeds"
            print(f"| {name} | {seeds} | {sd} | {cov:.3f} |", flush=True)


if __name__ == "__main__":
    main()
