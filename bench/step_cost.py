"""What does a SOAR step cost relative to an SFT step, and which forward layout is fastest?

For a small transformer velocity model and K in --ks, prints the measured time of one optimizer step for SFT and
for SOAR in each forward layout, all at identical loss values (checked on fixed draws):

* ``default``: the library default, ``reuse_main_output: auto``: ``fused`` on CUDA, ``reuse`` elsewhere
  (:func:`soarflow.objective.resolve_layout`; the resolved name is printed and recorded);
* ``reuse``: main term first (with grad), its detached output is the rollout's conditional half (one B-row
  no-grad forward for the unconditional half), then the aux rows (``forward_batch_size="auto"``: one call);
* ``reuse_Brows``: as reuse, aux rows in calls of B rows; ``reuse_probe``: as reuse, with the timing probe;
* ``fused``: rollout over 2B rows, then main + aux in one (1+K)B-row forward (``reuse_main_output=False``);
* ``chunked``: fused, in activation-checkpointed chunks of B rows (``aux_chunk_size=B``);
* ``loop``: the reference code's structure, one B-row forward per term (``fuse_forward=False``).

FLOP floors in forward units (backward = 2 forwards): SFT 3; fused/loop 3(1+K)+2; reuse 3(1+K)+1. Variants run
interleaved, round by round, so drifting machine load hits all alike; the spread over rounds is printed.

    python bench/step_cost.py                          # CPU, embedded MMDiT-style model if available
    python bench/step_cost.py --device cuda --out r.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

from soarflow import SOARConfig, sft_loss, soar_loss
from soarflow.objective import layout_name, resolve_layout
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
    if kind in ("mmdit", "unet"):
        try:
            from soarflow.models.embedded import build_model as build_embedded
            from soarflow.shapes import MAX_TOKENS, VOCAB, tokenize
        except ImportError:
            kind = "generic"
        else:
            # A fresh model of the architecture (its step costs what a trained one's does): "mmdit" is the
            # 1.28M-parameter MMDiT the CPU tables were measured on, "unet" the shipped base's architecture.
            model = build_embedded(kind, {"vocab_size": len(VOCAB), "max_tokens": MAX_TOKENS}).to(device)
            tokens = tokenize(["a red circle to the left of a blue square"])
            return (
                kind,
                model,
                lambda b: {"tokens": tokens.repeat(b, 1).to(device)},
                lambda b: {"tokens": torch.zeros_like(tokens).repeat(b, 1).to(device)},
            )
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


VARIANTS = {
    "default": dict(),  # reuse_main_output: auto -> fused on CUDA, reuse elsewhere (objective.resolve_layout)
    "reuse": dict(reuse_main_output=True),
    "reuse_Brows": dict(reuse_main_output=True, forward_batch_size=-1),  # -1: B rows per call
    "reuse_probe": dict(reuse_main_output=True, forward_batch_size="probe"),
    "fused": dict(reuse_main_output=False, forward_batch_size=None),
    "chunked": dict(reuse_main_output=False, forward_batch_size=None, aux_chunk_size=-1),  # -1: B rows
    "loop": dict(reuse_main_output=False, fuse_forward=False, forward_batch_size=None),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", choices=["mmdit", "unet", "generic"], default="mmdit")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5, help="rounds; each round times every variant once")
    ap.add_argument("--ks", default="1,2,4,6")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    name, model, cond_fn, null_fn = build_model(args.model, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    B = args.batch
    x0 = torch.randn(B, 3, 32, 32, device=device)
    cond, null = cond_fn(B), null_fn(1)
    params = sum(p.numel() for p in model.parameters())
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    default_layout = layout_name(resolve_layout(SOARConfig(), device))
    print(
        f"model={name} params={params / 1e6:.2f}M device={device} ({dev_name}) batch={B} "
        f"threads={torch.get_num_threads()} default layout={default_layout}"
    )
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {v!r} (choose from {', '.join(VARIANTS)})")

    def config(k: int, variant: str) -> SOARConfig:
        kw = dict(VARIANTS[variant])
        for key in ("aux_chunk_size", "forward_batch_size"):
            if kw.get(key) == -1:
                kw[key] = B
        return SOARConfig(num_aux=k, guidance_scale=4.5, **kw)

    def train_step(loss_fn):
        def run():
            opt.zero_grad(set_to_none=True)
            loss_fn().loss.backward()
            opt.step()

        return run

    def timed(fn) -> float:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    results = {
        "device": str(device),
        "device_name": dev_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "model": name,
        "params": params,
        "batch": B,
        "threads": torch.get_num_threads(),
        "default_layout": default_layout,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "ks": {},
    }
    g = torch.Generator(device="cpu").manual_seed(1)
    noise = torch.randn(x0.shape, generator=g).to(device)
    t_fixed = torch.rand(B, generator=g).to(device) * 0.9 + 0.05
    s1 = shift_sigma((t_fixed - 1 / 40).clamp_min(0), 3.0)
    header = f"{'K':>2} {'SFT ms':>8} " + " ".join(f"{v + ' ms':>15}" for v in variants)
    header += f" {'default/SFT':>11} {'floor':>6} {'old floor':>9} {'default/loop':>12} {'max|dloss|':>10}"
    print(header)
    for k in [int(v) for v in args.ks.split(",")]:
        # identical loss on fixed draws, for every variant
        aux = s1 + torch.rand(k, B, generator=g).to(device) * (1 - s1)
        fixed = dict(noise=noise, t=t_fixed, aux_sigmas=aux)
        losses = {
            v: soar_loss(model, x0, cond, null_cond=null, config=config(k, v), **fixed).loss.item() for v in variants
        }
        dloss = max(losses.values()) - min(losses.values())
        steps = {"sft": train_step(lambda: sft_loss(model, x0, cond, config=SOARConfig(num_aux=0)))}
        for v in variants:
            steps[v] = train_step(lambda cfg=config(k, v): soar_loss(model, x0, cond, null_cond=null, config=cfg))
        for fn in steps.values():
            fn()  # warm-up (and the probe's one-time timing)
        times = {n: [] for n in steps}
        for _ in range(args.repeats):
            for n, fn in steps.items():
                times[n].append(timed(fn))
        med = {n: statistics.median(ts) for n, ts in times.items()}
        # per-round ratios: their spread is the noise of the ratio
        ratio_rounds = [d / s for d, s in zip(times["default"], times["sft"])] if "default" in times else []
        floor, old_floor = (3 * (1 + k) + 1) / 3, (3 * (1 + k) + 2) / 3
        row = f"{k:>2} {med['sft'] * 1e3:>8.1f} " + " ".join(f"{med[v] * 1e3:>15.1f}" for v in variants)
        d_sft = med["default"] / med["sft"] if "default" in med else float("nan")
        d_loop = med["default"] / med["loop"] if "default" in med and "loop" in med else float("nan")
        row += f" {d_sft:>11.2f} {floor:>6.2f} {old_floor:>9.2f} {d_loop:>12.2f} {dloss:>10.1e}"
        print(row, flush=True)
        results["ks"][str(k)] = {
            "times_s": times,
            "median_s": med,
            "losses_fixed_draws": losses,
            "max_abs_loss_diff": dloss,
            "default_over_sft": d_sft,
            "default_over_sft_rounds": ratio_rounds,
            "default_over_loop": d_loop,
            "floor": floor,
            "old_floor": old_floor,
        }
        if device.type == "cuda":
            peaks = {}
            for n, fn in steps.items():
                torch.cuda.reset_peak_memory_stats(device)
                fn()
                peaks[n] = torch.cuda.max_memory_allocated(device) / 2**20
            results["ks"][str(k)]["peak_mib"] = peaks
            print("   peak MiB: " + ", ".join(f"{n} {m:.0f}" for n, m in peaks.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
