"""`soarflow pretrain`: train an embedded model (U-Net by default) from scratch on the ShapesEval pretraining corpus.

This produces the shipped base model (src/soarflow/assets/base_shapes.safetensors and its manifest). It is the
trainer with configs/shapes_pretrain.yaml: the flags below map onto that config's keys (`pretrain_config`), so
`soarflow pretrain --output_dir D` and `soarflow train --config configs/shapes_pretrain.yaml --output_dir D` run
the same training. Writes D/model.safetensors (EMA weights), D/manifest.json (this command line, its flags,
steps, loss, wall clock, ShapesEval / FD / diversity), config.yaml, logs/ and a resumable checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import shutil
import sys
from pathlib import Path

from ..train.config import TrainConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soarflow pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="runs/pretrain", help="where model.safetensors and manifest.json go")
    p.add_argument("--max_train_steps", type=int, default=4000)
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=6e-4)
    p.add_argument("--lr_warmup_steps", type=int, default=300)
    p.add_argument(
        "--lr_scheduler",
        choices=["constant", "cosine"],
        default="cosine",
        help="after warm-up: constant, or cosine decay to 0 (a converged, stable base to fine-tune)",
    )
    p.add_argument("--adam_weight_decay", type=float, default=0.0)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--cond_dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_samples", type=int, default=None, help="pretraining corpus size (default: the split's)")
    p.add_argument("--logit_mean", type=float, default=0.3, help="t density: mean of the logit-normal part")
    p.add_argument("--logit_std", type=float, default=1.0, help="t density: std of the logit-normal part")
    p.add_argument("--uniform_fraction", type=float, default=0.25, help="t density: share of t drawn from U(0, 1)")
    p.add_argument(
        "--max_train_seconds",
        type=float,
        default=None,
        help="stop early after this much training time (equal-wall-clock architecture comparisons)",
    )
    p.add_argument("--architecture", choices=["unet", "mmdit"], default="unet")
    p.add_argument(
        "--channels", type=_int_list, default=[32, 64, 128], help="unet: channels per resolution, e.g. 32,64,128"
    )
    p.add_argument("--num_res_blocks", type=int, default=1, help="unet: residual blocks per resolution")
    p.add_argument(
        "--attention_levels", type=_int_list, default=[1, 2], help="unet: levels with joint attention, e.g. 1,2"
    )
    p.add_argument("--text_dim", type=int, default=128, help="unet: caption encoder width")
    p.add_argument("--text_layers", type=int, default=1, help="unet: caption encoder transformer layers")
    p.add_argument("--hidden_size", type=int, default=96, help="mmdit: width")
    p.add_argument("--depth", type=int, default=4, help="mmdit: joint blocks")
    p.add_argument("--patch_size", type=int, default=4, help="mmdit: patch size")
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--checkpointing_steps", type=int, default=500, help="save a resumable checkpoint every N steps")
    p.add_argument(
        "--dataloader_num_workers", type=int, default=0, help="processes rendering the corpus (0: in the main one)"
    )
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--eval_prompts_per_family", type=int, default=10, help="ShapesEval size for the manifest score")
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing output_dir/model.safetensors")
    return p


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def pretrain_config(args: argparse.Namespace) -> TrainConfig:
    """The trainer config of a `soarflow pretrain` command line (configs/shapes_pretrain.yaml for the defaults)."""
    arch_keys = (
        "architecture",
        "channels",
        "num_res_blocks",
        "attention_levels",
        "text_dim",
        "text_layers",
        "hidden_size",
        "depth",
        "patch_size",
        "num_heads",
    )
    return TrainConfig(
        task="shapes",
        method="sft",
        output_dir=args.output_dir,
        seed=args.seed,
        learning_rate=args.learning_rate,
        # the trainer's "constant" has no warm-up; pretrain's "constant" is warm-up then constant
        lr_scheduler="constant_with_warmup" if args.lr_scheduler == "constant" else args.lr_scheduler,
        lr_warmup_steps=args.lr_warmup_steps,
        train_batch_size=args.train_batch_size,
        max_train_steps=args.max_train_steps,
        max_train_seconds=args.max_train_seconds,
        max_grad_norm=args.max_grad_norm,
        adam_weight_decay=args.adam_weight_decay,
        mixed_precision=args.mixed_precision,
        dataloader_num_workers=args.dataloader_num_workers,
        weighting_scheme="logit_normal",
        logit_mean=args.logit_mean,
        logit_std=args.logit_std,
        uniform_fraction=args.uniform_fraction,
        cond_dropout=args.cond_dropout,
        use_ema=True,
        ema_decay=args.ema_decay,
        checkpointing_steps=args.checkpointing_steps,
        checkpoints_total_limit=1,
        validation_steps=0,
        logging_steps=1,
        write_manifest=True,
        soar=dataclasses.replace(TrainConfig().soar, shift=1.0),  # pixel space: no time shift
        model={"pretrained": None, **{k: getattr(args, k) for k in arch_keys}},
        data={
            "split": "pretrain",
            "num_samples": args.num_samples,
            "seed": args.seed,
            "eval_prompts_per_family": args.eval_prompts_per_family,
        },
    )


# What a pretraining run writes into output_dir (removed by --overwrite; nothing else is touched).
RUN_FILES = ("model.safetensors", "model-latest.safetensors", "manifest.json", "config.yaml", "logs", "validation")


def _remove_previous_run(out: Path) -> None:
    if not out.is_dir():
        return
    for path in (
        [out / name for name in RUN_FILES] + sorted(out.glob("config.*.yaml")) + sorted(out.glob("checkpoint-*"))
    ):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)  # several processes (accelerate launch) may race here
        else:
            path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    from .train import run_train

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir)
    final = out / "model.safetensors"
    if final.exists() and not args.overwrite:
        print(
            f"soarflow pretrain: error: {final} already exists; pass --overwrite or choose another --output_dir",
            file=sys.stderr,
        )
        return 2
    try:
        cfg = pretrain_config(args)
    except ValueError as err:
        print(f"soarflow pretrain: error: {err}", file=sys.stderr)
        return 2
    if args.overwrite:
        _remove_previous_run(out)
    return run_train(cfg, "soarflow pretrain " + shlex.join(argv), prog="soarflow pretrain", args=vars(args))
