"""Headroom probe: does a post-training recipe beat the shipped base on ShapesEval (40 steps, guidance 4)?

Trains one recipe (a `soarflow train` config plus dotted overrides) from the base, evaluates the base and the
trained model on the same images (same prompts, same noise), and prints overall / per family, the paired
difference with a prompt-cluster bootstrap interval, FD and diversity, plus a detection breakdown for the
single-object prompts (was an object found at all, and in which colour). One JSON line per recipe is appended to
``--out`` so every recipe tried stays on record.

    OMP_NUM_THREADS=1 python bench/headroom_probe.py --name lr2e-5_ema --set learning_rate=2e-5 use_ema=true \
        max_train_steps=300 --out docs/perf/headroom/probes.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import yaml

from soarflow.shapes import ShapesEval, render
from soarflow.shapes.evaluate import evaluate_setting
from soarflow.shapes.scorer import detect
from soarflow.train import TrainConfig, build_task, train
from soarflow.study.spec import with_overrides

ROOT = Path(__file__).resolve().parents[1]


def cluster_bootstrap(a: np.ndarray, b: np.ndarray, groups: np.ndarray, n: int = 4000, seed: int = 0):
    """Percentile CI of mean(a - b), resampling prompts (all images of a prompt together)."""
    d = a - b
    ids = np.unique(groups)
    per = np.array([d[groups == g].mean() for g in ids])
    rng = np.random.default_rng(seed)
    boot = per[rng.integers(0, len(per), (n, len(per)))].mean(1)
    return float(per.mean()), *np.quantile(boot, [0.025, 0.975]).tolist()


def evaluate(model, bench: ShapesEval, real, steps: int, guidance: float, seed: int):
    prompts = bench.image_prompts()
    groups = [p.index for p in bench.prompts for _ in range(bench.images_per_prompt)]
    metrics, images, report = evaluate_setting(
        model, prompts, groups, real, num_steps=steps, guidance_scale=guidance, seed=seed, exposure_images=8, shift=1.0
    )
    single = [i for i, p in enumerate(prompts) if bench.prompts[groups[i]].family == "single_object"]
    found = detect(images[single]) if single else []
    colors = Counter(o.color for objs in found for o in objs if o.shape != "unknown")
    empty = sum(1 for objs in found if not objs)
    return {
        "overall": metrics["shapes_eval"]["overall"],
        "per_family": metrics["shapes_eval"]["per_family"],
        "fd": metrics["frechet_distance"],
        "diversity": metrics["diversity"],
        "correct": np.array([float(r.correct) for r in report.records]),
        "single_empty": empty,
        "single_n": len(single),
        "single_colors": dict(colors),
    }, np.array(groups)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--config", default=str(ROOT / "configs/shapes_sft.yaml"))
    ap.add_argument("--set", nargs="*", default=[], help="dotted overrides key=value (YAML values)")
    ap.add_argument("--prompts_per_family", type=int, default=8)
    ap.add_argument("--images_per_prompt", type=int, default=2)
    ap.add_argument("--eval_seed", type=int, default=777, help="prompt set + noise (not the studies' 1234)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--out", default=str(ROOT / "docs/perf/headroom/probes.jsonl"))
    args = ap.parse_args()

    raw = yaml.safe_load(Path(args.config).read_text())
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    raw = with_overrides(
        raw,
        {
            "output_dir": f"/tmp/headroom/{args.name}",
            "report_to": "none",
            "checkpointing_steps": 0,
            "validation_steps": 0,
            "show_progress": False,
            **overrides,
        },
    )
    config = TrainConfig.from_dict(raw)
    bench = ShapesEval(
        prompts_per_family=args.prompts_per_family, images_per_prompt=args.images_per_prompt, seed=args.eval_seed
    )
    real = render(bench.image_prompts(), seed=args.eval_seed + 1)
    task = build_task(config)

    base_cache = Path(f"/tmp/headroom/base_{args.eval_seed}_{args.prompts_per_family}_{args.steps}_{args.guidance}.pt")
    base_model = task.build_model().float().eval()
    if base_cache.exists() and config.model.get("pretrained", "base") == "base":
        base, groups = torch.load(base_cache, weights_only=False)
    else:
        with torch.no_grad():
            base, groups = evaluate(base_model, bench, real, args.steps, args.guidance, args.eval_seed)
        if config.model.get("pretrained", "base") == "base":
            base_cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save((base, groups), base_cache)
    t0 = time.perf_counter()
    result = train(config, task, base_model)
    train_s = time.perf_counter() - t0
    with torch.no_grad():
        trained, _ = evaluate(result.model.float().eval(), bench, real, args.steps, args.guidance, args.eval_seed)
    diff, lo, hi = cluster_bootstrap(trained["correct"], base["correct"], groups)
    line = {
        "name": args.name,
        "overrides": overrides,
        "train_seconds": round(train_s, 1),
        "steps": result.global_step,
        "eval": {
            "prompts_per_family": args.prompts_per_family,
            "images_per_prompt": args.images_per_prompt,
            "seed": args.eval_seed,
            "num_steps": args.steps,
            "guidance": args.guidance,
        },
        "base": {k: v for k, v in base.items() if k != "correct"},
        "trained": {k: v for k, v in trained.items() if k != "correct"},
        "diff_overall": [round(diff, 4), round(lo, 4), round(hi, 4)],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(line) + "\n")
    fam = " ".join(f"{k[:6]} {base['per_family'][k]:.2f}->{trained['per_family'][k]:.2f}" for k in base["per_family"])
    print(
        f"{args.name}: overall {base['overall']:.3f} -> {trained['overall']:.3f}  diff {diff:+.3f} "
        f"[{lo:+.3f}, {hi:+.3f}]  FD {base['fd']:.2f} -> {trained['fd']:.2f}  div {base['diversity']:.2f} -> "
        f"{trained['diversity']:.2f}  | {fam} | single empty {base['single_empty']}->{trained['single_empty']}"
        f"/{trained['single_n']} colors {trained['single_colors']}  ({train_s:.0f}s train)",
        flush=True,
    )


if __name__ == "__main__":
    main()
