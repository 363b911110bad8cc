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

import logging
import signal
import threading
from pathlib import Path
from typing import Callable, Iterable

import torch

logger = logging.getLogger(__name__)

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
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: reduce the shards' partial norms


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True if every value of every tensor is finite (one device sync)."""
    flags = [torch.isfinite(t.detach()).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


def step_flags(accelerator, nonfinite: torch.Tensor, stop: bool) -> tuple[bool, bool]:
    """(any process saw a non-finite value, any process got a stop signal): one small all-reduce per step."""
    flags = torch.stack(
        [
            nonfinite.to(accelerator.device, torch.float32).reshape(()),
            torch.tensor(float(stop), device=accelerator.device),
        ]
    )
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    bad, stopped = flags.tolist()
    return bad > 0, stopped > 0


def diverged_message(step: int, last_good: Path | None, what: str, budget: int = 0) -> str:
    """The :class:`Diverged` text: what went wrong at `step` and how to go on from the last good checkpoint."""
    where = (
        f"the last good checkpoint is {last_good}; resume from it with a lower learning_rate into a new folder: "
        f"--resume_from_checkpoint {last_good.resolve()} --output_dir <new folder> --learning_rate <lower>"
        if last_good is not None
        else "no checkpoint was saved before it; lower learning_rate and start again"
    )
    allowed = f" (skip_nonfinite_steps: {budget} skipped steps allowed, all used)" if budget else ""
    return f"training diverged at step {step}: {what}{allowed}; {where}"


class StepGuard:
    """The skip / diverge decision of a run, made once per optimizer step by :meth:`decide`.

    Every micro-batch's loss is recorded (:meth:`saw_loss`); at the optimizer step the gradient norm joins it. A
    non-finite value on any process skips the update while fewer than `budget` steps were skipped
    (``skip_nonfinite_steps``), else raises :class:`Diverged` naming `last_good`. `check_grads` is False under
    fp16 loss scaling (inf gradients are the scaler's business). Where an update cannot be skipped
    (`can_skip` False: DeepSpeed steps its optimizer inside ``backward``) a non-finite step raises at once.
    """

    def __init__(
        self,
        budget: int,
        device,
        *,
        check_grads: bool = True,
        can_skip: bool = True,
        skipped: int = 0,
        last_good: Path | None = None,
    ):
        self.budget, self.check_grads, self.can_skip = budget, check_grads, can_skip
        self.skipped, self.last_good = skipped, last_good
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    def saw_loss(self, loss: torch.Tensor) -> None:
        self._nonfinite = self._nonfinite | ~torch.isfinite(loss.detach())

    def decide(
        self, accelerator, norm: torch.Tensor | float | None, stop_requested: bool, step: int
    ) -> tuple[bool, bool]:
        """(skip this update, stop after this step) for optimizer step `step` (1-based), alike on every process:
        the gradients are all-reduced and the flags combined. `norm` None: unknown (not checked)."""
        if self.check_grads and norm is not None:
            self._nonfinite = self._nonfinite | ~torch.isfinite(torch.as_tensor(norm, device=self._nonfinite.device))
        skip, stop = step_flags(accelerator, self._nonfinite, stop_requested)
        self._nonfinite = torch.zeros_like(self._nonfinite)
        if not skip:
            return False, stop
        if not self.can_skip or self.skipped >= self.budget:
            budget = self.budget if self.can_skip else 0
            what = "non-finite loss or gradient norm" + (
                "" if self.can_skip else " (this backend cannot skip an update)"
            )
            raise Diverged(diverged_message(step, self.last_good, what, budget), step, self.last_good)
        self.skipped += 1
        logger.warning(
            "step %d: non-finite loss or gradient norm; update skipped (%d of %d allowed by skip_nonfinite_steps)",
            step,
            self.skipped,
            self.budget,
        )
        return True, stop

    def check_weights(
        self,
        tensors: Iterable[torch.Tensor],
        step: int,
        what: str,
        finite: Callable[[Iterable[torch.Tensor]], bool] = all_finite,
    ) -> None:
        """Raise :class:`Diverged` unless every value of `tensors` is finite (before a save)."""
        if not finite(tensors):
            raise Diverged(diverged_message(step, self.last_good, what), step, self.last_good)
