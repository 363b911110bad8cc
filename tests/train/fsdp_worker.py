"""Run by `accelerate launch` in test_fsdp.py: the real trainer under accelerate's FSDP2 plugin, on CPU processes.

accelerate 1.16 only turns FSDP on for GPU-like distributed types: on CPUs (MULTI_CPU) it prepares the model with
plain DDP even when an FSDP plugin is given (the FSDP branch of `AcceleratorState.__init__` is in the multi-GPU
case). torch's FSDP2 (`fully_shard`) itself runs on CPUs with gloo, so this worker starts accelerate's process
state on the CPU and then labels it MULTI_GPU before the trainer creates its `Accelerator`: accelerate then takes
its FSDP2 code path (sharding, `get_state_dict`, sharded `save_state`/`load_state`) on CPU devices. Nothing in
soarflow is changed for the test; the plugin comes from the same environment variables `accelerate launch
--config_file configs/accelerate/fsdp_8gpu.yaml` sets.

    fsdp_worker.py OUT toy|toy-resume|cli|ddp-cli [train overrides...]

toy: trains ToyTask into OUT/run, rank 0 writes OUT/run.json; toy-resume: resumes OUT/run/checkpoint-1 into
OUT/resumed (the same number of steps), rank 0 writes OUT/resumed.json. cli: runs `soarflow train` (the CLI's
main) with the overrides. ddp-cli: the same under plain DDP (no FSDP), for comparison.
"""

import json
import os
import sys
from pathlib import Path

import torch


def watchdog() -> None:
    """A stalled collective would hang the launch until the test's timeout: after
    SOARFLOW_TEST_WORKER_WATCHDOG_S seconds (default 420) print every thread's stack to stderr (the test's failure
    message shows it) and exit."""
    import faulthandler

    faulthandler.dump_traceback_later(float(os.environ.get("SOARFLOW_TEST_WORKER_WATCHDOG_S", "420")), exit=True)


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ -> `train.toy_task`

FSDP_ENV = {  # what `accelerate launch` exports for an FSDP2 config (see configs/accelerate/fsdp_8gpu.yaml)
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
    "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
}


def start_fsdp_on_cpu() -> None:
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    for key, value in FSDP_ENV.items():
        os.environ.setdefault(key, value)
    state = PartialState(cpu=True)  # gloo process group over the launched CPU processes
    assert state.distributed_type == DistributedType.MULTI_CPU and state.num_processes == 2, state
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # so that FSDP is not dropped


def run_toy(out: Path, overrides: list[str], resume: bool) -> None:
    """One training per launch: the trainer's `end_training` destroys the process group, and a second run in the
    same processes re-creates it on the same store, which stalled a barrier now and then on a loaded machine."""
    from torch.distributed.tensor import DTensor
    from train.toy_task import ToyTask

    from soarflow.train import load_config, train

    name = "resumed" if resume else "run"
    start = ["--resume_from_checkpoint", str(out / "run" / "checkpoint-1")] if resume else []
    result = train(load_config(None, ["--output_dir", str(out / name), *overrides, *start]), task=ToyTask())
    sharded = all(isinstance(p, DTensor) for p in result.model.parameters())
    if os.environ.get("RANK", "0") != "0":
        return
    (out / f"{name}.json").write_text(
        json.dumps(
            {
                "history": result.history,
                "num_processes": result.num_processes,
                "sharded": sharded,
                "validation_images": [str(p) for p in result.validation_images],
            }
        )
    )


def main() -> None:
    out, mode, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    torch.set_num_threads(1)
    watchdog()
    if mode == "ddp-cli":  # the same run without FSDP: accelerate's plain multi-CPU DDP, for comparison
        mode = "cli"
    else:
        start_fsdp_on_cpu()
    if mode in ("toy", "toy-resume"):
        run_toy(out, overrides, resume=mode == "toy-resume")
    elif mode == "cli":  # one `soarflow train` run (one per launch, as for toy)
        from soarflow.cli import main as cli

        sys.exit(cli(["train", *overrides]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
