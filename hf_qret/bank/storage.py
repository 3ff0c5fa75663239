"""How a :class:`~hf_qret.bank.core.TargetBank` holds its rows: document ids by row number (:class:`RowIds`), float32
views converted chunk by chunk (:class:`Float32Rows`) and the device and dtype the rows live in (:func:`place_bank`).

The files the rows are read from and written to (dtypes, ``.npy`` / safetensors, memory maps) are
:mod:`hf_qret.bank.files`, whose names are re-exported here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import files
from .files import *  # noqa: F403  (every hf_qret.bank.files name, importable from here too: see __all__)
from .files import storage_dtype

if TYPE_CHECKING:
    from .core import TargetBank

#: This module's names, then every name of :mod:`hf_qret.bank.files` (re-exported).
__all__ = ["Float32Rows", "RowIds", "place_bank", *files.__all__]

logger = logging.getLogger("hf_qret.bank.core")


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
        >>> rows = Float32Rows(torch.eye(3, dtype=torch.float16))
        >>> rows.shape, rows[1:3].dtype
        ((3, 3), dtype('float32'))
    """

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, weight: torch.Tensor) -> None:
        self._weight = weight.detach()

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, dim)`` of the bank."""
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


def place_bank(
    bank: TargetBank,
    device: str | torch.device,
    bank_device: str = "auto",
    bank_dtype: str = "fp32",
    pin_memory: bool = False,
) -> None:
    """Stores the bank as the options ``bank_dtype`` / ``bank_device`` / ``bank_pin_memory`` say (see the README,
    "Scale"): on ``device`` (where training computes), or on the CPU with ``bank_device='cpu'`` (and by default for
    a memory-mapped bank), its gathered rows then moved to ``device``.

    Example:
        >>> place_bank(bank, "cuda", bank_device="cpu", bank_dtype="bf16", pin_memory=True)  # doctest: +SKIP
    """
    device = torch.device(device)
    if bank_device == "cpu" or (bank_device == "auto" and bank.is_mmap):
        target = torch.device("cpu")
    else:
        target = device
    if bank.dtype != storage_dtype(bank_dtype) and not bank.is_mmap:
        logger.info("bank: storing the rows as %s (bank_dtype)", bank_dtype)
    bank.to_storage(bank_dtype, target)
    bank.compute_device = None if target == device else device
    bank.pin_memory = bool(pin_memory)
