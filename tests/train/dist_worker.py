"""Run by `accelerate launch` in test_distributed.py: a short training run; rank 0 writes its history."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ -> `train.toy_task`

from train.toy_task import ToyTask  # noqa: E402

from soarflow.train import load_config, train  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    overrides = sys.argv[2:]
    torch.set_num_threads(1)
    cfg = load_config(None, ["--output_dir", str(out / "run"), *overrides])
    result = train(cfg, task=ToyTask())
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    (out / "history.json").write_text(json.dumps({"history": result.history, "num_processes": result.num_processes}))


if __name__ == "__main__":
    main()
