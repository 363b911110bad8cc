"""Why does SFT lose uncoloured objects? Images of "a circle" / "a square" / "a triangle" before and after SFT.

Trains one SFT recipe from the shipped base (or loads it from ``--weights`` if that file exists), samples the
uncoloured single-object prompts and their coloured counterparts at several guidance scales on the same noise for
both models, and sorts every image into one of:

* ``correct``: the scorer finds an object of the asked shape;
* ``blank``: almost nothing is drawn (fewer than the scorer's minimum object area of "ink" pixels: a channel at
  least 0.15 above the background's brightest);
* ``off_palette``: something is drawn, but too few of its pixels have a palette colour for the scorer to see an
  object (a colour between palette colours, or too dim);
* ``wrong_shape``: an object is found, of another shape or an unclassifiable one.

One JSON line per (model, prompt kind, guidance) is appended to ``--out`` (default runs/headroom/diagnose.jsonl);
a grid of the first images per setting is written next to it. The trained SFT weights are cached under a name
that covers the config, the overrides and the seed, so a run with other settings trains afresh. Command used for
docs/headroom.md (docs/perf/headroom/diagnose.jsonl):

    OMP_NUM_THREADS=1 python bench/headroom_diagnose.py --seed 2 --out docs/perf/headroom/diagnose.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from pathlib import Path

import torch
import yaml

from soarflow.shapes.generate import generate_images
from soarflow.shapes.scorer import detect, min_object_area, pixel_classes
from soarflow.study.spec import with_overrides
from soarflow.utils.images import save_image_grid
from soarflow.train import TrainConfig, build_task, train

ROOT = Path(__file__).resolve().parents[1]
UNCOLOURED = ["a circle", "a square", "a triangle"]
COLOURED = ["a red circle", "a blue square", "a green triangle"]
BACKGROUND_MAX = 26 / 255  # the background's brightest channel (grammar.BACKGROUND)


def categorise(images: torch.Tensor, prompts: list[str]) -> tuple[Counter, list[dict]]:
    found = detect(images)
    classes = pixel_classes(images)
    ink = ((images + 1) / 2).amax(1) > BACKGROUND_MAX + 0.15  # clearly brighter than the background
    area = min_object_area(images.shape[-1])
    counts, rows = Counter(), []
    for i, (objs, prompt) in enumerate(zip(found, prompts)):
        shape = prompt.split()[-1]
        if any(o.shape == shape for o in objs):
            kind = "correct"
        elif objs:
            kind = "wrong_shape"
        elif int(ink[i].sum()) < area:
            kind = "blank"
        else:
            kind = "off_palette"
        counts[kind] += 1
        rows.append({"kind": kind, "ink": int(ink[i].sum()), "palette": int((classes[i] > 0).sum())})
    return counts, rows


class SplitGuidance(torch.nn.Module):
    """One velocity model from two: `cond_model` for captioned rows, `null_model` for null-caption rows (all-zero
    tokens), so classifier-free guidance mixes one model's conditional branch with the other's unconditional one."""

    def __init__(self, cond_model: torch.nn.Module, null_model: torch.nn.Module):
        super().__init__()
        self.cond_model, self.null_model, self.config = cond_model, null_model, cond_model.config

    def forward(self, x, sigma, cond):
        null = (cond["tokens"] == 0).all(1).view(-1, *([1] * (x.ndim - 1)))
        return torch.where(null, self.null_model(x, sigma, cond), self.cond_model(x, sigma, cond))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/shapes_sft.yaml"))
    ap.add_argument("--set", nargs="*", default=["learning_rate=1e-4", "max_train_steps=300"])
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument(
        "--weights", default=None, help="SFT weights to load or save (default /tmp/diag/sft_<seed>_<settings hash>.pt)"
    )
    ap.add_argument("--images", type=int, default=32, help="images per prompt")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 4.0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default="runs/headroom/diagnose.jsonl", help="JSON lines, appended")
    ap.add_argument(
        "--split_guidance",
        action="store_true",
        help="instead: uncoloured prompts at the last --guidance with one model's conditional branch and the "
        "other's unconditional one (which branch makes the blanks?)",
    )
    args = ap.parse_args()

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    raw = with_overrides(
        yaml.safe_load(Path(args.config).read_text()),
        {"output_dir": f"/tmp/diag/run_{args.seed}", "report_to": "none", "checkpointing_steps": 0,
         "validation_steps": 0, "show_progress": False, "seed": args.seed, **overrides},
    )  # fmt: skip
    config = TrainConfig.from_dict(raw)
    task = build_task(config)
    base = task.build_model().float().eval()
    settings = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:12]
    weights = Path(args.weights or f"/tmp/diag/sft_{args.seed}_{settings}.pt")
    tuned = task.build_model().float().eval()
    if weights.exists():
        tuned.load_state_dict(torch.load(weights))
    else:
        tuned = train(config, task, tuned).model.float().eval()
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tuned.state_dict(), weights)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grids = {}
    models = [("base", base), ("sft", tuned)]
    kinds = (("uncoloured", UNCOLOURED), ("coloured", COLOURED))
    if args.split_guidance:
        models = [
            ("sft_cond+base_null", SplitGuidance(tuned, base)),
            ("base_cond+sft_null", SplitGuidance(base, tuned)),
        ]
        kinds, args.guidance = kinds[:1], args.guidance[-1:]
    for kind, names in kinds:
        prompts = [p for p in names for _ in range(args.images)]
        for g in args.guidance:
            for label, model in models:
                with torch.no_grad():
                    images = generate_images(model, prompts, num_steps=args.steps, guidance_scale=g, shift=1.0, seed=7)
                counts, rows = categorise(images, prompts)
                per_prompt = {
                    p: dict(Counter(r["kind"] for r, q in zip(rows, prompts) if q == p)) for p in names
                }  # fmt: skip
                line = {
                    "model": label, "seed": args.seed, "overrides": overrides, "prompts": kind, "guidance": g,
                    "steps": args.steps, "n": len(prompts), **{k: counts.get(k, 0) for k in
                    ("correct", "blank", "off_palette", "wrong_shape")}, "per_prompt": per_prompt,
                    "mean_ink_pixels": sum(r["ink"] for r in rows) / len(rows),
                    "mean_palette_pixels": sum(r["palette"] for r in rows) / len(rows),
                }  # fmt: skip
                with open(out, "a") as f:
                    f.write(json.dumps(line) + "\n")
                print(json.dumps({k: v for k, v in line.items() if k not in ("overrides", "per_prompt")}), flush=True)
                grids[f"{kind}_g{g:g}_{label}"] = images.view(len(names), args.images, *images.shape[1:])[:, :8]
    for name, im in grids.items():
        save_image_grid(im.flatten(0, 1), None, out.parent / f"diagnose_{args.seed}_{name}.png", ncol=8)


if __name__ == "__main__":
    main()
