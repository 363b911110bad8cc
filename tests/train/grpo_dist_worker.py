"""Run by `accelerate launch` in test_grpo_prompts.py: GRPO on the tiny SD3 from a prompt file with a CLIP-score
reward; every rank records the prompts, rewards and advantages of each rollout (rank<r>.json)."""

import json
import os
import sys
from pathlib import Path

import torch


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    import diffusers

    from soarflow.methods import grpo as grpo_math
    from soarflow.train import load_config, train

    def no_image_encoding(*args, **kwargs):
        raise AssertionError("GRPO on a prompt file encoded an image with the VAE")

    diffusers.AutoencoderKL.encode = no_image_encoding
    calls = []
    gather = grpo_math.gather_prompt_advantages

    def recording(prompts, rewards, clip, eps=1e-4, *, global_std=False):
        adv = gather(prompts, rewards, clip, eps, global_std=global_std)
        calls.append(
            {
                "prompts": list(prompts),
                "rewards": rewards.double().tolist(),
                "advantages": adv.tolist(),
                "clip": clip,
                "global_std": global_std,
            }
        )
        return adv

    grpo_math.gather_prompt_advantages = recording
    result = train(load_config(None, ["--output_dir", str(out / "run"), *overrides]))
    rank = os.environ.get("RANK", "0")
    (out / f"rank{rank}.json").write_text(
        json.dumps({"calls": calls, "num_processes": result.num_processes, "history": result.history})
    )


if __name__ == "__main__":
    main()
