r"""What keeps a run alive and its checkpoints good: divergence checks and graceful stops on SIGTERM / SIGINT.

Divergence: every optimizer step checks the loss of each micro-batch and the gradient norm. A non-finite value
either stops the run (:class:`Diverged`, naming the step and the newest good checkpoint) or, within the
opt-in ``skip_nonfinite_steps`` budget, skips the update (the step counter still advances, so the data order
and seeds are those of the uninterrupted run). Weights are checked before every save, so a checkpoint never
holds NaN/Inf.

Stops: :class:`StopSignals` turns SIGTERM (schedulers, preemption, ``timeout``, ``docker stop``) and SIGINT
(Ctrl-C) into a flag. The loop finishes the current optimizer step, saves ``checkpoint-{step}`` and raises
:class:`Interrupted`; ``soarflow train`` exits with :data:`EXIT_INTERRUPTED`. A second signal stops at once.
With several processes the flags are combined (all-reduce) every step, so every process saves the same step.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Iterable

import torch

# Exit status of `soarflow train` after a signal-triggered stop with a checkpoint saved (BSD EX_TEMPFAIL:
# "try again later"); a job script may requeue on it and resume with --resume_from_checkpoint latest.
EXIT_INTERRUPTED = 75
# Exit status after divergence (non-finite loss or gradient norm).
EXIT_DIVERGED = 1


class Diverged(FloatingPointError):
    """Non-finite loss or gradient at `step`; `checkpoint` is the newest good checkpoint (None if none)."""

    def __init__(self, message: str, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


class Interrupted(Exception):
    """A signal stopped the run after step `step`; `checkpoint` holds that step."""

    def __init__(self, message: str, step: int, checkpoint: Path | None, signal_name: str):
        super().__init__(message)
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name


class StopSignals:
    """Context manager: while active, SIGTERM/SIGINT set `self.received` (the signal's name) instead of killing
    the process; a second signal gets the previous handler (stops at once). Only the main thread can install
    handlers; elsewhere this is a no-op."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum).name
        for sig, prev in self._previous.items():  # the next signal is not deferred
            signal.signal(sig, prev)
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous = {}


def grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Total L2 norm of the gradients (a 0-d tensor on the parameters' device; 0 when there are none)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, 2.0)


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True if every value of every tensor is finite (one device sync)."""
    flags = [torch.isfinite(t.detach()).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


def step_flags(accelerator, nonfinite: torch.Tensor, stop: bool) -> tuple[bool, bool]:
    """(any process saw a non-finite value, any process got a stop signal): one small all-reduce per step."""
    flags = torch.stack([nonfinite.to(accelerator.device, torch.float32).reshape(()),
                         torch.tensor(float(stop), device=accelerator.device)])
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    bad, stopped = flags.tolist()
    return bad > 0, stopped > 0
