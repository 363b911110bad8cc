"""`soarflow train`: config file + dotted overrides -> `train()` (`soarflow pretrain` maps its flags onto a config
and runs the same `run_train`).

    soarflow train --config configs/shapes_soar.yaml --soar.num_aux 4 --learning_rate=1e-4
    accelerate launch --num_processes 2 -m soarflow train --config ...     # several processes / GPUs

Exit status: 0 done; 2 bad input (config, paths, files); 1 diverged (non-finite loss or gradient; the message
names the last good checkpoint); 75 stopped by SIGTERM/SIGINT after saving a checkpoint of the current step
(resume with --resume_from_checkpoint latest); 130 a second Ctrl-C while stopping.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from ..train.config import describe_fields


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="soarflow train",
        add_help=False,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Post-train a flow model with SFT, SOAR, Flow-GRPO, scheduled sampling or input perturbation. Every config key can be overridden as "
        "--key value or --key=value (dotted for sections: --soar.num_aux 4, --model.rank 16).",
    )
    parser.add_argument("--config", default=None, help="YAML config file (defaults are used without one)")
    parser.add_argument("-h", "--help", action="store_true", help="show this help and the config keys")
    return parser


def train_help() -> str:
    return _parser().format_help() + "\nconfig keys:\n" + "\n".join(describe_fields()) + "\n"


def main_train(argv: list[str]) -> int:
    args, overrides = _parser().parse_known_args(list(argv))
    if args.help:
        print(train_help())
        return 0
    from ..train.config import load_config

    try:
        cfg = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"soarflow train: error: {err}", file=sys.stderr)
        return 2
    return run_train(cfg, "soarflow train " + shlex.join(argv))


def run_train(cfg, command: str, prog: str = "soarflow train", args: dict | None = None) -> int:
    """Train `cfg`, print the summary and (``write_manifest``) write manifest.json naming `command` (and the
    command's own flags `args`); returns the exit status."""
    from ..train.manifest import write_manifest
    from ..tasks.registry import build_task
    from ..train.safety import EXIT_DIVERGED, EXIT_INTERRUPTED, Interrupted
    from ..train.trainer import train

    try:
        task = build_task(cfg) if cfg.write_manifest else None  # the manifest's evaluation needs it
        result = train(cfg, task=task)
    except (ValueError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # diverged: a training failure, not a usage error
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except Interrupted as err:  # SIGTERM / SIGINT: a checkpoint of the current step was saved
        print(f"{prog}: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        print(
            f"{prog}: interrupted; continue with --resume_from_checkpoint latest (from the last checkpoint)",
            file=sys.stderr,
        )
        return 130
    if result.num_processes > 1:
        from accelerate.state import PartialState

        if not PartialState().is_main_process:
            return 0
    print(summary(cfg, result))
    if cfg.write_manifest:
        path = write_manifest(cfg, result, task, command, args)
        print(f"  manifest: {path}")
    return 0


def summary(cfg, result) -> str:
    last = result.history[-1] if result.history else {}
    lines = [
        f"done: {cfg.method} on task {cfg.task}, {result.global_step} steps in {result.wall_time_s:.1f} s "
        f"({result.num_processes} process(es))",
    ]
    if last:
        parts = "  ".join(
            f"{k} {last[k]:.4f}" for k in ("main_loss", "aux_loss", "flow_loss", "reward_mean", "kl") if k in last
        )
        lines.append(
            f"  last logged step {int(last['step'])}: loss {last['loss']:.4f}  {parts}  lr {last['lr']:.3g}  "
            f"{last.get('step_time_s', float('nan')):.2f} s/step"
        )
    if result.resumed_from is not None:
        lines.append(f"  resumed from {result.resumed_from}")
    if result.data_summary:
        lines.append(f"  data:   {result.data_summary}")
    lines.append(f"  model:  {result.model_path}")
    lines.append(f"  output: {result.output_dir} (config.yaml, checkpoints, logs/, validation/)")
    return "\n".join(lines)
