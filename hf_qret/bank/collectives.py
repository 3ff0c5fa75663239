"""How the rows of a bank are split across processes (:class:`ShardLayout`) and the few ``torch.distributed``
collectives the sharded bank and index use (``bank_sharding='rows'``).

Each process owns a contiguous slice of the rows, in rank order (:func:`shard_bounds`: sizes differ by at most
one). The collectives run on a process group of their own (:meth:`ShardLayout.create` makes it), so they never
interleave with the encoder's DDP gradient all-reduce. Tensors move on the CPU under gloo and on the current CUDA
device under NCCL. Bottom layer: imports neither training, hub nor evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from ..errors import CollectiveCallError
from .uneven import all_gather_uneven as gather_uneven
from .uneven import shard_bounds

__all__ = [
    "LocalOnly",
    "ShardLayout",
    "shard_bounds",
    "check_every_process",
    "all_gather_uneven",
    "broadcast_bytes",
    "gather_bytes",
    "gather_rows",
    "send_chunks",
    "recv_chunks",
]


@dataclass(frozen=True)
class ShardLayout:
    """Which rows of a ``count``-row bank each of ``world`` processes owns, seen from process ``rank``.

    Args:
        count: Rows of the whole bank.
        world: Number of processes.
        rank: This process.
        group: The ``torch.distributed`` process group the shards talk on (``None``: the default group).
        monitor: A gloo process group of the same processes for :func:`check_every_process` (``None``: no check).

    Example:
        >>> layout = ShardLayout(count=10, world=3, rank=1)
        >>> layout.start, layout.end, layout.sizes
        (4, 7, [4, 3, 3])
        >>> layout.owners(np.array([0, 4, 9])).tolist()
        [0, 1, 2]
    """

    count: int
    world: int
    rank: int
    group: Any = None
    monitor: Any = None

    @classmethod
    def create(cls, count: int) -> ShardLayout:
        """The layout of this process in the initialised ``torch.distributed`` world, with a process group of its
        own for the shards' collectives and a gloo one for :func:`check_every_process` (a collective: every process
        calls it at the same point).

        Example:
            >>> layout = ShardLayout.create(len(bank))  # under torchrun  # doctest: +SKIP
        """
        import torch.distributed as dist

        ranks = list(range(dist.get_world_size()))
        group = dist.new_group(ranks=ranks)
        monitor = dist.new_group(ranks=ranks, backend="gloo")
        return cls(int(count), dist.get_world_size(), dist.get_rank(), group, monitor)

    def bounds(self, rank: int) -> tuple[int, int]:
        """``(start, end)`` rows of process ``rank``."""
        return shard_bounds(self.count, self.world, rank)

    @property
    def start(self) -> int:
        """The first row this process owns."""
        return self.bounds(self.rank)[0]

    @property
    def end(self) -> int:
        """One past the last row this process owns."""
        return self.bounds(self.rank)[1]

    @property
    def local_count(self) -> int:
        """How many rows this process owns."""
        start, end = self.bounds(self.rank)
        return end - start

    @property
    def sizes(self) -> list[int]:
        """Rows per process, in rank order."""
        return [end - start for start, end in (self.bounds(r) for r in range(self.world))]

    def owners(self, rows: np.ndarray) -> np.ndarray:
        """The process owning each of ``rows`` (global row numbers)."""
        firsts = np.array([self.bounds(r)[0] for r in range(self.world)])
        return np.searchsorted(firsts, np.asarray(rows), side="right") - 1

    def device(self) -> torch.device:
        """Where collective tensors live: the current CUDA device under NCCL, else the CPU."""
        import torch.distributed as dist

        if self.world > 1 and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


class LocalOnly:
    """A whole-bank (or whole-index) name a sharded class does not have, because there it would mean this process's
    rows only: reading it raises an ``AttributeError`` that names the ``local_`` replacement (``hasattr`` is
    ``False``).

    Args:
        replacement: What to use instead, e.g. ``"local_weight"``.
        global_name: The whole-bank equivalent, if there is one (e.g. ``"global_ntotal"``).

    Example:
        >>> class Shard:
        ...     size = LocalOnly("local_size")
        >>> hasattr(Shard(), "size")
        False
    """

    def __init__(self, replacement: str, global_name: str | None = None) -> None:
        self.replacement, self.global_name, self.name = replacement, global_name, "?"

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def message(self, owner: type) -> str:
        """The error message: what the name would mean and what to use."""
        whole = f"; for all of them use .{self.global_name}" if self.global_name else ""
        return (
            f"{owner.__name__} has no .{self.name}: in a sharded object it would be this process's rows only. Use "
            f".{self.replacement} for this process's rows (numbered from 0){whole}."
        )

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        raise AttributeError(self.message(type(obj)))


def check_every_process(layout: ShardLayout, call: str, timeout_s: float) -> None:
    """Waits until every process has reached ``call`` (a gloo ``monitored_barrier`` on the layout's monitor group),
    so that a call made on some processes only fails with a message instead of hanging in the collectives after it.

    Raises:
        CollectiveCallError: Some process did not reach ``call`` within ``timeout_s`` seconds.

    Example:
        >>> check_every_process(ShardLayout(count=4, world=1, rank=0), "evaluate()", 60)  # one process: no wait
    """
    import torch.distributed as dist

    if layout.world == 1 or layout.monitor is None:
        return
    try:
        dist.monitored_barrier(group=layout.monitor, timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as error:
        raise CollectiveCallError(
            f"process {layout.rank} called {call}, but not every one of the {layout.world} processes did within "
            f"{timeout_s:g} s (--ddp_timeout): with bank_sharding='rows' each process holds part of the bank and "
            f"the index, so call {call} on every process (not only on the main one; the main process writes the "
            f"files). ({error})"
        ) from error


def all_gather_uneven(layout: ShardLayout, *tensors: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """Every process's ``tensors`` (same first dimension within a process, any across processes), concatenated in
    rank order, and each process's count (:func:`hf_qret.bank.uneven.all_gather_uneven`). A collective on the
    layout's group.

    Example:
        >>> rows, counts = all_gather_uneven(layout, torch.tensor([3, 1]))  # under torchrun  # doctest: +SKIP
    """
    if layout.world == 1:
        return list(tensors), [int(tensors[0].shape[0])]
    device = layout.device()
    return gather_uneven([tensor.to(device) for tensor in tensors], layout.world, layout.group)


def broadcast_bytes(layout: ShardLayout, data: bytes | None, src: int = 0) -> bytes:
    """``data`` of process ``src`` on every process. A collective on the layout's group.

    Example:
        >>> trained = broadcast_bytes(layout, blob if layout.rank == 0 else None)  # doctest: +SKIP
    """
    import torch.distributed as dist

    if layout.world == 1:
        return bytes(data or b"")
    device = layout.device()
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.long, device=device)
    dist.broadcast(size, src=src, group=layout.group)
    if layout.rank == src:
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    else:
        buffer = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(buffer, src=src, group=layout.group)
    return buffer.cpu().numpy().tobytes()


def _send(layout: ShardLayout, tensor: torch.Tensor, dst: int) -> None:
    import torch.distributed as dist

    device = layout.device()
    dist.send(torch.tensor([tensor.numel()], dtype=torch.long, device=device), dst=dst, group=layout.group)
    if tensor.numel():
        dist.send(tensor.contiguous().to(device), dst=dst, group=layout.group)


def _recv(layout: ShardLayout, src: int, dtype: torch.dtype) -> torch.Tensor:
    import torch.distributed as dist

    device = layout.device()
    size = torch.zeros(1, dtype=torch.long, device=device)
    dist.recv(size, src=src, group=layout.group)
    out = torch.empty(int(size.item()), dtype=dtype, device=device)
    if out.numel():
        dist.recv(out, src=src, group=layout.group)
    return out.cpu()


def gather_bytes(layout: ShardLayout, data: bytes, dst: int = 0) -> list[bytes] | None:
    """Every process's ``data`` on process ``dst`` (in rank order; ``None`` on the others). A collective.

    Example:
        >>> parts = gather_bytes(layout, faiss.serialize_index(local).tobytes())  # doctest: +SKIP
    """
    if layout.world == 1:
        return [data]
    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    if layout.rank != dst:
        _send(layout, tensor, dst)
        return None
    return [data if r == dst else _recv(layout, r, torch.uint8).numpy().tobytes() for r in range(layout.world)]


def gather_rows(layout: ShardLayout, chunks: Any, sizes: list[int], dim: int, dst: int = 0) -> np.ndarray | None:
    """Every process's float32 rows, given as an iterable of ``(n, dim)`` chunks (``sizes[r]`` rows in all from
    process ``r``), in rank order in one ``(sum(sizes), dim)`` array on process ``dst`` (``None`` on the others).
    Rows travel chunk by chunk straight into that array: no process holds another copy. A collective.

    Example:
        >>> gather_rows(ShardLayout(count=2, world=1, rank=0), [np.ones((2, 3))], [2], 3).shape
        (2, 3)
    """
    if layout.rank != dst:
        raw = (
            torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32)).reshape(-1).view(torch.uint8) for c in chunks
        )
        send_chunks(layout, raw, dst)
        return None
    out = np.empty((sum(sizes), dim), dtype=np.float32)
    position = 0
    for rank in range(layout.world):
        if rank == dst:
            parts = (np.asarray(c, dtype=np.float32).reshape(-1, dim) for c in chunks)
        else:
            parts = (chunk.numpy().view(np.float32).reshape(-1, dim) for chunk in recv_chunks(layout, rank))
        for part in parts:
            out[position : position + len(part)] = part
            position += len(part)
    return out


def send_chunks(layout: ShardLayout, chunks: Any, dst: int = 0) -> None:
    """Sends ``chunks`` (raw ``uint8`` tensors), then an empty one, to process ``dst`` (see :func:`recv_chunks`).

    Example:
        >>> send_chunks(layout, (c.view(torch.uint8) for c in rows))  # doctest: +SKIP
    """
    for chunk in chunks:
        if chunk.numel():
            _send(layout, chunk.reshape(-1), dst)
    _send(layout, torch.zeros(0, dtype=torch.uint8), dst)


def recv_chunks(layout: ShardLayout, src: int) -> Any:
    """Yields the ``uint8`` chunks process ``src`` sends with :func:`send_chunks`.

    Example:
        >>> for chunk in recv_chunks(layout, 1): handle.write(chunk.numpy().tobytes())  # doctest: +SKIP
    """
    while True:
        chunk = _recv(layout, src, torch.uint8)
        if chunk.numel() == 0:
            return
        yield chunk
