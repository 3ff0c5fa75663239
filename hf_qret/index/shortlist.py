"""A mining shortlist: an inverted file over the served index's own PQ codes.

A flat product-quantized index (``PQ16``, ``OPQ16,PQ16``) scores every query against every code: on a 2-core CPU
that is ~130 queries/s at one million rows, too slow to mine negatives for every training query. The
:class:`MiningShortlist` stores the *same* codes (same rotation, same PQ centroids, no residual encoding) in
``nlist`` inverted lists and scans only the ``nprobe`` lists nearest to a query. Every row it returns carries
exactly the score the served index gives it; it can only miss rows that sit in unprobed lists. The served index is
unchanged and stays the artifact; the shortlist exists only while training.

Example:
    >>> import numpy as np
    >>> from hf_qret.index.core import QuantizedIndex
    >>> vectors = np.random.default_rng(0).standard_normal((4000, 32)).astype("float32")
    >>> index = QuantizedIndex(32, "PQ8", mining_nlist=16, mining_nprobe=16)
    >>> index.build(vectors)
    >>> np.array_equal(index.mine(vectors[:4], 10)[1], index.search(vectors[:4], 10)[1])  # all lists probed
    True
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..errors import ConfigError
from .faiss_ops import apply_transforms, import_faiss, split_pretransform

__all__ = ["MiningShortlist"]

logger = logging.getLogger(__name__)

#: Coarse k-means: iterations and the training points kept per list.
COARSE_NITER = 10
COARSE_POINTS_PER_LIST = 256


def served_parts(faiss: Any, index: Any) -> tuple[list[Any], Any]:
    """The vector transforms (e.g. OPQ) and the flat ``IndexPQ`` of a served index, or ConfigError.

    Example:
        >>> from hf_qret.index.faiss_ops import import_faiss
        >>> faiss = import_faiss()
        >>> transforms, pq = served_parts(faiss, faiss.index_factory(32, "OPQ8,PQ8", faiss.METRIC_INNER_PRODUCT))
        >>> len(transforms), type(pq).__name__
        (1, 'IndexPQ')
        >>> served_parts(faiss, faiss.index_factory(32, "SQ8", faiss.METRIC_INNER_PRODUCT))
        Traceback (most recent call last):
        ...
        hf_qret.errors.ConfigError: a mining shortlist (--mining_nlist) goes over a flat PQ index such as 'PQ16' or 'OPQ16,PQ16', not a IndexScalarQuantizer; an IVF index already has one: set its nprobe with --index_search_params.
    """
    transforms, inner = split_pretransform(faiss, index)
    if not isinstance(inner, faiss.IndexPQ):
        raise ConfigError(
            f"a mining shortlist (--mining_nlist) goes over a flat PQ index such as 'PQ16' or 'OPQ16,PQ16', not a "
            f"{type(inner).__name__}; an IVF index already has one: set its nprobe with --index_search_params."
        )
    return transforms, inner


class MiningShortlist:
    """Inverted lists over the codes of a flat (O)PQ index, searched with ``nprobe`` lists per query.

    Args:
        served: The trained FAISS index that is served (``IndexPQ``, or ``IndexPreTransform`` of OPQ then PQ).
        sample: Float32 training rows (original space) for the coarse quantizer.
        nlist: Number of inverted lists.
        nprobe: Lists scanned per query.

    Example:
        >>> import numpy as np
        >>> from hf_qret.index.faiss_ops import import_faiss
        >>> faiss = import_faiss()
        >>> vectors = np.random.default_rng(0).standard_normal((2000, 32)).astype("float32")
        >>> served = faiss.index_factory(32, "PQ8", faiss.METRIC_INNER_PRODUCT)
        >>> served.train(vectors)
        >>> served.add(vectors)
        >>> shortlist = MiningShortlist(served, vectors, nlist=8, nprobe=8)
        >>> shortlist.add(vectors)
        >>> shortlist.nlist, shortlist.ntotal
        (8, 2000)
        >>> np.array_equal(shortlist.search(vectors[:2], 5)[1], served.search(vectors[:2], 5)[1])  # all lists probed
        True
    """

    def __init__(self, served: Any, sample: np.ndarray, nlist: int, nprobe: int) -> None:
        faiss = self.faiss = import_faiss()
        self.transforms, served_pq = served_parts(faiss, served)
        if len(sample) < nlist:
            raise ConfigError(
                f"--mining_nlist {nlist} needs at least as many training rows as lists (got {len(sample)}); "
                "use fewer lists (about 4 * sqrt(rows) is usual)."
            )
        dim = int(served_pq.d)
        points = self._transform(sample)
        if len(points) > nlist * COARSE_POINTS_PER_LIST:
            keep = np.random.default_rng(1234).choice(len(points), nlist * COARSE_POINTS_PER_LIST, replace=False)
            points = points[np.sort(keep)]
        kmeans = faiss.Kmeans(dim, int(nlist), niter=COARSE_NITER, seed=1234, max_points_per_centroid=1 << 30)
        kmeans.train(points)
        self.quantizer = faiss.IndexFlatIP(dim)
        self.quantizer.add(kmeans.centroids)
        pq = served_pq.pq
        self.ivf = faiss.IndexIVFPQ(
            self.quantizer, dim, int(nlist), int(pq.M), int(pq.nbits), faiss.METRIC_INNER_PRODUCT
        )
        self.ivf.by_residual = False  # the codes of the served index, not residuals: identical scores
        self.sync_codebooks(served)
        self.ivf.is_trained = True
        self.ivf.make_direct_map(True)  # rows can be moved between lists in place (8 bytes per row)
        self.ivf.nprobe = int(nprobe)

    @classmethod
    def from_ivf(cls, served: Any, ivf: Any) -> MiningShortlist:
        """Wraps saved inverted lists (an ``IndexIVFPQ`` written by ``faiss.write_index``) for ``served``."""
        self = cls.__new__(cls)
        faiss = self.faiss = import_faiss()
        self.transforms, _ = served_parts(faiss, served)
        self._owner = ivf  # the object read from disk owns the C++ index: keep it alive
        self.ivf = faiss.downcast_index(ivf)
        self.quantizer = self.ivf.quantizer
        if self.ivf.direct_map.type == faiss.DirectMap.NoMap:
            self.ivf.make_direct_map(True)
        return self

    @property
    def nlist(self) -> int:
        """Number of inverted lists."""
        return int(self.ivf.nlist)

    @property
    def nprobe(self) -> int:
        """Lists scanned per query."""
        return int(self.ivf.nprobe)

    @property
    def ntotal(self) -> int:
        """Number of rows in the lists (the served index's rows once they are added)."""
        return int(self.ivf.ntotal)

    @property
    def nbytes(self) -> int:
        """Bytes of the second copy of the codes: each row's code, its 8-byte id and its 8-byte direct-map entry."""
        return self.ntotal * (int(self.ivf.code_size) + 16)

    def _transform(self, vectors: np.ndarray) -> np.ndarray:
        return apply_transforms(self.transforms, vectors)

    def sync_codebooks(self, served: Any) -> None:
        """Copies the served index's PQ centroids (after they were retrained or learned)."""
        _, served_pq = served_parts(self.faiss, served)
        self.ivf.pq = served_pq.pq  # a copy (SWIG value member)

    def add(self, vectors: np.ndarray) -> None:
        """Appends rows (original space); their ids continue the row numbering, as in the served index."""
        self.ivf.add(self._transform(vectors))

    def update(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Re-encodes ``rows`` and moves each to the list of its new vector."""
        self.ivf.update_vectors(np.ascontiguousarray(rows, dtype=np.int64), self._transform(vectors))

    def reset(self) -> None:
        """Empties the lists (the coarse quantizer and codebooks stay), before the rows are added anew."""
        self.ivf.reset()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows among the ``nprobe`` nearest lists, with the served index's scores."""
        return self.ivf.search(self._transform(queries), int(k))
