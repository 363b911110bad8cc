"""`soarflow <command> ...`: each command lives in its own module and is imported only when run."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": (
        "soarflow.commands.demo:main",
        "base -> SFT, SOAR (or --methods ...) post-training -> ShapesEval report (CPU, minutes)",
    ),
    "pretrain": ("soarflow.commands.pretrain:main", "pretrain the embedded model on the ShapesEval corpus"),
    "train": (
        "soarflow.commands.train:main_train",
        "train a model with any method (sft, soar, grpo, ...) from a YAML config + overrides",
    ),
    "cache": (
        "soarflow.commands.cache:main",
        "encode a training config's data (VAE latents, text embeddings) into data.cache_dir before training",
    ),
    "sample": ("soarflow.commands.sample:main", "generate images from a trained checkpoint"),
    "eval": (
        "soarflow.commands.eval:main",
        "generate a prompt suite (GenEval, DrawBench, OCR, ...) and score it with the paper's metrics",
    ),
    "eval-shapes": ("soarflow.commands.eval_shapes:main", "score images or a checkpoint on ShapesEval"),
    "study": (
        "soarflow.commands.study:main",
        "run a grid of methods x settings x seeds with cached cells and statistics",
    ),
    "study-report": (
        "soarflow.commands.study_report:main",
        "rebuild a study report's intervals from its per_image.npz",
    ),
}


def usage() -> str:
    lines = ["usage: soarflow <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `soarflow <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"soarflow {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"soarflow: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func = COMMANDS[name][0].split(":")
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
