"""Peak memory and seconds per step of training with and without the encoder cache, on the tiny SD3 and FLUX test
pipelines (tests/diffusers_testing.py) on the CPU.

Each measurement runs in a fresh subprocess (so the peak resident set, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``,
is that run's alone):

* ``uncached``: SOAR training on an image folder without ``data.cache_dir`` (the frozen pipeline is loaded, every
  batch is decoded and encoded);
* ``fill``: ``soarflow cache`` on the same config with a cache folder (time to encode everything);
* ``cached``: the same training on the complete cache (no text encoder, no VAE encoder, no image decoded).

Seconds per step is the median of the trainer's ``step_time_s`` over the steps after the first. Validation is off.

    taskset -c 1 python bench/cache_bench.py --out bench_cache.json [--steps 4] [--images 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _config(work: Path, family: str, cached: bool, steps: int):
    from soarflow.train import load_config

    extra = [f"--data.cache_dir={work / 'cache'}"] if cached else []
    return load_config(
        None,
        [
            "--task",
            family,
            "--method",
            "soar",
            "--output_dir",
            str(work / f"run-{family}-{int(cached)}-{time.time_ns()}"),
            "--train_batch_size",
            "4",
            "--max_train_steps",
            str(steps),
            "--logging_steps",
            "1",
            "--validation_steps",
            "0",
            "--checkpointing_steps",
            "0",
            "--report_to",
            "none",
            "--show_progress",
            "false",
            "--soar.num_aux",
            "2",
            "--soar.rollout_steps",
            "4",
            "--soar.guidance_scale",
            "2.0",
            f"--model.pretrained={work / family}",
            "--model.max_sequence_length=32",
            f"--data.path={work / 'imgs'}",
            "--data.resolution=32",
            *extra,
        ],
    )


def child(mode: str, family: str, work: Path, steps: int) -> dict:
    """One measurement in this (fresh) process."""
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    out: dict = {"mode": mode, "family": family}
    if mode == "fill":
        from soarflow.commands.cache import run_cache

        assert run_cache(_config(work, family, True, steps), batch_size=8) == 0
    else:
        from soarflow.tasks.registry import build_task
        from soarflow.train import train

        cfg = _config(work, family, mode == "cached", steps)
        task = build_task(cfg)
        result = train(cfg, task=task)
        times = [h["step_time_s"] for h in result.history[1:]]
        out.update(
            s_per_step=statistics.median(times),
            losses=[h["loss"] for h in result.history],
            encoders_loaded=task.pipeline.loaded,
        )
    out["seconds"] = time.perf_counter() - start
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def prepare(work: Path, images: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from diffusers_testing import CAPTIONS, build_tiny_flux_pipeline, build_tiny_sd3_pipeline, make_imagefolder

    build_tiny_sd3_pipeline(work / "sd3")
    build_tiny_flux_pipeline(work / "flux")
    captions = [f"{CAPTIONS[i % len(CAPTIONS)]} number {i}" for i in range(images)]
    make_imagefolder(work / "imgs", captions=captions, sizes=((32, 32), (40, 48)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench_cache.json")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--child", nargs=3, metavar=("MODE", "FAMILY", "WORK"))
    args = p.parse_args()
    if args.child:
        mode, family, work = args.child
        print("RESULT " + json.dumps(child(mode, family, Path(work), args.steps)), flush=True)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.images)
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
        for family in ("sd3", "flux"):
            for mode in ("uncached", "fill", "cached"):
                proc = subprocess.run(
                    [sys.executable, __file__, "--steps", str(args.steps), "--child", mode, family, str(work)],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    raise SystemExit(f"{family} {mode} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
                results.append(json.loads(line[len("RESULT ") :]))
                print(json.dumps(results[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"steps": args.steps, "images": args.images, "results": results}, indent=1))


if __name__ == "__main__":
    main()
