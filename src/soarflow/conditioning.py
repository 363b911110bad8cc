"""Generic batch operations on conditions.

A condition is whatever a velocity model takes as its third argument: a tensor, or a dict / list / tuple
(nested freely) of tensors whose first dimension is the batch. Non-tensor leaves (strings, ints, None) are
carried through unchanged, so a model may also receive static options inside its condition.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


def _map(fn: Callable[[torch.Tensor], torch.Tensor], cond: Any) -> Any:
    if isinstance(cond, torch.Tensor):
        return fn(cond)
    if isinstance(cond, dict):
        return {k: _map(fn, v) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_map(fn, v) for v in cond)
    return cond


def _leaves(cond: Any) -> list[torch.Tensor]:
    if isinstance(cond, torch.Tensor):
        return [cond]
    if isinstance(cond, dict):
        return [t for v in cond.values() for t in _leaves(v)]
    if isinstance(cond, (list, tuple)):
        return [t for v in cond for t in _leaves(v)]
    return []


def cond_batch_size(cond: Any) -> int | None:
    """Batch size shared by every tensor leaf; None if the condition holds no tensor.

    Raises ValueError if the leaves disagree."""
    sizes = {t.shape[0] for t in _leaves(cond) if t.ndim > 0}
    if not sizes:
        return None
    if len(sizes) > 1:
        raise ValueError(f"cond: tensor leaves have different batch sizes {sorted(sizes)}")
    return sizes.pop()


def cond_index(cond: Any, index: torch.Tensor | slice) -> Any:
    """Select samples along the batch dimension of every tensor leaf."""
    return _map(lambda t: t[index], cond)


def cond_repeat(cond: Any, n: int) -> Any:
    """Tile the whole batch n times: [c, c, ..., c] along the batch dimension (sample b lands at b + k*B)."""
    return _map(lambda t: t.repeat((n,) + (1,) * (t.ndim - 1)), cond)


def cond_cat(conds: Sequence[Any]) -> Any:
    """Concatenate conditions of the same structure along the batch dimension."""
    first = conds[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(conds), dim=0)
    if isinstance(first, dict):
        return {k: cond_cat([c[k] for c in conds]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(cond_cat([c[i] for c in conds]) for i in range(len(first)))
    return first


def cond_where(mask: torch.Tensor, a: Any, b: Any) -> Any:
    """Per sample: a where mask (shape (B,)) is True, else b. Both must have the same structure."""
    if isinstance(a, torch.Tensor):
        m = mask.to(a.device).reshape(mask.shape + (1,) * (a.ndim - 1))
        return torch.where(m, a, b.to(a.dtype))
    if isinstance(a, dict):
        return {k: cond_where(mask, a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        return type(a)(cond_where(mask, x, y) for x, y in zip(a, b))
    return a


def cond_to(cond: Any, device=None, dtype: torch.dtype | None = None) -> Any:
    """Move every tensor leaf to a device; cast floating leaves to `dtype` if given."""

    def move(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)

    return _map(move, cond)


def cond_expand_null(null_cond: Any, batch_size: int) -> Any:
    """Broadcast a null condition given for one sample (batch 1) to `batch_size`; pass others through."""
    n = cond_batch_size(null_cond)
    if n == batch_size or n is None:
        return null_cond
    if n == 1:
        return cond_repeat(null_cond, batch_size)
    raise ValueError(f"null_cond: batch size {n} is neither 1 nor the batch size {batch_size}")
