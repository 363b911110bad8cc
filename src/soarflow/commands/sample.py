"""`soarflow sample`: generate images from a trained SD3/FLUX model with a diffusers pipeline.

``--model`` is one of

* a saved model folder (``output_dir/model``: ``soarflow_model.json`` + ``transformer/`` or LoRA weights), or
  the run folder holding it;
* a checkpoint folder (``output_dir/checkpoint-N``): the run's ``config.yaml`` rebuilds the task and model and
  the checkpoint's trainable weights are loaded into it.

The base pipeline (VAE, text encoders, scheduler) comes from the model's ``pretrained`` path unless ``--base``
overrides it. Full fine-tunes replace the pipeline's transformer; LoRA folders go through
``pipeline.load_lora_weights``. Images are written as ``{output_dir}/{index:03d}.png`` with ``prompts.json``.

    soarflow sample --model runs/sd35_soar/model --prompt "a red apple" --output_dir samples/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from ..models.diffusers_weights import MANIFEST

PIPELINES = {
    "sd3": ("StableDiffusion3Pipeline", "SD3Transformer2DModel"),
    "flux": ("FluxPipeline", "FluxTransformer2DModel"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soarflow sample",
        description="Generate images from a trained SD3/FLUX model (saved "
        "model folder, run folder or checkpoint) with a diffusers pipeline.",
    )
    p.add_argument("--model", required=True, help="saved model folder, run folder, or checkpoint-N folder")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts_file", help="text file with one prompt per line")
    p.add_argument("--output_dir", required=True, help="folder for the PNGs (created; existing images are kept)")
    p.add_argument("--base", help="base pipeline folder/hub id (default: the model's pretrained path)")
    p.add_argument("--num_inference_steps", type=int, default=28)
    p.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="CFG scale (SD3, FLUX with guidance=cfg) or embedded guidance (FLUX guidance=embedded)",
    )
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_images_per_prompt", type=int, default=1)
    p.add_argument("--max_sequence_length", type=int, default=None)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on cuda, float32 on cpu")
    return p


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts_file not found: {path}")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompt given: use --prompt and/or --prompts_file")
    return prompts


def _find_model(path: Path) -> tuple[str, Path]:
    """('saved', folder with the manifest) or ('checkpoint', checkpoint folder)."""
    if (path / MANIFEST).is_file():
        return "saved", path
    if (path / "model" / MANIFEST).is_file():
        return "saved", path / "model"
    from ..train.checkpoint import CONFIG_FILE, TRAINABLE_FILE

    if (path / TRAINABLE_FILE).is_file() and (path.parent / CONFIG_FILE).is_file():
        return "checkpoint", path
    raise FileNotFoundError(
        f"--model {path}: neither a saved soarflow model ({MANIFEST}), a run folder with "
        f"model/{MANIFEST}, nor a checkpoint folder ({TRAINABLE_FILE} + ../{CONFIG_FILE})"
    )


def _refuse_shapes_run(path: Path) -> None:
    """A run or checkpoint of the embedded shapes model has no diffusers pipeline: point to eval-shapes."""
    from ..train.checkpoint import CONFIG_FILE

    for cfg in (path / CONFIG_FILE, path.parent / CONFIG_FILE):
        if cfg.is_file():
            try:
                import yaml

                task = (yaml.safe_load(cfg.read_text()) or {}).get("task")
            except (OSError, ValueError, AttributeError, yaml.YAMLError):
                return
            if task == "shapes":
                raise ValueError(
                    f"--model {path} is a shapes model (task 'shapes' in {cfg}); sample and score it "
                    f"with: soarflow eval-shapes --checkpoint {path} --sheet samples.png"
                )
            return


def load_pipeline(model_path: str | Path, base: str | None = None, dtype: torch.dtype = torch.float32):
    """(pipeline, manifest) for a saved model folder, run folder or checkpoint folder."""
    path = Path(model_path)
    if not path.exists():
        raise FileNotFoundError(f"--model not found: {path}")
    _refuse_shapes_run(path)
    kind, path = _find_model(path)
    try:
        import diffusers
    except ImportError:
        raise ValueError("soarflow sample needs the diffusers extra: pip install 'soarflow[diffusers]'") from None
    if kind == "checkpoint":
        return _pipeline_from_checkpoint(path, base, dtype)
    manifest = json.loads((path / MANIFEST).read_text())
    family = manifest.get("family")
    if family not in PIPELINES:
        raise ValueError(f"{path / MANIFEST}: unknown family {family!r}")
    pipe_cls, tr_cls = (getattr(diffusers, n) for n in PIPELINES[family])
    base = base or manifest["pretrained"]
    load_kw = {k: manifest[k] for k in ("revision", "variant") if manifest.get(k)}
    if manifest["finetune"] == "full":
        transformer = tr_cls.from_pretrained(str(path / "transformer"), torch_dtype=dtype)
        pipe = pipe_cls.from_pretrained(base, transformer=transformer, torch_dtype=dtype, **load_kw)
    else:
        pipe = pipe_cls.from_pretrained(base, torch_dtype=dtype, **load_kw)
        pipe.load_lora_weights(str(path))
    return pipe, manifest


def _pipeline_from_checkpoint(path: Path, base: str | None, dtype: torch.dtype):
    from ..train.checkpoint import CONFIG_FILE, TRAINABLE_FILE
    from ..train.config import load_config
    from ..tasks.registry import build_task
    from safetensors.torch import load_file

    cfg = load_config(path.parent / CONFIG_FILE)
    if base is not None:
        cfg.model["pretrained"] = base
    task = build_task(cfg)
    model = task.build_model()
    state = load_file(str(path / TRAINABLE_FILE))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n in params if n not in state]
    if missing:
        raise ValueError(
            f"checkpoint {path} does not match the model of {path.parent / CONFIG_FILE}: missing {missing[:5]}"
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])
    transformer = model.transformer  # a LoRA checkpoint keeps its peft adapter; the pipeline just calls forward
    pipe = task.pipeline.pipeline_class.from_pretrained(
        task.model_config.pretrained, transformer=transformer.to(dtype), torch_dtype=dtype, **task.pipeline.load_kwargs
    )
    return pipe, task.manifest(model)


def generate(
    pipe,
    manifest: dict,
    prompts: list[str],
    *,
    num_inference_steps: int,
    guidance_scale: float | None,
    height: int | None,
    width: int | None,
    seed: int,
    num_images_per_prompt: int = 1,
    max_sequence_length: int | None = None,
):
    """PIL images from the pipeline, one generator per prompt seeded (seed, prompt index); ``guidance_scale`` None
    is the diffusers tasks' default (tasks.diffusers_sections.GUIDANCE_SCALE)."""
    kw = pipeline_kwargs(manifest, guidance_scale, max_sequence_length)
    images = []
    for i, prompt in enumerate(prompts):
        gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + i)
        out = pipe(
            prompt,
            num_inference_steps=num_inference_steps,
            height=height,
            width=width,
            generator=gen,
            num_images_per_prompt=num_images_per_prompt,
            **kw,
        )
        images += [(prompt, im) for im in out.images]
    return images


def pipeline_kwargs(manifest: dict, guidance_scale: float | None, max_sequence_length: int | None = None) -> dict:
    """The guidance keywords of the pipeline call for the model's family (SD3: CFG ``guidance_scale``; FLUX with
    embedded guidance: ``guidance_scale`` is the embedded value; FLUX with true CFG: ``true_cfg_scale`` and an empty
    negative prompt); ``guidance_scale`` None is the diffusers tasks' default."""
    from ..tasks.diffusers_sections import GUIDANCE_SCALE

    kw: dict = {}
    if max_sequence_length:
        kw["max_sequence_length"] = max_sequence_length
    if manifest["family"] == "flux":
        if manifest.get("guidance") == "embedded":
            kw["guidance_scale"] = guidance_scale if guidance_scale is not None else manifest["embedded_guidance_scale"]
        else:
            kw["guidance_scale"] = manifest.get("embedded_guidance_scale", 3.5)
            kw["true_cfg_scale"] = guidance_scale if guidance_scale is not None else GUIDANCE_SCALE
            kw["negative_prompt"] = ""
    else:
        kw["guidance_scale"] = guidance_scale if guidance_scale is not None else GUIDANCE_SCALE
    return kw


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        prompts = _prompts(args)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = DTYPES[args.dtype or ("bfloat16" if device == "cuda" else "float32")]
        pipe, manifest = load_pipeline(args.model, args.base, dtype)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        images = generate(
            pipe,
            manifest,
            prompts,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            height=args.height,
            width=args.width,
            seed=args.seed,
            num_images_per_prompt=args.num_images_per_prompt,
            max_sequence_length=args.max_sequence_length,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"soarflow sample: error: {err}", file=sys.stderr)
        return 2
    taken = [int(p.stem) for p in out.glob("*.png") if p.stem.isdigit()]
    start = max(taken) + 1 if taken else 0  # never overwrite earlier samples
    index = {}
    for j, (prompt, image) in enumerate(images):
        name = f"{start + j:03d}.png"
        image.save(out / name)
        index[name] = prompt
    meta = out / "prompts.json"
    previous = json.loads(meta.read_text()) if meta.is_file() else {}
    meta.write_text(json.dumps({**previous, **index}, indent=1))
    print(f"wrote {len(images)} image(s) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
