"""`soarflow eval`: generate a prompt suite with a model and score it with the paper's metrics.

    soarflow eval --model runs/sd35_soar --suite geneval --output_dir eval/soar_geneval
    accelerate launch --num_processes 8 -m soarflow eval --model ... --suite drawbench --prompts_file drawbench.csv ...

``--model`` is a diffusers pipeline folder (``model_index.json``; a hub id works too) or anything `soarflow
sample` loads (a saved model folder, a run folder, a ``checkpoint-N`` folder; full fine-tune or LoRA).

**Generation.** Image k of prompt i starts from the noise of seed ``SeedSequence([seed, i, k])``, whatever the
number of processes or the order of the runs. Process r of R generates (and scores) prompts i with i mod R = r.
An image that exists and opens is not generated again, so an interrupted run continues where it stopped; the run's
settings are kept in ``eval_config.json`` and a rerun with other settings is refused (``--overwrite`` starts over).
Layout: GenEval as its ``evaluate_images.py`` reads it, ``<out>/<i:05d>/metadata.jsonl`` +
``<out>/<i:05d>/samples/<k:04d>.png``; other suites ``<out>/images/<i:05d>_<k:04d>.png``; both with
``<out>/index.jsonl`` (one line per image: file, prompt index, image index, prompt, metadata).

**Scoring** reads the saved PNGs (what the official evaluators see), in batches of ``--batch_size``. Results:
``<out>/results.json`` (settings, per-image scores, per-scorer summary, GenEval per tag) and ``<out>/results.md``
(the paper's columns: GenEval, OCR, PickScore, ClipScore, HPSv2.1, Aesthetic, ImageReward).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..scorers.registry import COLUMNS, SCORER_NAMES, build_scorer, check_packages
from ..scorers.suites import SUITES, PromptRecord, load_suite
from .sample import DTYPES, load_pipeline, pipeline_kwargs

CONFIG_FILE, INDEX_FILE, RESULTS_FILE, TABLE_FILE = "eval_config.json", "index.jsonl", "results.json", "results.md"
DEFAULT_SCORERS = {
    "geneval": ("geneval",),
    "ocr": ("ocr",),
    "drawbench": ("pickscore", "clip", "hpsv2", "aesthetic", "imagereward"),
    "pickscore": ("pickscore", "clip", "hpsv2", "aesthetic", "imagereward"),
    "file": ("pickscore", "clip", "hpsv2", "aesthetic", "imagereward"),
}
PIPELINE_FAMILIES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
# how the table prints each column (the paper's precision)
FORMATS = {
    "geneval": "{:.3f}",
    "ocr": "{:.3f}",
    "pickscore": "{:.2f}",
    "clip": "{:.3f}",
    "hpsv2": "{:.3f}",
    "aesthetic": "{:.2f}",
    "imagereward": "{:.3f}",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soarflow eval",
        description="Generate a prompt suite with a model (diffusers "
        "pipeline folder or soarflow run) and score it with the paper's metrics.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="diffusers pipeline folder or hub id, saved soarflow model, run folder or checkpoint-N folder",
    )
    p.add_argument(
        "--suite",
        choices=SUITES,
        default="geneval",
        help="prompt suite (geneval is built in; the others need --prompts_file)",
    )
    p.add_argument(
        "--prompts_file",
        help="the suite's prompts: GenEval evaluation_metadata.jsonl, .txt (one per "
        "line), .jsonl ('prompt' key) or .csv ('Prompts' column)",
    )
    p.add_argument("--output_dir", required=True)
    p.add_argument(
        "--scorers",
        default=None,
        help=f"comma-separated, from {', '.join(SCORER_NAMES)} "
        "(default: the suite's: geneval -> geneval, ocr -> ocr, others -> the five preference metrics)",
    )
    p.add_argument(
        "--scorer_path",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="weights of a scorer (folder, file or hub id; for ocr the engine easyocr|paddleocr); repeatable",
    )
    p.add_argument("--aesthetic_head", default=None, help="the aesthetic MLP head file (default: from the hub)")
    p.add_argument("--geneval_config", default=None, help="mmdet config of the GenEval detector")
    p.add_argument("--num_images_per_prompt", type=int, default=None, help="default 4 for geneval, else 1")
    p.add_argument("--num_inference_steps", type=int, default=40)
    p.add_argument("--guidance_scale", type=float, default=4.5)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_sequence_length", type=int, default=None)
    p.add_argument("--max_prompts", type=int, default=None, help="only the first N prompts of the suite")
    p.add_argument("--base", help="base pipeline for a soarflow model (default: its pretrained path)")
    p.add_argument("--batch_size", type=int, default=8, help="images per scorer call")
    p.add_argument("--device", default=None, help="default: this process's accelerator, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--skip_scoring", action="store_true", help="only generate (e.g. for the official evaluators)")
    p.add_argument("--overwrite", action="store_true", help="discard images made with other settings")
    return p


@dataclass(frozen=True)
class ImageItem:
    prompt_index: int
    image_index: int
    record: PromptRecord
    file: str  # relative to the output folder


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The noise seed of image k of prompt i: independent of the process count and of the run order."""
    return int(np.random.SeedSequence([seed, prompt_index, image_index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def image_file(suite: str, i: int, k: int) -> str:
    return f"{i:05d}/samples/{k:04d}.png" if suite == "geneval" else f"images/{i:05d}_{k:04d}.png"


def plan(records: Sequence[PromptRecord], suite: str, n: int) -> list[ImageItem]:
    return [ImageItem(i, k, r, image_file(suite, i, k)) for i, r in enumerate(records) for k in range(n)]


def is_valid_image(path: Path, size: tuple[int | None, int | None] = (None, None)) -> bool:
    """An image that exists, decodes, and has the requested (height, width) where given."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            w, h = im.size
    except (OSError, ValueError, SyntaxError):
        return False
    return (size[0] is None or h == size[0]) and (size[1] is None or w == size[1])


def load_model_pipeline(model: str, base: str | None, dtype: torch.dtype):
    """(pipeline, manifest): a diffusers pipeline folder or hub id, or whatever `soarflow sample` loads."""
    path = Path(model)
    if path.exists() and not (path / "model_index.json").is_file():
        return load_pipeline(model, base, dtype)  # a soarflow model, run or checkpoint (or a clear error)
    if not path.exists() and (model.startswith(".") or path.is_absolute() or model.count("/") != 1):
        raise FileNotFoundError(f"--model not found: {model}")
    try:
        import diffusers
    except ImportError:
        raise ValueError("soarflow eval needs the diffusers extra: pip install 'soarflow[diffusers]'") from None
    pipe = diffusers.DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    family = PIPELINE_FAMILIES.get(type(pipe).__name__)
    if family is None:
        raise ValueError(
            f"--model {model}: a {type(pipe).__name__}; soarflow eval knows {', '.join(PIPELINE_FAMILIES)}"
        )
    manifest: dict[str, Any] = {"family": family}
    if family == "flux" and getattr(pipe.transformer.config, "guidance_embeds", False):
        manifest.update(guidance="embedded", embedded_guidance_scale=3.5)
    return pipe, manifest


def settings_of(args, records: Sequence[PromptRecord], n: int) -> dict[str, Any]:
    return {
        "model": str(args.model),
        "base": args.base,
        "suite": args.suite,
        "num_prompts": len(records),
        "prompts_sha": _digest([json.dumps([r.prompt, r.metadata], sort_keys=True) for r in records]),
        "num_images_per_prompt": n,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "height": args.height,
        "width": args.width,
        "seed": args.seed,
        "max_sequence_length": args.max_sequence_length,
        "dtype": args.dtype,
    }


def _digest(lines: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def check_settings(out: Path, settings: Mapping[str, Any], overwrite: bool) -> None:
    """Refuse to mix images of other settings into this folder (the keys that differ are named)."""
    path = out / CONFIG_FILE
    if path.is_file() and not overwrite:
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise ValueError(
                f"{out} holds images made with other settings ({changes}); use another --output_dir or --overwrite"
            )


def write_layout(
    out: Path, suite: str, items: Sequence[ImageItem], records: Sequence[PromptRecord], settings: Mapping[str, Any]
) -> None:
    """eval_config.json, index.jsonl and (GenEval) each prompt folder's metadata.jsonl (main process)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(settings, indent=1))
    with (out / INDEX_FILE).open("w") as f:
        for it in items:
            f.write(
                json.dumps(
                    {
                        "file": it.file,
                        "prompt_index": it.prompt_index,
                        "image_index": it.image_index,
                        "prompt": it.record.prompt,
                        "metadata": it.record.metadata,
                    }
                )
                + "\n"
            )
    if suite == "geneval":
        for i, r in enumerate(records):
            (out / f"{i:05d}" / "samples").mkdir(parents=True, exist_ok=True)
            (out / f"{i:05d}" / "metadata.jsonl").write_text(json.dumps(r.metadata) + "\n")
    else:
        (out / "images").mkdir(exist_ok=True)


def generate_missing(pipe, manifest: Mapping[str, Any], items: Sequence[ImageItem], out: Path, args) -> int:
    """Generate this process's missing images, one pipeline call per prompt (its missing images batched, each
    with its own seeded generator); returns how many were made."""
    kw = pipeline_kwargs(dict(manifest), args.guidance_scale, args.max_sequence_length)
    by_prompt: dict[int, list[ImageItem]] = {}
    for it in items:
        if not is_valid_image(out / it.file, (args.height, args.width)):
            by_prompt.setdefault(it.prompt_index, []).append(it)
    made = 0
    for i, todo in sorted(by_prompt.items()):
        gens = [torch.Generator("cpu").manual_seed(image_seed(args.seed, i, it.image_index)) for it in todo]
        result = pipe(
            todo[0].record.prompt,
            num_inference_steps=args.num_inference_steps,
            height=args.height,
            width=args.width,
            generator=gens,
            num_images_per_prompt=len(todo),
            **kw,
        )
        for it, image in zip(todo, result.images):
            path = out / it.file
            tmp = path.with_name(path.stem + ".tmp.png")
            image.save(tmp)
            os.replace(tmp, path)
            made += 1
    return made


def load_images(out: Path, items: Sequence[ImageItem]) -> torch.Tensor:
    """The saved PNGs as a (B, 3, H, W) tensor in [-1, 1]."""
    from PIL import Image

    arrays = []
    for it in items:
        with Image.open(out / it.file) as im:
            arrays.append(np.asarray(im.convert("RGB"), dtype=np.float32))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def score_items(scorers: Mapping[str, Any], items: Sequence[ImageItem], out: Path, batch_size: int) -> list[dict]:
    """One row per image: file, indices, prompt, tag and each scorer's score."""
    rows = [
        {
            "file": it.file,
            "prompt_index": it.prompt_index,
            "image_index": it.image_index,
            "prompt": it.record.prompt,
            "tag": it.record.tag,
            "scores": {},
        }
        for it in items
    ]
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        images = load_images(out, chunk)
        prompts = [it.record.prompt for it in chunk]
        for name, scorer in scorers.items():
            if name == "geneval":
                s = scorer(images, prompts, metadata=[it.record.metadata for it in chunk])
            else:
                s = scorer(images, prompts)
            s = torch.as_tensor(s).float().reshape(-1)
            if s.numel() != len(chunk):
                raise ValueError(f"scorer {name!r} returned {s.numel()} scores for {len(chunk)} images")
            for row, v in zip(rows[start : start + batch_size], s.tolist()):
                row["scores"][name] = v
    return rows


def summarize(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """Per scorer: mean, std, n over images; GenEval also per tag and ``overall`` = mean over tags."""
    from ..scorers.geneval import summarize as geneval_summary

    out: dict[str, Any] = {}
    for name in names:
        vals = np.array([r["scores"][name] for r in rows], dtype=np.float64)
        out[name] = {
            "mean": float(vals.mean()),
            "std": float(vals.std(ddof=1)) if len(vals) > 1 else math.nan,
            "n": int(len(vals)),
        }
        if name == "geneval":
            tags = [r["tag"] or "untagged" for r in rows]
            out[name]["per_tag"] = geneval_summary(tags, vals.tolist())
            out[name]["mean"] = out[name]["per_tag"]["overall"]
    return out


def table(label: str, suite: str, summary: Mapping[str, Any]) -> str:
    """A markdown table with the paper's columns (a dash where a metric was not run)."""
    head = "| model | suite | " + " | ".join(COLUMNS.values()) + " |"
    cells = [FORMATS[n].format(summary[n]["mean"]) if n in summary else "-" for n in COLUMNS]
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2), f"| {label} | {suite} | " + " | ".join(cells) + " |"]
    if "geneval" in summary:
        tags = summary["geneval"]["per_tag"]
        lines += ["", "GenEval per tag: " + ", ".join(f"{t} {v:.3f}" for t, v in tags.items())]
    return "\n".join(lines) + "\n"


def _scorer_paths(args) -> dict[str, str]:
    paths = {}
    for spec in args.scorer_path:
        name, sep, value = spec.partition("=")
        if not sep or name not in SCORER_NAMES:
            raise ValueError(f"--scorer_path {spec!r}: expected NAME=PATH with NAME one of {', '.join(SCORER_NAMES)}")
        paths[name] = value
    return paths


def scorer_names(args) -> list[str]:
    names = (
        [n.strip() for n in args.scorers.split(",") if n.strip()] if args.scorers else list(DEFAULT_SCORERS[args.suite])
    )
    bad = [n for n in names if n not in SCORER_NAMES]
    if bad:
        raise ValueError(f"--scorers: unknown {bad[0]!r} (choose from {', '.join(SCORER_NAMES)})")
    return names


def build_scorers(args, names: Sequence[str], device: str) -> dict[str, Any]:
    paths = _scorer_paths(args)
    extra = {"aesthetic": {"head": args.aesthetic_head}, "geneval": {"config": args.geneval_config}}
    return {n: build_scorer(n, path=paths.get(n), device=device, **extra.get(n, {})) for n in names}


def run(args, scorers: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """Generate (sharded over the accelerate processes) and score; returns the results on the main process.
    `scorers` replaces the ones `--scorers` would build (stand-ins, or scorers built by the caller)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object, parse_flag_from_env

    # on CPU (`accelerate launch --cpu`, or ACCELERATE_USE_CPU as the launcher sets it) the process group is gloo
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or args.device == "cpu")
    records = load_suite(args.suite, args.prompts_file)
    if args.max_prompts:
        records = records[: args.max_prompts]
    n = args.num_images_per_prompt or (4 if args.suite == "geneval" else 1)
    names = list(scorers) if scorers is not None else scorer_names(args)
    out = Path(args.output_dir)
    items = plan(records, args.suite, n)
    mine = [it for it in items if it.prompt_index % state.num_processes == state.process_index]
    settings = settings_of(args, records, n)
    if scorers is None and not args.skip_scoring:
        paths = _scorer_paths(args)
        for name in names:  # a missing package fails now, not after the generation
            check_packages(name, paths.get("ocr") if name == "ocr" else None)
    if state.is_main_process:
        check_settings(out, settings, args.overwrite)
        write_layout(out, args.suite, items, records, settings)
    state.wait_for_everyone()
    device = args.device or str(state.device)
    if any(not is_valid_image(out / it.file, (args.height, args.width)) for it in mine):
        dtype = DTYPES[args.dtype or ("bfloat16" if torch.device(device).type == "cuda" else "float32")]
        with state.main_process_first():
            pipe, manifest = load_model_pipeline(args.model, args.base, dtype)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        made = generate_missing(pipe, manifest, mine, out, args)
        del pipe
        print(f"[process {state.process_index}] generated {made} image(s)", file=sys.stderr)
    state.wait_for_everyone()
    if args.skip_scoring:
        return None
    if scorers is None:
        with state.main_process_first():
            scorers = build_scorers(args, names, device)
    rows = score_items(scorers, mine, out, args.batch_size)
    if state.num_processes > 1:
        rows = gather_object(rows)
    if not state.is_main_process:
        return None
    rows = sorted(rows, key=lambda r: (r["prompt_index"], r["image_index"]))
    summary = summarize(rows, names)
    results = {"settings": settings, "num_processes": state.num_processes, "summary": summary, "images": rows}
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=1))
    (out / TABLE_FILE).write_text(table(str(args.model), args.suite, summary))
    return results


def close_process_group() -> None:
    """Destroy the process group of an `accelerate launch` run before the interpreter exits, so its teardown is
    an orderly call rather than left to destructors at exit. Callers of `run` under a launcher call it too."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        results = run(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"soarflow eval: error: {err}", file=sys.stderr)
        return 2
    finally:
        close_process_group()
    if results is not None:
        print((Path(args.output_dir) / TABLE_FILE).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
