"""`soarflow cache`: encode a training config's data (VAE latents and text embeddings, the validation prompts and
the empty prompt) into ``data.cache_dir`` before training, so the run builds neither the text encoders nor the VAE
encoder and decodes no image.

    soarflow cache --config configs/sd35_medium_soar.yaml --data.path /data/my_images
    accelerate launch --num_processes 8 -m soarflow cache --config configs/sd35_medium_soar.yaml   # 8 GPUs

It takes the same config and overrides as `soarflow train`. Each process encodes its share of the entries;
rerunning after an interruption encodes only what is missing or corrupt (see soarflow.data.encode_cache).
Exit status: 0 complete; 2 bad input; 1 entries still missing (e.g. unreadable images under on_bad_sample fail).
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..train.config import describe_fields


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="soarflow cache",
        add_help=False,
        allow_abbrev=False,
        description="Encode the data of a training config into its data.cache_dir (VAE latents + text embeddings). "
        "Takes the config and overrides of `soarflow train` (--data.cache_dir, --data.cache_dtype ...).",
    )
    parser.add_argument("--config", default=None, help="the training YAML config")
    parser.add_argument("--batch_size", type=int, default=8, help="images / prompts encoded per forward (default 8)")
    parser.add_argument("-h", "--help", action="store_true", help="show this help and the config keys")
    return parser


def main(argv: list[str]) -> int:
    args, overrides = _parser().parse_known_args(list(argv))
    if args.help:
        print(_parser().format_help() + "\nconfig keys:\n" + "\n".join(describe_fields()))
        return 0
    if args.batch_size < 1:
        print(f"soarflow cache: error: --batch_size must be >= 1 (got {args.batch_size})", file=sys.stderr)
        return 2
    from ..train.config import load_config

    try:
        cfg = load_config(args.config, overrides)
        return run_cache(cfg, args.batch_size)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"soarflow cache: error: {err}", file=sys.stderr)
        return 2


def run_cache(cfg, batch_size: int = 8) -> int:
    """Fill `cfg`'s encoder cache on every process of the current launch; returns the exit status."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from ..data.encode_cache import cache_size_bytes, fill_cache, missing_entries
    from ..tasks.registry import build_task

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator: `launch --cpu` sets it
    task = build_task(cfg)
    if not hasattr(task, "caches") or not hasattr(task, "encode_pixels"):
        raise ValueError(
            f"task {cfg.task!r} has no encoder cache (soarflow cache is for the diffusers tasks sd3, flux)"
        )
    if task.data_config.cache_dir is None:
        raise ValueError(
            "config key 'data.cache_dir': set a folder for the encoder cache (e.g. --data.cache_dir cache/)"
        )
    if task.data_config.random_flip:
        raise ValueError("config key 'data.random_flip': the cache holds one latent per image; set it to false")
    task.encode_device = state.device
    dataset = task._dataset(task.records())
    text, latents = task.caches()
    prompts = list(task.data_config.validation_prompts)
    report = fill_cache(
        text,
        latents,
        dataset,
        prompts,
        task,
        rank=state.process_index,
        world=state.num_processes,
        batch_size=batch_size,
        on_progress=lambda m: logging.getLogger(__name__).debug(m),
    )
    print(f"soarflow cache: {report.line()}", flush=True)
    for name in report.corrupt:
        print(f"  re-encoded corrupt entry {name}", flush=True)
    state.wait_for_everyone()
    if not state.is_main_process:
        return 0
    captions, images = missing_entries(text, latents, dataset, prompts)
    size = cache_size_bytes(text, latents) / 2**20
    print(
        f"soarflow cache: {len(dataset)} images, {len(text)} text entries, {len(latents)} latent entries "
        f"({task.data_config.cache_dtype}, {size:.1f} MiB) in {task.data_config.cache_dir}; "
        f"{task.bad_samples.summary()}"
    )
    if captions or images:
        print(
            f"soarflow cache: error: still missing {len(captions)} captions and {len(images)} images", file=sys.stderr
        )
        return 1
    print("soarflow cache: complete; `soarflow train` with this config reads it and builds no encoder")
    return 0
