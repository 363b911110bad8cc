"""Run by `accelerate launch` in test_distributed.py: a short training run; rank 0 writes its history."""

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

from train.toy_task import ToyTask  # noqa: E402

from soarflow.train import load_config, train  # noqa: E402


class SignalledToyTask(ToyTask):
    """Sends SIGTERM to its own process on rank 1 only, in micro-batch `at` (a preempted worker)."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def encode_batch(self, batch, device):
        import os
        import signal

        if self.encoded + 1 == self.at and os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGTERM)
        return super().encode_batch(batch, device)


def main() -> None:
    out = Path(sys.argv[1])
    overrides = sys.argv[2:]
    torch.set_num_threads(1)
    watchdog()
    cfg = load_config(None, ["--output_dir", str(out / "run"), *overrides])
    signal_at = int(os.environ.get("SOARFLOW_TEST_SIGTERM_RANK1_AT", "0"))
    if signal_at:
        from soarflow.train.safety import Interrupted

        try:
            train(cfg, task=SignalledToyTask(signal_at))
        except Interrupted as err:
            rank = os.environ["RANK"]
            (out / f"stopped_{rank}.json").write_text(json.dumps({"step": err.step, "signal": err.signal_name}))
        return
    result = train(cfg, task=ToyTask())
    # the launcher's RANK, not torch.distributed: the trainer may have torn the process group down by now, and
    # two processes writing history.json at once leave a file that is not JSON
    if os.environ.get("RANK", "0") != "0":
        return
    (out / "history.json").write_text(json.dumps({"history": result.history, "num_processes": result.num_processes}))


if __name__ == "__main__":
    main()
