"""Searching a :class:`~hf_qret.index.core.QuantizedIndex`: :class:`SearchMixin`, the part of the index that serves
queries (runtime search parameters, the GPU copy, top-``k`` search, negative mining through the shortlist, decoded
vectors) and :func:`cosine_top`, the re-ranking by the cosine of each candidate's decoded vector
(``normalize_decoded``). :class:`~hf_qret.index.sharding.ShardedIndex` overrides :meth:`SearchMixin.search` and
:meth:`SearchMixin.mine` to search every shard as one index.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..errors import ArtifactError, ConfigError
from .faiss_ops import as_float32

__all__ = ["SearchMixin", "cosine_top", "RENORM_DEPTH"]

# the index's one logger (hf_qret.index.faiss_ops logs under it too)
logger = logging.getLogger("hf_qret.index.core")

#: With ``normalize_decoded``, how many of the index's top rows per query are re-scored by their decoded cosine (at
#: least ``k``): on InsuranceQA and SciFact dev, 50 or more gave the nDCG@10 of the cosine over every row.
RENORM_DEPTH = 100


def cosine_top(scores: np.ndarray, rows: np.ndarray, norms: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` of candidates ordered by score (``norms`` ``None``), or by ``score / norm``: the cosine of each
    candidate's decoded vector (ties to the earlier candidate; ``-1`` rows and zero norms last, as ``-1`` / ``-inf``).

    Example:
        >>> import numpy as np
        >>> top = cosine_top(np.array([[0.9, 0.8]]), np.array([[4, 7]]), np.array([[1.0, 0.8]]), k=1)
        >>> top[1].tolist(), top[0].tolist()
        ([[7]], [[1.0]])
    """
    if norms is None:
        return scores[:, :k], rows[:, :k]
    valid = (rows >= 0) & (norms > 0)
    cosine = np.where(valid, scores / np.where(valid, norms, 1.0), -np.inf).astype(np.float32)
    order = np.argsort(-cosine, axis=1, kind="stable")[:, :k]
    top_scores = np.take_along_axis(cosine, order, axis=1)
    return top_scores, np.where(np.isfinite(top_scores), np.take_along_axis(rows, order, axis=1), -1)


class SearchMixin:
    """Searches the index's codes and decodes them (mixed into :class:`~hf_qret.index.core.QuantizedIndex`, which
    provides ``faiss``, ``index``, ``factory``, ``search_params``, ``use_gpu``, ``shortlist``, ``normalize_decoded``,
    ``ntotal``, ``local_ntotal`` and ``_codec``).

    Example:
        >>> from hf_qret.index.core import QuantizedIndex
        >>> issubclass(QuantizedIndex, SearchMixin)
        True
    """

    # ------------------------------------------------------------------ search parameters and the GPU copy
    def _apply_search_params(self, index: Any, gpu: bool = False) -> None:
        if self.search_params:
            space = self.faiss.GpuParameterSpace() if gpu and hasattr(self.faiss, "GpuParameterSpace") else None
            try:
                (space or self.faiss.ParameterSpace()).set_index_parameters(index, self.search_params)
            except RuntimeError as exc:
                raise ConfigError(
                    f"search parameters {self.search_params!r} do not apply to {self.factory!r} ({exc}); "
                    "use e.g. 'nprobe=16' for IVF or 'efSearch=64' for HNSW."
                ) from None

    def set_search_params(self, params: str | None) -> None:
        """Sets runtime parameters such as ``"nprobe=16"`` or ``"efSearch=64"``."""
        self.search_params = params or None
        self._apply_search_params(self.index)
        self._drop_gpu()

    def _drop_gpu(self) -> None:
        self._gpu_index = None

    # ------------------------------------------------------------------ search
    def _searcher(self) -> Any:
        if self.use_gpu is False or self._gpu_failed or not hasattr(self.faiss, "get_num_gpus"):
            return self.index
        if self.faiss.get_num_gpus() <= 0:
            return self.index
        if self._gpu_index is None:
            try:
                resources = getattr(self, "_gpu_resources", None) or self.faiss.StandardGpuResources()
                self._gpu_resources = resources
                options = self.faiss.GpuClonerOptions()
                options.useFloat16LookupTables = True
                gpu_index = self.faiss.index_cpu_to_gpu(resources, 0, self.index, options)
                self._apply_search_params(gpu_index, gpu=True)  # e.g. nprobe, through GpuParameterSpace
                self._gpu_index = gpu_index
            except (RuntimeError, AttributeError, ConfigError) as exc:
                logger.info("FAISS index %r stays on the CPU (%s)", self.factory, exc)
                self._gpu_failed = True
                return self.index
        return self._gpu_index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows by (approximate) inner product; with :attr:`normalize_decoded`, by the cosine of each
        row's decoded vector (see :meth:`local_search`).

        Returns:
            ``(scores, rows)``, each ``(num_queries, k)``; ``rows`` is ``-1`` where fewer than ``k`` were found.
        """
        if self.ntotal == 0:
            raise ArtifactError("the index is empty; build it from the bank before searching.")
        return self.local_search(as_float32(queries), min(int(k), self.ntotal))

    def local_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The search of this index's own rows (``k`` at most :attr:`ntotal`): :meth:`raw_candidates`, then
        :func:`cosine_top`.

        With :attr:`normalize_decoded` (cosine models), each query's top ``max(k, RENORM_DEPTH)`` rows are scored
        ``q · x̂ / |x̂|``: the inner product with the row's decoded vector divided by that vector's norm, computed
        from the codes (no byte is stored for it), and the best ``k`` kept. A quantizer shrinks the reconstruction
        of a document it fits badly; the cosine serves every document at the unit norm the model gave it.
        """
        return cosine_top(*self.raw_candidates(queries, k), k)

    def raw_candidates(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The FAISS search's ``(scores, rows, norms)``: the top ``k`` by inner product and ``norms`` ``None``; with
        :attr:`normalize_decoded`, the top ``max(k, RENORM_DEPTH)`` and the norms of their decoded vectors. Rows are
        those this process holds (:attr:`local_ntotal`; a shard's numbered from 0)."""
        if not self.normalize_decoded:
            scores, rows = self._searcher().search(queries, k)
            return scores, rows, None
        depth = min(max(k, RENORM_DEPTH), self.local_ntotal)
        scores = np.empty((len(queries), depth), dtype=np.float32)
        rows = np.empty((len(queries), depth), dtype=np.int64)
        norms = np.empty((len(queries), depth), dtype=np.float32)
        for start in range(0, len(queries), 256):  # (256, depth, dim) decoded floats at a time
            part = slice(start, start + 256)
            scores[part], rows[part], decoded = self.index.search_and_reconstruct(queries[part], depth)
            norms[part] = np.linalg.norm(decoded, axis=2)
        return scores, rows, norms

    def mine(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows for negative mining: :meth:`search`, or the mining shortlist's ``mining_nprobe`` lists
        when there is one (the same scores as :meth:`search`; rows in unprobed lists are not seen)."""
        if self.shortlist is None:
            return self.search(queries, k)
        if self.ntotal == 0:
            raise ArtifactError("the index is empty; build it from the bank before searching.")
        k = min(int(k), self.ntotal)
        if not self.normalize_decoded:
            return self.shortlist.search(as_float32(queries), k)
        # the shortlist's top max(k, RENORM_DEPTH) re-scored by decoded cosine, as search() does over the whole index
        scores, rows = self.shortlist.search(as_float32(queries), min(max(k, RENORM_DEPTH), self.ntotal))
        decoded = self.index.reconstruct_batch(np.ascontiguousarray(np.where(rows >= 0, rows, 0).ravel()))
        norms = np.linalg.norm(decoded, axis=1).reshape(rows.shape).astype(np.float32)
        return cosine_top(scores, rows, norms, k)

    def quantize(self, vectors: np.ndarray) -> np.ndarray:
        """Encodes ``vectors`` with the current codebooks and decodes them: what the index would store."""
        codec = self._codec()
        return codec.sa_decode(codec.sa_encode(as_float32(vectors)))

    def reconstruct_all(self) -> np.ndarray:
        """The decoded (quantized) vector of every row this process holds, ``(local_ntotal, dim)``."""
        return self.index.reconstruct_n(0, self.local_ntotal)
