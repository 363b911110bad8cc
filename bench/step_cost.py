"""What does a SOAR step cost relative to an SFT step?

Prints, for a small transformer velocity model, the measured SOAR/SFT training-step time ratio for several
numbers of auxiliary points K beside the FLOP ratio (3(1+K)+2)/3 — an SFT step is one forward + backward
(~3 forward units) over B rows; a SOAR step adds a no-grad guided rollout over 2B rows (2 units) and K*B more
rows in the fused forward/backward — and the time of the fused evaluation against a per-point loop (the
reference code's structure) at identical loss values.

    python bench/step_cost.py                 # CPU, embedded MMDiT-style model if available
    python bench/step_cost.py --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from soarflow import SOARConfig, sft_loss, soar_loss
from soarflow.flow import shift_sigma


class SmallTransformer(nn.Module):
    """A generic DiT-like velocity model: patchify, add sigma and condition embeddings, transformer, unpatchify."""

    def __init__(self, channels=3, size=32, patch=4, width=128, depth=4, heads=4, cond_dim=32):
        super().__init__()
        self.patch, self.size, self.channels = patch, size, channels
        self.embed = nn.Linear(channels * patch * patch, width)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, width) * 0.02)
        self.sigma_mlp = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width))
        self.cond = nn.Linear(cond_dim, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.out = nn.Linear(width, channels * patch * patch)

    def forward(self, x, sigma, cond):
        b, c, h, w = x.shape
        p = self.patch
        tok = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        hdn = self.embed(tok) + self.pos + (self.sigma_mlp(sigma[:, None].to(x.dtype)) + self.cond(cond))[:, None]
        out = self.out(self.blocks(hdn))
        return out.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def build_model(kind: str, device):
    if kind == "mmdit":
        try:
            from soarflow.models.mmdit import MMDiT, MMDiTConfig
            from soarflow.shapes import VOCAB, tokenize
        except ImportError:
            kind = "generic"
        else:
            from soarflow.models.shapes_task import base_checkpoint_path, load_shapes_model

            # The shipped base (trained weights) when present; a fresh model has the same cost.
            if base_checkpoint_path().is_file():
                model = load_shapes_model("base").to(device)
            else:
                model = MMDiT(MMDiTConfig(vocab_size=len(VOCAB))).to(device)
            tokens = tokenize(["a red circle to the left of a blue square"])
            return "mmdit", model, lambda b: {"tokens": tokens.repeat(b, 1).to(device)}, \
                lambda b: {"tokens": torch.zeros_like(tokens).repeat(b, 1).to(device)}
    model = SmallTransformer().to(device)
    g = torch.Generator().manual_seed(0)
    c = torch.randn(1, 32, generator=g).to(device)
    return "generic", model, lambda b: c.repeat(b, 1), lambda b: torch.zeros(b, 32, device=device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(fn, repeats: int, device) -> float:
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", choices=["mmdit", "generic"], default="mmdit")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ks", default="1,2,4,6")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    name, model, cond_fn, null_fn = build_model(args.model, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    B = args.batch
    x0 = torch.randn(B, 3, 32, 32, device=device)
    cond, null = cond_fn(B), null_fn(1)
    params = sum(p.numel() for p in model.parameters())
    print(f"model={name} params={params / 1e6:.2f}M device={device} batch={B} threads={torch.get_num_threads()}")

    def train_step(loss_fn):
        def run():
            opt.zero_grad(set_to_none=True)
            loss_fn().loss.backward()
            opt.step()

        return run

    sft = train_step(lambda: sft_loss(model, x0, cond, config=SOARConfig(num_aux=0)))
    print(f"\n{'K':>3} {'SFT ms':>9} {'SOAR ms':>9} {'ratio':>7} {'FLOP ratio':>11}")
    for k in [int(v) for v in args.ks.split(",")]:
        cfg = SOARConfig(num_aux=k, rollout_cfg=4.5)
        soar = train_step(lambda: soar_loss(model, x0, cond, null_cond=null, config=cfg))
        # interleave the two so drift in machine load hits both alike
        t_sft, t_soar = [], []
        for _ in range(args.repeats):
            t_sft.append(time_steps(sft, 1, device))
            t_soar.append(time_steps(soar, 1, device))
        a, b = statistics.median(t_sft), statistics.median(t_soar)
        print(f"{k:>3} {a * 1e3:>9.1f} {b * 1e3:>9.1f} {b / a:>7.2f} {(3 * (1 + k) + 2) / 3:>11.2f}")

    k = 6
    g = torch.Generator(device="cpu").manual_seed(1)
    noise = torch.randn(x0.shape, generator=g).to(device)
    t = torch.rand(B, generator=g).to(device) * 0.9 + 0.05
    s1 = shift_sigma((t - 1 / 40).clamp_min(0), 3.0)
    aux = s1 + torch.rand(k, B, generator=g).to(device) * (1 - s1)
    fixed = dict(noise=noise, t=t, aux_sigmas=aux)
    fused_cfg = SOARConfig(num_aux=k)
    loop_cfg = fused_cfg.replace(fuse_forward=False)
    lf = soar_loss(model, x0, cond, null_cond=null, config=fused_cfg, **fixed).loss.item()
    ll = soar_loss(model, x0, cond, null_cond=null, config=loop_cfg, **fixed).loss.item()
    tf = time_steps(train_step(lambda: soar_loss(model, x0, cond, null_cond=null, config=fused_cfg, **fixed)), args.repeats, device)
    tl = time_steps(train_step(lambda: soar_loss(model, x0, cond, null_cond=null, config=loop_cfg, **fixed)), args.repeats, device)
    print(f"\nK={k}: fused {tf * 1e3:.1f} ms, per-point loop {tl * 1e3:.1f} ms, speed-up {tl / tf:.2f}x; "
          f"loss fused={lf:.6f} loop={ll:.6f} |diff|={abs(lf - ll):.2e}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        train_step(lambda: soar_loss(model, x0, cond, null_cond=null, config=fused_cfg, **fixed))()
        print(f"peak CUDA memory (fused, K={k}): {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
