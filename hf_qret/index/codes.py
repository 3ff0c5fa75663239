"""The stored codes of a trained FAISS index: rewriting rows in place, their size in bytes, reading them back decoded.

:class:`~hf_qret.index.core.QuantizedIndex` uses these for its incremental refresh (:meth:`~hf_qret.index.core.
QuantizedIndex.update`), :attr:`~hf_qret.index.core.QuantizedIndex.codes_nbytes` and for rebuilding a mining
shortlist over a replaced index's codes.

Example:
    >>> import numpy as np
    >>> from hf_qret.index.faiss_ops import import_faiss
    >>> faiss = import_faiss()
    >>> vectors = np.random.default_rng(0).standard_normal((300, 16)).astype("float32")
    >>> index = faiss.index_factory(16, "SQ8", faiss.METRIC_INNER_PRODUCT)
    >>> index.train(vectors)
    >>> index.add(vectors)
    >>> update, reason = in_place_updater(faiss, index)
    >>> update(np.array([0]), vectors[5:6])  # row 0 now stores row 5's code
    >>> np.array_equal(DecodedCodes(index)[0:1], DecodedCodes(index)[5:6])
    True
    >>> served_codes_nbytes(faiss, index, fallback_code_size=lambda: 16)  # 300 rows x 16 one-byte scalars
    4800
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .faiss_ops import apply_transforms, split_pretransform

__all__ = ["DecodedCodes", "RowUpdater", "in_place_updater", "served_codes_nbytes"]

#: Writes the codes of ``(rows, float32 vectors)`` into an index, in place.
RowUpdater = Callable[[np.ndarray, np.ndarray], None]


class DecodedCodes:
    """The decoded codes of a FAISS index as a chunk-sliceable array-like.

    What :func:`~hf_qret.index.faiss_ops.chunks` and :func:`~hf_qret.index.faiss_ops.train_sample` read: ``len()`` is
    the index's ``ntotal``, a slice decodes a row range (``reconstruct_n``), an integer array decodes those rows.

    Args:
        index: A FAISS index that can reconstruct its rows.

    Example:
        >>> import numpy as np
        >>> from hf_qret.index.faiss_ops import import_faiss
        >>> faiss = import_faiss()
        >>> flat = faiss.IndexFlatIP(4)
        >>> flat.add(np.eye(4, dtype="float32"))
        >>> decoded = DecodedCodes(flat)
        >>> len(decoded), decoded[1:3].tolist()
        (4, [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
        >>> decoded[np.array([3])].tolist()
        [[0.0, 0.0, 0.0, 1.0]]
    """

    def __init__(self, index: Any) -> None:
        self.index = index

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def __getitem__(self, rows: Any) -> np.ndarray:
        if isinstance(rows, slice):
            start, stop, _ = rows.indices(len(self))
            return self.index.reconstruct_n(start, stop - start)
        return self.index.reconstruct_batch(np.ascontiguousarray(rows, dtype=np.int64))


def in_place_updater(faiss: Any, index: Any, shortlist: Any = None) -> tuple[RowUpdater | None, str]:
    """A function writing new codes for (rows, float32 vectors) into ``index`` (and ``shortlist``), or ``None`` and why.

    The codes written are exactly those a full re-encode would store. Flat-code indexes (``PQ``, ``OPQ..,PQ``,
    ``SQ``, ``Flat``) get their codes overwritten at the rows' positions; IVF indexes move each row to its new list
    (``IndexIVF.update_vectors``; an array direct map is made on first use, 8 bytes per row).

    Args:
        faiss: The ``faiss`` module.
        index: The trained CPU FAISS index.
        shortlist: A :class:`~hf_qret.index.shortlist.MiningShortlist` over the same codes, updated along, or ``None``.

    Returns:
        ``(updater, "")``, or ``(None, reason)`` when the index type cannot be updated in place (e.g. HNSW).

    Example:
        >>> from hf_qret.index.faiss_ops import import_faiss
        >>> faiss = import_faiss()
        >>> in_place_updater(faiss, faiss.index_factory(16, "HNSW32,Flat", faiss.METRIC_INNER_PRODUCT))[1]
        'FAISS cannot update the codes of a IndexHNSWFlat in place'
    """
    updater, reason = _served_updater(faiss, index)
    if updater is None or shortlist is None:
        return updater, reason

    def update_both(rows: np.ndarray, vectors: np.ndarray) -> None:
        updater(rows, vectors)
        shortlist.update(rows, vectors)

    return update_both, ""


def _served_updater(faiss: Any, index: Any) -> tuple[RowUpdater | None, str]:
    top = faiss.downcast_index(index)
    transforms, inner = split_pretransform(faiss, top)
    if isinstance(inner, faiss.IndexIVF):
        ivf = inner
        if ivf.direct_map.type == faiss.DirectMap.NoMap:
            ivf.make_direct_map(True)  # array direct map (8 bytes per row), kept up to date by later adds

        def update_ivf(rows: np.ndarray, vectors: np.ndarray) -> None:
            ivf.update_vectors(rows, apply_transforms(transforms, vectors))

        return update_ivf, ""
    if isinstance(inner, faiss.IndexFlatCodes):
        if not inner.codes.is_owned:
            return None, "its codes are a read-only view (memory-mapped index file)"
        code_size = int(inner.code_size)
        if int(top.sa_code_size()) != code_size:
            return None, f"its standalone code ({top.sa_code_size()} bytes) is not its stored code ({code_size})"

        def update_codes(rows: np.ndarray, vectors: np.ndarray) -> None:
            # A zero-copy numpy view on the index's code array: write the new codes at the rows' positions.
            view = faiss.rev_swig_ptr(inner.codes.data(), int(inner.ntotal) * code_size)
            view.reshape(int(inner.ntotal), code_size)[rows] = top.sa_encode(vectors)

        return update_codes, ""
    return None, f"FAISS cannot update the codes of a {type(inner).__name__} in place"


def served_codes_nbytes(faiss: Any, index: Any, fallback_code_size: Callable[[], int]) -> int:
    """Approximate bytes of an index's stored codes: ``ntotal`` codes, plus 8-byte ids (and direct map) for IVF.

    Args:
        faiss: The ``faiss`` module.
        index: The FAISS index.
        fallback_code_size: Called for the bytes per row of an index without a ``code_size`` (e.g. HNSW), only then.

    Example:
        >>> from hf_qret.index.faiss_ops import import_faiss
        >>> faiss = import_faiss()
        >>> served_codes_nbytes(faiss, faiss.IndexFlatIP(8), fallback_code_size=lambda: 32)  # empty
        0
    """
    ntotal = int(index.ntotal)
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        direct = 8 * ntotal if ivf.direct_map.type != faiss.DirectMap.NoMap else 0
        return ntotal * (int(ivf.code_size) + 8) + direct
    inner = split_pretransform(faiss, index)[1]
    code_size = getattr(inner, "code_size", None)
    if code_size is None:
        code_size = fallback_code_size()
    return ntotal * int(code_size)
