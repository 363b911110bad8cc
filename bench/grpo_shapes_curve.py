"""Does Flow-GRPO raise the ShapesEval reward of the shipped base on the CPU? Trains `soarflow train` with
configs/shapes_grpo.yaml in segments (resuming), and after every segment scores the model with the ODE sampler
(Flow-GRPO's evaluation convention) on a fixed ShapesEval prompt set with fixed noise, at the 10-step schedule
GRPO trains on and, at the start and the end, at 40 steps.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/grpo_shapes_curve.py --steps 60 --every 15 --out /tmp/grpo_curve
    # the machinery on a dense reward that any working policy gradient moves fast (mean brightness):
    OMP_NUM_THREADS=1 PYTHONPATH=src:bench python bench/grpo_shapes_curve.py --reward grpo_rewards:brightness ...

Prints one JSON line per segment and writes <out>/curve.json (the curve, the per-step training history).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


from soarflow.models.embedded import load_shapes_model
from soarflow.shapes.generate import generate_images
from soarflow.shapes import ShapesEval, reward as shapes_reward
from soarflow.train import load_config, train
from soarflow.train.methods import resolve_reward


def ode_reward(model, prompts, reward_fn, num_steps: int, guidance_scale: float) -> float:
    images = generate_images(model, prompts, num_steps=num_steps, guidance_scale=guidance_scale, seed=1234)
    return float(reward_fn(images, prompts).float().mean())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=15)
    p.add_argument("--out", default="/tmp/grpo_curve")
    p.add_argument("--reward", default="auto", help="grpo.reward: auto (ShapesEval partial credit) or pkg.mod:fn")
    p.add_argument("--prompts_per_family", type=int, default=16)
    p.add_argument("--images_per_prompt", type=int, default=2)
    p.add_argument("--eval_steps", type=int, default=10, help="ODE steps of the per-segment evaluation")
    p.add_argument("--final_eval_steps", type=int, default=40, help="extra evaluation at the start and the end")
    p.add_argument("overrides", nargs="*", help="extra --key=value overrides of configs/shapes_grpo.yaml")
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    bench = ShapesEval(prompts_per_family=args.prompts_per_family, images_per_prompt=args.images_per_prompt, seed=0)
    prompts = [q.text for q in bench.prompts for _ in range(args.images_per_prompt)]
    base_overrides = [
        f"--output_dir={out / 'run'}",
        "--report_to=none",
        "--validation_steps=0",
        f"--checkpointing_steps={args.every}",
        "--show_progress=false",
        "--logging_steps=1",
        f"--grpo.reward={args.reward}",
        *args.overrides,
    ]
    cfg = load_config("configs/shapes_grpo.yaml", base_overrides + ["--max_train_steps=1"])
    reward_fn = shapes_reward if args.reward == "auto" else resolve_reward(args.reward, {}, "shapes")[0]
    guidance = cfg.grpo.guidance_scale
    base = load_shapes_model("base")
    curve = [
        {
            "step": 0,
            "ode_reward": ode_reward(base, prompts, reward_fn, args.eval_steps, guidance),
            f"ode_reward_{args.final_eval_steps}": ode_reward(
                base, prompts, reward_fn, args.final_eval_steps, guidance
            ),
        }
    ]
    print(
        json.dumps(
            {
                "images": len(prompts),
                "config": {k: v for k, v in cfg.to_dict().items() if k in ("learning_rate", "train_batch_size")},
                "grpo": cfg.to_dict()["grpo"],
            }
        ),
        flush=True,
    )
    print(json.dumps(curve[-1]), flush=True)
    history: list[dict] = []
    start = time.perf_counter()
    for step in range(args.every, args.steps + 1, args.every):
        resume = ["--resume_from_checkpoint=latest"] if step > args.every else []
        cfg = load_config("configs/shapes_grpo.yaml", base_overrides + [f"--max_train_steps={step}"] + resume)
        result = train(cfg)
        seg = result.history
        history += seg
        point = {
            "step": step,
            "ode_reward": ode_reward(result.model, prompts, reward_fn, args.eval_steps, guidance),
            "train_reward_mean_segment": sum(h["reward_mean"] for h in seg) / len(seg),
            "kl_last": seg[-1]["kl"],
            "clip_frac_mean": sum(h["clip_frac"] for h in seg) / len(seg),
            "s_per_step": sum(h["step_time_s"] for h in seg) / len(seg),
            "elapsed_s": round(time.perf_counter() - start, 1),
        }
        if step + args.every > args.steps:
            point[f"ode_reward_{args.final_eval_steps}"] = ode_reward(
                result.model, prompts, reward_fn, args.final_eval_steps, guidance
            )
        curve.append(point)
        print(json.dumps(curve[-1]), flush=True)
        (out / "curve.json").write_text(
            json.dumps({"images": len(prompts), "args": vars(args), "curve": curve, "history": history}, indent=1)
        )


if __name__ == "__main__":
    main()
