"""The TargetBank: corpus embeddings computed once, then trained by backpropagation as a memory buffer.

The bank is an ``nn.Module`` whose single parameter is the ``(num_docs, dim)`` matrix of target embeddings. The
trainer gathers the rows of a batch's candidate set with a *sparse* gradient, and :class:`RowAdam` updates only those
rows. Every row keeps its own Adam moments **and its own step count**, so the bias correction of a row depends only on
how often that row was updated, and no state is ever shared between two documents.

Scale: the bank can be stored in ``float32``, ``bfloat16`` or ``float16`` (rows are gathered as float32, the update
is computed in float32 and written back in the storage dtype), kept on the CPU while training on a GPU, or backed by
a memory-mapped ``.npy`` file (:meth:`TargetBank.create_mmap`, :meth:`TargetBank.open_mmap`) for corpora larger than
RAM. :class:`RowAdam` keeps optimizer state only for the rows it has updated, and the bank records which rows changed
since the last index refresh (:meth:`TargetBank.changed_rows`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .distributed import row_gradients
from .errors import ArtifactError, ConfigError

__all__ = ["TargetBank", "RowAdam", "RowIds", "Float32Rows", "BANK_DTYPES", "storage_dtype"]

logger = logging.getLogger(__name__)

BANK_KEY = "embeddings"

#: Storage dtypes of the bank, by their config name.
BANK_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float": "fp32"}
# numpy has no bfloat16: a bf16 memory-mapped bank is a .npy of its raw uint16 bit patterns.
_NUMPY_STORAGE = {torch.float32: np.dtype("<f4"), torch.float16: np.dtype("<f2"), torch.bfloat16: np.dtype("<u2")}
_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
#: Rows read or written at a time when the bank is streamed (files, FAISS): 64k rows of 384-d fp32 = 96 MiB.
CHUNK_ROWS = 65536


def storage_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Maps ``"fp32"``/``"bf16"``/``"fp16"`` (or a ``torch.dtype``) to the bank's storage dtype.

    Example:
        >>> storage_dtype("fp16")
        torch.float16
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in _NUMPY_STORAGE:
            raise ConfigError(f"bank dtype {dtype} is not supported; use one of {', '.join(BANK_DTYPES)}.")
        return dtype
    name = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in BANK_DTYPES:
        raise ConfigError(f"bank_dtype must be one of {', '.join(BANK_DTYPES)}, got {dtype!r}.")
    return BANK_DTYPES[name]


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in BANK_DTYPES.items() if value == dtype)


class RowIds(Sequence):
    """The document ids ``"0"``, ``"1"``, ... ``"n-1"`` (row numbers), without one Python string per row.

    Ten million id strings and their lookup table take over 1 GB; pass ``doc_ids=None`` to :class:`TargetBank` when
    the corpus is identified by row numbers.

    Example:
        >>> ids = RowIds(3)
        >>> list(ids), ids[1], ids == ["0", "1", "2"]
        (['0', '1', '2'], '1', True)
    """

    def __init__(self, count: int) -> None:
        self.count = int(count)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, slice):
            return [str(i) for i in range(self.count)[item]]
        return str(range(self.count)[item])

    def __iter__(self) -> Iterator[str]:
        return (str(i) for i in range(self.count))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RowIds):
            return other.count == self.count
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(other) == self.count and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash(("RowIds", self.count))

    def __repr__(self) -> str:
        return f"RowIds({self.count})"

    def row_of(self, doc_id: str) -> int | None:
        """The row of ``doc_id``, ``None`` when it is not a row number of this range."""
        if isinstance(doc_id, str) and doc_id.isdigit() and (doc_id == "0" or not doc_id.startswith("0")):
            row = int(doc_id)
            if row < self.count:
                return row
        return None


class Float32Rows:
    """A read-only float32 numpy view of a bank's rows, converted only for the rows asked for.

    FAISS needs float32 rows; slicing this object (``rows[a:b]`` or ``rows[index_array]``) returns exactly those rows
    as a C-contiguous float32 array, so a float16 or memory-mapped bank can be indexed in chunks without ever making a
    float32 copy of the whole bank. For a float32 CPU bank a slice may share memory with the bank.

    Example:
        >>> import torch
        >>> rows = TargetBank(torch.eye(3), ["a", "b", "c"], dtype="fp16").float32_rows()
        >>> rows.shape, rows[1:3].dtype
        ((3, 3), dtype('float32'))
    """

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, weight: torch.Tensor) -> None:
        self._weight = weight.detach()

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self._weight.shape[0]), int(self._weight.shape[1]))

    def __len__(self) -> int:
        return int(self._weight.shape[0])

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, np.ndarray):
            key = torch.from_numpy(np.asarray(key, dtype=np.int64))
        if torch.is_tensor(key):
            key = key.to(self._weight.device)
        part = self._weight[key]
        return np.ascontiguousarray(part.to("cpu", torch.float32).numpy())


class FrozenRows:
    """Fixed rows in a compact storage dtype, indexed like a tensor and returned as float32.

    The trainer keeps the initial bank rows this way for drift control when the bank is not float32 (or is memory
    mapped), so the copy costs what the bank costs, not a float32 matrix.
    """

    def __init__(self, storage: torch.Tensor) -> None:
        self.storage = storage

    @property
    def device(self) -> torch.device:
        return self.storage.device

    def __getitem__(self, rows: Any) -> torch.Tensor:
        return self.storage[rows].float()


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


def _read_npy_header(handle: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(handle)  # (shape, fortran_order, dtype)
    return np.lib.format.read_array_header_2_0(handle)


def _npy_chunks(path: Path, chunk_rows: int = CHUNK_ROWS) -> tuple[tuple[int, int], np.dtype, Iterator[np.ndarray]]:
    """Shape, dtype and a chunk iterator of a 2-D C-ordered ``.npy`` file, read with plain file reads (no mmap)."""
    handle = open(path, "rb")
    try:
        shape, fortran_order, dtype = _read_npy_header(handle)
    except Exception:
        handle.close()
        raise
    if fortran_order or len(shape) != 2 or dtype.hasobject:
        handle.close()
        raise ArtifactError(f"{path}: a bank .npy must be a 2-D C-ordered numeric matrix; re-save it with np.save.")

    def chunks() -> Iterator[np.ndarray]:
        with handle:
            for start in range(0, shape[0], chunk_rows):
                count = min(chunk_rows, shape[0] - start)
                data = np.fromfile(handle, dtype=dtype, count=count * shape[1])
                if data.size != count * shape[1]:
                    raise ArtifactError(f"{path}: the file is truncated; re-create it.")
                yield data.reshape(count, shape[1])

    return (int(shape[0]), int(shape[1])), dtype, chunks()


def _to_storage_array(chunk: np.ndarray | torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """A chunk of rows converted to the on-disk numpy layout of ``dtype`` (raw uint16 for bf16)."""
    tensor = torch.as_tensor(chunk) if not torch.is_tensor(chunk) else chunk
    tensor = tensor.detach().to("cpu", dtype).contiguous()
    if dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return tensor.numpy().view(_NUMPY_STORAGE[dtype])


class TargetBank(nn.Module):
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
    @staticmethod
    def _check_shape(shape: tuple[int, ...], doc_ids: Sequence[str] | None) -> None:
        if len(shape) != 2:
            raise ArtifactError(f"bank embeddings must be a 2-D (num_docs, dim) matrix, got shape {shape}.")
        if doc_ids is not None and shape[0] != len(doc_ids):
            raise ArtifactError(
                f"the bank has {shape[0]} rows but {len(doc_ids)} document ids were given; "
                "re-encode the corpus or pass the doc-id list the bank was built from."
            )

    def _setup(self, doc_ids: Sequence[str] | None) -> None:
        count = int(self.weight.shape[0])
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
    def __len__(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        """The embedding dimension."""
        return self.weight.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype of the rows."""
        return self.weight.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the row storage."""
        return self.weight.numel() * self.weight.element_size()

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
        weight = self.weight
        target = self.compute_device
        if target is not None and torch.device(target) != weight.device:
            pin = self.pin_memory and weight.device.type == "cpu" and torch.device(target).type == "cuda"
            return _StagedGather.apply(weight, rows.to(weight.device), torch.device(target), pin)
        gathered = nn.functional.embedding(rows.to(weight.device), weight, sparse=True)
        return gathered if gathered.dtype == torch.float32 else gathered.float()

    def numpy(self) -> np.ndarray:
        """A float32 ``(num_docs, dim)`` copy for FAISS (the whole bank: prefer :meth:`float32_rows` at scale)."""
        return np.ascontiguousarray(self.weight.detach().to("cpu", torch.float32).numpy())

    def float32_rows(self) -> Float32Rows:
        """A float32 view converted chunk by chunk (see :class:`Float32Rows`); what the index refresh reads."""
        return Float32Rows(self.weight)

    def iter_float32(self, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """Yields ``(start_row, float32 rows)`` chunks of the whole bank."""
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

    def changed_rows(self) -> np.ndarray:
        """The sorted rows changed since the last :meth:`clear_changed` (``int64``)."""
        return self._changed.nonzero().squeeze(1).numpy()

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
        dtype = storage_dtype(dtype) if dtype is not None else self.weight.dtype
        device = torch.device(device) if device is not None else self.weight.device
        if dtype == self.weight.dtype and device == self.weight.device:
            return self
        if self.is_mmap:
            raise ConfigError(
                f"the bank is memory mapped from {self._mmap_path} ({_dtype_name(self.weight.dtype)}, CPU); it cannot "
                f"become {_dtype_name(dtype)} on {device}: create the mmap file with that dtype, or turn bank_mmap off."
            )
        self.weight.data = self.weight.data.to(device, dtype)
        return self

    def flush(self) -> None:
        """Writes the dirty pages of a memory-mapped bank to its file (no-op otherwise)."""
        if self._mmap is not None:
            self._mmap.flush()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_encoder(
        cls,
        encode: Callable[[list[str]], torch.Tensor | np.ndarray],
        texts: Sequence[str],
        doc_ids: Sequence[str] | None,
        dtype: str | torch.dtype = torch.float32,
        mmap_path: str | os.PathLike | None = None,
        chunk_texts: int = CHUNK_ROWS,
    ) -> TargetBank:
        """Builds the bank by encoding the corpus once.

        Args:
            encode: Maps a list of texts to their ``(n, dim)`` embeddings, for example
                :func:`hf_qret.encoder.encode_texts` bound to a model (batched, with a progress bar).
            texts: The document texts, in row order.
            doc_ids: The document ids, in row order (``None``: row numbers).
            dtype: Storage dtype (``"fp32"``, ``"bf16"``, ``"fp16"``).
            mmap_path: Write the rows into this ``.npy`` file, ``chunk_texts`` texts at a time, and memory-map it
                (see :meth:`open_mmap`); ``None`` keeps the bank in RAM.

        Example:
            >>> from functools import partial
            >>> from hf_qret.encoder import encode_texts
            >>> bank = TargetBank.from_encoder(partial(encode_texts, model), texts, ids)  # doctest: +SKIP
        """
        if mmap_path is None:
            return cls(torch.as_tensor(np.asarray(encode(list(texts)), dtype=np.float32)), doc_ids, dtype)
        texts = list(texts)
        first = np.asarray(encode(texts[:chunk_texts]), dtype=np.float32)
        bank = cls.create_mmap(mmap_path, len(texts), first.shape[1], doc_ids, dtype)
        bank.write_rows(0, first)
        for start in range(chunk_texts, len(texts), chunk_texts):
            bank.write_rows(start, np.asarray(encode(texts[start : start + chunk_texts]), dtype=np.float32))
        bank.flush()
        return bank

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        doc_ids: Sequence[str] | None,
        dtype: str | torch.dtype = torch.float32,
        mmap_path: str | os.PathLike | None = None,
    ) -> TargetBank:
        """Loads initial embeddings from a ``.npy`` file (no pickle) or a safetensors file (key ``embeddings``).

        Args:
            path: The file.
            doc_ids: The document ids, in row order (``None``: row numbers).
            dtype: Storage dtype of the bank (the file's rows are cast).
            mmap_path: Instead of loading the rows into RAM, write them once into this ``.npy`` working file (in
                ``dtype``, streamed in chunks: a plain file copy when ``path`` is already a ``.npy`` of that dtype)
                and memory-map it. Training then updates the working file, never ``path``.

        Example:
            >>> bank = TargetBank.from_file(
            ...     "bank.npy", doc_ids, dtype="fp16", mmap_path="out/bank_mmap.npy"
            ... )  # doctest: +SKIP
        """
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path}: no such bank file; pass a .npy or .safetensors file of embeddings.")
        dtype = storage_dtype(dtype)
        if mmap_path is not None:
            return cls._mmap_from_file(path, doc_ids, dtype, Path(mmap_path))
        try:
            if path.suffix == ".npy":
                tensor = torch.from_numpy(np.asarray(np.load(path, allow_pickle=False), dtype=np.float32))
            else:
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as handle:
                    keys = sorted(handle.keys())
                    if BANK_KEY not in keys:
                        raise ArtifactError(f"{path}: no {BANK_KEY!r} tensor; found {keys}.")
                    tensor = handle.get_tensor(BANK_KEY)
        except ArtifactError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoding failure is a corrupt file for the user
            raise ArtifactError(f"{path}: cannot be read as a bank ({exc}); re-create it.") from None
        return cls(tensor, doc_ids, dtype)

    @classmethod
    def _mmap_from_file(cls, path: Path, doc_ids: Sequence[str] | None, dtype: torch.dtype, target: Path) -> TargetBank:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            if path.suffix == ".npy":
                shape, file_dtype, chunks = _npy_chunks(path)
                cls._check_shape(shape, doc_ids)
                size = shape[0] * shape[1] * _NUMPY_STORAGE[dtype].itemsize
                if file_dtype == _NUMPY_STORAGE[dtype] and dtype != torch.bfloat16:
                    chunks.close()
                    logger.info(
                        "bank: copying %s to the memory-mapped working file %s (%.2f GB)", path, target, size / 1e9
                    )
                    shutil.copyfile(path, target.with_name(target.name + ".tmp"))
                    os.replace(target.with_name(target.name + ".tmp"), target)
                    return cls.open_mmap(target, doc_ids, dtype)
            else:
                from safetensors import safe_open

                handle = safe_open(str(path), framework="pt")
                if BANK_KEY not in handle.keys():
                    raise ArtifactError(f"{path}: no {BANK_KEY!r} tensor; found {sorted(handle.keys())}.")
                sliced = handle.get_slice(BANK_KEY)
                shape = tuple(sliced.get_shape())
                cls._check_shape(shape, doc_ids)
                size = shape[0] * shape[1] * _NUMPY_STORAGE[dtype].itemsize
                chunks = (sliced[start : start + CHUNK_ROWS] for start in range(0, shape[0], CHUNK_ROWS))
            logger.info(
                "bank: converting %s to the memory-mapped %s working file %s (%d x %d, %.2f GB), once per run",
                path, _dtype_name(dtype), target, shape[0], shape[1], size / 1e9,
            )  # fmt: skip
            cls._write_npy(target, shape, dtype, chunks)
        except ArtifactError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ArtifactError(f"{path}: cannot be read as a bank ({exc}); re-create it.") from None
        return cls.open_mmap(target, doc_ids, dtype)

    @staticmethod
    def _write_npy(target: Path, shape: tuple[int, int], dtype: torch.dtype, chunks: Any) -> None:
        """Streams chunks of rows into a new ``.npy`` file (temp name, then rename) with plain writes."""
        tmp = target.with_name(target.name + ".tmp")
        header = {"descr": np.lib.format.dtype_to_descr(_NUMPY_STORAGE[dtype]), "fortran_order": False, "shape": shape}
        written = 0
        with open(tmp, "wb") as handle:
            np.lib.format.write_array_header_1_0(handle, header)
            for chunk in chunks:
                array = _to_storage_array(chunk, dtype)
                if array.ndim != 2 or array.shape[1] != shape[1]:
                    raise ArtifactError(f"a chunk of shape {array.shape} does not fit a {shape} bank.")
                handle.write(memoryview(array).cast("B"))
                written += array.shape[0]
        if written != shape[0]:
            tmp.unlink(missing_ok=True)
            raise ArtifactError(f"{target}: wrote {written} rows for a bank of {shape[0]}; the source is truncated.")
        os.replace(tmp, target)

    @classmethod
    def zeros(
        cls,
        num_docs: int,
        dim: int,
        doc_ids: Sequence[str] | None = None,
        dtype: str | torch.dtype = torch.float32,
        mmap_path: str | os.PathLike | None = None,
    ) -> TargetBank:
        """A zero bank to fill with :meth:`write_rows` chunk by chunk (in RAM, or in a new mmap file).

        Example:
            >>> bank = TargetBank.zeros(1000, 8, dtype="fp16")
            >>> bank.write_rows(0, torch.ones(10, 8)); bank.dtype, int(bank.weight.float().sum())
            (torch.float16, 80)
        """
        if mmap_path is not None:
            return cls.create_mmap(mmap_path, num_docs, dim, doc_ids, dtype)
        storage = torch.zeros(int(num_docs), int(dim), dtype=storage_dtype(dtype))
        return cls._from_storage(storage, doc_ids)

    @classmethod
    def create_mmap(
        cls,
        path: str | os.PathLike,
        num_docs: int,
        dim: int,
        doc_ids: Sequence[str] | None = None,
        dtype: str | torch.dtype = torch.float32,
    ) -> TargetBank:
        """A zero-filled bank backed by a new memory-mapped ``.npy`` file (a sparse file: no RAM, little disk).

        Fill it with :meth:`write_rows` (chunk by chunk: the rows never need to fit in RAM at once).

        Example:
            >>> bank = TargetBank.create_mmap("bank.npy", 10_000_000, 384, dtype="fp16")  # doctest: +SKIP
            >>> bank.write_rows(0, first_chunk)  # doctest: +SKIP
        """
        path = Path(path)
        dtype = storage_dtype(dtype)
        cls._check_shape((int(num_docs), int(dim)), doc_ids)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=_NUMPY_STORAGE[dtype], shape=(int(num_docs), int(dim)))
        del array
        os.replace(tmp, path)
        return cls.open_mmap(path, doc_ids, dtype)

    @classmethod
    def open_mmap(
        cls, path: str | os.PathLike, doc_ids: Sequence[str] | None, dtype: str | torch.dtype | None = None
    ) -> TargetBank:
        """Opens a ``.npy`` file as a bank **in place**: the parameter is backed by the file's memory map.

        Reads and updates touch only the rows involved; the OS pages the file in and out, so the bank may be larger
        than RAM. Updates are written to the file (call :meth:`flush` to force them to disk). A float32 or float16
        file keeps its dtype; a bf16 bank is stored as the raw ``uint16`` bits (pass ``dtype="bf16"``).

        Example:
            >>> bank = TargetBank.open_mmap("out/bank_mmap.npy", doc_ids)  # doctest: +SKIP
        """
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path}: no such bank file; create it with TargetBank.create_mmap or from_file.")
        try:
            array = np.load(path, mmap_mode="r+", allow_pickle=False)
        except Exception as exc:  # noqa: BLE001
            raise ArtifactError(f"{path}: cannot be memory-mapped as a bank ({exc}); re-create it.") from None
        wanted = storage_dtype(dtype) if dtype is not None else None
        found = {np.dtype("<f4"): torch.float32, np.dtype("<f2"): torch.float16}.get(array.dtype)
        if array.dtype == np.dtype("<u2") and wanted == torch.bfloat16:
            found = torch.bfloat16
        if found is None or (wanted is not None and wanted != found) or not array.flags["C_CONTIGUOUS"]:
            raise ArtifactError(
                f"{path}: a memory-mapped bank must be a C-ordered float32, float16 (or uint16 bf16 bits) .npy, "
                f"found {array.dtype}{'' if wanted is None else f' for bank_dtype {_dtype_name(wanted)}'}; convert it "
                "with TargetBank.from_file(..., mmap_path=...)."
            )
        tensor = torch.from_numpy(array)
        if found == torch.bfloat16:
            tensor = tensor.view(torch.bfloat16)
        return cls._from_storage(tensor, doc_ids, mmap=array, path=path)

    @torch.no_grad()
    def write_rows(self, start: int, rows: np.ndarray | torch.Tensor) -> None:
        """Overwrites rows ``start .. start + len(rows)`` (cast to the storage dtype); marks them changed."""
        values = torch.as_tensor(rows) if not torch.is_tensor(rows) else rows
        end = start + values.shape[0]
        self.weight[start:end].copy_(values.to(self.weight.device))
        self._changed[start:end] = True

    @torch.no_grad()
    def load_rows_from_file(self, path: str | os.PathLike) -> None:
        """Copies the rows of a saved bank file into this bank's storage, chunk by chunk (resuming a checkpoint).

        Raises:
            ArtifactError: The file is unreadable or has another shape.
        """
        path = Path(path)
        try:
            if path.suffix == ".npy":
                shape, _, chunks = _npy_chunks(path)
            else:
                from safetensors import safe_open

                handle = safe_open(str(path), framework="pt")
                sliced = handle.get_slice(BANK_KEY)
                shape = tuple(sliced.get_shape())
                chunks = (sliced[start : start + CHUNK_ROWS] for start in range(0, shape[0], CHUNK_ROWS))
            if tuple(shape) != tuple(self.weight.shape):
                raise ArtifactError(
                    f"{path}: the saved bank is {tuple(shape)} but this bank is {tuple(self.weight.shape)}; "
                    "resume with the same corpus and model."
                )
            start = 0
            for chunk in chunks:
                chunk = torch.as_tensor(chunk) if not torch.is_tensor(chunk) else chunk
                self.weight[start : start + chunk.shape[0]].copy_(chunk.to(self.weight.device))
                start += chunk.shape[0]
        except ArtifactError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ArtifactError(f"{path}: cannot be read as a bank ({exc}); re-create it.") from None
        self.version += 1
        self.mark_all_changed()

    def frozen_copy(self, path: str | os.PathLike | None = None) -> torch.Tensor | FrozenRows:
        """A fixed copy of the current rows (the trainer's initial rows for drift control).

        A float32 in-RAM bank gives a plain tensor clone. Otherwise the copy keeps the storage dtype and is returned
        as :class:`FrozenRows` (float32 on indexing); a memory-mapped bank is copied file to file into ``path`` and
        mapped copy-on-write, so it costs disk, not RAM.
        """
        weight = self.weight.detach()
        if not self.is_mmap:
            return weight.clone() if weight.dtype == torch.float32 else FrozenRows(weight.clone())
        if path is None:
            raise ValueError("a memory-mapped bank needs a file path for its frozen copy.")
        self.flush()
        path = Path(path)
        shutil.copyfile(self._mmap_path, path.with_name(path.name + ".tmp"))
        os.replace(path.with_name(path.name + ".tmp"), path)
        array = np.load(path, mmap_mode="c", allow_pickle=False)
        tensor = torch.from_numpy(array)
        if weight.dtype == torch.bfloat16:
            tensor = tensor.view(torch.bfloat16)
        frozen = FrozenRows(tensor)
        frozen._mmap = array  # keeps the mapping alive
        return frozen

    def row_norms(self, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
        """The float32 L2 norm of every row, computed chunk by chunk."""
        weight = self.weight.detach()
        if weight.dtype == torch.float32 and not self.is_mmap:
            return weight.norm(dim=1)
        return torch.cat(
            [weight[s : s + chunk_rows].float().norm(dim=1) for s in range(0, weight.shape[0], chunk_rows)]
        )

    # ------------------------------------------------------------------ saving
    def save(self, path: str | os.PathLike) -> None:
        """Writes the embeddings atomically: ``.npy`` (float32) for a ``.npy`` path, else safetensors (key
        ``embeddings``, in the storage dtype). A memory-mapped bank is streamed in chunks."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        if path.suffix == ".npy":
            if self.is_mmap:
                self._write_npy(path, tuple(self.weight.shape), torch.float32, (c for _, c in self.iter_float32()))
                return
            with open(tmp, "wb") as handle:
                np.save(handle, self.numpy(), allow_pickle=False)
        elif self.is_mmap:
            self._save_safetensors_streamed(tmp)
        else:
            from safetensors.torch import save_file

            save_file({BANK_KEY: self.weight.detach().to("cpu").contiguous()}, str(tmp))
        os.replace(tmp, path)

    def _save_safetensors_streamed(self, tmp: Path) -> None:
        weight = self.weight.detach()
        nbytes = weight.numel() * weight.element_size()
        header = {BANK_KEY: {"dtype": _SAFETENSORS_DTYPE[weight.dtype], "shape": list(weight.shape),
                             "data_offsets": [0, nbytes]}}  # fmt: skip
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        with open(tmp, "wb") as handle:
            handle.write(len(encoded).to_bytes(8, "little"))
            handle.write(encoded)
            for start in range(0, weight.shape[0], CHUNK_ROWS):
                handle.write(memoryview(_to_storage_array(weight[start : start + CHUNK_ROWS], weight.dtype)).cast("B"))

    def check_dim(self, dim: int, what: str = "the encoder") -> None:
        """Raises a clear error when the bank dimension differs from ``dim``."""
        if self.dim != dim:
            raise ArtifactError(
                f"the bank has dimension {self.dim} but {what} produces {dim}-d embeddings; "
                "build the bank with the same encoder."
            )


class RowAdam:
    """Adam over the rows of a :class:`TargetBank`, with per-row state and per-row step counts.

    Only rows that received a gradient (the candidate rows of the accumulated batches) are read or written. A row's
    moments and step count belong to that row alone, so the first update of a row always gets the full bias
    correction of a first Adam step, however late in training it happens.

    State is kept only for rows that were ever updated: a row-to-slot map (4 bytes per bank row) and slot tensors of
    moments and step counts allocated in blocks of ``block_rows`` rows as new rows are touched, so the memory grows
    with the number of touched rows, not with the corpus. The update is computed in float32 whatever the bank's
    storage dtype, and written back in that dtype.

    Args:
        bank: The bank to optimise.
        lr: Learning rate.
        betas: Adam's moment coefficients.
        eps: Adam's epsilon.
        weight_decay: Decoupled (AdamW-style) weight decay on the updated rows.
        block_rows: Rows of optimizer state allocated at a time.

    Example:
        >>> import torch
        >>> bank = TargetBank(torch.zeros(3, 2), ["a", "b", "c"])
        >>> opt = RowAdam(bank, lr=0.1)
        >>> bank.gather(torch.tensor([1])).sum().backward()
        >>> opt.step()  # rows updated
        1
        >>> opt.zero_grad()
        >>> [round(v, 4) for v in bank.weight[1].tolist()], bank.weight[0].tolist()
        ([-0.1, -0.1], [0.0, 0.0])
        >>> opt.num_touched_rows
        1
    """

    STATE_NAMES = ("exp_avg", "exp_avg_sq", "row_steps")

    def __init__(
        self,
        bank: TargetBank,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        block_rows: int = 16384,
    ) -> None:
        if block_rows < 1:
            raise ValueError(f"block_rows must be at least 1, got {block_rows}.")
        self.bank = bank
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.block_rows = int(block_rows)
        weight = bank.weight
        self._num_rows = int(weight.shape[0])
        self._dim = int(weight.shape[1])
        self._device = weight.device
        index_dtype = torch.int32 if self._num_rows < 2**31 else torch.int64
        self._slot_of = torch.full((self._num_rows,), -1, dtype=index_dtype, device=self._device)
        self._reset_slots()

    def _reset_slots(self) -> None:
        self._slot_of.fill_(-1)
        self._avg_blocks: list[torch.Tensor] = []
        self._sq_blocks: list[torch.Tensor] = []
        self._step_blocks: list[torch.Tensor] = []
        self._capacity = 0
        self.num_touched_rows = 0

    # ------------------------------------------------------------------ slot store
    def _grow(self, needed: int) -> None:
        while self._capacity < needed:
            rows = min(self.block_rows, self._num_rows - self._capacity)
            self._avg_blocks.append(torch.zeros(rows, self._dim, dtype=torch.float32, device=self._device))
            self._sq_blocks.append(torch.zeros(rows, self._dim, dtype=torch.float32, device=self._device))
            self._step_blocks.append(torch.zeros(rows, dtype=torch.int64, device=self._device))
            self._capacity += rows

    def _slots(self, rows: torch.Tensor) -> torch.Tensor:
        """The slots of ``rows`` (unique), allocating fresh zeroed slots for rows seen for the first time."""
        slots = self._slot_of[rows].long()
        fresh = slots < 0
        count = int(fresh.sum())
        if count:
            start = self.num_touched_rows
            self._grow(start + count)
            new_slots = torch.arange(start, start + count, device=self._device)
            self._slot_of[rows[fresh]] = new_slots.to(self._slot_of.dtype)
            slots[fresh] = new_slots
            self.num_touched_rows += count
        return slots

    def _read(self, blocks: list[torch.Tensor], slots: torch.Tensor) -> torch.Tensor:
        if len(blocks) == 1:
            return blocks[0][slots]
        block, offset = slots // self.block_rows, slots % self.block_rows
        out = blocks[0].new_empty((slots.numel(), *blocks[0].shape[1:]))
        for b in torch.unique(block).tolist():
            where = (block == b).nonzero().squeeze(1)
            out[where] = blocks[b][offset[where]]
        return out

    def _write(self, blocks: list[torch.Tensor], slots: torch.Tensor, values: torch.Tensor) -> None:
        if len(blocks) == 1:
            blocks[0][slots] = values
            return
        block, offset = slots // self.block_rows, slots % self.block_rows
        for b in torch.unique(block).tolist():
            where = (block == b).nonzero().squeeze(1)
            blocks[b][offset[where]] = values[where]

    # ------------------------------------------------------------------ optimisation
    @torch.no_grad()
    def step(self) -> int:
        """Updates the rows that have a gradient; returns how many rows were updated."""
        rows, grads = row_gradients(self.bank.weight)
        if rows.numel() == 0:
            return 0
        beta1, beta2 = self.betas
        weight = self.bank.weight
        grads = grads.float()
        slots = self._slots(rows)
        row_steps = self._read(self._step_blocks, slots) + 1
        self._write(self._step_blocks, slots, row_steps)
        steps = row_steps.to(torch.float32).unsqueeze(1)
        exp_avg = self._read(self._avg_blocks, slots).mul_(beta1).add_(grads, alpha=1 - beta1)
        exp_avg_sq = self._read(self._sq_blocks, slots).mul_(beta2).addcmul_(grads, grads, value=1 - beta2)
        self._write(self._avg_blocks, slots, exp_avg)
        self._write(self._sq_blocks, slots, exp_avg_sq)
        bias1 = 1 - beta1**steps
        bias2 = 1 - beta2**steps
        denom = (exp_avg_sq / bias2).sqrt_().add_(self.eps)
        update = (exp_avg / bias1) / denom
        current = weight[rows].float()
        if self.weight_decay:
            current = current * (1 - self.lr * self.weight_decay)
        weight[rows] = (current - self.lr * update).to(weight.dtype)
        self.bank.version += 1
        if hasattr(self.bank, "mark_changed"):
            self.bank.mark_changed(rows)
        return int(rows.numel())

    def zero_grad(self) -> None:
        """Drops the accumulated (sparse) gradient of the bank."""
        self.bank.weight.grad = None

    # ------------------------------------------------------------------ inspection
    def touched_rows(self) -> torch.Tensor:
        """The sorted bank rows that have optimizer state (were updated at least once)."""
        return (self._slot_of >= 0).nonzero().squeeze(1)

    @property
    def nbytes(self) -> int:
        """Bytes of optimizer state: the row-to-slot map plus the allocated slot blocks."""
        blocks = self._avg_blocks + self._sq_blocks + self._step_blocks
        return self._slot_of.numel() * self._slot_of.element_size() + sum(b.numel() * b.element_size() for b in blocks)

    def _dense(self, blocks: list[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        out = torch.zeros(shape, dtype=dtype, device=self._device)
        rows = self.touched_rows()
        if rows.numel():
            out[rows] = self._read(blocks, self._slot_of[rows].long())
        return out

    @property
    def row_steps(self) -> torch.Tensor:
        """Every row's own step count, ``(num_docs,)`` int64 (a copy; 0 for rows never updated)."""
        return self._dense(self._step_blocks, (self._num_rows,), torch.int64)

    @property
    def exp_avg(self) -> torch.Tensor:
        """A dense ``(num_docs, dim)`` copy of the first moments (zeros where untouched): for small banks only."""
        return self._dense(self._avg_blocks, (self._num_rows, self._dim), torch.float32)

    @property
    def exp_avg_sq(self) -> torch.Tensor:
        """A dense ``(num_docs, dim)`` copy of the second moments (zeros where untouched): for small banks only."""
        return self._dense(self._sq_blocks, (self._num_rows, self._dim), torch.float32)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The optimizer state as tensors (safetensors-friendly), compact.

        ``row_steps`` is ``(num_docs,)``; ``exp_avg`` and ``exp_avg_sq`` are ``(T, dim)`` for the ``T`` rows with
        ``row_steps > 0``, in increasing row order.
        """
        rows = self.touched_rows()
        slots = self._slot_of[rows].long()
        empty = torch.zeros(0, self._dim, dtype=torch.float32, device=self._device)
        steps = torch.zeros(self._num_rows, dtype=torch.int64, device=self._device)
        if rows.numel():
            steps[rows] = self._read(self._step_blocks, slots)
        return {
            "exp_avg": self._read(self._avg_blocks, slots) if rows.numel() else empty,
            "exp_avg_sq": self._read(self._sq_blocks, slots) if rows.numel() else empty.clone(),
            "row_steps": steps,
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores :meth:`state_dict` output; also reads the older dense format (``(num_docs, dim)`` moments).

        Raises:
            ArtifactError: A tensor is missing or its shape does not fit this bank.
        """

        def wrong(name: str) -> ArtifactError:
            return ArtifactError(
                f"bank optimizer state {name!r} is missing or has the wrong shape; the checkpoint belongs to another "
                "corpus."
            )

        for name in self.STATE_NAMES:
            if name not in state:
                raise wrong(name)
        steps = state["row_steps"].to(self._device, torch.int64)
        if tuple(steps.shape) != (self._num_rows,):
            raise wrong("row_steps")
        rows = steps.gt(0).nonzero().squeeze(1)
        moments = {}
        for name in ("exp_avg", "exp_avg_sq"):
            tensor = state[name].to(self._device, torch.float32)
            if tensor.ndim != 2 or tensor.shape[1] != self._dim:
                raise wrong(name)
            if tensor.shape[0] == rows.numel():
                moments[name] = tensor
            elif tensor.shape[0] == self._num_rows:  # the dense format of earlier versions
                moments[name] = tensor[rows]
            else:
                raise wrong(name)
        self._reset_slots()
        if rows.numel():
            slots = self._slots(rows)
            self._write(self._step_blocks, slots, steps[rows])
            self._write(self._avg_blocks, slots, moments["exp_avg"])
            self._write(self._sq_blocks, slots, moments["exp_avg_sq"])
