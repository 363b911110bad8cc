"""Dense toy rewards for checking the GRPO machinery (bench/grpo_shapes_curve.py --reward grpo_rewards:NAME)."""

import torch


def brightness(images: torch.Tensor, prompts) -> torch.Tensor:
    """Mean pixel value in [-1, 1]: any working policy gradient raises it within a few steps."""
    return images.float().mean(dim=(1, 2, 3))
