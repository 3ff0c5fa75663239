"""The quantized index split across processes by rows (``bank_sharding='rows'``): :class:`ShardedIndex`.

Each process indexes its own slice of the bank rows (:class:`~hf_qret.bank.collectives.ShardLayout`) with the same
codebooks: they are trained once, on process 0, on the very sample the replicated index trains on (gathered from
the shards), and broadcast. A search asks every shard for its top-k of every process's queries and merges them
(:func:`merge_topk`: by score, ties to the lower row), which is the whole index's top-k. For the served artifact
:meth:`ShardedIndex.assemble` merges the shards into one FAISS index on process 0.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from ..bank.collectives import LocalOnly, ShardLayout, all_gather_uneven, broadcast_bytes, gather_bytes, gather_rows
from ..errors import ArtifactError
from .core import QuantizedIndex
from .faiss_ops import CHUNK_ROWS, MAX_TRAIN_ROWS, as_float32, import_faiss
from .searching import RENORM_DEPTH, cosine_top

__all__ = ["ShardedIndex", "merge_shard_indexes", "merge_topk", "sample_rows"]

logger = logging.getLogger(__name__)


def sample_rows(count: int, max_rows: int | None, seed: int = 1234) -> np.ndarray:
    """The sorted rows :func:`hf_qret.index.faiss_ops.train_sample` trains on for a ``count``-row bank.

    Example:
        >>> sample_rows(5, None).tolist(), len(sample_rows(100, 10))
        ([0, 1, 2, 3, 4], 10)
    """
    if max_rows is None or count <= max_rows:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=int(max_rows), replace=False))


def merge_topk(scores: np.ndarray, rows: np.ndarray, k: int, *aligned: np.ndarray) -> tuple[np.ndarray, ...]:
    """The top ``k`` of several shards' results: ``(B, n)`` scores and global rows (``-1``: none) side by side,
    ordered by score (highest first), ties to the lower row, missing results last. Arrays in ``aligned`` (e.g. the
    candidates' decoded norms) are reordered with them and returned after them.

    Example:
        >>> scores = np.array([[0.9, 0.5, 0.7, 0.9]], dtype="float32")
        >>> rows = np.array([[8, 2, 5, 3]])
        >>> merge_topk(scores, rows, 3)[1].tolist()
        [[3, 8, 5]]
    """
    missing = rows < 0
    key = np.where(missing, np.inf, -scores.astype(np.float64))
    tie = np.where(missing, np.iinfo(np.int64).max, rows)
    order = np.lexsort((tie, key), axis=1)[:, :k]
    return tuple(np.take_along_axis(array, order, axis=1) for array in (scores, rows, *aligned))


def merge_shard_indexes(parts: Iterable[Any], starts: Sequence[int], factory: str) -> Any:
    """One FAISS index over the shards' rows, in row order: ``parts[1:]``'s codes merged into ``parts[0]``
    (``merge_from``, one part at a time: ``parts`` may be a generator; an IVF's ids offset to each shard's first
    global row, ``starts``).

    An IVF shard whose rows were re-encoded in place (``update_vectors``: an incremental refresh, or a checkpoint's
    served copy) carries a direct map, which FAISS refuses to merge; the maps are dropped before merging and the
    merged index gets back the first shard's map type, rebuilt over every row.

    Raises:
        ArtifactError: FAISS cannot merge this index type.

    Example:
        >>> merge_shard_indexes([shard0, shard1], [0, 150], "OPQ16,IVF1024,PQ16").ntotal  # doctest: +SKIP
        300
    """
    faiss = import_faiss()
    parts = iter(parts)
    full = next(parts)
    ivf = faiss.try_extract_index_ivf(full)
    map_type = ivf.direct_map.type if ivf is not None else None
    if ivf is not None:
        ivf.set_direct_map_type(faiss.DirectMap.NoMap)
    for part, start in zip(parts, starts[1:]):
        if ivf is not None:
            faiss.extract_index_ivf(part).set_direct_map_type(faiss.DirectMap.NoMap)
        try:
            full.merge_from(part, start if ivf is not None else 0)
        except RuntimeError:
            if faiss.downcast_index(full).__class__.__name__.startswith("IndexFlat"):
                full.add(part.reconstruct_n(0, part.ntotal))  # exact vectors: the same index
                continue
            raise ArtifactError(
                f"FAISS cannot merge the shards of a {factory!r} index into one; train it with "
                "bank_sharding='none' or a flat-code (RQ, PQ, SQ) or IVF factory."
            ) from None
    if ivf is not None and map_type != faiss.DirectMap.NoMap:
        ivf.set_direct_map_type(map_type)  # rebuilt from the merged lists
    return full


class ShardedIndex(QuantizedIndex):
    """A :class:`~hf_qret.index.core.QuantizedIndex` over this process's rows, searched as one index over all of
    them.

    :attr:`local_ntotal` and everything that builds or refreshes the index (:meth:`add`, :meth:`refresh`,
    :meth:`update`) are this shard's; :attr:`global_ntotal`, :meth:`search` and :meth:`mine` are the whole index's
    (row numbers global). ``ntotal`` raises an ``AttributeError`` that names both. :meth:`train`, :meth:`search`, :meth:`mine` and :meth:`assemble` are collectives: every
    process calls them at the same point.

    Args:
        dim: Embedding dimension.
        factory: A ``faiss.index_factory`` string whose parts FAISS can merge (not HNSW).
        layout: Which rows this process indexes.
        **kwargs: What :class:`~hf_qret.index.core.QuantizedIndex` takes besides (``search_params``, ``opq_niter``).

    Example:
        >>> import numpy as np
        >>> from hf_qret.bank.collectives import ShardLayout
        >>> index = ShardedIndex(8, "Flat", ShardLayout(count=8, world=1, rank=0))
        >>> index.build(np.eye(8, dtype="float32"))
        >>> index.search(np.eye(8, dtype="float32")[:1], k=2)[1].tolist()
        [[0, 1]]
    """

    #: this shard's row count under the whole index's name: refused, naming local_ntotal and global_ntotal
    ntotal = LocalOnly("local_ntotal", "global_ntotal")

    def __init__(self, dim: int, factory: str, layout: ShardLayout, **kwargs: Any) -> None:
        super().__init__(dim, factory, **kwargs)
        self.shard = layout

    @classmethod
    def from_args(cls, dim: int, args: Any, layout: ShardLayout | None = None) -> ShardedIndex:  # type: ignore[override]
        """An empty sharded index as :class:`~hf_qret.config.QRetTrainingArguments` describe it."""
        return cls(
            dim,
            args.index_factory,
            layout,
            search_params=args.index_search_params,
            opq_niter=args.opq_niter,
            rq_beam_size=args.rq_beam_size,
        )

    @classmethod
    def wrap(cls, index: QuantizedIndex, layout: ShardLayout) -> ShardedIndex:
        """``index`` (over this process's rows) as a sharded index of ``layout``, sharing its FAISS index."""
        self = cls.__new__(cls)
        self.__dict__.update(index.__dict__)
        self.shard = layout
        return self

    @property
    def global_ntotal(self) -> int:
        """Rows indexed by all the shards together (the whole bank, once built)."""
        return self.shard.count if self.local_ntotal else 0

    # ------------------------------------------------------------------ training
    def train(self, vectors: Any, max_train_rows: int | None = MAX_TRAIN_ROWS) -> None:
        """Trains the codebooks once, on process 0, on the sample the replicated index would train on (this
        process's ``vectors`` are its share of it), and gives every process the same trained, empty index."""
        layout = self.shard
        if self.mining_nlist:
            raise ArtifactError("a sharded index has no mining shortlist; set mining_nlist 0.")
        rows = sample_rows(layout.count, max_train_rows)
        sizes = [int(((rows >= lo) & (rows < hi)).sum()) for lo, hi in map(layout.bounds, range(layout.world))]
        mine = rows[(rows >= layout.start) & (rows < layout.end)] - layout.start
        chunks = (as_float32(vectors[mine[i : i + CHUNK_ROWS]]) for i in range(0, len(mine), CHUNK_ROWS))
        sample = gather_rows(layout, chunks, sizes, self.dim)
        if layout.rank == 0:
            if len(rows) < layout.count:
                logger.info("training the index on a random sample of %d of %d rows", len(rows), layout.count)
            trained = self._trained_empty(sample)
            del sample
            blob = self.faiss.serialize_index(trained).tobytes()
        else:
            self._fit_factory(len(rows))  # the same factory process 0 trains
            blob = None
        blob = broadcast_bytes(layout, blob, src=0)
        if layout.rank != 0:
            trained = self.faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
        self._install(trained)

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` global rows of every shard for this process's ``queries``: every process's queries are searched
        in every shard and the results merged (:func:`merge_topk`)."""
        layout = self.shard
        queries = as_float32(queries)
        k = min(int(k), layout.count)
        (everyone,), counts = all_gather_uneven(layout, torch.from_numpy(np.ascontiguousarray(queries)))
        everyone = everyone.cpu().numpy()
        # normalize_decoded: every shard's raw top `depth` with their decoded norms; the merged raw top `depth` is
        # then re-scored by cosine, as one index over all the rows would (QuantizedIndex.local_search)
        depth = min(max(k, RENORM_DEPTH), layout.count) if self.normalize_decoded else k
        local_k = min(k, self.local_ntotal)
        scores = np.full((len(everyone), depth), -np.inf, dtype=np.float32)
        rows = np.full((len(everyone), depth), -1, dtype=np.int64)
        norms = np.ones((len(everyone), depth), dtype=np.float32)
        if len(everyone) and local_k:
            found_scores, found, found_norms = self.raw_candidates(everyone, local_k)
            width = found.shape[1]
            scores[:, :width] = found_scores
            rows[:, :width] = np.where(found >= 0, found + layout.start, -1)
            if found_norms is not None:
                norms[:, :width] = found_norms
        # every shard's results of every process's queries: (world * B, depth) -> (B, world * depth)
        parts = (scores, rows, norms)
        gathered, _ = all_gather_uneven(layout, *(torch.from_numpy(part) for part in parts))
        width = layout.world * depth
        gathered = [
            g.cpu().numpy().reshape(layout.world, -1, depth).transpose(1, 0, 2).reshape(-1, width) for g in gathered
        ]
        merged_scores, merged_rows, merged_norms = merge_topk(gathered[0], gathered[1], depth, gathered[2])
        merged_scores, merged_rows = cosine_top(
            merged_scores, merged_rows, merged_norms if self.normalize_decoded else None, k
        )
        first = sum(counts[: layout.rank])
        return merged_scores[first : first + len(queries)], merged_rows[first : first + len(queries)]

    def mine(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows for negative mining: :meth:`search` (a sharded index has no mining shortlist)."""
        return self.search(queries, k)

    # ------------------------------------------------------------------ copies
    def synced_copy(self, vectors: Any, rows: np.ndarray) -> ShardedIndex:
        """This shard's index with ``rows`` (of this shard) re-encoded from ``vectors``, still sharded."""
        return ShardedIndex.wrap(super().synced_copy(vectors, rows), self.shard)

    def flat_index(self, vectors: Any) -> ShardedIndex:
        """An exact (``Flat``) sharded index over this shard's ``vectors``: the evaluator's flat baseline."""
        flat = ShardedIndex(self.dim, "Flat", self.shard, use_gpu=self.use_gpu)
        flat.add(vectors)
        return flat

    def rebuild_from(self, index: Any, vectors: Any) -> None:
        """Serves ``index``'s codebooks (a whole saved index, e.g. an artifact's) with this shard's ``vectors``
        encoded by them: the shard of that index when it indexes the same rows."""
        local = self.faiss.clone_index(index)
        local.reset()
        self.replace(local)
        self.add(vectors)

    def assemble(self, dst: int = 0) -> QuantizedIndex | None:
        """One FAISS index over every shard's rows, in row order, on process ``dst`` (``None`` on the others):
        every shard's codes merged into process ``dst``'s copy (``merge_from``). A collective.

        Raises:
            ArtifactError: FAISS cannot merge this index type.
        """
        layout = self.shard
        parts = gather_bytes(layout, self.faiss.serialize_index(self.index).tobytes(), dst)
        if parts is None:
            return None
        read = (self.faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8)) for blob in parts)
        full = merge_shard_indexes(read, [layout.bounds(rank)[0] for rank in range(len(parts))], self.factory)
        assembled = QuantizedIndex.from_index(full, self.factory, self.search_params)
        assembled.opq_niter, assembled.rq_beam_size = self.opq_niter, self.rq_beam_size
        assembled._apply_search_params(assembled.index)
        return assembled
