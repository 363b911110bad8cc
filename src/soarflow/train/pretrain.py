"""`soarflow pretrain`: train the embedded MMDiT from scratch on the ShapesEval pretraining corpus.

This produces the shipped base model (src/soarflow/assets/base_shapes.safetensors and its manifest). It is
plain rectified-flow pretraining — the SFT loss with 10% condition dropout so guidance works, AdamW, a
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

from ..objective import SOARConfig, sft_loss


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soarflow pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="runs/pretrain", help="where model.safetensors and manifest.json go")
    p.add_argument("--max_train_steps", type=int, default=5000)
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
    p.add_argument("--hidden_size", type=int, default=96)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--patch_size", type=int, default=4)
    p.add_argument("--checkpointing_steps", type=int, default=500, help="write the EMA weights every N steps")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--eval_prompts_per_family", type=int, default=10, help="ShapesEval size for the manifest score")
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing output_dir/model.safetensors")
    return p


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

    from ..models.mmdit import save_mmdit
    from ..models.shapes_task import ShapesDataSection, ShapesModelSection, ShapesTask

    args = build_parser().parse_args(argv)
    out = Path(args.output_dir)
    final = out / "model.safetensors"
    if final.exists() and not args.overwrite:
        print(f"error: {final} already exists; pass --overwrite or choose another --output_dir", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    set_seed(args.seed)
    task = ShapesTask(
        ShapesModelSection(
            pretrained=None, hidden_size=args.hidden_size, depth=args.depth, num_heads=args.num_heads, patch_size=args.patch_size
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
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, args))
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    ema.to(accelerator.device)
    gen = torch.Generator(device=accelerator.device).manual_seed(args.seed + 1)

    n_params = sum(p.numel() for p in model.parameters())
    accelerator.print(f"pretraining MMDiT ({n_params / 1e6:.2f}M params) for {args.max_train_steps} steps -> {out}")
    step, start, running = 0, time.time(), None
    while step < args.max_train_steps:
        for batch in loader:
            x0, cond = task.encode_batch(batch, accelerator.device)
            out_obj = sft_loss(model, x0, cond, config=objective, null_cond=task.null_cond(x0.shape[0], accelerator.device), generator=gen)
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
                save_mmdit(ema, out / "model-latest.safetensors", {"step": str(step)})
            if step >= args.max_train_steps:
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
        "machine": f"{platform.machine()} {platform.system()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
    }
    save_mmdit(ema, final, {"step": str(step)})
    (out / "model-latest.safetensors").unlink(missing_ok=True)
    manifest["shapes_eval"] = _score_for_manifest(ema, args)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {final} and {out / 'manifest.json'} (ShapesEval overall {manifest['shapes_eval'].get('overall')})")
    return 0


def _score_for_manifest(model: torch.nn.Module, args: argparse.Namespace) -> dict:
    """ShapesEval of the base at the demo's default sampler settings (40 Euler steps, guidance 4)."""
    from ..models.shapes_task import generate_images
    from ..shapes import ShapesEval, score

    bench = ShapesEval(prompts_per_family=args.eval_prompts_per_family, images_per_prompt=4, seed=0)
    prompts = [p.text for p in bench.prompts for _ in range(bench.images_per_prompt)]
    images = generate_images(model, prompts, num_steps=40, cfg_scale=4.0, seed=0)
    report = score(images, prompts)
    return {"num_steps": 40, "cfg_scale": 4.0, "overall": report.overall, "per_family": report.per_family}
