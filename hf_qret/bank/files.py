"""The bank's rows on disk: storage dtypes, chunked ``.npy`` and safetensors reading and writing, memory-mapped ``.npy``
files.

The bank's rows can be ``float32``, ``bfloat16`` or ``float16`` (numpy has no bfloat16: a bf16 ``.npy`` holds the raw
``uint16`` bit patterns). Files are read or written in chunks of :data:`CHUNK_ROWS` rows so that a bank larger than RAM
is never materialised as one float32 array, always written to a temporary name and renamed, and never unpickled on
load. :mod:`hf_qret.bank.storage` (the rows in memory) re-exports every name of this module.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ArtifactError, ConfigError
from ..options import BANK_DTYPE_NAMES

#: Every public name of this module (:mod:`hf_qret.bank.storage` re-exports them).
__all__ = [
    "BANK_DTYPES",
    "BANK_KEY",
    "CHUNK_ROWS",
    "NUMPY_STORAGE",
    "check_bank_shape",
    "copy_file_atomic",
    "create_npy_memmap",
    "dtype_name",
    "npy_chunks",
    "open_npy_memmap",
    "read_bank_chunks",
    "load_bank_file",
    "read_bank_file",
    "safetensors_chunks",
    "storage_dtype",
    "to_storage_array",
    "write_npy",
    "write_safetensors_header",
    "write_safetensors_streamed",
]

#: The safetensors key of the bank's embeddings.
BANK_KEY = "embeddings"

#: Storage dtypes of the bank, by their config name.
BANK_DTYPES: dict[str, torch.dtype] = dict(zip(BANK_DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16)))
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float": "fp32"}
# numpy has no bfloat16: a bf16 memory-mapped bank is a .npy of its raw uint16 bit patterns.
NUMPY_STORAGE = {torch.float32: np.dtype("<f4"), torch.float16: np.dtype("<f2"), torch.bfloat16: np.dtype("<u2")}
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
        if dtype not in NUMPY_STORAGE:
            raise ConfigError(f"bank dtype {dtype} is not supported; use one of {', '.join(BANK_DTYPES)}.")
        return dtype
    name = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in BANK_DTYPES:
        raise ConfigError(f"bank_dtype must be one of {', '.join(BANK_DTYPES)}, got {dtype!r}.")
    return BANK_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The config name (``"fp32"``, ``"bf16"``, ``"fp16"``) of a storage dtype.

    Example:
        >>> dtype_name(torch.bfloat16)
        'bf16'
    """
    return next(name for name, value in BANK_DTYPES.items() if value == dtype)


def check_bank_shape(shape: tuple[int, ...], doc_ids: Sequence[str] | None) -> None:
    """Raises a clear error unless ``shape`` is a 2-D ``(num_docs, dim)`` matrix with one row per id.

    Example:
        >>> check_bank_shape((3, 384), ["a", "b", "c"])  # one row per id: no error
    """
    if len(shape) != 2:
        raise ArtifactError(f"bank embeddings must be a 2-D (num_docs, dim) matrix, got shape {shape}.")
    if doc_ids is not None and shape[0] != len(doc_ids):
        raise ArtifactError(
            f"the bank has {shape[0]} rows but {len(doc_ids)} document ids were given; "
            "re-encode the corpus or pass the doc-id list the bank was built from."
        )


# ---------------------------------------------------------------------------------------------------- file I/O
def _read_npy_header(handle: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(handle)  # (shape, fortran_order, dtype)
    return np.lib.format.read_array_header_2_0(handle)


def npy_chunks(path: Path, chunk_rows: int = CHUNK_ROWS) -> tuple[tuple[int, int], np.dtype, Iterator[np.ndarray]]:
    """Shape, dtype and a chunk iterator of a 2-D C-ordered ``.npy`` file, read with plain file reads (no mmap).

    Example:
        >>> shape, dtype, chunks = npy_chunks(Path("bank.npy"))  # doctest: +SKIP
        >>> sum(len(chunk) for chunk in chunks) == shape[0]  # doctest: +SKIP
        True
    """
    handle = open(path, "rb")
    try:
        shape, fortran_order, dtype = _read_npy_header(handle)
    except Exception:
        handle.close()
        raise
    if fortran_order or len(shape) != 2 or dtype.hasobject:
        handle.close()
        raise ArtifactError(
            f"{path}: cannot be read as a bank: a bank .npy must be a 2-D C-ordered numeric matrix; re-save it "
            "with np.save."
        )

    def chunks() -> Iterator[np.ndarray]:
        with handle:
            for start in range(0, shape[0], chunk_rows):
                count = min(chunk_rows, shape[0] - start)
                data = np.fromfile(handle, dtype=dtype, count=count * shape[1])
                if data.size != count * shape[1]:
                    raise ArtifactError(f"{path}: the file is truncated; re-create it.")
                yield data.reshape(count, shape[1])

    return (int(shape[0]), int(shape[1])), dtype, chunks()


def _safetensors_entry(handle: Any, path: Path) -> tuple[tuple[int, ...], torch.dtype, int]:
    """Shape, dtype and absolute byte offset of the ``embeddings`` tensor of an open safetensors file (the format's
    header: 8 bytes of little-endian length, then that many bytes of JSON)."""
    size = int.from_bytes(handle.read(8), "little")
    if size <= 0 or size > 100 << 20:
        raise ArtifactError(f"{path}: cannot be read as a bank (not a safetensors file); re-create it.")
    header = json.loads(handle.read(size))
    entry = header.get(BANK_KEY)
    if entry is None:
        raise ArtifactError(
            f"{path}: no {BANK_KEY!r} tensor; found {sorted(k for k in header if k != '__metadata__')}."
        )
    dtype = {name: dtype for dtype, name in _SAFETENSORS_DTYPE.items()}.get(entry.get("dtype"))
    if dtype is None:
        raise ArtifactError(f"{path}: {BANK_KEY!r} is {entry.get('dtype')}; a bank is F32, F16 or BF16.")
    shape = tuple(int(n) for n in entry["shape"])
    begin, end = (int(n) for n in entry["data_offsets"])
    if len(shape) == 2 and end - begin != shape[0] * shape[1] * NUMPY_STORAGE[dtype].itemsize:
        raise ArtifactError(f"{path}: the {BANK_KEY!r} tensor's byte range does not match its shape; re-create it.")
    return shape, dtype, 8 + size + begin


def safetensors_chunks(path: Path, chunk_rows: int = CHUNK_ROWS) -> tuple[tuple[int, ...], Iterator[torch.Tensor]]:
    """Shape and a chunk iterator (tensors in the file's dtype) of a bank safetensors file's ``embeddings``, read
    with plain file reads: unlike a memory map, the rows already read do not stay in the process's resident set.

    Raises:
        ArtifactError: The file is not safetensors, or has no float ``embeddings`` tensor.

    Example:
        >>> shape, chunks = safetensors_chunks(Path("runs/scifact/bank.safetensors"))  # doctest: +SKIP
    """
    handle = open(path, "rb")
    try:
        shape, dtype, offset = _safetensors_entry(handle, path)
    except ArtifactError:
        handle.close()
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed header is a corrupt file for the user
        handle.close()
        raise ArtifactError(f"{path}: cannot be read as a bank ({exc}); re-create it.") from None

    def chunks() -> Iterator[torch.Tensor]:
        with handle:
            handle.seek(offset)
            width = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
            for start in range(0, shape[0], chunk_rows):
                count = min(chunk_rows, shape[0] - start)
                data = np.fromfile(handle, dtype=NUMPY_STORAGE[dtype], count=count * width)
                if data.size != count * width:
                    raise ArtifactError(f"{path}: the file is truncated; re-create it.")
                tensor = torch.from_numpy(data.reshape(count, *shape[1:]))
                yield tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor

    return shape, chunks()


def read_bank_chunks(path: Path) -> tuple[tuple[int, int], np.dtype | None, Iterator[Any]]:
    """Shape, the ``.npy`` dtype (``None`` for safetensors) and a chunk iterator of a saved bank file, read with
    plain file reads (see :func:`npy_chunks`, :func:`safetensors_chunks`).

    Raises:
        ArtifactError: A safetensors file without the ``embeddings`` tensor.

    Example:
        >>> shape, dtype, chunks = read_bank_chunks(Path("runs/scifact/bank.safetensors"))  # doctest: +SKIP
    """
    if path.suffix == ".npy":
        return npy_chunks(path)
    shape, chunks = safetensors_chunks(path)
    return shape, None, chunks


def load_bank_file(path: Path, dtype: torch.dtype) -> torch.Tensor:
    """The whole embedding matrix of a bank file (``.npy`` or safetensors), cast to ``dtype``: read chunk by chunk
    into the one tensor returned, so loading a bank never holds a second full copy of it (nor its file's pages).

    Raises:
        ArtifactError: The file is missing, unreadable, or not a 2-D matrix of embeddings.

    Example:
        >>> load_bank_file(Path("runs/scifact/bank.safetensors"), torch.float16).dtype  # doctest: +SKIP
        torch.float16
    """
    if not path.is_file():
        raise ArtifactError(f"{path}: no such bank file; pass a .npy or .safetensors file of embeddings.")
    try:
        shape, _, chunks = read_bank_chunks(path)
        check_bank_shape(tuple(shape), None)
        out = torch.empty(tuple(shape), dtype=dtype)
        start = 0
        for chunk in chunks:
            values = torch.as_tensor(np.asarray(chunk, dtype=np.float32)) if not torch.is_tensor(chunk) else chunk
            out[start : start + values.shape[0]].copy_(values.float() if values.dtype != torch.float32 else values)
            start += values.shape[0]
    except ArtifactError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a corrupt file for the user
        raise ArtifactError(f"{path}: cannot be read as a bank ({exc}); re-create it.") from None
    return out


def read_bank_file(path: Path) -> torch.Tensor:
    """The whole embedding matrix of a ``.npy`` (float32, no pickle) or safetensors (key ``embeddings``) file.

    Raises:
        ArtifactError: The file is missing, unreadable, or has no ``embeddings`` tensor.

    Example:
        >>> read_bank_file(Path("runs/scifact/bank.safetensors")).shape  # doctest: +SKIP
        torch.Size([5183, 384])
    """
    if not path.is_file():
        raise ArtifactError(f"{path}: no such bank file; pass a .npy or .safetensors file of embeddings.")
    try:
        if path.suffix == ".npy":
            return torch.from_numpy(np.asarray(np.load(path, allow_pickle=False), dtype=np.float32))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            keys = sorted(handle.keys())
            if BANK_KEY not in keys:
                raise ArtifactError(f"{path}: no {BANK_KEY!r} tensor; found {keys}.")
            return handle.get_tensor(BANK_KEY)
    except ArtifactError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a corrupt file for the user
        raise ArtifactError(f"{path}: cannot be read as a bank ({exc}); re-create it.") from None


def to_storage_array(chunk: np.ndarray | torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """A chunk of rows converted to the on-disk numpy layout of ``dtype`` (raw uint16 for bf16).

    Example:
        >>> to_storage_array(np.ones((1, 2), dtype=np.float32), torch.float16).dtype
        dtype('float16')
    """
    tensor = torch.as_tensor(chunk) if not torch.is_tensor(chunk) else chunk
    tensor = tensor.detach().to("cpu", dtype).contiguous()
    if dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return tensor.numpy().view(NUMPY_STORAGE[dtype])


def write_npy(target: Path, shape: tuple[int, int], dtype: torch.dtype, chunks: Any) -> None:
    """Streams chunks of rows into a new ``.npy`` file (temp name, then rename) with plain writes.

    Example:
        >>> write_npy(Path("bank.npy"), (2, 2), torch.float32, [np.eye(2, dtype=np.float32)])  # doctest: +SKIP
    """
    tmp = target.with_name(target.name + ".tmp")
    header = {"descr": np.lib.format.dtype_to_descr(NUMPY_STORAGE[dtype]), "fortran_order": False, "shape": shape}
    written = 0
    with open(tmp, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        for chunk in chunks:
            array = to_storage_array(chunk, dtype)
            if array.ndim != 2 or array.shape[1] != shape[1]:
                raise ArtifactError(f"a chunk of shape {array.shape} does not fit a {shape} bank.")
            handle.write(memoryview(array).cast("B"))
            written += array.shape[0]
    if written != shape[0]:
        tmp.unlink(missing_ok=True)
        raise ArtifactError(f"{target}: wrote {written} rows for a bank of {shape[0]}; the source is truncated.")
    os.replace(tmp, target)


def write_safetensors_header(handle: Any, dtype: torch.dtype, shape: list[int], nbytes: int) -> None:
    """Writes the header of a one-tensor (``BANK_KEY``) safetensors file whose ``nbytes`` of rows follow.

    Example:
        >>> import io
        >>> buffer = io.BytesIO()
        >>> write_safetensors_header(buffer, torch.float32, [2, 4], 32)
        >>> len(buffer.getvalue()) % 8
        0
    """
    header = {BANK_KEY: {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": shape, "data_offsets": [0, nbytes]}}
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    handle.write(len(encoded).to_bytes(8, "little"))
    handle.write(encoded)


def write_safetensors_streamed(weight: torch.Tensor, path: Path) -> None:
    """Writes ``weight`` as a safetensors file (key ``embeddings``) chunk by chunk, to a temp name then renamed.

    Example:
        >>> write_safetensors_streamed(bank.weight, Path("bank.safetensors"))  # doctest: +SKIP
    """
    weight = weight.detach()
    tmp = path.with_name(path.name + ".tmp")
    nbytes = weight.numel() * weight.element_size()
    with open(tmp, "wb") as handle:
        write_safetensors_header(handle, weight.dtype, list(weight.shape), nbytes)
        for start in range(0, weight.shape[0], CHUNK_ROWS):
            handle.write(memoryview(to_storage_array(weight[start : start + CHUNK_ROWS], weight.dtype)).cast("B"))
    os.replace(tmp, path)


def copy_file_atomic(source: Path, target: Path) -> None:
    """Copies ``source`` to ``target`` through a temporary name (one per process: processes copying the same file
    at once never write into each other's copy).

    Example:
        >>> copy_file_atomic(Path("bank.npy"), Path("out/bank_mmap.npy"))  # doctest: +SKIP
    """
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


# ---------------------------------------------------------------------------------------------------- memory maps
def create_npy_memmap(path: Path, shape: tuple[int, int], dtype: torch.dtype) -> None:
    """Creates a zero-filled ``.npy`` file of ``shape`` (a sparse file: no RAM, little disk), atomically.

    Example:
        >>> create_npy_memmap(Path("out/bank_mmap.npy"), (1000, 384), torch.float16)  # doctest: +SKIP
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=NUMPY_STORAGE[dtype], shape=shape)
    del array
    os.replace(tmp, path)


def open_npy_memmap(path: Path, dtype: torch.dtype | None = None, mode: str = "r+") -> tuple[torch.Tensor, np.memmap]:
    """Maps a bank ``.npy`` file: ``(tensor backed by the map, the map)``.

    ``mode="r+"`` writes updates to the file; ``"c"`` maps it copy-on-write (updates stay in this process).

    Raises:
        ArtifactError: The file is missing, not a C-ordered float32/float16 (or bf16 bits) matrix, or not ``dtype``.

    Example:
        >>> weight, mapped = open_npy_memmap(Path("out/bank_mmap.npy"), torch.float16)  # doctest: +SKIP
    """
    if not path.is_file():
        raise ArtifactError(f"{path}: no such bank file; create it with TargetBank.create_mmap or from_file.")
    try:
        array = np.load(path, mmap_mode=mode, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001
        raise ArtifactError(f"{path}: cannot be memory-mapped as a bank ({exc}); re-create it.") from None
    found = {np.dtype("<f4"): torch.float32, np.dtype("<f2"): torch.float16}.get(array.dtype)
    if array.dtype == np.dtype("<u2") and dtype == torch.bfloat16:
        found = torch.bfloat16
    if found is None or (dtype is not None and dtype != found) or not array.flags["C_CONTIGUOUS"]:
        raise ArtifactError(
            f"{path}: a memory-mapped bank must be a C-ordered float32, float16 (or uint16 bf16 bits) .npy, "
            f"found {array.dtype}{'' if dtype is None else f' for bank_dtype {dtype_name(dtype)}'}; convert it "
            "with TargetBank.from_file(..., mmap_path=...)."
        )
    tensor = torch.from_numpy(array)
    if found == torch.bfloat16:
        tensor = tensor.view(torch.bfloat16)
    return tensor, array
