"""The TargetBank: corpus embeddings computed once, then trained by backpropagation as a memory buffer.

The bank is an ``nn.Module`` whose single parameter is the ``(num_docs, dim)`` matrix of target embeddings. The
trainer gathers the rows of a batch's candidate set with a *sparse* gradient, and :class:`~hf_qret.training.optim.RowAdam`
updates only those rows, each with its own optimizer state. How the rows are held (row ids, float32 views, device
placement) lives in :mod:`hf_qret.bank.storage`, their files (dtypes, memory maps, chunked I/O) in
:mod:`hf_qret.bank.files`, its constructors (encoded, read from a file, zeros, memory-mapped) in
:mod:`hf_qret.bank.construction`; the bank records which rows changed since the last index refresh
(:meth:`TargetBank.changed_rows`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ArtifactError, ConfigError
from .construction import ConstructionMixin
from .files import (
    BANK_DTYPES,
    BANK_KEY,
    CHUNK_ROWS,
    check_bank_shape,
    dtype_name,
    read_bank_chunks,
    storage_dtype,
    write_npy,
    write_safetensors_streamed,
)
from .storage import Float32Rows, RowIds

__all__ = ["TargetBank", "RowIds", "Float32Rows", "BANK_DTYPES", "storage_dtype"]


class _StagedGather(torch.autograd.Function):
    """Gathers rows of a bank kept on another device (CPU) and moves them to the compute device as float32.

    The gradient comes back as a sparse ``(num_docs, dim)`` tensor on the bank's device, like ``embedding(...,
    sparse=True)``. With ``pin`` the rows are staged in page-locked memory, so the copy to the GPU is asynchronous.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rows: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.bank_shape = tuple(weight.shape)
        ctx.bank_dtype = weight.dtype
        ctx.bank_device = weight.device
        staged = torch.empty((rows.numel(), weight.shape[1]), dtype=weight.dtype, pin_memory=pin)
        torch.index_select(weight, 0, rows, out=staged)
        return staged.to(device, non_blocking=pin).float()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (rows,) = ctx.saved_tensors
        values = grad.to(ctx.bank_device, ctx.bank_dtype)
        sparse = torch.sparse_coo_tensor(rows.unsqueeze(0), values, ctx.bank_shape, check_invariants=False)
        return sparse, None, None, None


class TargetBank(ConstructionMixin, nn.Module):
    """Trainable target (document) embeddings, one row per document.

    Args:
        embeddings: ``(num_docs, dim)`` initial embeddings (copied).
        doc_ids: Document id of each row, in row order; ``None`` uses the row numbers (``"0"``, ``"1"``, ...)
            without storing one string per row (see :class:`RowIds`).
        dtype: Storage dtype: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``. Gathered rows are always float32.

    Example:
        >>> import torch
        >>> bank = TargetBank(torch.randn(4, 8), ["a", "b", "c", "d"])
        >>> rows = bank.gather(torch.tensor([2, 0]))
        >>> rows.shape
        torch.Size([2, 8])
        >>> bank.row_of("c")
        2
        >>> TargetBank(torch.randn(4, 8), None, dtype="bf16").gather(torch.tensor([1])).dtype
        torch.float32
    """

    def __init__(
        self,
        embeddings: torch.Tensor | np.ndarray,
        doc_ids: Sequence[str] | None,
        dtype: str | torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        dtype = storage_dtype(dtype)
        embeddings = torch.as_tensor(np.asarray(embeddings) if not torch.is_tensor(embeddings) else embeddings)
        self._check_shape(tuple(embeddings.shape), doc_ids)
        self.weight = nn.Parameter(embeddings.detach().to(dtype).clone().contiguous())
        self._setup(doc_ids)

    # ------------------------------------------------------------------ setup
    _check_shape = staticmethod(check_bank_shape)

    def _setup(self, doc_ids: Sequence[str] | None) -> None:
        count = int(self.local_weight.shape[0])
        if doc_ids is None or isinstance(doc_ids, RowIds):
            self.doc_ids: Sequence[str] = RowIds(count)
            self._row_of: dict[str, int] | None = None
        else:
            self.doc_ids = [str(d) for d in doc_ids]
            self._row_of = {d: i for i, d in enumerate(self.doc_ids)}
            if len(self._row_of) != len(self.doc_ids):
                raise ArtifactError("the doc-id list of the bank has duplicates; every row needs a unique document id.")
        #: Incremented by every optimizer step that changes rows; the index refresh compares it.
        self.version = 0
        #: How the rows were encoded (``"fp32"`` / ``"bf16"``): ``qret_config.json``'s ``document_precision``, the
        #: precision ``add_documents`` encodes new documents in. ``None``: not known (rows read from a file or made by
        #: an encode function that does not say); set it when you know.
        self.encode_precision: str | None = None
        #: Where gathered rows are returned (``None``: the bank's device); set by the trainer for a CPU bank.
        self.compute_device: torch.device | None = None
        #: Stage gathered rows in page-locked memory before copying them to ``compute_device``.
        self.pin_memory = False
        self._mmap: np.memmap | None = None
        self._mmap_path: Path | None = None
        # Rows changed since the last index refresh (1 byte per row, always on the CPU).
        self._changed = torch.zeros(count, dtype=torch.bool)

    @classmethod
    def _from_storage(
        cls,
        storage: torch.Tensor,
        doc_ids: Sequence[str] | None,
        mmap: np.memmap | None = None,
        path: Path | None = None,
    ) -> TargetBank:
        """Wraps ``storage`` without copying it."""
        cls._check_shape(tuple(storage.shape), doc_ids)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.weight = nn.Parameter(storage)
        self._setup(doc_ids)
        self._mmap = mmap
        self._mmap_path = path
        return self

    # ------------------------------------------------------------------ basics
    @property
    def local_weight(self) -> nn.Parameter:
        """The parameter of the rows this process holds (what the row optimizer updates): :attr:`weight`, every row,
        here; one process's rows, numbered from 0, in a :class:`~hf_qret.bank.sharding.ShardedTargetBank`."""
        return self._parameters["weight"]

    def __len__(self) -> int:
        return self.local_weight.shape[0]

    @property
    def dim(self) -> int:
        """The embedding dimension."""
        return self.local_weight.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype of the rows."""
        return self.local_weight.dtype

    @property
    def local_nbytes(self) -> int:
        """Bytes of the row storage of :attr:`local_weight`: every row here; one process's rows in a
        :class:`~hf_qret.bank.sharding.ShardedTargetBank`."""
        return self.local_weight.numel() * self.local_weight.element_size()

    #: Bytes of the row storage: :attr:`local_nbytes` (a sharded bank has no ``nbytes``).
    nbytes = local_nbytes

    @property
    def is_mmap(self) -> bool:
        """Whether the rows live in a memory-mapped file (:attr:`mmap_path`)."""
        return self._mmap is not None

    @property
    def mmap_path(self) -> Path | None:
        """The ``.npy`` file backing a memory-mapped bank."""
        return self._mmap_path

    def row_of(self, doc_id: str) -> int:
        """The row index of ``doc_id``."""
        row = self._row_of.get(doc_id) if self._row_of is not None else self.doc_ids.row_of(doc_id)
        if row is None:
            raise KeyError(f"document {doc_id!r} is not in the bank ({len(self)} documents).") from None
        return row

    def rows_of(self, doc_ids: Sequence[str]) -> list[int]:
        """Row indices of several document ids."""
        return [self.row_of(d) for d in doc_ids]

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """The float32 embeddings of ``rows``, differentiable with a sparse gradient w.r.t. the bank.

        Rows are returned on :attr:`compute_device` when it is set (a CPU bank feeding a GPU), else on the bank's
        device.
        """
        weight = self.local_weight
        target = self.compute_device
        if target is not None and torch.device(target) != weight.device:
            pin = self.pin_memory and weight.device.type == "cpu" and torch.device(target).type == "cuda"
            return _StagedGather.apply(weight, rows.to(weight.device), torch.device(target), pin)
        gathered = nn.functional.embedding(rows.to(weight.device), weight, sparse=True)
        return gathered if gathered.dtype == torch.float32 else gathered.float()

    def local_numpy(self) -> np.ndarray:
        """A float32 copy of :attr:`local_weight` (every row here, this shard's in a sharded bank) for FAISS:
        prefer :meth:`local_float32_rows` at scale."""
        return np.ascontiguousarray(self.local_weight.detach().to("cpu", torch.float32).numpy())

    #: A float32 ``(num_docs, dim)`` copy of the whole bank: :meth:`local_numpy` (a sharded bank has no ``numpy``).
    numpy = local_numpy

    def local_float32_rows(self) -> Float32Rows:
        """A float32 view of :attr:`local_weight` (every row here, this shard's in a sharded bank, numbered from 0),
        converted chunk by chunk (see :class:`Float32Rows`): what the index (refresh) over these rows reads."""
        return Float32Rows(self.local_weight)

    #: A float32 view of the whole bank: :meth:`local_float32_rows` (a sharded bank has no ``float32_rows``).
    float32_rows = local_float32_rows

    def iter_float32(self, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """Yields ``(start_row, float32 rows)`` chunks of the whole bank (a sharded bank has no ``iter_float32``)."""
        view = self.float32_rows()
        for start in range(0, len(self), chunk_rows):
            yield start, view[start : start + chunk_rows]

    # ------------------------------------------------------------------ changed rows
    def mark_changed(self, rows: torch.Tensor) -> None:
        """Records that ``rows`` changed (the optimizer calls it); the next incremental refresh re-encodes them."""
        self._changed[rows.detach().to("cpu", torch.long)] = True

    def mark_all_changed(self) -> None:
        """Records every row as changed (for example after loading rows from a checkpoint)."""
        self._changed.fill_(True)

    def local_changed_rows(self) -> np.ndarray:
        """The sorted rows of :attr:`local_weight` changed since the last :meth:`clear_changed` (``int64``; in a
        sharded bank this shard's, numbered from 0)."""
        return self._changed.nonzero().squeeze(1).numpy()

    #: The sorted rows changed since the last :meth:`clear_changed`: :meth:`local_changed_rows` (all the rows of an
    #: unsharded bank are this process's; a sharded bank has no ``changed_rows``).
    changed_rows = local_changed_rows

    @property
    def num_changed(self) -> int:
        """How many rows changed since the last refresh."""
        return int(self._changed.sum())

    def clear_changed(self) -> None:
        """Forgets the changed rows (the index was refreshed from the current bank)."""
        self._changed.fill_(False)

    def set_changed(self, rows: torch.Tensor | np.ndarray) -> None:
        """Replaces the changed-row record by ``rows`` (restoring a checkpoint)."""
        self._changed.fill_(False)
        self._changed[torch.as_tensor(np.asarray(rows), dtype=torch.long)] = True

    # ------------------------------------------------------------------ storage
    def to_storage(
        self, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None
    ) -> TargetBank:
        """Casts the rows to ``dtype`` and/or moves them to ``device``, in place (no-op when nothing changes).

        Raises:
            ConfigError: The bank is memory mapped: its file fixes the dtype and it stays on the CPU.
        """
        dtype = storage_dtype(dtype) if dtype is not None else self.local_weight.dtype
        device = torch.device(device) if device is not None else self.local_weight.device
        if dtype == self.local_weight.dtype and device == self.local_weight.device:
            return self
        if self.is_mmap:
            raise ConfigError(
                f"the bank is memory mapped from {self._mmap_path} ({dtype_name(self.local_weight.dtype)}, CPU); it cannot "
                f"become {dtype_name(dtype)} on {device}: create the mmap file with that dtype, or turn bank_mmap off."
            )
        self.local_weight.data = self.local_weight.data.to(device, dtype)
        return self

    def flush(self) -> None:
        """Writes the dirty pages of a memory-mapped bank to its file (no-op otherwise)."""
        if self._mmap is not None:
            self._mmap.flush()

    @torch.no_grad()
    def write_rows(self, start: int, rows: np.ndarray | torch.Tensor) -> None:
        """Overwrites rows ``start .. start + len(rows)`` (cast to the storage dtype); marks them changed."""
        values = torch.as_tensor(rows) if not torch.is_tensor(rows) else rows
        end = start + values.shape[0]
        self.local_weight[start:end].copy_(values.to(self.local_weight.device))
        self._changed[start:end] = True

    def _file_window(self) -> tuple[int, int, int]:
        """The rows of the whole bank a saved file holds, and the window ``[start, end)`` of them this bank keeps
        (all of them; one process's shard in a sharded bank)."""
        return self.local_weight.shape[0], 0, self.local_weight.shape[0]

    @torch.no_grad()
    def load_rows_from_file(self, path: str | os.PathLike) -> None:
        """Copies the rows of a saved bank file (the whole bank) this bank keeps into its storage, chunk by chunk
        (resuming a checkpoint; a sharded bank takes its window of rows).

        Raises:
            ArtifactError: The file is unreadable or has another shape.
        """
        path = Path(path)
        count, start, end = self._file_window()
        try:
            shape, _, chunks = read_bank_chunks(path)
            if tuple(shape) != (count, self.dim):
                raise ArtifactError(
                    f"{path}: the saved bank is {tuple(shape)} but this bank is {(count, self.dim)}; "
                    "resume with the same corpus and model."
                )
            first = 0
            for chunk in chunks:
                chunk = torch.as_tensor(chunk) if not torch.is_tensor(chunk) else chunk
                last = first + chunk.shape[0]
                lo, hi = max(first, start), min(last, end)
                if lo < hi:
                    self.local_weight[lo - start : hi - start].copy_(
                        chunk[lo - first : hi - first].to(self.local_weight.device)
                    )
                first = last
        except ArtifactError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ArtifactError(f"{path}: cannot be read as a bank ({exc}); re-create it.") from None
        self.version += 1
        self.mark_all_changed()

    def local_row_norms(self, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
        """The float32 L2 norm of every row of :attr:`local_weight` (this shard's in a sharded bank), chunk by chunk."""
        weight = self.local_weight.detach()
        if weight.dtype == torch.float32 and not self.is_mmap:
            return weight.norm(dim=1)
        return torch.cat(
            [weight[s : s + chunk_rows].float().norm(dim=1) for s in range(0, weight.shape[0], chunk_rows)]
        )

    #: The float32 L2 norm of every row: :meth:`local_row_norms` (a sharded bank has no ``row_norms``).
    row_norms = local_row_norms

    # ------------------------------------------------------------------ saving
    def save(self, path: str | os.PathLike) -> None:
        """Writes the embeddings atomically: ``.npy`` (float32) for a ``.npy`` path, else safetensors (key
        ``embeddings``, in the storage dtype). A memory-mapped bank is streamed in chunks."""
        path = Path(path)
        if path.suffix == ".npy":
            write_npy(path, tuple(self.local_weight.shape), torch.float32, (c for _, c in self.iter_float32()))
        elif self.is_mmap:
            write_safetensors_streamed(self.local_weight, path)
        else:
            from safetensors.torch import save_file

            tmp = path.with_name(path.name + ".tmp")
            save_file({BANK_KEY: self.local_weight.detach().to("cpu").contiguous()}, str(tmp))
            os.replace(tmp, path)

    def check_dim(self, dim: int, what: str = "the encoder") -> None:
        """Raises a clear error when the bank dimension differs from ``dim``."""
        if self.dim != dim:
            raise ArtifactError(
                f"the bank has dimension {self.dim} but {what} produces {dim}-d embeddings; "
                "build the bank with the same encoder."
            )
