"""FAISS plumbing shared by the index and the mining shortlist: the lazy import, the
vector transforms of an ``IndexPreTransform`` (OPQ), chunked float32 streaming of large banks and the training sample.

FAISS is imported only when one of these runs (``import_faiss``), so importing hf-qret never loads it.

Example:
    >>> import numpy as np
    >>> [chunk.shape for chunk in chunks(np.ones((5, 2), dtype=np.float16), chunk_rows=2)]
    [(2, 2), (2, 2), (1, 2)]
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

__all__ = [
    "CHUNK_ROWS",
    "MAX_TRAIN_ROWS",
    "import_faiss",
    "set_faiss_threads",
    "split_pretransform",
    "apply_transforms",
    "set_opq_iterations",
    "set_rq_beam_size",
    "nested_indexes",
    "disable_polysemous_training",
    "fit_training_to_sample",
    "encode_chunk_rows",
    "pq_encode_block",
    "chunks",
    "train_sample",
    "as_float32",
]

logger = logging.getLogger("hf_qret.index.core")

#: Rows encoded (added, updated) per FAISS call when vectors are streamed.
CHUNK_ROWS = 65536
#: Training sample size cap: PQ/OPQ training uses at most 65,536 points per codebook and IVF 256 per list anyway.
MAX_TRAIN_ROWS = 262144


def import_faiss() -> Any:
    """Imports FAISS, with an install hint when it is missing.

    Example:
        >>> faiss = import_faiss()
        >>> faiss.METRIC_INNER_PRODUCT
        0
    """
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "hf-qret needs FAISS: `pip install 'hf-qret[cpu]'` (faiss-cpu) or `pip install 'hf-qret[gpu]'`."
        ) from None
    return faiss


def nested_indexes(faiss: Any, index: Any, depth: int = 4) -> Iterator[Any]:
    """``index`` and the indexes it wraps (``.index`` of a pre-transform / IVF refine, ``.storage`` of HNSW), each
    downcast, outermost first, at most ``depth`` levels.

    Example:
        >>> faiss = import_faiss()
        >>> index = faiss.index_factory(32, "HNSW32,SQ8", faiss.METRIC_INNER_PRODUCT)
        >>> [type(node).__name__ for node in nested_indexes(faiss, index)]
        ['IndexHNSWSQ', 'IndexScalarQuantizer']
    """
    for _ in range(depth):
        if index is None:
            return
        index = faiss.downcast_index(index)
        yield index
        index = getattr(index, "index", None) or getattr(index, "storage", None)


def disable_polysemous_training(faiss: Any, index: Any) -> None:
    """Turns off polysemous training on every PQ stage of a fresh index.

    ``index_factory`` turns on polysemous training for PQ codes: an expensive extra optimisation of the code
    assignment that only Hamming-filtered search uses, which hf-qret never does.

    Example:
        >>> faiss = import_faiss()
        >>> index = faiss.index_factory(32, "PQ8", faiss.METRIC_INNER_PRODUCT)
        >>> disable_polysemous_training(faiss, index)
        >>> faiss.downcast_index(index).do_polysemous_training
        False
    """
    for node in nested_indexes(faiss, index):
        if hasattr(node, "do_polysemous_training"):
            node.do_polysemous_training = False


def split_pretransform(faiss: Any, index: Any) -> tuple[list[Any], Any]:
    """The vector transforms of an ``IndexPreTransform`` (e.g. OPQ; ``[]`` for any other index) and the index that
    holds the codes, both downcast.

    Example:
        >>> faiss = import_faiss()
        >>> transforms, inner = split_pretransform(faiss, faiss.index_factory(32, "OPQ8,PQ8", faiss.METRIC_INNER_PRODUCT))
        >>> [type(t).__name__ for t in transforms], type(inner).__name__
        (['OPQMatrix'], 'IndexPQ')
    """
    top = faiss.downcast_index(index)
    if not isinstance(top, faiss.IndexPreTransform):
        return [], top
    transforms = [faiss.downcast_VectorTransform(top.chain.at(i)) for i in range(top.chain.size())]
    return transforms, faiss.downcast_index(top.index)


def apply_transforms(transforms: list[Any], vectors: np.ndarray) -> np.ndarray:
    """``vectors`` (float32) through every transform of :func:`split_pretransform`, in order.

    Example:
        >>> import numpy as np
        >>> apply_transforms([], np.ones((2, 4), dtype=np.float64)).dtype  # no transform: float32, unchanged
        dtype('float32')
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    for transform in transforms:
        vectors = np.ascontiguousarray(transform.apply(vectors), dtype=np.float32)
    return vectors


def set_opq_iterations(faiss: Any, index: Any, niter: int) -> None:
    """Sets ``niter`` on every OPQ rotation of a fresh index.

    Example:
        >>> faiss = import_faiss()
        >>> index = faiss.index_factory(32, "OPQ8,PQ8", faiss.METRIC_INNER_PRODUCT)
        >>> set_opq_iterations(faiss, index, 5)
        >>> split_pretransform(faiss, index)[0][0].niter
        5
    """
    for transform in split_pretransform(faiss, index)[0]:
        if isinstance(transform, faiss.OPQMatrix):
            transform.niter = int(niter)


def set_rq_beam_size(faiss: Any, index: Any, beam_size: int) -> None:
    """Sets the beam of every residual quantizer of a fresh index (``ResidualQuantizer.max_beam_size``, FAISS's
    default 5): the candidates kept per stage when training the codebooks and when encoding a vector.

    Training and encoding cost grow with it; on SciFact 1 gave the same nDCG@10 as 5 at a sixth of the training time
    (``benchmarks/results/end_to_end.md``). Indexes without a residual quantizer are left alone.

    Example:
        >>> faiss = import_faiss()
        >>> index = faiss.index_factory(64, "RQ4x8", faiss.METRIC_INNER_PRODUCT)
        >>> set_rq_beam_size(faiss, index, 1)
        >>> faiss.downcast_index(index).rq.max_beam_size
        1
    """
    for node in nested_indexes(faiss, index):
        rq = getattr(node, "rq", None)
        if rq is not None and hasattr(rq, "max_beam_size"):
            rq.max_beam_size = int(beam_size)


def as_float32(vectors: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 array of ``vectors`` (no copy when it already is one).

    Example:
        >>> import numpy as np
        >>> as_float32(np.ones((3, 2), dtype=np.float16)[::2]).dtype, as_float32([[1, 2]]).flags["C_CONTIGUOUS"]
        (dtype('float32'), True)
    """
    return np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))


def encode_chunk_rows(faiss: Any, index: Any, budget: int = 1 << 27) -> int:
    """Rows per encoding call that keep FAISS's temporary tables near ``budget`` bytes.

    Product quantizers encode a batch through a ``(rows, M, ksub)`` float32 distance table (1 GB for 65,536 rows of
    ``PQ16``), so PQ-based indexes are fed smaller chunks.

    Example:
        >>> faiss = import_faiss()
        >>> encode_chunk_rows(faiss, faiss.index_factory(384, "PQ16", faiss.METRIC_INNER_PRODUCT))
        7489
        >>> encode_chunk_rows(faiss, faiss.index_factory(384, "SQ8", faiss.METRIC_INNER_PRODUCT)) == CHUNK_ROWS
        True
    """
    for node in nested_indexes(faiss, index):
        pq = getattr(node, "pq", None)
        if pq is not None:
            per_row = int(pq.M) * int(pq.ksub) * 4 + 4 * int(node.d)
            return int(min(CHUNK_ROWS, max(1024, budget // per_row)))
    return CHUNK_ROWS


@contextmanager
def pq_encode_block(faiss: Any, index: Any, budget: int = 1 << 27) -> Iterator[int]:
    """Within the block, FAISS's product quantizers encode at most as many rows per batch as keep their
    ``(rows, M, ksub)`` float32 distance table near ``budget`` bytes; yields that row count.

    FAISS encodes PQ codes in batches of ``product_quantizer_compute_codes_bs`` rows (262,144), so training an OPQ
    rotation on its 65,536-row sample allocates a 1 GB table at each of its iterations for ``OPQ16`` (and 4 GB for a
    full batch); :meth:`hf_qret.index.core.QuantizedIndex.train` runs inside this block. Every row's code is
    computed on its own, so the codes (and what is trained from them) are the same at any batch size. The previous
    batch size is restored on exit.

    Example:
        >>> faiss = import_faiss()
        >>> with pq_encode_block(faiss, faiss.index_factory(384, "OPQ16,PQ16", faiss.METRIC_INNER_PRODUCT)) as rows:
        ...     rows
        7489
    """
    rows = encode_chunk_rows(faiss, index, budget)
    for transform in split_pretransform(faiss, index)[0]:
        if isinstance(transform, faiss.OPQMatrix):  # its own PQ: M sub-quantizers of 256 centroids
            rows = min(rows, max(1024, budget // (int(transform.M) * 256 * 4 + 4 * int(transform.d_out))))
    settings = getattr(faiss, "cvar", None)
    previous = getattr(settings, "product_quantizer_compute_codes_bs", None)
    if previous is None:  # a FAISS without the setting: nothing to cap
        yield rows
        return
    settings.product_quantizer_compute_codes_bs = int(min(rows, previous))
    try:
        yield rows
    finally:
        settings.product_quantizer_compute_codes_bs = previous


def chunks(vectors: Any, chunk_rows: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
    """Float32 chunks of an array or array-like; a small ndarray is passed whole, as before.

    Example:
        >>> import numpy as np
        >>> [chunk.shape for chunk in chunks(np.ones((5, 2), dtype=np.float16), chunk_rows=2)]
        [(2, 2), (2, 2), (1, 2)]
    """
    count = len(vectors)
    if isinstance(vectors, np.ndarray) and count <= chunk_rows:
        yield as_float32(vectors)
        return
    for start in range(0, count, chunk_rows):
        yield as_float32(vectors[start : start + chunk_rows])


def train_sample(vectors: Any, max_rows: int | None, seed: int = 1234) -> np.ndarray:
    """All rows (as before) when there are at most ``max_rows``, else a fixed random sample of ``max_rows`` rows.

    Example:
        >>> import numpy as np
        >>> vectors = np.arange(20, dtype=np.float32).reshape(10, 2)
        >>> train_sample(vectors, max_rows=None).shape, train_sample(vectors, max_rows=4).shape
        ((10, 2), (4, 2))
    """
    count = len(vectors)
    if max_rows is None or count <= max_rows:
        return as_float32(vectors[:] if not isinstance(vectors, np.ndarray) else vectors)
    rows = np.sort(np.random.default_rng(seed).choice(count, size=int(max_rows), replace=False))
    logger.info("training the index on a random sample of %d of %d rows", max_rows, count)
    parts = [as_float32(vectors[rows[i : i + CHUNK_ROWS]]) for i in range(0, len(rows), CHUNK_ROWS)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def set_faiss_threads(threads: int) -> None:
    """Sets FAISS's OpenMP thread count (``0`` or less: leave FAISS's default).

    Example:
        >>> set_faiss_threads(2)  # doctest: +SKIP
    """
    if threads and threads > 0:
        import_faiss().omp_set_num_threads(int(threads))


def fit_training_to_sample(faiss: Any, index: Any, num_rows: int) -> None:
    """Adapts a fresh index's training to a sample of ``num_rows`` rows, where FAISS would fail on it.

    A residual quantizer (``RQ...``) trains progressively over PCA-rotated dimensions (FAISS's default), which needs
    at least as many rows as dimensions (``PCA matrix cannot output 384 dimensions``); on fewer rows it trains its
    codebooks over all dimensions at once (``Train_default``).

    Example:
        >>> faiss = import_faiss()
        >>> index = faiss.index_factory(64, "RQ4x8", faiss.METRIC_INNER_PRODUCT)
        >>> fit_training_to_sample(faiss, index, num_rows=32)  # fewer rows than dimensions
        >>> faiss.downcast_index(index).rq.train_type == faiss.ResidualQuantizer.Train_default
        True
    """
    for node in nested_indexes(faiss, index):
        rq = getattr(node, "rq", None)
        if rq is not None and num_rows < int(node.d) and hasattr(faiss, "ResidualQuantizer"):
            rq.train_type = faiss.ResidualQuantizer.Train_default
            logger.info(
                "residual quantizer on %d rows (< %d dimensions): codebooks trained without PCA", num_rows, node.d
            )
