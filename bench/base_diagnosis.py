"""Why a base fails at layout: its clean-image estimate x0_hat = x - sigma v at high noise (docs/base_model.md).

For each checkpoint and sigma: the x0-estimate error against the real render (and against the mean image, the
best a model without any layout can do), and the *patch-boundary ratio*: the mean |horizontal pixel step| across
the 4-px patch boundaries divided by the mean step inside patches. Real renders give ~1 (edges fall anywhere);
a model whose 4x4 patches do not coordinate gives a checkerboard of per-patch colours, a ratio well above 1.

    python bench/base_diagnosis.py base path/to/other.safetensors [--images 64]
"""

from __future__ import annotations

import argparse

import torch

from soarflow.flow import interpolate, x0_from_velocity
from soarflow.models.embedded import load_shapes_model
from soarflow.shapes.generate import encode_captions
from soarflow.shapes import ShapesEval


def boundary_ratio(x: torch.Tensor, patch: int = 4) -> float:
    steps = (x[..., 1:] - x[..., :-1]).abs().mean(dim=(0, 1, 2))  # (W-1,) mean step between columns j and j+1
    across = torch.arange(steps.shape[0]) % patch == patch - 1
    return float(steps[across].mean() / steps[~across].mean())


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 0.8, 0.95])
    args = ap.parse_args()
    ev = ShapesEval(prompts_per_family=max(1, args.images // 6), images_per_prompt=1, seed=9)
    prompts = ev.image_prompts()[: args.images]
    x0 = ev.render_real()[: args.images]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    mean_err = float((x0 - x0.mean(0, keepdim=True)).square().mean())
    print(f"real renders: patch-boundary ratio {boundary_ratio(x0):.2f}; mean-image x0 error {mean_err:.4f}")
    for path in args.checkpoints:
        model = load_shapes_model(path).eval()
        cond = encode_captions(prompts, max_tokens=model.config.max_tokens)
        for s in args.sigmas:
            sigma = torch.full((x0.shape[0],), s)
            x = interpolate(x0, noise, sigma)
            x0_hat = x0_from_velocity(x, sigma, model(x, sigma, cond))
            err = float((x0_hat - x0).square().mean())
            print(f"{path:40s} sigma {s:.2f}: x0 error {err:.4f}  patch-boundary ratio {boundary_ratio(x0_hat):.2f}")


if __name__ == "__main__":
    main()
