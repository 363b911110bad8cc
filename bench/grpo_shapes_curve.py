"""Does Flow-GRPO raise the ShapesEval reward of the shipped base on the CPU? Trains `soarflow train` with
configs/shapes_grpo.yaml in segments (resuming), and after every segment scores the model with the ODE sampler
(evaluation convention of Flow-GRPO) on a fixed ShapesEval prompt set with fixed noise.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/grpo_shapes_curve.py --steps 60 --every 15 --out /tmp/grpo_curve
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from soarflow.models.shapes_task import generate_images, load_shapes_model
from soarflow.shapes import ShapesEval, reward
from soarflow.train import load_config, train


def ode_reward(model, prompts, num_steps: int, guidance_scale: float) -> float:
    images = generate_images(model, prompts, num_steps=num_steps, guidance_scale=guidance_scale, seed=1234)
    return float(reward(images, prompts).mean())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=15)
    p.add_argument("--out", default="/tmp/grpo_curve")
    p.add_argument("--prompts_per_family", type=int, default=8)
    p.add_argument("--eval_steps", type=int, default=40)
    p.add_argument("overrides", nargs="*", help="extra --key=value overrides of configs/shapes_grpo.yaml")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    bench = ShapesEval(prompts_per_family=args.prompts_per_family, images_per_prompt=1, seed=0)
    prompts = [q.text for q in bench.prompts]
    base_overrides = [f"--output_dir={out / 'run'}", "--report_to=none", "--validation_steps=0",
                      f"--checkpointing_steps={args.every}", "--show_progress=false", "--logging_steps=1",
                      *args.overrides]
    cfg = load_config("configs/shapes_grpo.yaml", base_overrides + ["--max_train_steps=1"])
    curve = [{"step": 0, "ode_reward": ode_reward(load_shapes_model("base"), prompts, args.eval_steps, cfg.grpo.guidance_scale)}]
    print(json.dumps(curve[-1]), flush=True)
    history: list[dict] = []
    start = time.perf_counter()
    for step in range(args.every, args.steps + 1, args.every):
        resume = ["--resume_from_checkpoint=latest"] if step > args.every else []
        cfg = load_config("configs/shapes_grpo.yaml", base_overrides + [f"--max_train_steps={step}"] + resume)
        result = train(cfg)
        history += result.history
        seg = result.history
        curve.append({"step": step, "ode_reward": ode_reward(result.model, prompts, args.eval_steps, cfg.grpo.guidance_scale),
                      "train_reward_mean_segment": sum(h["reward_mean"] for h in seg) / len(seg),
                      "kl_last": seg[-1]["kl"], "s_per_step": sum(h["step_time_s"] for h in seg) / len(seg),
                      "elapsed_s": round(time.perf_counter() - start, 1)})
        print(json.dumps(curve[-1]), flush=True)
    (out / "curve.json").write_text(json.dumps({"prompts": len(prompts), "curve": curve, "history": history}, indent=1))


if __name__ == "__main__":
    main()
