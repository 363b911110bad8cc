"""Which processes do what, for every way accelerate runs the trainer: one process, DDP, FSDP2, DeepSpeed ZeRO.

The rules live here so that the training loop asks one question ("does this process validate?", "who writes
files?") instead of testing ``is_main_process`` and the backend at each place:

* **writes files**: the main process only (checkpoint folders' renames, config.yaml, validation grids, the final
  model folder). Collective work (``save_state``, gathering sharded weights) runs on every process.
* **validates**: with replicated weights (one process, DDP, ZeRO-1/2) the main process samples the grid alone;
  with sharded weights (FSDP, ZeRO-3) a forward needs every process (each holds a shard that the others
  all-gather), so every process runs the same sampling and the main process writes the grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Layout:
    """How the model is laid out over the processes of a run.

    backend: ``"none"`` (one process), ``"ddp"`` (replicated: DDP on GPUs or CPUs), ``"fsdp"`` or ``"deepspeed"``;
    sharded: the parameters are split over the processes (FSDP, ZeRO-3), so forwards and weight reads are
    collective."""

    backend: str
    num_processes: int
    sharded: bool = False
    zero_stage: int | None = None

    @property
    def validate_on_every_rank(self) -> bool:
        return self.sharded

    @property
    def can_skip_updates(self) -> bool:
        """DeepSpeed steps its optimizer inside ``backward``, so a non-finite step cannot be skipped there."""
        return self.backend != "deepspeed"


def layout_of(accelerator: Any) -> Layout:
    """The :class:`Layout` of a prepared-or-not accelerator."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    n = accelerator.num_processes
    if kind == DistributedType.FSDP:
        return Layout("fsdp", n, sharded=True)
    if kind == DistributedType.DEEPSPEED:
        stage = int(accelerator.state.deepspeed_plugin.zero_stage)
        return Layout("deepspeed", n, sharded=stage == 3, zero_stage=stage)
    return Layout("ddp" if n > 1 else "none", n)


def writes_files(accelerator: Any) -> bool:
    """Whether this process writes the run's files (the main process; collective saves run everywhere)."""
    return bool(accelerator.is_main_process)


def validates(layout: Layout, accelerator: Any) -> bool:
    """Whether this process runs the validation sampling (every process with sharded weights, else the main one)."""
    return layout.validate_on_every_rank or bool(accelerator.is_main_process)
