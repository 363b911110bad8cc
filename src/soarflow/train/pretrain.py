"""`soarflow pretrain`: train an embedded model (U-Net by default) from scratch on the ShapesEval pretraining corpus.

This produces the shipped base model (src/soarflow/assets/base_shapes.safetensors and its manifest). It is
plain rectified-flow pretraining — the SFT loss with 10% condition dropout so guidance works, training times
t drawn from a mixture of logit-normal(logit_mean, logit_std) and uniform(0, 1) (the uniform share keeps the
high-noise levels, where the layout is decided, in the training mix), AdamW, a
linear warm-up, and an EMA of the weights (the EMA is what is saved) — in a short loop of its own on
accelerate, because pretraining streams a large synthetic corpus once and needs none of the post-training
trainer's machinery (rollouts, resumable checkpoints of several methods). Post-training uses
`soarflow train` / `soarflow demo`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shlex
import sys
import time
from functools import partial
from pathlib import Path

import torch

from ..flow import sample_t
from ..objective import SOARConfig, sft_loss


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soarflow pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="runs/pretrain", help="where model.safetensors and manifest.json go")
    p.add_argument("--max_train_steps", type=int, default=4000)
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=6e-4)
    p.add_argument("--lr_warmup_steps", type=int, default=300)
    p.add_argument("--lr_scheduler", choices=["constant", "cosine"], default="cosine",
                   help="after warm-up: constant, or cosine decay to 0 (a converged, stable base to fine-tune)")
    p.add_argument("--adam_weight_decay", type=float, default=0.0)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--cond_dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_samples", type=int, default=None, help="pretraining corpus size (default: the split's)")
    p.add_argument("--logit_mean", type=float, default=0.3, help="t density: mean of the logit-normal part")
    p.add_argument("--logit_std", type=float, default=1.0, help="t density: std of the logit-normal part")
    p.add_argument("--uniform_fraction", type=float, default=0.25, help="t density: share of t drawn from U(0, 1)")
    p.add_argument("--max_train_seconds", type=float, default=None,
                   help="stop early after this much training time (equal-wall-clock architecture comparisons)")
    p.add_argument("--architecture", choices=["unet", "mmdit"], default="unet")
    p.add_argument("--channels", type=_int_list, default=[32, 64, 128], help="unet: channels per resolution, e.g. 32,64,128")
    p.add_argument("--num_res_blocks", type=int, default=1, help="unet: residual blocks per resolution")
    p.add_argument("--attention_levels", type=_int_list, default=[1, 2], help="unet: levels with joint attention, e.g. 1,2")
    p.add_argument("--text_dim", type=int, default=128, help="unet: caption encoder width")
    p.add_argument("--text_layers", type=int, default=1, help="unet: caption encoder transformer layers")
    p.add_argument("--hidden_size", type=int, default=96, help="mmdit: width")
    p.add_argument("--depth", type=int, default=4, help="mmdit: joint blocks")
    p.add_argument("--patch_size", type=int, default=4, help="mmdit: patch size")
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--checkpointing_steps", type=int, default=500, help="write the EMA weights every N steps")
    p.add_argument("--dataloader_num_workers", type=int, default=0, help="processes rendering the corpus (0: in the main one)")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--eval_prompts_per_family", type=int, default=10, help="ShapesEval size for the manifest score")
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing output_dir/model.safetensors")
    return p


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def draw_t(args: argparse.Namespace, batch: int, generator: torch.Generator, device) -> torch.Tensor:
    """Training times: logit-normal(logit_mean, logit_std), each replaced by U(0, 1) with prob. uniform_fraction."""
    t = sample_t(batch, density="logit_normal", logit_mean=args.logit_mean, logit_std=args.logit_std,
                 generator=generator, device=device)
    if args.uniform_fraction > 0:
        u = torch.rand(batch, generator=generator, device=device)
        pick = torch.rand(batch, generator=generator, device=device) < args.uniform_fraction
        t = torch.where(pick, u, t)
    return t


def lr_factor(args: argparse.Namespace, step: int) -> float:
    """Linear warm-up, then constant or a cosine decay to 0 at max_train_steps."""
    if step < args.lr_warmup_steps:
        return (step + 1) / args.lr_warmup_steps
    if args.lr_scheduler == "constant":
        return 1.0
    progress = (step - args.lr_warmup_steps) / max(1, args.max_train_steps - args.lr_warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1 - decay)


def main_pretrain(argv: list[str] | None = None) -> int:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from ..models.embedded import save_checkpoint
    from ..tasks.shapes import ShapesDataSection, ShapesModelSection, ShapesTask

    args = build_parser().parse_args(argv)
    out = Path(args.output_dir)
    final = out / "model.safetensors"
    if final.exists() and not args.overwrite:
        print(f"error: {final} already exists; pass --overwrite or choose another --output_dir", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    set_seed(args.seed)
    if not 0 <= args.uniform_fraction <= 1:
        print(f"error: --uniform_fraction must be in [0, 1], got {args.uniform_fraction}", file=sys.stderr)
        return 2
    task = ShapesTask(
        ShapesModelSection(
            pretrained=None, architecture=args.architecture, channels=args.channels, num_res_blocks=args.num_res_blocks,
            attention_levels=args.attention_levels, text_dim=args.text_dim, text_layers=args.text_layers,
            hidden_size=args.hidden_size, depth=args.depth, num_heads=args.num_heads, patch_size=args.patch_size,
        ),
        ShapesDataSection(split="pretrain", num_samples=args.num_samples, seed=args.seed),
    )
    model = task.build_model()
    ema = copy.deepcopy(model).requires_grad_(False)
    objective = SOARConfig(num_aux=0, shift=1.0, cond_dropout=args.cond_dropout)
    loader = torch.utils.data.DataLoader(
        task.train_dataset(),
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=task.collate,
        generator=torch.Generator().manual_seed(args.seed),
        num_workers=args.dataloader_num_workers,
        persistent_workers=args.dataloader_num_workers > 0,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, args))
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    ema.to(accelerator.device)
    gen = torch.Generator(device=accelerator.device).manual_seed(args.seed + 1)

    n_params = sum(p.numel() for p in model.parameters())
    accelerator.print(f"pretraining {args.architecture} ({n_params / 1e6:.2f}M params) for {args.max_train_steps} steps -> {out}")
    step, start, running = 0, time.time(), None
    while step < args.max_train_steps:
        for batch in loader:
            x0, cond = task.encode_batch(batch, accelerator.device)
            t = draw_t(args, x0.shape[0], gen, accelerator.device)
            out_obj = sft_loss(model, x0, cond, config=objective, null_cond=task.null_cond(x0.shape[0], accelerator.device),
                               generator=gen, t=t)
            accelerator.backward(out_obj.loss)
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            ema_update(ema, accelerator.unwrap_model(model), min(args.ema_decay, (1 + step) / (10 + step)))
            step += 1
            loss = out_obj.loss.item()
            running = loss if running is None else 0.98 * running + 0.02 * loss
            if step % 100 == 0 or step == args.max_train_steps:
                accelerator.print(f"step {step}/{args.max_train_steps} loss {running:.4f} {time.time() - start:.0f}s", flush=True)
            if accelerator.is_main_process and step % args.checkpointing_steps == 0:
                save_checkpoint(ema, out / "model-latest.safetensors", {"step": str(step)})
            out_of_time = args.max_train_seconds is not None and time.time() - start >= args.max_train_seconds
            if step >= args.max_train_steps or out_of_time:
                break
        if args.max_train_seconds is not None and time.time() - start >= args.max_train_seconds:
            break
    wall = time.time() - start
    if not accelerator.is_main_process:
        return 0
    manifest = {
        "command": "soarflow pretrain " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "args": vars(args),
        "steps": step,
        "parameters": n_params,
        "final_loss_ema": running,
        "wall_clock_s": round(wall, 1),
        "machine": f"{platform.machine()} {platform.system()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name()}" if accelerator.device.type == "cuda" else ""),
    }
    save_checkpoint(ema, final, {"step": str(step)})
    (out / "model-latest.safetensors").unlink(missing_ok=True)
    manifest["shapes_eval"] = _score_for_manifest(ema, args)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {final} and {out / 'manifest.json'} (ShapesEval overall {manifest['shapes_eval'].get('overall')})")
    return 0


def _score_for_manifest(model: torch.nn.Module, args: argparse.Namespace) -> dict:
    """ShapesEval, FD and diversity of the base at the demo's default sampler settings (40 Euler steps, guidance 4)."""
    from ..shapes.generate import generate_images
    from ..shapes import ShapesEval, score
    from ..shapes.metrics import diversity, frechet_distance

    bench = ShapesEval(prompts_per_family=args.eval_prompts_per_family, images_per_prompt=4, seed=0)
    prompts = bench.image_prompts()
    images = generate_images(model, prompts, num_steps=40, guidance_scale=4.0, seed=0)
    report = score(images, prompts)
    groups = [i // bench.images_per_prompt for i in range(len(prompts))]
    return {"num_steps": 40, "cfg_scale": 4.0, "prompt_seed": 0, "overall": report.overall, "per_family": report.per_family,
            "fd": frechet_distance(images, bench.render_real()), "diversity": diversity(images, groups)}
