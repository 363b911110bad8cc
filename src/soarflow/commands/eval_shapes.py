"""`soarflow eval-shapes`: score a folder of PNGs, a model checkpoint or the world's own renders on ShapesEval.

Image layout (used by ``--images`` and written by ``--write_real``): image k (0-based) of evaluation prompt p is
``{p.index:04d}_{k}.png`` (RGB, all the same square size, at least 24 x 24), e.g. ``0012_3.png``. Grayscale or
palette images are converted to RGB and counted. The prompt set is
``ShapesEval(--prompts_per_family, --images_per_prompt, --seed)``; list it with ``--list_prompts``.

``--checkpoint`` takes ``base``, a model file, a run folder or a ``checkpoint-N`` folder
(see :mod:`soarflow.train.shapes_checkpoint` for the rule).

Alignment is always reported with fidelity: the Frechet distance (``fd``) of the images to real renders of the
same prompts (drawn with seed ``--seed + 1``, so ``--real`` shows the floor set by sampling noise) and the
per-prompt diversity (``diversity``, needs ``--images_per_prompt`` >= 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..shapes.metrics import diversity, frechet_distance
from ..shapes.scorer import score
from ..shapes.sheet import save_sample_sheet
from ..shapes.datasets import ShapesEval
from ..shapes.drawing import render, to_tensor

MIN_SIZE = 24  # the renderer's and scorer's smallest classifiable image


def read_png(path: str | Path) -> tuple[np.ndarray, bool]:
    """(H, W, 3) uint8 of an image file and whether it had to be converted to RGB (grayscale, palette, RGBA).

    Corrupt or truncated files are a ValueError naming the file."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            converted = im.mode != "RGB"
            arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as err:
        # PIL: UnidentifiedImageError / "image file is truncated" (OSError), broken chunks (SyntaxError), ...
        raise ValueError(f"image {path} is corrupt or truncated ({type(err).__name__}: {err})") from None
    return arr, converted


def image_filename(prompt_index: int, k: int) -> str:
    return f"{prompt_index:04d}_{k}.png"


def load_image_folder(folder: str | Path, ev: ShapesEval, converted: list[Path] | None = None) -> torch.Tensor:
    """All evaluation images from `folder` in `ev.image_prompts()` order, (B, 3, S, S) in [-1, 1]. Files that were
    not RGB are converted and appended to `converted`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist or is not a directory")
    arrays, first = [], None
    for p in ev.prompts:
        for k in range(ev.images_per_prompt):
            path = folder / image_filename(p.index, k)
            if not path.is_file():
                raise FileNotFoundError(f"missing image {path} for prompt {p.index} ({p.text!r}), image {k}")
            arr, was_converted = read_png(path)
            if was_converted and converted is not None:
                converted.append(path)
            if arr.shape[0] != arr.shape[1] or (first is not None and arr.shape != first):
                expected = f"{first[1]}x{first[0]} like the first image" if first is not None else "a square image"
                raise ValueError(f"image {path} has size {arr.shape[1]}x{arr.shape[0]}, expected {expected}")
            if arr.shape[0] < MIN_SIZE:
                raise ValueError(
                    f"image {path} is {arr.shape[1]}x{arr.shape[0]}; ShapesEval needs at least {MIN_SIZE}x{MIN_SIZE}"
                )
            first = arr.shape
            arrays.append(arr)
    return to_tensor(np.stack(arrays))


def write_image_folder(images: torch.Tensor, folder: str | Path, ev: ShapesEval) -> list[Path]:
    """Write images (in `ev.image_prompts()` order) as PNGs in the layout above; never overwrites a file."""
    folder = Path(folder)
    names = [image_filename(p.index, k) for p in ev.prompts for k in range(ev.images_per_prompt)]
    if len(names) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images for {len(names)} evaluation images")
    existing = [n for n in names if (folder / n).exists()]
    if existing:
        raise FileExistsError(f"{folder / existing[0]} already exists ({len(existing)} files would be overwritten)")
    folder.mkdir(parents=True, exist_ok=True)
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    paths = []
    for name, a in zip(names, arr):
        Image.fromarray(a).save(folder / name)
        paths.append(folder / name)
    return paths


# The spellings before the flags took the underscore style of every other command; still accepted, not listed.
OLD_FLAGS = {
    "--write-real": "--write_real",
    "--list-prompts": "--list_prompts",
    "--prompts-per-family": "--prompts_per_family",
    "--images-per-prompt": "--images_per_prompt",
    "--num-steps": "--num_steps",
    "--cfg-scale": "--guidance_scale",
    "--batch-size": "--batch_size",
}


def _new_spelling(arg: str) -> str:
    flag, eq, value = arg.partition("=")
    return OLD_FLAGS[flag] + eq + value if flag in OLD_FLAGS else arg


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="soarflow eval-shapes", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="score PNGs named {prompt_index:04d}_{k}.png in DIR")
    src.add_argument(
        "--checkpoint",
        metavar="PATH",
        help='score a shapes model: "base" (shipped), a model file, a run folder or a checkpoint-N folder',
    )
    src.add_argument("--real", action="store_true", help="score the world's own renders (scorer sanity check)")
    src.add_argument("--write_real", metavar="DIR", help="write the world's renders to DIR in the --images layout")
    src.add_argument("--list_prompts", action="store_true", help="print the evaluation prompts as JSON lines")
    ap.add_argument("--prompts_per_family", type=int, default=10)
    ap.add_argument("--images_per_prompt", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0, help="prompt-set seed; also the render / sampling seed")
    ap.add_argument("--size", type=int, default=32, help="image size for --real / --write_real")
    ap.add_argument("--num_steps", type=int, default=40, help="sampler steps for --checkpoint")
    ap.add_argument("--guidance_scale", type=float, default=4.0, help="guidance scale for --checkpoint")
    ap.add_argument("--batch_size", type=int, default=64, help="sampling batch size for --checkpoint")
    ap.add_argument("--jsonl", metavar="PATH", help="write per-image records (JSON lines)")
    ap.add_argument("--json", metavar="PATH", help="write the summary (JSON)")
    ap.add_argument("--sheet", metavar="PATH", help="write a PNG sample sheet of the first image of each prompt")
    return ap


def _checkpoint_images(args, ev: ShapesEval) -> torch.Tensor:
    from tqdm.auto import tqdm

    from ..train.shapes_checkpoint import describe, load_shapes_checkpoint
    from ..shapes.generate import generate_images

    kind, resolved = describe(args.checkpoint)
    model = load_shapes_checkpoint(args.checkpoint)
    prompts = ev.image_prompts()
    print(
        f"checkpoint {resolved if kind != 'base' else 'base (shipped)'}: sampling {len(prompts)} images with "
        f"{args.num_steps} Euler steps, guidance {args.guidance_scale}, seed {args.seed}",
        file=sys.stderr,
    )
    batches = -(-len(prompts) // args.batch_size)
    # one model forward per sampler step (guidance runs both halves in one call): the bar counts them
    with tqdm(total=batches * args.num_steps, desc="sampling", unit="step", disable=None, file=sys.stderr) as bar:
        hook = model.register_forward_hook(lambda *_: bar.update(1))
        try:
            return generate_images(
                model,
                prompts,
                num_steps=args.num_steps,
                guidance_scale=args.guidance_scale,
                seed=args.seed,
                batch_size=args.batch_size,
            )
        finally:
            hook.remove()


def check_writable(path: str | Path, flag: str) -> None:
    """Fail before any work if `path` exists (never overwritten) or could not be created."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{flag} {path} already exists; not overwriting it")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot write there ({parent} is not a writable folder)")


def fidelity(images: torch.Tensor, ev: ShapesEval) -> dict:
    """``fd`` to real renders of the same prompts (seed + 1) and per-prompt ``diversity`` (None with one image
    per prompt)."""
    real = render(ev.image_prompts(), seed=ev.seed + 1, size=images.shape[-1])
    groups = [p.index for p in ev.prompts for _ in range(ev.images_per_prompt)]
    div = diversity(images, groups) if ev.images_per_prompt >= 2 else None
    return {"fd": frechet_distance(images, real), "diversity": div}


def fidelity_table(fid: dict) -> str:
    div = "  -  (needs --images_per_prompt >= 2)" if fid["diversity"] is None else f"{fid['diversity']:.3f}"
    return f"{'Frechet dist.':<15}{fid['fd']:>7.2f}   (to real renders; lower is better)\n{'diversity':<15}{div:>7}"


def _run(args) -> int:
    ev = ShapesEval(args.prompts_per_family, args.images_per_prompt, args.seed)
    for name in ("jsonl", "json", "sheet"):
        path = getattr(args, name)
        if path:
            check_writable(path, f"--{name}")
    if args.list_prompts:
        for p in ev.prompts:
            print(json.dumps(p.__dict__))
        return 0
    if args.write_real:
        paths = write_image_folder(ev.render_real(args.size), args.write_real, ev)
        print(f"wrote {len(paths)} images to {args.write_real}")
        return 0
    if args.images:
        converted: list[Path] = []
        images = load_image_folder(args.images, ev, converted)
        if converted:
            print(f"converted {len(converted)} non-RGB image(s) to RGB (first: {converted[0]})", file=sys.stderr)
    elif args.checkpoint:
        images = _checkpoint_images(args, ev)
    else:
        images = ev.render_real(args.size)
    prompts = [p for p in ev.prompts for _ in range(ev.images_per_prompt)]
    report = score(images, prompts)
    fid = fidelity(images, ev)
    print(report.table())
    print(fidelity_table(fid))
    if args.jsonl:
        report.write_jsonl(args.jsonl)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "x") as f:
            json.dump({**report.to_dict(), **fid}, f, indent=2)
    if args.sheet:
        first = list(range(0, images.shape[0], ev.images_per_prompt))
        save_sample_sheet(images[first], [ev.prompts[i // ev.images_per_prompt].text for i in first], args.sheet, 10)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args([_new_spelling(a) for a in (sys.argv[1:] if argv is None else argv)])
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"soarflow eval-shapes: error: {e}", file=sys.stderr)
        return 2
