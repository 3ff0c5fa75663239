"""The quantized FAISS index built over the TargetBank.

Any ``faiss.index_factory`` string with the inner-product metric works (``PQ16``, ``OPQ16,PQ16``,
``IVF64,PQ16``, ``HNSW32,PQ16``, ``SQ8``, ``Flat``...). FAISS is imported lazily; when FAISS has GPUs and the index
type supports them, searches run on a GPU copy while the CPU index stays the one that is trained, saved and loaded.

Vectors may be given as a float32 array or as any array-like with ``len()`` and row slicing that returns float32-
convertible rows (for example :meth:`hf_qret.bank.core.TargetBank.float32_rows`): they are then read ``CHUNK_ROWS`` rows
at a time (:mod:`hf_qret.index.faiss_ops`), so a large float16 or memory-mapped bank is never copied to float32 as a
whole. Training uses at most ``max_train_rows`` rows (a fixed random sample).

This module builds, trains, refreshes and saves the index; searching it (:meth:`~QuantizedIndex.search`,
:meth:`~QuantizedIndex.mine`, the decoded-cosine re-ranking :func:`cosine_top`) is
:class:`hf_qret.index.searching.SearchMixin`'s.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactError, ConfigError
from ..options import REFRESH_MODES
from .codes import DecodedCodes, in_place_updater, served_codes_nbytes
from .factory import OPQ_MIN_ROWS, check_index_options, fit_factory
from .faiss_ops import (
    MAX_TRAIN_ROWS,
    as_float32,
    chunks,
    disable_polysemous_training,
    encode_chunk_rows,
    fit_training_to_sample,
    import_faiss,
    nested_indexes,
    pq_encode_block,
    set_faiss_threads,
    set_opq_iterations,
    set_rq_beam_size,
    train_sample,
)
from .searching import RENORM_DEPTH, SearchMixin, cosine_top
from .shortlist import MiningShortlist, served_parts

__all__ = [
    "QuantizedIndex",
    "import_faiss",
    "REFRESH_MODES",
    "set_faiss_threads",
    "check_index_options",
    "fit_factory",
    "OPQ_MIN_ROWS",
    "RENORM_DEPTH",
    "cosine_top",
]

logger = logging.getLogger(__name__)


class QuantizedIndex(SearchMixin):
    """A FAISS index (inner product) over the bank, rebuilt as the bank trains.

    Args:
        dim: Embedding dimension.
        factory: A ``faiss.index_factory`` string, for example ``"OPQ16,PQ16"``.
        search_params: FAISS runtime parameters, for example ``"nprobe=16"`` or ``"efSearch=64"``.
        use_gpu: ``None`` uses a GPU when FAISS sees one and the index type runs there; ``False`` never does.
        opq_niter: Alternating iterations of OPQ rotation training (``faiss.OPQMatrix.niter``; FAISS's default is
            50); ``None`` keeps FAISS's default. Ignored by indexes without an ``OPQ`` stage.
        mining_nlist: With a flat ``PQ``/``OPQ..,PQ`` index, keep a :class:`~hf_qret.index.shortlist.MiningShortlist` of
            this many inverted lists over the same codes, so :meth:`mine` scans only ``mining_nprobe`` lists per
            query (same scores, far fewer codes scanned); ``0`` (default): :meth:`mine` is :meth:`search`.
        mining_nprobe: Lists scanned per mining query.
        rq_beam_size: Beam of a residual quantizer's training and encoding (``ResidualQuantizer.max_beam_size``);
            ``None`` keeps FAISS's default (5). Ignored by indexes without a residual quantizer.
        normalize_decoded: Score each candidate by the cosine of its decoded vector, ``q · x̂ / |x̂|`` (for cosine
            models; see :meth:`local_search`); the stored codes and bytes per vector are unchanged.

    Example:
        >>> import numpy as np
        >>> vectors = np.random.default_rng(0).standard_normal((2000, 32)).astype("float32")
        >>> index = QuantizedIndex(32, "PQ8")
        >>> index.build(vectors)
        >>> index.bytes_per_vector, index.ntotal
        (8, 2000)
        >>> scores, rows = index.search(vectors[:3], k=5)
        >>> rows.shape
        (3, 5)
    """

    def __init__(
        self,
        dim: int,
        factory: str,
        search_params: str | None = None,
        use_gpu: bool | None = None,
        opq_niter: int | None = None,
        mining_nlist: int = 0,
        mining_nprobe: int = 16,
        rq_beam_size: int | None = None,
        normalize_decoded: bool = False,
    ) -> None:
        check_index_options(opq_niter, mining_nlist, mining_nprobe, rq_beam_size)
        self.faiss = import_faiss()
        self.dim = int(dim)
        #: The factory asked for; :attr:`factory` is the one built (see :func:`fit_factory`).
        self.requested_factory = factory
        self.factory = factory
        self.search_params = search_params or None
        self.use_gpu = use_gpu
        self.opq_niter = None if opq_niter is None else int(opq_niter)
        self.rq_beam_size = None if rq_beam_size is None else int(rq_beam_size)
        self.mining_nlist, self.mining_nprobe = int(mining_nlist), int(mining_nprobe)
        self.shortlist: MiningShortlist | None = None
        #: What ``factory="auto"`` resolved to when the index was first trained (:mod:`hf_qret.index.auto`).
        self.choice: Any = None
        # "auto": an empty flat placeholder until train() knows the number of rows
        self.index = self.faiss.IndexFlatIP(self.dim) if self._is_auto() else self._new_index()
        if self.mining_nlist:
            served_parts(self.faiss, self.index)  # a flat (O)PQ index, or a clear error now
        self._gpu_index = None
        self._gpu_failed = False
        self.version = 0
        #: Score candidates by their decoded vector's cosine (:meth:`local_search`): cosine models.
        self.normalize_decoded = bool(normalize_decoded)

    # ------------------------------------------------------------------ construction
    def _new_index(self) -> Any:
        try:
            index = self.faiss.index_factory(self.dim, self.factory, self.faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "rejected"
            raise ConfigError(
                f"invalid --index_factory {self.factory!r} for dimension {self.dim} ({reason}); use a "
                "faiss.index_factory string such as 'PQ16', 'OPQ16,PQ16', 'IVF64,PQ16' or 'HNSW32,PQ16' whose "
                "sub-quantizer count divides the dimension."
            ) from None
        if index.metric_type != self.faiss.METRIC_INNER_PRODUCT:
            raise ConfigError(
                f"--index_factory {self.factory!r} builds an L2 index in this FAISS version (inner product is not "
                "supported for it); use e.g. 'HNSW32,SQ8', 'PQ16', 'OPQ16,PQ16' or 'IVF64,PQ16'."
            )
        disable_polysemous_training(self.faiss, index)
        if self.opq_niter is not None:
            set_opq_iterations(self.faiss, index, self.opq_niter)
        if self.rq_beam_size is not None:
            set_rq_beam_size(self.faiss, index, self.rq_beam_size)
        return index

    @classmethod
    def validate_factory(cls, dim: int, factory: str, num_rows: int | None = None) -> None:
        """Raises :class:`ConfigError` when ``factory`` is not a valid index for ``dim`` (or cannot be trained on
        ``num_rows`` rows, see :func:`fit_factory`), before any heavy work."""
        cls(dim, factory)
        if num_rows is not None:
            fit_factory(factory, min(int(num_rows), MAX_TRAIN_ROWS))

    @classmethod
    def from_args(cls, dim: int, args: Any) -> QuantizedIndex:
        """An empty index as :class:`~hf_qret.config.QRetTrainingArguments` describe it (factory, search
        parameters, OPQ iterations, mining shortlist)."""
        return cls(
            dim,
            args.index_factory,
            args.index_search_params,
            opq_niter=args.opq_niter,
            mining_nlist=args.mining_nlist,
            mining_nprobe=args.mining_nprobe,
            rq_beam_size=args.rq_beam_size,
        )

    @classmethod
    def from_index(cls, index: Any, factory: str, search_params: str | None = None) -> QuantizedIndex:
        """Wraps an existing FAISS index."""
        self = cls.__new__(cls)
        self.faiss = import_faiss()
        self.dim = index.d
        self.requested_factory = factory
        self.factory = factory
        self.search_params = search_params or None
        self.use_gpu = None
        self.opq_niter = None
        self.rq_beam_size = None  # a loaded residual quantizer keeps the beam it was saved with
        self.mining_nlist, self.mining_nprobe = 0, 16
        self.shortlist = None
        self.index = index
        self._gpu_index = None
        self._gpu_failed = False
        self.version = 0
        self.normalize_decoded = False
        return self

    # ------------------------------------------------------------------ properties
    @property
    def ntotal(self) -> int:
        """Number of indexed vectors."""
        return int(self.index.ntotal)

    @property
    def local_ntotal(self) -> int:
        """Rows this process's index holds (numbered from 0): every row here; a
        :class:`~hf_qret.index.sharding.ShardedIndex`'s own shard there. What :meth:`refresh` compares the bank's
        rows with."""
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        """Whether the codebooks (and coarse quantizer / rotation) are trained: :meth:`train` or :meth:`build` ran."""
        return bool(self.index.is_trained)

    def _codec(self) -> Any:
        # The index that implements the standalone codec (sa_encode/sa_decode): HNSW delegates to its storage.
        for node in nested_indexes(self.faiss, self.index):  # e.g. an HNSW graph's storage codes
            try:
                node.sa_code_size()
                return node
            except RuntimeError:
                continue
        raise ConfigError(f"the {self.factory!r} index has no standalone codec in FAISS; use a PQ/OPQ/SQ/IVF index.")

    @property
    def bytes_per_vector(self) -> int:
        """Bytes one vector's code takes in the index (``sa_code_size``; for IVF it includes the list id).

        Graph links (HNSW) and inverted-list bookkeeping are not counted.
        """
        try:
            return int(self._codec().sa_code_size())
        except ConfigError:
            return int(getattr(self.faiss.downcast_index(self.index), "code_size", 4 * self.dim))

    # ------------------------------------------------------------------ build / refresh
    def train(self, vectors: Any, max_train_rows: int | None = MAX_TRAIN_ROWS) -> None:
        """(Re)trains the codebooks (and coarse quantizer / rotation) on ``vectors`` (at most ``max_train_rows``
        rows, a fixed random sample; ``None``: all)."""
        if self._is_auto():  # the default index, chosen from the number of rows (logged once)
            from .auto import choose_index, faiss_sees_gpu

            self.choice = choose_index(len(vectors), gpu=faiss_sees_gpu())
            logger.info("index_factory auto: %s", self.choice.reason)
            self.requested_factory = self.factory = self.choice.factory
            self.search_params = self.search_params or self.choice.search_params
        sample = train_sample(vectors, max_train_rows)
        fresh = self._trained_empty(sample)
        if self.mining_nlist:
            self.shortlist = MiningShortlist(fresh, sample, self.mining_nlist, self.mining_nprobe)
        del sample
        self._install(fresh)

    def _is_auto(self) -> bool:
        return str(self.requested_factory).lower() == "auto"

    def _fit_factory(self, num_rows: int) -> None:
        # FAISS aborts the whole process on some samples too small for the factory: check before it trains.
        factory, reason = fit_factory(self.requested_factory, num_rows)
        if factory != self.factory:
            logger.warning(
                "index factory %r on %d training rows: %s; training %r instead.",
                self.requested_factory, num_rows, reason, factory,
            )  # fmt: skip
            self.factory = factory

    def _trained_empty(self, sample: np.ndarray) -> Any:
        """A new empty FAISS index of the factory (fitted to the sample size) trained on ``sample``."""
        self._fit_factory(len(sample))
        fresh = self._new_index()
        fit_training_to_sample(self.faiss, fresh, len(sample))
        with pq_encode_block(self.faiss, fresh):  # FAISS's 1 GB distance tables per PQ encoding batch: 128 MB
            fresh.train(sample)
        return fresh

    def _install(self, fresh: Any) -> None:
        """Serves the freshly trained FAISS index ``fresh``."""
        self.index = fresh
        self._changed()
        self._apply_search_params(self.index)

    def add(self, vectors: Any) -> None:
        """Encodes and appends ``vectors`` (streamed in chunks); their ids are their row numbers."""
        for chunk in chunks(vectors, encode_chunk_rows(self.faiss, self.index)):
            self.index.add(chunk)
            if self.shortlist is not None:
                self.shortlist.add(chunk)
        self._changed()

    def build(self, vectors: Any, max_train_rows: int | None = MAX_TRAIN_ROWS) -> None:
        """Trains on ``vectors`` (see :meth:`train`) and indexes them (row ``i`` gets id ``i``)."""
        self.train(vectors, max_train_rows)
        self.add(vectors)

    def refresh(
        self,
        vectors: Any,
        mode: str = "reencode",
        rows: np.ndarray | None = None,
        max_train_rows: int | None = MAX_TRAIN_ROWS,
    ) -> int:
        """Brings the index up to date with the current bank.

        A :class:`~hf_qret.index.sharding.ShardedIndex` refreshes its own shard the same way: ``vectors`` and ``rows``
        are then this shard's (rows numbered from 0 in it), and ``"retrain"`` is its collective :meth:`train`.

        Args:
            vectors: The whole bank, ``(num_docs, dim)`` (an array or a chunk-sliceable array-like).
            mode: ``"reencode"`` keeps the codebooks and re-encodes every row with them; ``"retrain"`` retrains
                the codebooks on the current bank first; ``"incremental"`` keeps the codebooks and re-encodes only
                ``rows``, in place (see :meth:`update`); it falls back to ``"reencode"`` (with a logged reason) when
                the index type cannot be updated in place, and re-encodes everything when ``rows`` is ``None``.
            rows: The rows changed since the last refresh (``"incremental"`` only).
            max_train_rows: Training sample cap for ``"retrain"``.

        Returns:
            How many rows were encoded.

        Example:
            >>> index.refresh(bank.float32_rows(), mode="incremental", rows=bank.changed_rows())  # doctest: +SKIP
        """
        if mode not in REFRESH_MODES:
            raise ConfigError(f"unknown index refresh mode {mode!r}; use one of {', '.join(REFRESH_MODES)}.")
        if mode == "retrain" or not self.is_trained:
            self.build(vectors, max_train_rows)
            return len(vectors)
        held = self.local_ntotal
        if mode == "incremental" and rows is not None and held == len(vectors):
            rows = np.unique(np.asarray(rows, dtype=np.int64))
            if rows.size == 0:
                return 0
            if rows[0] < 0 or rows[-1] >= held:
                raise ValueError(f"rows to update must lie in [0, {held}), got {rows[0]}..{rows[-1]}.")
            updater, reason = in_place_updater(self.faiss, self.index, self.shortlist)
            if updater is not None:
                chunk_rows = encode_chunk_rows(self.faiss, self.index)
                try:
                    for start in range(0, rows.size, chunk_rows):
                        part = rows[start : start + chunk_rows]
                        updater(part, as_float32(vectors[part]))
                    self._changed()
                    return int(rows.size)
                except RuntimeError as exc:
                    reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "FAISS refused the update"
            logger.info("incremental refresh of %r falls back to a full re-encode: %s", self.factory, reason)
        self.index.reset()
        if self.shortlist is not None:
            self.shortlist.reset()
        self.add(vectors)
        return len(vectors)

    def update(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Re-encodes ``rows`` from their new ``vectors`` with the current codebooks, in place.

        The codes are exactly those a full re-encode would store. Flat-code indexes (``PQ``, ``OPQ..,PQ``, ``SQ``,
        ``Flat``) get their codes overwritten at the rows' positions; IVF indexes move each row to its new list
        (``IndexIVF.update_vectors``, with an array direct map made on first use: 8 bytes per row).

        Raises:
            ConfigError: The index type cannot be updated in place (e.g. HNSW); use a full refresh.
        """
        updater, reason = in_place_updater(self.faiss, self.index, self.shortlist)
        if updater is None:
            raise ConfigError(f"the {self.factory!r} index cannot be updated in place ({reason}); refresh it fully.")
        rows = np.ascontiguousarray(np.asarray(rows, dtype=np.int64))
        vectors = as_float32(vectors)
        if len(rows) != len(vectors) or len(np.unique(rows)) != len(rows):
            raise ValueError("update needs one vector per row and distinct rows.")
        updater(rows, vectors)
        self._changed()

    @property
    def codes_nbytes(self) -> int:
        """Approximate bytes of the stored codes: ``ntotal`` codes, plus 8-byte ids (and direct map) for IVF, plus
        the mining shortlist's copy (codes, ids, direct map) when there is one."""
        served = served_codes_nbytes(self.faiss, self.index, lambda: self.bytes_per_vector)
        return served + (0 if self.shortlist is None else self.shortlist.nbytes)

    # ------------------------------------------------------------------ change record
    def _changed(self) -> None:
        # Codes or codebooks changed: the GPU copy is stale and holders of decoded codes must resync.
        self.version += 1
        self._drop_gpu()

    def replace(self, index: Any, shortlist_ivf: Any = None) -> None:
        """Serves another trained FAISS index of the same kind (e.g. a checkpoint's).

        The mining shortlist, if any, becomes ``shortlist_ivf`` (a checkpoint's saved inverted lists: the same
        candidates as the run that saved it) or is rebuilt over the new index's codes (decoded and re-encoded with the
        same codebooks: the same codes, but lists trained anew).
        """
        self.index = index
        self._changed()
        if self.mining_nlist and self.ntotal and shortlist_ivf is not None:
            self.shortlist = MiningShortlist.from_ivf(self.index, shortlist_ivf)
        elif self.mining_nlist and self.ntotal:
            decoded = DecodedCodes(self.index)
            self.shortlist = MiningShortlist(
                self.index, train_sample(decoded, MAX_TRAIN_ROWS), self.mining_nlist, self.mining_nprobe
            )
            for chunk in chunks(decoded):
                self.shortlist.add(chunk)
        else:
            self.shortlist = None

    def synced_copy(self, vectors: Any, rows: np.ndarray) -> QuantizedIndex:
        """A copy of this index with ``rows`` re-encoded from ``vectors`` (the whole bank) with the current codebooks.

        This is the index of the bank as it is now, for evaluation and saving; ``self`` (what training mines from
        between refreshes) is left untouched. The copy has no mining shortlist.

        Example:
            >>> served = index.synced_copy(bank.float32_rows(), bank.changed_rows())  # doctest: +SKIP
        """
        copy = QuantizedIndex.from_index(self.faiss.clone_index(self.index), self.factory, self.search_params)
        copy.opq_niter = self.opq_niter
        copy.rq_beam_size = self.rq_beam_size
        copy.use_gpu = self.use_gpu
        copy.normalize_decoded = self.normalize_decoded
        copy._apply_search_params(copy.index)
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if rows.size:
            copy.refresh(vectors, mode="incremental", rows=rows)
        return copy

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Writes the CPU index with ``faiss.write_index``, atomically (temp file, then rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        self.faiss.write_index(self.index, str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(
        cls, path: str | os.PathLike, factory: str | None = None, search_params: str | None = None
    ) -> QuantizedIndex:
        """Reads an index written by :meth:`save`; a truncated or corrupt file raises :class:`ArtifactError`."""
        faiss = import_faiss()
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path}: no such index file; train or download the artifact first.")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            last = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
            raise ArtifactError(f"{path}: corrupt or truncated FAISS index ({last}); re-create the artifact.") from None
        wrapped = cls.from_index(index, factory or "unknown", search_params)
        wrapped._apply_search_params(wrapped.index)
        return wrapped
