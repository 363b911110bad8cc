"""Cost per optimizer step of every method relative to SFT on the shapes task (shipped base, shipped recipes):
model forwards per training sample (counted) and seconds per step (measured), methods interleaved round-robin
in one process so load changes hit all of them alike.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/method_cost.py --rounds 3 --steps 3 --batch 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from soarflow.train import train
from soarflow.train.methods import METHODS, method_config


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    forwards: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for m in METHODS:
                cfg = method_config(
                    m,
                    {
                        "output_dir": str(Path(tmp) / f"{m}_{r}"),
                        "train_batch_size": args.batch,
                        "max_train_steps": args.steps,
                        "report_to": "none",
                        "show_progress": False,
                        "checkpointing_steps": 0,
                        "validation_steps": 0,
                        "seed": r,
                    },
                )
                hist = train(cfg).history
                times[m] += [h["step_time_s"] for h in hist[1:]]  # the first step includes warm-up
                forwards[m] = (hist[-1]["forwards_per_sample"], hist[-1]["grad_forwards_per_sample"])
    sft = statistics.median(times["sft"])
    rows = {
        m: {
            "forwards_per_sample": forwards[m][0],
            "grad_forwards_per_sample": forwards[m][1],
            "s_per_step_median": statistics.median(times[m]),
            "time_vs_sft": statistics.median(times[m]) / sft,
        }
        for m in METHODS
    }
    print(json.dumps({"batch": args.batch, "rounds": args.rounds, "steps": args.steps, "methods": rows}, indent=1))


if __name__ == "__main__":
    main()
