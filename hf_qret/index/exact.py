"""Exact (flat) inner-product search over rows read chunk by chunk: the flat baseline of an evaluation without a
second copy of the bank.

A FAISS ``IndexFlatIP`` holds its own float32 copy of every row (1.5 GB at 1M x 384), next to the bank it was
filled from. :class:`ExactSearch` searches the bank's own rows instead (for example
:meth:`hf_qret.bank.core.TargetBank.float32_rows`, which converts only the chunk asked for), with FAISS's brute-force
kernel (``faiss.knn``, the one ``IndexFlatIP.search`` runs) chunk by chunk, the chunks' top-``k`` merged in one heap.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .faiss_ops import CHUNK_ROWS, as_float32, import_faiss

__all__ = ["ExactSearch"]


class ExactSearch:
    """Top-``k`` rows by exact inner product, reading ``rows`` ``chunk_rows`` at a time (nothing is copied whole).

    Args:
        rows: ``(n, dim)`` rows: an array, or anything whose slices ``rows[a:b]`` are float32 arrays (a
            :class:`~hf_qret.bank.storage.Float32Rows`).
        chunk_rows: Rows searched per FAISS call (a multiple of FAISS's 1,024-row blocks keeps every score the
            same as a flat index's).

    Example:
        >>> import numpy as np
        >>> rows = np.eye(4, dtype=np.float32)
        >>> scores, found = ExactSearch(rows, chunk_rows=2).search(rows[2:3], k=1)
        >>> found.tolist(), scores.tolist()
        ([[2]], [[1.0]])
    """

    def __init__(self, rows: Any, chunk_rows: int = CHUNK_ROWS) -> None:
        self.faiss = import_faiss()
        self.rows = rows
        self.chunk_rows = int(chunk_rows)

    @property
    def ntotal(self) -> int:
        """The number of rows searched."""
        return len(self.rows)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)`` of each query's top ``k`` (at most :attr:`ntotal`), best first, as
        ``IndexFlatIP.search`` returns them."""
        faiss = self.faiss
        queries = as_float32(queries)
        k = min(int(k), self.ntotal)
        heap = faiss.ResultHeap(len(queries), k, keep_max=True)
        for start in range(0, self.ntotal, self.chunk_rows):
            block = as_float32(self.rows[start : start + self.chunk_rows])
            scores, found = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(scores, np.where(found >= 0, found + start, -1))
        heap.finalize()
        return heap.D, heap.I
