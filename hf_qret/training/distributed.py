"""Multi-process (DDP / ``accelerate launch``) support for the TargetBank.

The encoder is wrapped in ``DistributedDataParallel``, which averages its gradients across processes; the bank is not
a parameter of the wrapped model, so its sparse row gradients are averaged here, before every process applies the
same :class:`~hf_qret.training.optim.RowAdam` step. Every process thus keeps an identical bank (and rebuilds an identical
index from it), as it keeps identical encoder weights.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


def _group() -> Any:
    """``torch.distributed`` when a process group is initialised, else ``None``."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    """The number of processes of the initialised ``torch.distributed`` group (1 when not distributed).

    Example:
        >>> world_size()  # outside torch.distributed
        1
    """
    dist = _group()
    return 1 if dist is None else dist.get_world_size()


def process_rank() -> int:
    """This process's rank in the initialised ``torch.distributed`` group (0 when not distributed).

    Example:
        >>> process_rank()
        0
    """
    dist = _group()
    return 0 if dist is None else dist.get_rank()


def barrier() -> None:
    """Waits for every process (a no-op outside ``torch.distributed``).

    Example:
        >>> barrier()  # outside torch.distributed: returns at once
    """
    import torch.distributed as dist

    if world_size() > 1:
        dist.barrier()


def encode_corpus(
    encode: Callable[[list[str]], Any],
    texts: Sequence[str],
    write: Callable[[int, np.ndarray], None] | None = None,
    chunk_texts: int = 65536,
    local: bool = False,
) -> np.ndarray | None:
    """Encodes ``texts`` once per run, whatever the number of processes: each process encodes its contiguous share
    (:func:`shard_bounds`), then either ``write(start, rows)`` stores it, ``chunk_texts`` rows at a time (e.g. into
    a memory-mapped bank every process shares; returns ``None`` once every process has written) or the shares are
    gathered so that every process returns all ``(len(texts), dim)`` float32 rows. One process: ``encode(texts)``.
    ``local``: every process returns its own share only (the rows of a sharded bank).

    Example:
        >>> encode_corpus(lambda t: np.ones((len(t), 2)), ["a", "b"]).shape
        (2, 2)
    """
    texts = list(texts)
    world, rank = world_size(), process_rank()
    start, end = shard_bounds(len(texts), world, rank)
    if world > 1:
        logger.info("bank: process %d of %d encodes documents %d-%d of %d", rank, world, start, end, len(texts))
    if write is not None:  # chunk by chunk: the share never needs to fit in RAM
        for first in range(start, end, chunk_texts):
            last = min(end, first + chunk_texts)
            write(first, np.asarray(encode(texts[first:last]), dtype=np.float32).reshape(last - first, -1))
        barrier()
        return None
    rows = np.asarray(encode(texts[start:end]), dtype=np.float32).reshape(end - start, -1)
    if world == 1 or local:
        return rows
    device = _collective_device()
    gathered = _all_gather_uneven(torch.from_numpy(rows).to(device))[0]
    return gathered.cpu().numpy()


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


def _collective_device() -> torch.device:
    """Where this process's collective tensors must live: the current CUDA device under NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_uneven(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Every process's ``tensors`` concatenated in rank order (:func:`hf_qret.bank.uneven.all_gather_uneven` on the
    default group); the tensors must already be on :func:`_collective_device`."""
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
    local = rows.detach().reshape(-1).to(device=_collective_device(), dtype=torch.long)
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
    device = _collective_device()
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
