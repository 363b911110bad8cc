"""Seconds per pretraining step (forward + backward + AdamW) of the embedded-model candidates on this machine.

    python bench/pretrain_step.py [--batch 64] [--threads 2] [--repeats 6]

Prints one line per candidate of docs/base_model.md (the median of `repeats` steps after one warm-up) and the
projected `soarflow pretrain` time for 4,000 steps. Run it on a quiet machine: nothing else may use the cores.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from soarflow.models.embedded import build_model
from soarflow.shapes import MAX_TOKENS, VOCAB

CANDIDATES = {
    "mmdit (shipped before)": ("mmdit", dict(patch_size=4, hidden_size=96, depth=4)),
    "mmdit patch 2, width 128": ("mmdit", dict(patch_size=2, hidden_size=128, depth=4)),
    "unet 32/64/128 (shipped)": ("unet", dict(channels=[32, 64, 128], num_res_blocks=1)),
    "unet 32/64/128, 2 blocks": ("unet", dict(channels=[32, 64, 128], num_res_blocks=2)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    sigma = torch.rand(args.batch, generator=g)
    tokens = torch.randint(1, len(VOCAB), (args.batch, MAX_TOKENS), generator=g)
    tokens[:, 8:] = 0
    print(f"batch {args.batch}, {args.threads} threads")
    for name, (arch, cfg) in CANDIDATES.items():
        model = build_model(arch, dict(cfg, num_heads=4, vocab_size=len(VOCAB), max_tokens=MAX_TOKENS))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times = []
        for i in range(args.repeats + 1):
            t0 = time.perf_counter()
            loss = (model(x, sigma, {"tokens": tokens}) - x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:
                times.append(time.perf_counter() - t0)
        s = statistics.median(times)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name:28s} {params:5.2f}M params  {s:.3f} s/step  4000 steps: {4000 * s / 60:.0f} min")


if __name__ == "__main__":
    main()
