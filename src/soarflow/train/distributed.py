"""Which processes do what, for every way accelerate runs the trainer: one process, DDP, FSDP2, DeepSpeed ZeRO.

The rules live here so that the training loop asks one question ("does this process validate?", "who writes
files?") instead of testing ``is_main_process`` and the backend at each place:

* **writes files**: the main process only (checkpoint folders' renames, config.yaml, validation grids, the final
  model folder). Collective work (``save_state``, gathering sharded weights) runs on every process.
* **sharded weights** (FSDP2, ZeRO-3): a read of the weights is collective. Saves gather them (the checkpoint's
  trainable tensors, the final model through ``accelerator.get_state_dict``); the EMA is built after
  ``accelerator.prepare`` on each process's shards and gathered into whole tensors when it is saved; the finite
  checks combine every process's verdict.
* **validates**: with replicated weights (one process, DDP, ZeRO-1/2) the main process samples the grid alone;
  with sharded weights (FSDP, ZeRO-3) a forward needs every process (each holds a shard that the others
  all-gather), so every process runs the same sampling and the main process writes the grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn


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


# ---------------------------------------------------------------------------------------------- support checks


def check_supported(layout: Layout, accelerator: Any, config: Any) -> None:
    """Refuse the combinations the trainer cannot run correctly, naming the setting to change."""
    if layout.backend == "fsdp":
        version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
        if int(version) != 2:
            raise ValueError(
                f"FSDP version {version} is not supported: set fsdp_version: 2 in the accelerate config "
                "(configs/accelerate/fsdp_8gpu.yaml uses FSDP2, torch's fully_shard)"
            )
    if layout.backend == "deepspeed" and layout.sharded and config.use_ema:
        raise ValueError(
            "use_ema with DeepSpeed ZeRO-3: the EMA cannot read ZeRO-3's partitioned parameters; use "
            "FSDP2 (configs/accelerate/fsdp_8gpu.yaml) or ZeRO-2 for EMA runs, or set use_ema: false"
        )


# ---------------------------------------------------------------------------------------------- sharded tensors


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP2 parameter (a DTensor); any other tensor as it is."""
    return t.to_local() if _is_dtensor(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: FSDP2 shards are all-gathered (collective: every process calls it in the same order)."""
    return t.full_tensor() if _is_dtensor(t) else t


def copy_full_into(dst: torch.Tensor, full: torch.Tensor) -> None:
    """``dst.copy_(full)`` where `dst` may be an FSDP2 shard: each process keeps its own slice of `full` (every
    process holds the same `full`, read from the same file; no communication)."""
    with torch.no_grad():
        if _is_dtensor(dst):
            from torch.distributed.tensor import distribute_tensor

            full = distribute_tensor(
                full.to(dst.device, dst.dtype), dst.device_mesh, dst.placements, src_data_rank=None
            )
        dst.copy_(full)


def reshard(model: nn.Module) -> None:
    """Put FSDP2's sharded parameters back after a forward outside training (validation): the root module keeps
    its all-gathered parameters after a forward without backward, and the EMA and the saves must read shards."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def scalar(t: torch.Tensor | float | None) -> torch.Tensor | float | None:
    """A reduction's value (a gradient norm) whether it came back as a DTensor or a plain tensor."""
    return full_tensor(t) if isinstance(t, torch.Tensor) else t


def all_finite(accelerator: Any, tensors: Iterable[torch.Tensor]) -> bool:
    """Every value of every tensor finite, on every process: shards are checked locally, then the flags are
    combined, so that all processes agree (one all-reduce when there are several processes)."""
    flags = [torch.isfinite(local_tensor(t).detach()).all() for t in tensors]
    ok = torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce((~ok).to(accelerator.device, torch.float32).reshape(1), reduction="sum")
        return bool(bad.item() == 0)
    return bool(ok)


# ---------------------------------------------------------------------------------------------- gathered weights


def trainable_state(accelerator: Any, layout: Layout, model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> whole CPU tensor of the trainable parameters of the prepared `model` (every process calls it;
    with sharded weights the shards are gathered: FSDP2 per parameter, ZeRO-3 through ``get_state_dict``).
    Names are the unwrapped module's (no DDP/FSDP prefixes)."""
    unwrapped = accelerator.unwrap_model(model)
    names = [n for n, p in unwrapped.named_parameters() if p.requires_grad]
    if layout.backend == "deepspeed" and layout.sharded:
        state = accelerator.get_state_dict(model)  # ZeRO-3: consolidated on the main process
        return {n: state[n].detach().to("cpu").contiguous() for n in names if n in state}
    params = dict(unwrapped.named_parameters())
    return {n: full_tensor(params[n].detach()).to("cpu").contiguous() for n in names}


def gathered_model(
    accelerator: Any, layout: Layout, model: nn.Module, build: Callable[[], nn.Module]
) -> nn.Module | None:
    """The model with whole weights for saving: the unwrapped module itself when the weights are replicated;
    with sharded weights, a fresh ``build()`` on the main process holding the gathered full state dict
    (``accelerator.get_state_dict``, collective: every process calls it) and None on the others."""
    unwrapped = accelerator.unwrap_model(model)
    if not layout.sharded:
        return unwrapped
    state = accelerator.get_state_dict(model)
    if not writes_files(accelerator):
        return None
    fresh = build()
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"the gathered weights do not match a freshly built model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return fresh.to("cpu").eval()
