"""How rows split across processes (:func:`shard_bounds`) and the all-gather of tensors whose first dimension
differs between processes (:func:`all_gather_uneven`): the two pieces the replicated run
(:mod:`hf_qret.training.distributed`) and the sharded bank (:mod:`hf_qret.bank.collectives`) share. Needs only torch.

Example:
    >>> [shard_bounds(5, 2, r) for r in range(2)]
    [(0, 3), (3, 5)]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["shard_bounds", "all_gather_uneven"]


def shard_bounds(count: int, world: int, rank: int) -> tuple[int, int]:
    """The contiguous range of ``count`` rows process ``rank`` of ``world`` takes (sizes differ by at most one).

    Example:
        >>> [shard_bounds(10, 3, r) for r in range(3)]
        [(0, 4), (4, 7), (7, 10)]
    """
    base, extra = divmod(int(count), int(world))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_gather_uneven(
    tensors: Sequence[torch.Tensor], world: int, group: Any = None
) -> tuple[list[torch.Tensor], list[int]]:
    """Every process's ``tensors`` (same first dimension within a process, any across processes), concatenated in
    rank order, and each process's count: one all-gather of the counts, then one per tensor padded to the largest
    count (none when every process has zero rows). A collective on ``group`` (``None``: the default group); the
    tensors must be where the backend moves them (CUDA under NCCL, the CPU under gloo).

    Example:
        >>> rows, sizes = all_gather_uneven([torch.tensor([3, 1])], world_size)  # under torchrun  # doctest: +SKIP
    """
    import torch.distributed as dist

    device = tensors[0].device
    count = torch.tensor([tensors[0].shape[0]], dtype=torch.long, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c.item()) for c in counts]
    width = max(sizes)
    if width == 0:  # the same on every process: nothing to move
        return [tensor[:0] for tensor in tensors], sizes
    out = []
    for tensor in tensors:
        padded = tensor.new_zeros((width, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded, group=group)
        out.append(torch.cat([g[:n] for g, n in zip(gathered, sizes)]))
    return out, sizes
