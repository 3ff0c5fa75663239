"""Multi-process (DDP / ``accelerate launch``) support for the TargetBank.

The encoder is wrapped in ``DistributedDataParallel``, which averages its gradients across processes; the bank is not
a parameter of the wrapped model, so its sparse row gradients are averaged here, before every process applies the
same :class:`~hf_qret.training.optim.RowAdam` step. Every process thus keeps an identical bank (and rebuilds an identical
index from it), as it keeps identical encoder weights.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import torch

from ..bank.processes import barrier, collective_device, encode_corpus, process_rank, world_size
from ..bank.uneven import all_gather_uneven, shard_bounds

logger = logging.getLogger(__name__)

__all__ = [
    "world_size",
    "process_rank",
    "barrier",
    "row_gradients",
    "all_reduce_row_grad",
    "all_gather_rows",
    "shard_bounds",
    "encode_corpus",
    "is_row_writer",
]


def is_row_writer(mmap_path: str | Path | None) -> bool:
    """Whether this process writes the bank's rows: always, unless several processes on this machine map the same
    bank file (``mmap_path``), in which case only the lowest rank among them does (the others keep the same
    optimizer state and read the rows it wrote), so every row moves once per step.

    Must be called by every process at the same point (it is a collective).

    Example:
        >>> is_row_writer("out/bank_mmap.npy")  # one process: it writes
        True
    """
    import torch.distributed as dist

    if world_size() == 1:
        return True
    key = (socket.gethostname(), str(Path(mmap_path).resolve()) if mmap_path is not None else None)
    keys: list[Any] = [None] * world_size()
    dist.all_gather_object(keys, key)
    if key[1] is None:
        return True
    return process_rank() == min(r for r, other in enumerate(keys) if other == key)


def _all_gather_uneven(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Every process's ``tensors`` concatenated in rank order (:func:`hf_qret.bank.uneven.all_gather_uneven` on the
    default group); the tensors must already be on :func:`~hf_qret.bank.processes.collective_device`."""
    return all_gather_uneven(tensors, world_size())[0]


@torch.no_grad()
def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """The concatenation, in rank order, of every process's 1-D tensor of bank rows (lengths may differ).

    This is how the trainer mines candidates for the *global* batch under DDP: every process contributes its queries'
    positives and top-k rows, and every process builds the same candidate set from the union. Must be called by every
    process at the same point (it is a collective). Outside ``torch.distributed`` it returns ``rows`` unchanged.

    Example:
        >>> import torch
        >>> all_gather_rows(torch.tensor([3, 1])).tolist()  # one process: nothing to gather
        [3, 1]
    """
    if world_size() == 1:
        return rows
    local = rows.detach().reshape(-1).to(device=collective_device(), dtype=torch.long)
    return _all_gather_uneven(local)[0].to(rows.device)


def row_gradients(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``weight`` that have a gradient and those gradients (sparse or dense ``weight.grad``).

    Returns empty tensors when there is no gradient.

    Example:
        >>> weight = torch.zeros(3, 2, requires_grad=True)
        >>> weight[1].sum().backward()
        >>> row_gradients(weight)[0].tolist()
        [1]
    """
    grad = weight.grad
    if grad is None:
        return (
            torch.zeros(0, dtype=torch.long, device=weight.device),
            torch.zeros(0, weight.shape[1], dtype=weight.dtype, device=weight.device),
        )
    if grad.is_sparse:
        grad = grad.coalesce()
        return grad.indices()[0], grad.values()
    rows = grad.abs().sum(dim=1).nonzero().squeeze(1)
    return rows, grad[rows]


@torch.no_grad()
def all_reduce_row_grad(weight: torch.Tensor, average: bool = True) -> int:
    """Replaces ``weight.grad`` (sparse rows, possibly ``None``) by its mean (or sum) over all processes.

    Processes touch different rows, so the rows and their gradients are gathered from every process (padded to the
    largest count) and summed into one coalesced sparse gradient; a row touched by one process only gets that
    process's gradient divided by the world size, exactly as DDP averages a dense gradient.

    Must be called by every process at the same point (it is a collective). A no-op outside ``torch.distributed``.

    Returns:
        How many rows carry a gradient after the reduction.

    Example:
        >>> weight = torch.zeros(3, 2, requires_grad=True)
        >>> weight[1].sum().backward()
        >>> all_reduce_row_grad(weight)  # one process: counts the rows with a gradient
        1
    """
    world = world_size()
    if world == 1:
        grad = weight.grad
        if grad is None:
            return 0
        return int(grad.coalesce().indices().shape[1]) if grad.is_sparse else int(grad.abs().sum(dim=1).gt(0).sum())
    # NCCL only moves CUDA tensors, gloo CPU tensors; the bank may live elsewhere (a CPU bank feeding a GPU).
    device = collective_device()
    rows, values = row_gradients(weight)
    rows, values = _all_gather_uneven(rows.to(device), values.to(device))
    if rows.numel() == 0:
        weight.grad = None
        return 0
    rows, values = rows.to(weight.device), values.to(weight.device)
    grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values, tuple(weight.shape), check_invariants=False).coalesce()
    if average:
        grad = grad / world
    weight.grad = grad
    return int(grad.indices().shape[1])
