"""The bank split across processes by rows (``bank_sharding='rows'``): :class:`ShardedTargetBank`.

Each process keeps its contiguous slice of the rows (:class:`~hf_qret.bank.collectives.ShardLayout`) as the
parameter, plus the whole doc-id map: row numbers stay global everywhere (the collator, the miner, the loss), and
only the bank translates them. :meth:`ShardedTargetBank.gather` is a collective: every process contributes the
requested rows it owns and gets back the rows it asked for. Their gradients are kept aside until the bank's step,
where :meth:`ShardedTargetBank.exchange_gradients` sends each row's gradient to its owner, averaged over the
processes exactly as the replicated bank averages them; the row optimizer then updates the owner's rows only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ArtifactError, ConfigError
from .collectives import LocalOnly, ShardLayout, all_gather_uneven, recv_chunks, send_chunks
from .core import TargetBank
from .files import CHUNK_ROWS, storage_dtype, write_safetensors_header
from .storage import RowIds

__all__ = ["ShardedTargetBank", "AssembledBankFile"]


class _ShardedGather(torch.autograd.Function):
    """Rows of a sharded bank from their owners (a collective); their gradient is kept on the bank until its step."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rows: torch.Tensor, bank: ShardedTargetBank) -> torch.Tensor:
        ctx.bank = bank
        ctx.save_for_backward(rows)
        return bank._fetch(rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None, None]:
        (rows,) = ctx.saved_tensors
        bank = ctx.bank
        # the replicated bank's gradient is in its storage dtype (embedding backward): the same values here
        bank._pending.append((rows.to("cpu", torch.long), grad.detach().to("cpu", bank.local_weight.dtype)))
        return None, None, None


class ShardedTargetBank(TargetBank):
    """A :class:`~hf_qret.bank.core.TargetBank` of which this process holds one contiguous slice of rows.

    ``len(bank)``, ``doc_ids`` and every row number the bank takes or returns in :meth:`gather` are global;
    :attr:`local_weight` (what the row optimizer updates), :meth:`local_float32_rows` (what the index over this shard
    encodes), :meth:`local_numpy`, :attr:`local_nbytes`, :meth:`local_changed_rows` and :meth:`local_row_norms` are
    this shard's, numbered from 0. The whole-bank names ``weight``, ``float32_rows()``, ``numpy()``, ``nbytes``,
    ``iter_float32()``, ``changed_rows()`` and ``row_norms()`` of a :class:`~hf_qret.bank.core.TargetBank` raise an
    ``AttributeError`` naming their ``local_`` replacement.

    Args:
        local_rows: ``(end - start, dim)`` this process's rows (copied).
        doc_ids: Every document id of the whole bank, in row order (``None``: row numbers).
        layout: Which rows this process owns.
        dtype: Storage dtype.
        copy: Copy ``local_rows`` (default); ``False`` keeps the tensor itself (when it has the storage dtype).

    Example:
        >>> import torch
        >>> from hf_qret.bank.collectives import ShardLayout
        >>> layout = ShardLayout(count=4, world=1, rank=0)  # one process: a sharded bank of one shard
        >>> bank = ShardedTargetBank(torch.eye(4), ["a", "b", "c", "d"], layout)
        >>> len(bank), bank.local_rows, bank.gather(torch.tensor([2])).tolist()
        (4, 4, [[0.0, 0.0, 1.0, 0.0]])
        >>> hasattr(bank, "weight"), tuple(bank.local_weight.shape)
        (False, (4, 4))
    """

    # this process's rows under whole-bank names: refused, with the local_ name to use (LocalOnly)
    weight = LocalOnly("local_weight")
    changed_rows = LocalOnly("local_changed_rows()")
    row_norms = LocalOnly("local_row_norms()")
    numpy = LocalOnly("local_numpy()")
    float32_rows = LocalOnly("local_float32_rows()")
    iter_float32 = LocalOnly("local_float32_rows()")
    nbytes = LocalOnly("local_nbytes")

    def __init__(
        self,
        local_rows: torch.Tensor | np.ndarray,
        doc_ids: Sequence[str] | None,
        layout: ShardLayout,
        dtype: str | torch.dtype = torch.float32,
        copy: bool = True,
    ) -> None:
        nn.Module.__init__(self)
        rows = torch.as_tensor(np.asarray(local_rows) if not torch.is_tensor(local_rows) else local_rows)
        if rows.ndim != 2 or rows.shape[0] != layout.local_count:
            raise ArtifactError(
                f"process {layout.rank} of {layout.world} owns {layout.local_count} of {layout.count} rows, got "
                f"{tuple(rows.shape)}; pass its own slice (hf_qret.bank.collectives.shard_bounds)."
            )
        if doc_ids is not None and len(doc_ids) != layout.count:
            raise ArtifactError(f"the sharded bank has {layout.count} rows in all but {len(doc_ids)} document ids.")
        rows = rows.detach().to(storage_dtype(dtype))
        self.weight = nn.Parameter(rows.clone().contiguous() if copy else rows.contiguous())
        self.shard = layout
        self._setup(RowIds(layout.count) if doc_ids is None else doc_ids)
        #: ``(global rows, gradients)`` of the gathers since the last :meth:`exchange_gradients`.
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __getattr__(self, name: str) -> Any:
        hidden = type(self).__dict__.get(name)
        if isinstance(hidden, LocalOnly):  # nn.Module's lookup of the parameter would otherwise answer for "weight"
            raise AttributeError(hidden.message(type(self)))
        return super().__getattr__(name)

    def _setup(self, doc_ids: Sequence[str]) -> None:
        super()._setup(doc_ids)
        if isinstance(doc_ids, RowIds):  # TargetBank numbers the rows of its weight: here, the whole bank's
            self.doc_ids = RowIds(self.shard.count)
        self._changed = torch.zeros(self.shard.local_count, dtype=torch.bool)

    @classmethod
    def zeros(  # type: ignore[override]
        cls, layout: ShardLayout, dim: int, doc_ids: Sequence[str] | None = None, dtype: str | torch.dtype = "fp32"
    ) -> ShardedTargetBank:
        """A zero shard to fill with :meth:`write_rows` (positions in this shard), allocated once.

        Example:
            >>> from hf_qret.bank.collectives import ShardLayout
            >>> ShardedTargetBank.zeros(ShardLayout(count=5, world=2, rank=1), 4).local_weight.shape
            torch.Size([2, 4])
        """
        storage = torch.zeros(layout.local_count, int(dim), dtype=storage_dtype(dtype))
        return cls(storage, doc_ids, layout, dtype, copy=False)

    @classmethod
    def from_bank(cls, bank: TargetBank, layout: ShardLayout) -> ShardedTargetBank:
        """This process's shard of a whole ``bank`` (its rows copied; ``bank`` can then be dropped).

        Example:
            >>> sharded = ShardedTargetBank.from_bank(bank, ShardLayout.create(len(bank)))  # doctest: +SKIP
        """
        if len(bank) != layout.count:
            raise ArtifactError(f"the bank has {len(bank)} rows but the layout splits {layout.count}.")
        doc_ids = None if isinstance(bank.doc_ids, RowIds) else bank.doc_ids
        local = bank.local_weight.detach()[layout.start : layout.end]
        shard = cls(local.to("cpu"), doc_ids, layout, bank.dtype)
        shard.encode_precision = bank.encode_precision
        return shard

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        return self.shard.count

    @property
    def local_rows(self) -> int:
        """How many rows this process holds."""
        return int(self.local_weight.shape[0])

    def to_local(self, rows: torch.Tensor) -> torch.Tensor:
        """Global row numbers of this shard's rows, as positions in :attr:`local_weight`."""
        return rows - self.shard.start

    # ------------------------------------------------------------------ gathering
    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """The float32 embeddings of global ``rows``, from whichever process owns them: a collective, every process
        calls it at the same point (with rows of its own). Differentiable: see :meth:`exchange_gradients`."""
        rows = rows.detach().to("cpu", torch.long).reshape(-1)
        if torch.is_grad_enabled() and self.local_weight.requires_grad:
            return _ShardedGather.apply(self.local_weight, rows, self)
        return self._fetch(rows)

    @torch.no_grad()
    def _fetch(self, rows: torch.Tensor) -> torch.Tensor:
        layout = self.shard
        (requested,), _ = all_gather_uneven(layout, rows)
        union = torch.unique(requested.cpu())
        owned = (union >= layout.start) & (union < layout.end)
        device = layout.device()
        buffer = torch.zeros(union.numel(), self.dim, dtype=torch.float32, device=device)
        local = self.to_local(union[owned]).to(self.local_weight.device)
        buffer[owned.to(device)] = self.local_weight[local].to(device, torch.float32)
        if layout.world > 1:  # every row has one owner: the others add exact zeros
            import torch.distributed as dist

            dist.all_reduce(buffer, group=layout.group)
        out = buffer.cpu()[torch.searchsorted(union, rows)]
        target = self.compute_device if self.compute_device is not None else self.local_weight.device
        return out.to(target)

    @torch.no_grad()
    def exchange_gradients(self, average: bool = True) -> int:
        """Sends the row gradients of every process's gathers to the rows' owners, summed (and divided by the number
        of processes with ``average``, as the replicated bank averages them), and makes them this shard's sparse
        ``local_weight.grad``. A collective: every process calls it at the bank's step.

        When rows of other shards only carry a gradient, :attr:`version` still moves (the bank changed), as the
        optimizer step moves it on the shards whose rows carry one.

        Returns:
            How many of this shard's rows carry a gradient.
        """
        layout, dim = self.shard, self.dim
        if self._pending:
            rows = torch.cat([r for r, _ in self._pending])
            values = torch.cat([v for _, v in self._pending])
            local = torch.sparse_coo_tensor(rows.unsqueeze(0), values, (layout.count, dim), check_invariants=False)
            local = local.coalesce()
            rows, values = local.indices()[0], local.values()
        else:
            rows = torch.zeros(0, dtype=torch.long)
            values = torch.zeros(0, dim, dtype=self.local_weight.dtype)
        self._pending = []
        (rows, values), _ = all_gather_uneven(layout, rows, values)
        rows, values = rows.cpu(), values.cpu()
        mine = (rows >= layout.start) & (rows < layout.end)
        if not bool(mine.any()):
            self.local_weight.grad = None
            if rows.numel():
                # other shards' rows move: the bank as a whole changes, so this shard's version moves with it and
                # every process sees the index as stale together (its refreshes are collectives: a process that
                # skipped one would leave the others waiting in it)
                self.version += 1
            return 0
        grad = torch.sparse_coo_tensor(
            self.to_local(rows[mine]).unsqueeze(0), values[mine], tuple(self.local_weight.shape), check_invariants=False
        ).coalesce()
        if average:
            grad = grad / layout.world
        self.local_weight.grad = grad.to(self.local_weight.device)
        return int(grad.indices().shape[1])

    # ------------------------------------------------------------------ files
    def save_shard(self, path: str | os.PathLike) -> None:
        """Writes this shard's rows (safetensors, key ``embeddings``, storage dtype), atomically."""
        TargetBank._from_storage(self.local_weight.data, None).save(path)

    @torch.no_grad()
    def load_shard(self, path: str | os.PathLike) -> None:
        """Reads back :meth:`save_shard`'s rows into this shard (a checkpoint of the same layout)."""
        TargetBank._from_storage(self.local_weight.data, None).load_rows_from_file(path)
        self.version += 1
        self.mark_all_changed()

    def _file_window(self) -> tuple[int, int, int]:
        """A saved bank file holds the whole bank; this process keeps its shard's rows of it."""
        return self.shard.count, self.shard.start, self.shard.end

    def save(self, path: str | os.PathLike) -> None:
        """Refused: the whole bank is written by :meth:`assemble_file` (a collective), a shard by :meth:`save_shard`."""
        raise ConfigError(
            "a sharded bank holds one process's rows: write the whole bank with assemble_file() on every process, "
            "or this shard's rows with save_shard()."
        )

    @torch.no_grad()
    def assemble_file(self, path: str | os.PathLike, dst: int = 0) -> AssembledBankFile | None:
        """Streams every shard's rows, in rank order, into one safetensors bank at ``path`` written by process
        ``dst`` (to a temporary name: :meth:`AssembledBankFile.save` puts it in place). No process ever holds more
        than its own rows and one chunk. A collective; returns ``None`` on the other processes.

        Example:
            >>> assembled = bank.assemble_file("out/bank.safetensors")  # every process  # doctest: +SKIP
        """
        layout, weight = self.shard, self.local_weight.detach()

        def raw(start: int) -> torch.Tensor:
            return weight[start : start + CHUNK_ROWS].to("cpu").contiguous().view(torch.uint8)

        if layout.rank != dst:
            send_chunks(layout, (raw(start) for start in range(0, self.local_rows, CHUNK_ROWS)), dst)
            return None
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        nbytes = layout.count * self.dim * weight.element_size()
        with open(tmp, "wb") as handle:
            write_safetensors_header(handle, weight.dtype, [layout.count, self.dim], nbytes)
            for rank in range(layout.world):
                if rank == dst:
                    for start in range(0, self.local_rows, CHUNK_ROWS):
                        handle.write(raw(start).numpy().tobytes())
                else:
                    for chunk in recv_chunks(layout, rank):
                        handle.write(chunk.numpy().tobytes())
        return AssembledBankFile(tmp, self.doc_ids, layout.count, self.dim)


class AssembledBankFile:
    """The whole bank, written by :meth:`ShardedTargetBank.assemble_file`: what
    :func:`hf_qret.serving.artifact.save_retrieval_files` takes as its bank (doc ids, size, dimension;
    :meth:`save` moves the written file into place).

    Example:
        >>> assembled = bank.assemble_file("out/bank.safetensors")  # doctest: +SKIP
        >>> save_retrieval_files("out", assembled, index)  # on the process that wrote it  # doctest: +SKIP
    """

    def __init__(self, tmp: Path, doc_ids: Sequence[str], count: int, dim: int) -> None:
        self.tmp, self.doc_ids, self.count, self.dim = Path(tmp), doc_ids, int(count), int(dim)

    def __len__(self) -> int:
        return self.count

    def save(self, path: str | os.PathLike) -> None:
        """Moves the assembled file to ``path`` (a copy when it is needed at a second place)."""
        import shutil

        path = Path(path)
        if self.tmp.is_file():
            os.replace(self.tmp, path)
            self.tmp = path
        elif self.tmp != path:
            shutil.copyfile(self.tmp, path)
