"""Which process this is (:func:`world_size`, :func:`process_rank`, :func:`barrier`) and the encoding of a corpus
once per run whatever the number of processes (:func:`encode_corpus`): what building a bank needs under
``torchrun`` / ``accelerate launch``. Outside ``torch.distributed`` everything is one process. Needs only torch;
:mod:`hf_qret.training.distributed` re-exports these names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .uneven import all_gather_uneven, shard_bounds

__all__ = ["world_size", "process_rank", "barrier", "encode_corpus", "collective_device"]

logger = logging.getLogger(__name__)


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
    device = collective_device()
    gathered = all_gather_uneven((torch.from_numpy(rows).to(device),), world)[0][0]
    return gathered.cpu().numpy()


def collective_device() -> torch.device:
    """Where this process's collective tensors must live: the current CUDA device under NCCL, else the CPU.

    Example:
        >>> collective_device()  # under torchrun with gloo  # doctest: +SKIP
        device(type='cpu')
    """
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
