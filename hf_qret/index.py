"""The quantized FAISS index built over the TargetBank.

Any ``faiss.index_factory`` string with the inner-product metric works (``PQ16``, ``OPQ16,PQ16``,
``IVF64,PQ16``, ``HNSW32,PQ16``, ``SQ8``, ``Flat``...). FAISS is imported lazily; when FAISS has GPUs and the index
type supports them, searches run on a GPU copy while the CPU index stays the one that is trained, saved and loaded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError, ConfigError

__all__ = ["QuantizedIndex", "import_faiss", "REFRESH_MODES"]

logger = logging.getLogger(__name__)

#: ``"reencode"`` keeps the trained codebooks and re-encodes every bank row; ``"retrain"`` also retrains them.
REFRESH_MODES = ("reencode", "retrain")


def import_faiss() -> Any:
    """Imports FAISS, with an install hint when it is missing."""
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "hf-qret needs FAISS: `pip install 'hf-qret[cpu]'` (faiss-cpu) or `pip install 'hf-qret[gpu]'`."
        ) from None
    return faiss


def _disable_polysemous_training(faiss: Any, index: Any) -> None:
    # index_factory turns on polysemous training for PQ codes: an expensive extra optimisation of the code
    # assignment that only Hamming-filtered search uses, which hf-qret never does.
    seen = 0
    while index is not None and seen < 4:
        index = faiss.downcast_index(index)
        if hasattr(index, "do_polysemous_training"):
            index.do_polysemous_training = False
        index = getattr(index, "index", None) or getattr(index, "storage", None)
        seen += 1


def _as_float32(vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))


class QuantizedIndex:
    """A FAISS index (inner product) over the bank, rebuilt as the bank trains.

    Args:
        dim: Embedding dimension.
        factory: A ``faiss.index_factory`` string, for example ``"OPQ16,PQ16"``.
        search_params: FAISS runtime parameters, for example ``"nprobe=16"`` or ``"efSearch=64"``.
        use_gpu: ``None`` uses a GPU when FAISS sees one and the index type runs there; ``False`` never does.

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

    def __init__(self, dim: int, factory: str, search_params: str | None = None, use_gpu: bool | None = None) -> None:
        self.faiss = import_faiss()
        self.dim = int(dim)
        self.factory = factory
        self.search_params = search_params or None
        self.use_gpu = use_gpu
        self.index = self._new_index()
        self._gpu_index = None
        self._gpu_failed = False
        self.version = 0

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
        _disable_polysemous_training(self.faiss, index)
        return index

    @classmethod
    def validate_factory(cls, dim: int, factory: str) -> None:
        """Raises :class:`ConfigError` when ``factory`` is not a valid index for ``dim``, before any heavy work."""
        cls(dim, factory)

    @classmethod
    def from_index(cls, index: Any, factory: str, search_params: str | None = None) -> QuantizedIndex:
        """Wraps an existing FAISS index."""
        self = cls.__new__(cls)
        self.faiss = import_faiss()
        self.dim = index.d
        self.factory = factory
        self.search_params = search_params or None
        self.use_gpu = None
        self.index = index
        self._gpu_index = None
        self._gpu_failed = False
        self.version = 0
        return self

    # ------------------------------------------------------------------ properties
    @property
    def ntotal(self) -> int:
        """Number of indexed vectors."""
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def _codec(self) -> Any:
        # The index that implements the standalone codec (sa_encode/sa_decode): HNSW delegates to its storage.
        index = self.index
        for _ in range(4):
            try:
                index.sa_code_size()
                return index
            except RuntimeError:
                storage = getattr(self.faiss.downcast_index(index), "storage", None)
                if storage is None:
                    break
                index = self.faiss.downcast_index(storage)
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
    def train(self, vectors: np.ndarray) -> None:
        """(Re)trains the codebooks (and coarse quantizer / rotation) on ``vectors``."""
        vectors = _as_float32(vectors)
        fresh = self._new_index()
        fresh.train(vectors)
        self.index = fresh
        self._changed()
        self._apply_search_params(self.index)

    def add(self, vectors: np.ndarray) -> None:
        """Encodes and appends ``vectors``; their ids are their row numbers."""
        self.index.add(_as_float32(vectors))
        self._changed()

    def build(self, vectors: np.ndarray) -> None:
        """Trains on ``vectors`` and indexes them (row ``i`` gets id ``i``)."""
        self.train(vectors)
        self.add(vectors)

    def refresh(self, vectors: np.ndarray, mode: str = "reencode") -> None:
        """Rebuilds the index from the current bank.

        Args:
            vectors: The whole bank, ``(num_docs, dim)``.
            mode: ``"reencode"`` keeps the codebooks and re-encodes every row with them; ``"retrain"`` retrains
                the codebooks on the current bank first.
        """
        if mode not in REFRESH_MODES:
            raise ConfigError(f"unknown index refresh mode {mode!r}; use one of {', '.join(REFRESH_MODES)}.")
        if mode == "retrain" or not self.is_trained:
            self.build(vectors)
            return
        self.index.reset()
        self.add(vectors)

    # ------------------------------------------------------------------ search
    def _apply_search_params(self, index: Any) -> None:
        if self.search_params:
            try:
                self.faiss.ParameterSpace().set_index_parameters(index, self.search_params)
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

    def _changed(self) -> None:
        # Codes or codebooks changed: the GPU copy is stale and holders of decoded codes must resync.
        self.version += 1
        self._drop_gpu()

    def codebooks_changed(self) -> None:
        """Call after editing the FAISS codebooks in place (see :class:`~hf_qret.codebook.TrainableCodebooks`)."""
        self._drop_gpu()

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
                self._gpu_index = self.faiss.index_cpu_to_gpu(resources, 0, self.index, options)
                self._apply_search_params(self._gpu_index)
            except (RuntimeError, AttributeError) as exc:
                logger.info("FAISS index %r stays on the CPU (%s)", self.factory, exc)
                self._gpu_failed = True
                return self.index
        return self._gpu_index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows by (approximate) inner product.

        Returns:
            ``(scores, rows)``, each ``(num_queries, k)``; ``rows`` is ``-1`` where fewer than ``k`` were found.
        """
        if self.ntotal == 0:
            raise ArtifactError("the index is empty; build it from the bank before searching.")
        k = min(int(k), self.ntotal)
        return self._searcher().search(_as_float32(queries), k)

    def quantize(self, vectors: np.ndarray) -> np.ndarray:
        """Encodes ``vectors`` with the current codebooks and decodes them: what the index would store."""
        codec = self._codec()
        return codec.sa_decode(codec.sa_encode(_as_float32(vectors)))

    def reconstruct_all(self) -> np.ndarray:
        """The decoded (quantized) vector of every row, ``(ntotal, dim)``."""
        return self.index.reconstruct_n(0, self.ntotal)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Writes the CPU index with ``faiss.write_index``, atomically (temp file, then rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        self.faiss.write_index(self.index, str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, factory: str | None = None, search_params: str | None = None) -> QuantizedIndex:
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
