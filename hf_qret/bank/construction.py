"""Making a :class:`~hf_qret.bank.core.TargetBank`: :class:`ConstructionMixin`, its constructors. A bank is encoded
from texts (:meth:`~ConstructionMixin.from_encoder`), read from a file (:meth:`~ConstructionMixin.from_file`), made
empty to fill chunk by chunk (:meth:`~ConstructionMixin.zeros`), or backed by a memory-mapped ``.npy`` file, new
(:meth:`~ConstructionMixin.create_mmap`) or existing (:meth:`~ConstructionMixin.open_mmap`).
:func:`hf_qret.bank.build.build_bank` chooses among them from a run's settings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import ArtifactError
from .files import (
    CHUNK_ROWS,
    NUMPY_STORAGE,
    copy_file_atomic,
    create_npy_memmap,
    dtype_name,
    load_bank_file,
    open_npy_memmap,
    read_bank_chunks,
    storage_dtype,
    write_npy,
)

if TYPE_CHECKING:
    from .core import TargetBank

__all__ = ["ConstructionMixin"]

# the bank's one logger
logger = logging.getLogger("hf_qret.bank.core")


class ConstructionMixin:
    """The constructors of :class:`~hf_qret.bank.core.TargetBank` (mixed into it; it provides ``_check_shape``,
    ``_from_storage``, ``write_rows`` and ``flush``).

    Example:
        >>> from hf_qret.bank.core import TargetBank
        >>> issubclass(TargetBank, ConstructionMixin)
        True
    """

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
                :func:`hf_qret.serving.encoder.encode_texts` bound to a model (batched, with a progress bar). Its
                ``precision`` attribute, when it has one (:func:`hf_qret.training.corpus.document_encode`), becomes
                :attr:`encode_precision`.
            texts: The document texts, in row order.
            doc_ids: The document ids, in row order (``None``: row numbers).
            dtype: Storage dtype (``"fp32"``, ``"bf16"``, ``"fp16"``).
            mmap_path: Write the rows into this ``.npy`` file, ``chunk_texts`` texts at a time, and memory-map it
                (see :meth:`open_mmap`); ``None`` keeps the bank in RAM.

        Example:
            >>> from functools import partial
            >>> from hf_qret.serving.encoder import encode_texts
            >>> bank = TargetBank.from_encoder(partial(encode_texts, model, role="document"), texts, ids)  # doctest: +SKIP
        """
        if mmap_path is None:
            bank = cls(torch.as_tensor(np.asarray(encode(list(texts)), dtype=np.float32)), doc_ids, dtype)
            bank.encode_precision = getattr(encode, "precision", None)  # document_encode's functions say it
            return bank
        texts = list(texts)
        first = np.asarray(encode(texts[:chunk_texts]), dtype=np.float32)
        bank = cls.create_mmap(mmap_path, len(texts), first.shape[1], doc_ids, dtype)
        bank.write_rows(0, first)
        for start in range(chunk_texts, len(texts), chunk_texts):
            bank.write_rows(start, np.asarray(encode(texts[start : start + chunk_texts]), dtype=np.float32))
        bank.flush()
        bank.encode_precision = getattr(encode, "precision", None)
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
        dtype = storage_dtype(dtype)
        if mmap_path is not None:
            path = Path(path)
            if not path.is_file():
                raise ArtifactError(f"{path}: no such bank file; pass a .npy or .safetensors file of embeddings.")
            return cls._mmap_from_file(path, doc_ids, dtype, Path(mmap_path))
        return cls._from_storage(load_bank_file(Path(path), dtype), doc_ids)  # one copy: read chunk by chunk into it

    @classmethod
    def _mmap_from_file(cls, path: Path, doc_ids: Sequence[str] | None, dtype: torch.dtype, target: Path) -> TargetBank:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shape, file_dtype, chunks = read_bank_chunks(path)
            cls._check_shape(shape, doc_ids)
            size = shape[0] * shape[1] * NUMPY_STORAGE[dtype].itemsize
            if file_dtype == NUMPY_STORAGE[dtype] and dtype != torch.bfloat16:
                chunks.close()
                logger.info("bank: copying %s to the memory-mapped working file %s (%.2f GB)", path, target, size / 1e9)
                copy_file_atomic(path, target)
                return cls.open_mmap(target, doc_ids, dtype)
            logger.info(
                "bank: converting %s to the memory-mapped %s working file %s (%d x %d, %.2f GB), once per run",
                path, dtype_name(dtype), target, shape[0], shape[1], size / 1e9,
            )  # fmt: skip
            write_npy(target, shape, dtype, chunks)
        except ArtifactError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ArtifactError(f"{path}: cannot be read as a bank ({exc}); re-create it.") from None
        return cls.open_mmap(target, doc_ids, dtype)

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
        create_npy_memmap(path, (int(num_docs), int(dim)), dtype)
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
        tensor, array = open_npy_memmap(path, storage_dtype(dtype) if dtype is not None else None)
        return cls._from_storage(tensor, doc_ids, mmap=array, path=path)
