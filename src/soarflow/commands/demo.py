"""`soarflow demo`: the paper's pipeline in miniature, on a CPU, with nothing downloaded.

1. Start from the shipped base model (the embedded U-Net pretrained on ShapesEval's noisy corpus).
2. Post-train it on the curated set twice, with SFT and with SOAR: same optimizer, learning rate, batch, steps
   and seed; SOAR with an ODE-only rollout of one guided Euler step, a few auxiliary points.
3. Evaluate base, SFT and SOAR on ShapesEval at the same sampler settings (40 Euler steps by default,
   `--eval_num_steps` for more; fixed guidance):
   per-family and overall accuracy, seen vs held-out prompts, Frechet distance to real renders, diversity,
   the exposure-bias gap, and the wall-clock of each post-training run.
4. Print the table and write a report folder: report.json (every number and the exact settings), a sample
   grid per method, and a comparison plot.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class DemoSettings:
    # 30 steps, 36 images at the paper's 40 sampler steps: the demo must fit 10 minutes with room on a slow 2-core
    # CPU, where an SFT step costs ~1.2 s, a SOAR step ~5.8 s and each model's evaluation ~55 s
    max_train_steps: int = 30
    train_batch_size: int = 32
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    cond_dropout: float = 0.1
    seed: int = 0
    num_aux: int = 4
    lambda_aux: float = 1.0
    rollout_steps: int = 10
    rollout_guidance_scale: float = 4.0
    eval_num_steps: list[int] = field(default_factory=lambda: [40])  # add 10 to see few-step exposure bias
    guidance_scale: float = 4.0  # evaluation
    prompts_per_family: int = 3
    images_per_prompt: int = 2
    exposure_images: int = 16
    base: str = "base"
    methods: list[str] = field(default_factory=lambda: ["sft", "soar"])  # post-trained; the base is always shown


QUICK = dict(
    max_train_steps=20,
    train_batch_size=16,
    eval_num_steps=[10],
    prompts_per_family=2,
    images_per_prompt=2,
    exposure_images=16,
)


def build_parser() -> argparse.ArgumentParser:
    from ..train.config import LR_SCHEDULERS, METHOD_NAMES

    d = DemoSettings()
    p = argparse.ArgumentParser(prog="soarflow demo", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--output_dir",
        default="runs/demo",
        help="report folder; a rerun with the same settings continues where it stopped",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: delete this demo's previous results in --output_dir (only a demo folder)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: a few steps and a small evaluation (< 2 min)")
    p.add_argument("--max_train_steps", type=int, help=f"post-training steps per method (default {d.max_train_steps})")
    p.add_argument("--train_batch_size", type=int, help=f"default {d.train_batch_size}")
    p.add_argument("--learning_rate", type=float, help=f"default {d.learning_rate}")
    p.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, help=f"default {d.lr_scheduler}")
    p.add_argument("--lr_warmup_steps", type=int, help=f"default {d.lr_warmup_steps}")
    p.add_argument(
        "--cond_dropout",
        type=float,
        help=f"probability of training on the null caption, keeps guidance working (default {d.cond_dropout})",
    )
    p.add_argument("--seed", type=int, help=f"default {d.seed}")
    p.add_argument("--num_aux", type=int, help=f"SOAR auxiliary points K (default {d.num_aux})")
    p.add_argument("--lambda_aux", type=float, help=f"SOAR auxiliary weight (default {d.lambda_aux})")
    p.add_argument("--rollout_steps", type=int, help=f"SOAR rollout schedule N (default {d.rollout_steps})")
    p.add_argument(
        "--rollout_guidance_scale", type=float, help=f"SOAR rollout guidance (default {d.rollout_guidance_scale})"
    )
    p.add_argument(
        "--eval_num_steps", type=int, nargs="+", help=f"sampler steps to evaluate (default {d.eval_num_steps})"
    )
    p.add_argument("--guidance_scale", type=float, help=f"evaluation guidance (default {d.guidance_scale})")
    p.add_argument(
        "--prompts_per_family", type=int, help=f"ShapesEval prompts per family (default {d.prompts_per_family})"
    )
    p.add_argument("--images_per_prompt", type=int, help=f"default {d.images_per_prompt}")
    p.add_argument("--base", help='base checkpoint: "base" (shipped) or a .safetensors path')
    p.add_argument(
        "--methods",
        type=lambda v: [m.strip() for m in v.split(",") if m.strip()],
        help=f"comma-separated methods to post-train and compare with the base, any of "
        f"{','.join(METHOD_NAMES)} (default {','.join(d.methods)}); each gets the same data, "
        f"optimizer, batch and steps, and its recipe from configs/shapes_<method>.yaml",
    )
    return p


# Flags renamed to the guidance_scale spelling of every other command; the former ones still work, unlisted.
OLD_FLAGS = {"--cfg_scale": "--guidance_scale", "--rollout_cfg": "--rollout_guidance_scale"}


def _new_spelling(arg: str) -> str:
    flag, eq, value = arg.partition("=")
    return OLD_FLAGS[flag] + eq + value if flag in OLD_FLAGS else arg


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    values = asdict(DemoSettings())
    if args.quick:
        values.update(QUICK)
    for k in values:
        v = getattr(args, k, None)
        if v is not None:
            values[k] = v
    s = DemoSettings(**values)
    for name in ("max_train_steps", "train_batch_size", "prompts_per_family", "images_per_prompt", "rollout_steps"):
        if getattr(s, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(s, name)}")
    if not s.learning_rate > 0:
        raise ValueError(f"--learning_rate must be > 0, got {s.learning_rate}")
    from ..train.config import METHOD_NAMES

    unknown = [m for m in s.methods if m not in METHOD_NAMES]
    if unknown or not s.methods or len(set(s.methods)) != len(s.methods):
        raise ValueError(
            f"--methods: {','.join(unknown) or ','.join(s.methods) or '(empty)'} is not a list of distinct "
            f"methods; choose from {','.join(METHOD_NAMES)}"
        )
    if any(n < 1 for n in s.eval_num_steps):
        raise ValueError(f"--eval_num_steps must all be >= 1, got {s.eval_num_steps}")
    return s


# -- post-training -------------------------------------------------------------------------------------
def methods_of(s: DemoSettings) -> tuple[str, ...]:
    return ("base", *s.methods)


def post_train(method: str, s: DemoSettings, run_dir: Path):
    """One method from the base with the shared settings, through the same trainer `soarflow train` uses.
    SOAR takes the demo's K / lambda / N / rollout guidance; the other baselines their shapes recipe
    (soarflow.train.methods.SHAPES_RECIPES, the settings of configs/shapes_<method>.yaml)."""
    from ..train import TrainConfig, train
    from ..train.config import set_dotted
    from ..train.methods import SHAPES_RECIPES

    values = {
        "task": "shapes",
        "method": method,
        "output_dir": str(run_dir),
        "seed": s.seed,
        "learning_rate": s.learning_rate,
        "lr_scheduler": s.lr_scheduler,
        "lr_warmup_steps": s.lr_warmup_steps,
        "cond_dropout": s.cond_dropout,
        "train_batch_size": s.train_batch_size,
        "max_train_steps": s.max_train_steps,
        "checkpointing_steps": max(1, s.max_train_steps // 5),  # an interrupted demo resumes from these
        "checkpoints_total_limit": 1,
        "resume_from_checkpoint": "latest",
        "show_progress": False,
        "validation_steps": 0,
        "logging_steps": 10,
        "weighting_scheme": "logit_normal",
        "soar.shift": 1.0,
        "soar.num_aux": s.num_aux,
        "soar.lambda_aux": s.lambda_aux,
        "soar.rollout_steps": s.rollout_steps,
        "soar.guidance_scale": s.rollout_guidance_scale,
        "soar.num_rollout_paths": 1,
        "model.pretrained": s.base,
        "data.split": "curated",
    }
    if method not in ("sft", "soar"):
        values.update(SHAPES_RECIPES[method])
    raw: dict = {}
    for key, value in values.items():  # dotted keys -> the nested mapping TrainConfig validates
        set_dotted(raw, key, key.split("."), value)
    return train(TrainConfig.from_dict(raw))


# -- evaluation ----------------------------------------------------------------------------------------
def evaluate(model: torch.nn.Module, s: DemoSettings, bench, real: torch.Tensor, log) -> dict:
    from ..shapes.evaluate import evaluate_setting

    prompts = [p.text for p in bench.prompts for _ in range(s.images_per_prompt)]
    groups = [p.index for p in bench.prompts for _ in range(s.images_per_prompt)]
    results, samples, records = {}, {}, {}
    for n in s.eval_num_steps:
        t0 = time.time()
        metrics, images, report = evaluate_setting(
            model,
            prompts,
            groups,
            real,
            num_steps=n,
            guidance_scale=s.guidance_scale,
            seed=s.seed,
            exposure_images=s.exposure_images,
            shift=1.0,
        )
        results[str(n)] = {**metrics, "eval_seconds": round(time.time() - t0, 1)}
        samples[n] = images
        records[n] = [{"correct": r.correct} for r in report.records]
        log(f"    {n:>3} steps: overall {report.overall:.3f}  ({time.time() - t0:.0f}s)")
    return {"metrics": results, "samples": samples, "records": records}


def format_table(report: dict, s: DemoSettings) -> str:
    lines = []
    families = list(report["methods"]["base"]["metrics"][str(s.eval_num_steps[0])]["shapes_eval"]["per_family"])
    methods = methods_of(s)
    diverged = {m: report["methods"][m]["train"] for m in methods if report["methods"][m].get("metrics") is None}
    for n in s.eval_num_steps:
        lines.append(
            f"\nShapesEval, {n} Euler steps, guidance {s.guidance_scale}  (higher is better, except FD / exposure gap)"
        )
        header = ["metric"] + list(methods)
        rows = []

        def row(name, get, fmt="{:.3f}"):
            vals = [None if m in diverged else get(report["methods"][m]["metrics"][str(n)]) for m in methods]
            rows.append([name] + ["-" if v is None else fmt.format(v) for v in vals])

        row("overall", lambda r: r["shapes_eval"]["overall"])
        for f in families:
            row(f"  {f}", lambda r, f=f: r["shapes_eval"]["per_family"][f])
        row("seen prompts", lambda r: r["shapes_eval"]["seen"])
        row("held-out prompts", lambda r: r["shapes_eval"]["held_out"])
        row("Frechet distance", lambda r: r["frechet_distance"], "{:.2f}")
        row("diversity", lambda r: r["diversity"], "{:.3f}")
        row("exposure gap", lambda r: r["exposure_bias"]["mean_gap"], "{:.4f}")
        widths = [max(len(str(x[i])) for x in rows + [header]) for i in range(len(header))]
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append("")
    lines.append(
        "post-training: "
        + ", ".join(
            f"{m} diverged at step {report['methods'][m]['train']['diverged_at_step']}"
            if m in diverged
            else f"{m} {report['methods'][m]['train']['steps']} steps in {report['methods'][m]['train']['wall_clock_s']:.0f}s"
            for m in s.methods
        )
    )
    for m, t in diverged.items():
        lines.append(f"  {m}: diverged at step {t['diverged_at_step']} (columns '-'): {t['message']}")
    return "\n".join(lines)


def save_plot(report: dict, s: DemoSettings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = str(max(s.eval_num_steps))
    fams = list(report["methods"]["base"]["metrics"][n]["shapes_eval"]["per_family"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    methods = methods_of(s)
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        if report["methods"][m].get("metrics") is None:  # diverged
            continue
        se = report["methods"][m]["metrics"][n]["shapes_eval"]
        vals = [se["per_family"][f] for f in fams] + [se["overall"]]
        axes[0].bar([j + (i - (len(methods) - 1) / 2) * width for j in range(len(vals))], vals, width, label=m)
        eb = report["methods"][m]["metrics"][n]["exposure_bias"]
        axes[1].plot(
            [(b["sigma_low"] + b["sigma_high"]) / 2 for b in eb["bins"]],
            [b["gap"] for b in eb["bins"]],
            marker="o",
            label=m,
        )
    axes[0].set_xticks(range(len(fams) + 1), fams + ["overall"], rotation=30, ha="right")
    axes[0].set_ylabel("accuracy")
    axes[0].set_title(f"ShapesEval ({n} steps, guidance {s.guidance_scale})")
    axes[0].legend()
    axes[1].set_xlabel("sigma")
    axes[1].set_ylabel("x0 error on own states - on ideal states")
    axes[1].set_title("exposure-bias gap per sigma bin")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from ..train.safety import EXIT_INTERRUPTED, Interrupted

    args = build_parser().parse_args([_new_spelling(a) for a in (sys.argv[1:] if argv is None else argv)])
    try:
        s = settings_from_args(args)
        return run_demo(s, Path(args.output_dir), overwrite=args.overwrite)
    except Interrupted as err:  # SIGTERM/SIGINT during post-training: the stage's checkpoint is saved
        print(f"soarflow demo: {err.args[0].split(';')[0]}; run the same command again to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("soarflow demo: interrupted; run the same command again to continue where it stopped", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as e:
        print(f"soarflow demo: error: {e}", file=sys.stderr)
        return 2


STATE_FILE = "demo_state.json"  # marks a demo folder: settings + finished stages


def _stage_key(settings: dict, stage: str) -> str:
    """Hash of the settings a stage's result depends on (all of them: the stages share the base and prompts)."""
    return hashlib.sha256(json.dumps({"stage": stage, **settings}, sort_keys=True).encode()).hexdigest()[:16]


class Stages:
    """Finished stages of a demo run (train_sft, train_soar, eval_base, ...), each stored with its settings hash
    in demo_state.json, so a rerun with the same settings skips what is done."""

    def __init__(self, out: Path, settings: dict):
        self.path, self.settings = out / STATE_FILE, settings
        self.state = json.loads(self.path.read_text()) if self.path.is_file() else {"settings": settings, "stages": {}}

    def get(self, stage: str) -> dict | None:
        entry = self.state["stages"].get(stage)
        return entry["result"] if entry and entry.get("key") == _stage_key(self.settings, stage) else None

    def put(self, stage: str, result: dict) -> dict:
        self.state["stages"][stage] = {"key": _stage_key(self.settings, stage), "result": result}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1) + "\n")
        tmp.replace(self.path)
        return result


def check_output_dir(out: Path, settings: dict, overwrite: bool) -> None:
    """One-line errors before any work: a file, an unwritable folder, another run's folder."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output_dir {out} is a file, not a folder; choose another --output_dir")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--output_dir {out}: cannot write there ({parent} is not a writable folder)")
    if not out.exists() or not any(out.iterdir()):
        return
    state = out / STATE_FILE
    if not state.is_file() and not (out / "report.json").is_file():
        raise FileExistsError(f"{out} exists and is not a demo run; choose another --output_dir (nothing was changed)")
    if overwrite:
        shutil.rmtree(out)
        return
    old = json.loads(state.read_text()) if state.is_file() else json.loads((out / "report.json").read_text())
    if old.get("settings") != settings:
        raise FileExistsError(
            f"{out} already holds a demo run with different settings; choose another --output_dir, "
            f"or pass --overwrite to start over (nothing was changed)"
        )


def run_demo(s: DemoSettings, out: Path, overwrite: bool = False) -> int:
    from ..train.shapes_checkpoint import load_shapes_checkpoint
    from ..models.embedded import load_shapes_model, resolve_checkpoint
    from ..shapes import ShapesEval, render
    from ..train.safety import Diverged
    from ..utils.images import save_image_grid

    settings = asdict(s)
    report_path = out / "report.json"
    check_output_dir(out, settings, overwrite)
    if report_path.exists():
        old = json.loads(report_path.read_text())
        print(format_table(old, s))
        print(f"\n(already computed: {report_path}; use another --output_dir or --overwrite to run again)")
        return 0
    if not resolve_checkpoint(s.base).is_file():
        raise FileNotFoundError(
            f"base checkpoint {resolve_checkpoint(s.base)} not found (create one with `soarflow pretrain`)"
        )

    torch.manual_seed(s.seed)
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:6.0f}s] {msg}", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out, settings)
    bench = ShapesEval(prompts_per_family=s.prompts_per_family, images_per_prompt=s.images_per_prompt, seed=s.seed)
    prompts = [p.text for p in bench.prompts for _ in range(s.images_per_prompt)]
    real = render(prompts, seed=s.seed + 1)
    log(
        f"ShapesEval: {len(bench.prompts)} prompts x {s.images_per_prompt} images; evaluating at {s.eval_num_steps} steps"
    )

    report = {"settings": settings, "methods": {"base": {"train": {"steps": 0, "wall_clock_s": 0.0}}}}
    models = {"base": lambda: load_shapes_model(s.base)}
    for method in s.methods:
        done = stages.get(f"train_{method}")
        if done is None:
            log(
                f"post-training {method.upper()} for {s.max_train_steps} steps (batch {s.train_batch_size}, lr {s.learning_rate})"
            )
            try:
                result = post_train(method, s, out / "runs" / method)
                done = {
                    "steps": result.global_step,
                    "wall_clock_s": round(result.wall_time_s, 1),
                    "history": result.history,
                    "model": str(result.model_path),
                }
            except Diverged as err:  # reported in the table; the other methods go on
                log(f"{method.upper()} diverged at step {err.step}")
                done = {"steps": err.step, "diverged_at_step": err.step, "message": str(err), "wall_clock_s": 0.0}
            stages.put(f"train_{method}", done)
        else:
            log(f"post-training {method.upper()}: already done ({out / 'runs' / method})")
        report["methods"][method] = {"train": done}
        if "diverged_at_step" not in done:
            models[method] = lambda path=done["model"]: load_shapes_checkpoint(path).float().cpu().eval()

    grid_idx = [i * s.images_per_prompt for i in range(0, len(bench.prompts), max(1, s.prompts_per_family // 2))][:16]
    for method in methods_of(s):
        if method not in models:
            report["methods"][method]["metrics"] = None
            continue
        metrics = stages.get(f"eval_{method}")
        if metrics is None:
            log(f"evaluating {method}")
            ev = evaluate(models[method](), s, bench, real, log)
            n = max(s.eval_num_steps)
            marks = [r["correct"] for r in ev["records"][n]]
            save_image_grid(
                ev["samples"][n][grid_idx],
                [prompts[i] for i in grid_idx],
                out / f"samples_{method}.png",
                marks=[marks[i] for i in grid_idx],
            )
            metrics = stages.put(f"eval_{method}", ev["metrics"])
        else:
            log(f"evaluating {method}: already done")
        report["methods"][method]["metrics"] = metrics
    save_image_grid(real[grid_idx], [prompts[i] for i in grid_idx], out / "samples_real.png")
    report = {k: report[k] for k in ("settings", "methods")}
    report["methods"] = {m: report["methods"][m] for m in methods_of(s)}
    report["total_wall_clock_s"] = round(time.time() - start, 1)
    save_plot(report, s, out / "comparison.png")
    tmp = report_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(report_path)
    print(format_table(report, s))
    log(
        f"report: {report_path}, grids: {out}/samples_*.png (border: green = scorer pass, red = fail), "
        f"plot: {out}/comparison.png"
    )
    return 0
