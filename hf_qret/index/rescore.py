"""A second search stage beyond the 16-byte budget: rescore the quantized index's top candidates with a compact copy
of the bank kept on disk and memory-mapped.

The quantized index keeps its ``bytes_per_vector`` in RAM; the copy lives in a ``.npy`` file (int8 rows with one
float32 scale per row, or float16 rows) that the operating system pages in as candidates are read, the way
sentence-transformers rescores a binary index with int8 embeddings. Only the rows of each query's candidates are
read. What this buys is reported as its own figure, with its bytes on disk, never as the quantized index's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, ConfigError

__all__ = ["RESCORE_DTYPES", "RescoreRows", "rescore_file_name", "write_rescore_rows"]

#: The compact copies: int8 (1 byte per dimension + a 4-byte scale per row) or float16 (2 bytes per dimension).
RESCORE_DTYPES = ("int8", "float16")


def rescore_file_name(dtype: str) -> str:
    """The artifact file of the copy in ``dtype`` (``rescore_int8.npy``; the int8 scales in
    ``rescore_int8.scales.npy``).

    Example:
        >>> rescore_file_name("float16")
        'rescore_float16.npy'
    """
    if dtype not in RESCORE_DTYPES:
        raise ConfigError(f"rescoring rows are one of {', '.join(RESCORE_DTYPES)}, got {dtype!r}.")
    return f"rescore_{dtype}.npy"


def _scales_path(path: Path) -> Path:
    return path.with_name(path.name[: -len(".npy")] + ".scales.npy")


def write_rescore_rows(
    chunks: Iterable[np.ndarray], num_rows: int, dim: int, path: str | os.PathLike, dtype: str
) -> int:
    """Writes the compact copy of a bank, chunk by chunk (never the whole bank in RAM), atomically.

    Args:
        chunks: The bank's rows in order, as float arrays of any number of rows each.
        num_rows: The bank's number of rows (checked against what the chunks hold).
        dim: The rows' dimension.
        path: Where to write (``.npy``); int8 scales go next to it (``.scales.npy``).
        dtype: ``"int8"`` (symmetric per-row scale: ``row ≈ scale * int8``) or ``"float16"``.

    Returns:
        The bytes written.

    Example:
        >>> import numpy as np, tempfile, os
        >>> rows = np.random.default_rng(0).standard_normal((10, 4)).astype("float32")
        >>> path = os.path.join(tempfile.mkdtemp(), "rescore_int8.npy")
        >>> write_rescore_rows([rows[:6], rows[6:]], 10, 4, path, "int8")
        336
        >>> bool(np.abs(RescoreRows(path).rows(np.arange(10)) - rows).max() < 0.02)
        True
    """
    rescore_file_name(dtype)  # validates
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    out = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=np.int8 if dtype == "int8" else np.float16, shape=(num_rows, dim)
    )
    scales = np.empty(num_rows, dtype=np.float32) if dtype == "int8" else None
    start = 0
    for chunk in chunks:
        chunk = np.asarray(chunk, dtype=np.float32)
        end = start + len(chunk)
        if end > num_rows or chunk.shape[1:] != (dim,):
            raise ArtifactError(f"the rows to copy do not match a {num_rows} x {dim} bank; re-create the artifact.")
        if scales is None:
            out[start:end] = chunk.astype(np.float16)
        else:
            scale = np.abs(chunk).max(axis=1) / 127.0
            scale[scale == 0] = 1.0
            out[start:end] = np.clip(np.rint(chunk / scale[:, None]), -127, 127).astype(np.int8)
            scales[start:end] = scale
        start = end
    if start != num_rows:
        raise ArtifactError(f"the bank gave {start} rows, not {num_rows}; re-create the artifact.")
    out.flush()
    del out
    written = tmp.stat().st_size
    if scales is not None:
        scales_path = _scales_path(path)
        scales_tmp = scales_path.with_name(scales_path.name + ".tmp")
        with open(scales_tmp, "wb") as handle:
            np.save(handle, scales)
        written += scales_tmp.stat().st_size
        os.replace(scales_tmp, scales_path)
    os.replace(tmp, path)
    return int(written)


class RescoreRows:
    """The memory-mapped compact copy of a bank (see :func:`write_rescore_rows`), and the rescoring stage.

    Args:
        path: The ``rescore_int8.npy`` / ``rescore_float16.npy`` file.

    Example:
        >>> import numpy as np, tempfile, os
        >>> rows = np.eye(4, dtype="float32")
        >>> path = os.path.join(tempfile.mkdtemp(), "rescore_float16.npy")
        >>> _ = write_rescore_rows([rows], 4, 4, path, "float16")
        >>> scores, found = RescoreRows(path).rescore(rows[:1], np.array([[2, 0, 1]]), k=2)
        >>> found.tolist(), scores.tolist()
        ([[0, 2]], [[1.0, 0.0]])
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(
                f"{self.path}: no rescoring rows; write them with QuantizedRetriever.write_rescore_rows() first."
            )
        try:
            self.data = np.load(self.path, mmap_mode="r", allow_pickle=False)
            scales = _scales_path(self.path)
            self.scales = np.load(scales, allow_pickle=False) if self.data.dtype == np.int8 else None
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{self.path}: unreadable rescoring rows ({exc}); write them again.") from None
        if self.data.ndim != 2 or (self.scales is not None and len(self.scales) != len(self.data)):
            raise ArtifactError(f"{self.path}: malformed rescoring rows; write them again.")

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes on disk (rows plus int8 scales)."""
        return int(self.data.nbytes + (0 if self.scales is None else self.scales.nbytes))

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The float32 rows ``rows`` (``-1`` gives zeros), read from the file."""
        rows = np.asarray(rows, dtype=np.int64)
        safe = np.where(rows >= 0, rows, 0)
        out = np.asarray(self.data[safe.reshape(-1)], dtype=np.float32).reshape(*rows.shape, self.data.shape[1])
        if self.scales is not None:
            out *= self.scales[safe][..., None]
        out[rows < 0] = 0.0
        return out

    def rescore(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores each query against its candidate rows (``-1``: none) with the copy and keeps the top ``k``.

        Returns:
            ``(scores, rows)``, ``(num_queries, k)`` each, best first; ``-1`` rows (score ``-inf``) pad a query with
            fewer than ``k`` candidates.
        """
        candidates = np.asarray(candidates, dtype=np.int64)
        scores = np.einsum("qd,qkd->qk", np.asarray(queries, dtype=np.float32), self.rows(candidates))
        scores[candidates < 0] = -np.inf
        k = min(int(k), candidates.shape[1])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(candidates, order, axis=1)
