"""Search with a trained artifact: the query encoder plus the quantized index, loaded in one call from a local
folder or a Hub repository.

Queries and added documents are embedded as training embedded them (:func:`hf_qret.serving.encoder.encode_texts`): with the
query / document prompts and the normalisation ``qret_config.json`` records (an artifact written before they were
recorded: the encoder's own prompts and sentence-transformers' rules, as before).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactError
from .artifact import (
    BANK_NAME,
    CONFIG_NAME,
    CORPUS_NAMES,
    PICKLE_PATTERNS,
    SERVING_IGNORE_PATTERNS,
    RetrievalFiles,
    check_encoder_files,
    hub_source_of,
    load_retrieval_files,
    load_shipped_corpus,
    resolve_artifact,
)
from .embedding import recorded_prompt
from .encoder import embedding_dim, encode_texts, resolved_precision
from .growing import GrowingMixin
from .saving import SavingMixin

__all__ = ["QuantizedRetriever", "CORPUS_NAMES", "PICKLE_PATTERNS"]

logger = logging.getLogger(__name__)

#: What :meth:`QuantizedRetriever.search` can return.
SEARCH_OUTPUTS = ("tuples", "semantic_search")


def _search_string(nprobe: int | None, ef_search: int | None, params: str | None) -> str | None:
    parts = [params] if params else []
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
        if value is not None:
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
            parts.append(f"{name}={int(value)}")
    return ",".join(parts) or None


class QuantizedRetriever(GrowingMixin, SavingMixin):
    """A query encoder and the quantized index of its corpus.

    Args:
        model: The query encoder (a ``SentenceTransformer`` or a transformers encoder).
        files: The artifact's index, doc-id map and config (:func:`hf_qret.serving.artifact.load_retrieval_files`).
        batch_size: Query encoding batch size.
        corpus: Document id to text, when the artifact ships ``corpus.jsonl``.
        nprobe: IVF lists to visit per query (IVF indexes only).
        ef_search: HNSW search depth (HNSW indexes only).
        folder: The artifact folder it was loaded from.

    Raises:
        ArtifactError: The encoder's dimension differs from the index's.

    Example:
        >>> retriever = QuantizedRetriever.from_pretrained("out/scifact", "cpu")  # doctest: +SKIP
        >>> retriever.search(["Vitamin D lowers cancer risk"], k=3)  # doctest: +SKIP
        [[('4983', 0.61), ('1130', 0.58), ('77', 0.55)]]
        >>> retriever.search("Vitamin D lowers cancer risk", k=1)  # one query: its hits  # doctest: +SKIP
        [('4983', 0.61)]
    """

    def __init__(
        self,
        model: Any,
        files: RetrievalFiles,
        batch_size: int = 64,
        *,
        corpus: dict[str, str] | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        folder: str | os.PathLike | None = None,
    ) -> None:
        self.model = model
        self.files = files
        self.index = files.index
        self.config = files.config
        self.batch_size = batch_size
        self.folder = Path(folder) if folder is not None else None
        self._corpus = corpus
        self._device: str | None = None
        self._document_encoder: Any = None
        self._added_rows: list[np.ndarray] = []  # embeddings of documents added since loading, for the bank file
        #: The second stage over the compact on-disk copy of the bank (enable_rescoring), or None.
        self.rescorer: Any = None
        self.rescore_depth = 0
        self._hub: Any = None  # a Hub download: where the parts serving skipped are fetched from (GrowingMixin)
        self._skipped: list[str] = []  # the patterns of those parts not fetched yet
        dim = embedding_dim(model)
        if dim != self.index.dim:
            raise ArtifactError(
                f"the query encoder produces {dim}-d embeddings but the index holds {self.index.dim}-d vectors; "
                "the artifact is inconsistent, re-create it."
            )
        if nprobe is not None or ef_search is not None:
            self.set_search_params(nprobe=nprobe, ef_search=ef_search)

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_path: str | os.PathLike,
        device: str | None = None,
        *,
        revision: str | None = None,
        load_bank: bool = False,
        nprobe: int | None = None,
        ef_search: int | None = None,
        use_gpu: bool | None = None,
        load_corpus: bool = True,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 64,
        merge_adapter: bool = False,
        document_encoder: Any = None,
    ) -> QuantizedRetriever:
        """Loads an artifact folder, or downloads a Hub repository with ``snapshot_download`` first.

        From the Hub only what serving needs is downloaded: the query encoder, the index, the doc-id map, the config,
        the model card (and ``corpus.jsonl`` with ``load_corpus``). The full-precision bank and ``document_encoder/``
        are downloaded, from the same commit, when :meth:`add_documents`, :meth:`retrain_index`,
        :meth:`save_pretrained` or ``load_bank=True`` need them.

        Everything is checked before it is used: the index size against the doc-id map, the index dimension
        against the config and the encoder, the shipped corpus against the doc ids. Nothing is unpickled: the
        encoder and the bank load from safetensors, the index with ``faiss.read_index``, the rest is JSON; pickled
        files are not even downloaded.

        Args:
            repo_id_or_path: A local artifact folder (works with ``HF_HUB_OFFLINE=1``) or a Hub model id.
            device: Torch device of the query encoder (default: CUDA when available); the second positional
                parameter, as in ``SentenceTransformer(name, device)``. Everything after it is keyword-only.
            revision: Hub revision (branch, tag or commit).
            load_bank: Also load the full-precision bank (``retriever.files.bank``).
            nprobe: IVF lists visited per query (IVF indexes).
            ef_search: HNSW search depth (HNSW indexes).
            use_gpu: ``None`` searches on a GPU copy of the index when FAISS has GPUs and the index type runs
                there; ``False`` never.
            load_corpus: Read ``corpus.jsonl`` when the artifact ships it (``retriever.corpus``).
            token: Hub token for private repositories.
            cache_dir: Hub cache folder.
            batch_size: Query encoding batch size.
            merge_adapter: When the artifact holds a peft adapter (``adapter_config.json``; loaded attached, on
                the base model its config names), merge it into the base weights for faster queries.
            document_encoder: The encoder new documents are encoded with (:meth:`add_documents`): a model or a
                sentence-transformers folder. Default: the artifact's own ``document_encoder/`` folder.

        Raises:
            ArtifactError: Not an hf-qret artifact, a file is missing or corrupt, or the parts disagree.

        Example:
            >>> retriever = QuantizedRetriever.from_pretrained("me/minilm-scifact-opq16", "cuda", nprobe=16)  # doctest: +SKIP
        """
        local = Path(repo_id_or_path).expanduser().is_dir()
        # A Hub download fetches what serving needs; the bank and document_encoder/ follow when first needed.
        skip = [p for p in SERVING_IGNORE_PATTERNS if not (load_bank and p == BANK_NAME)]
        skip += [] if load_corpus else list(CORPUS_NAMES)
        folder = resolve_artifact(repo_id_or_path, revision, token, cache_dir, skip=skip)
        hub = None if local else hub_source_of(folder, str(repo_id_or_path), revision, token, cache_dir)
        if not (folder / CONFIG_NAME).is_file():
            raise ArtifactError(f"{folder}: no {CONFIG_NAME}; this is not an hf-qret artifact folder.")
        check_encoder_files(folder)
        files = load_retrieval_files(folder, load_bank=load_bank)
        if use_gpu is not None:
            files.index.use_gpu = use_gpu
        corpus = load_shipped_corpus(folder, files.doc_ids) if load_corpus else None
        from .sentence_encoder import load_encoder

        # A plain Transformer/Pooling/Normalize folder loads with transformers alone (no sentence-transformers import,
        # so no training stack); anything else (a peft adapter, extra modules, cls pooling of a plain transformers
        # folder, as qret_config.json records it) with SentenceTransformer.
        model = load_encoder(folder, device, pooling=files.config.get("pooling"))
        if merge_adapter:
            from .peft_utils import merge_adapter as merge

            model = merge(model)
        retriever = cls(
            model, files, batch_size=batch_size, corpus=corpus, nprobe=nprobe, ef_search=ef_search, folder=folder
        )
        retriever._device = device
        retriever._hub, retriever._skipped = hub, skip if hub is not None else []
        if document_encoder is not None:
            retriever.document_encoder = document_encoder
        return retriever

    # ------------------------------------------------------------------ properties
    @property
    def doc_ids(self) -> list[str]:
        """Document id of each index row."""
        return self.files.doc_ids

    @property
    def corpus(self) -> dict[str, str] | None:
        """Document id to text (title and text joined) when the artifact ships ``corpus.jsonl``, else ``None``."""
        return self._corpus

    @property
    def bytes_per_vector(self) -> int:
        """Bytes one document takes in the index."""
        return self.index.bytes_per_vector

    @property
    def search_params(self) -> str | None:
        """The FAISS runtime parameters in effect (e.g. ``"nprobe=16"``)."""
        return self.index.search_params

    def set_search_params(
        self, nprobe: int | None = None, ef_search: int | None = None, params: str | None = None
    ) -> None:
        """Sets FAISS runtime parameters: ``nprobe`` (IVF), ``ef_search`` (HNSW) or a raw ``params`` string.

        Raises:
            ConfigError: The parameter does not apply to this index type.

        Example:
            >>> retriever.set_search_params(nprobe=32)  # doctest: +SKIP
        """
        self.index.set_search_params(_search_string(nprobe, ef_search, params))

    # ------------------------------------------------------------------ search
    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        """``(len(queries), dim)`` float32 query embeddings, exactly as training and evaluation embedded queries:
        with the query prompt ``qret_config.json`` records (else the encoder's own, as ``encode_query`` picks it),
        pooled and normalised as trained.

        Example:
            >>> retriever.encode_queries(["does aspirin prevent stroke?"]).shape  # doctest: +SKIP
            (1, 384)
        """
        if isinstance(queries, str):
            raise TypeError("encode_queries takes a list of strings; wrap a single query as [query].")
        return self._encode(self.model, list(queries), "query", self.batch_size)

    def _encode(self, model: Any, texts: list[str], role: str, batch_size: int) -> np.ndarray:
        normalize = self.config.get("normalize")
        return encode_texts(
            model,
            texts,
            batch_size=batch_size,
            role=role,
            prompt=recorded_prompt(self.config, role),
            normalize=None if normalize is None else bool(normalize),
            precision=self._document_precision(model) if role == "document" else "fp32",
        )

    def _document_precision(self, model: Any) -> str:
        """Documents are encoded in the precision the bank was (qret_config's ``document_precision``; float32 when
        it is not known), except bf16 where the hardware does not compute it natively (a CPU without AMX): emulated
        bf16 is many times slower there, and float32 embeddings are within bf16's rounding of the bank's."""
        recorded = self.config.get("document_precision") or "fp32"
        if recorded == "bf16" and resolved_precision("auto", model) != "bf16":
            if not getattr(self, "_precision_noted", False):
                logger.warning(
                    "the bank was encoded in bf16, which this device does not compute natively; new documents are "
                    "encoded in float32 (embeddings within bf16's rounding of the bank's rows, much faster here)."
                )
                self._precision_noted = True
            return "fp32"
        return recorded

    def search_embeddings(self, embeddings: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Raw search: ``(scores, rows)`` of the FAISS index, or, after :meth:`enable_rescoring`, its top
        ``rescore_depth`` rescored with the compact copy of the bank."""
        rescorer = self.rescorer
        if rescorer is None:
            return self.index.search(embeddings, k)
        if self.index.ntotal > len(rescorer):
            raise ArtifactError(
                f"the index holds {self.index.ntotal} documents but the rescoring rows {len(rescorer)}: call "
                "write_rescore_rows() again after add_documents (or disable_rescoring())."
            )
        _, rows = self.index.search(embeddings, max(int(k), self.rescore_depth))
        return rescorer.rescore(embeddings, rows, k)

    # ------------------------------------------------------------------ rescoring (beyond the index's bytes)
    def write_rescore_rows(self, dtype: str = "int8", path: str | os.PathLike | None = None) -> Path:
        """Writes the compact on-disk copy of the bank that :meth:`enable_rescoring` reads (int8 rows with a scale
        per row, or float16), by default into the artifact folder as ``rescore_int8.npy``.

        Raises:
            ArtifactError: The artifact has no bank file to copy.

        Example:
            >>> retriever.write_rescore_rows("int8")  # doctest: +SKIP
            PosixPath('out/rescore_int8.npy')
        """
        from ..bank.core import TargetBank
        from ..index.rescore import rescore_file_name, write_rescore_rows

        target = Path(path) if path is not None else self._folder_path() / rescore_file_name(dtype)
        bank = self.files.bank
        if bank is None:
            bank_file = self.config.get("bank_file")
            if not bank_file or not (self._folder_path() / bank_file).is_file():
                raise ArtifactError(
                    "this artifact has no bank file to make the rescoring rows from; load an artifact saved with its "
                    "bank (the default) or pass load_bank=True."
                )
            bank = TargetBank.from_file(self._folder_path() / bank_file, self.doc_ids)
        rows = bank.float32_rows()
        chunks = (rows[start : start + 65536] for start in range(0, len(rows), 65536))
        write_rescore_rows(chunks, len(rows), rows.shape[1], target, dtype)
        return target

    def enable_rescoring(self, depth: int = 100, dtype: str = "int8", path: str | os.PathLike | None = None) -> None:
        """Rescores each query's top ``depth`` hits of the quantized index with the memory-mapped compact copy of
        the bank (:meth:`write_rescore_rows`): the index's bytes stay in RAM, the copy's on disk.

        Example:
            >>> retriever.enable_rescoring(100)  # doctest: +SKIP
            >>> retriever.search("does aspirin prevent stroke?", k=10)  # doctest: +SKIP
        """
        from ..index.rescore import RescoreRows, rescore_file_name

        if int(depth) < 1:
            raise ValueError(f"depth must be at least 1, got {depth}.")
        self.rescorer = RescoreRows(Path(path) if path is not None else self._folder_path() / rescore_file_name(dtype))
        self.rescore_depth = int(depth)

    def disable_rescoring(self) -> None:
        """Back to the quantized index's own scores."""
        self.rescorer = None

    def _folder_path(self) -> Path:
        if self.folder is None:
            raise ArtifactError("this retriever was not loaded from a folder; pass path= explicitly.")
        return self.folder

    def search(
        self, queries: str | Sequence[str], k: int = 10, *, return_text: bool = False, output: str = "tuples"
    ) -> list[list[Any]] | list[Any]:
        """The top-``k`` hits of each query, best first (fewer only if the corpus is smaller).

        Args:
            queries: The query texts, or one query as a string: then the hits of that query are returned (a list
                of hits, not a list of lists), as ``SentenceTransformer.encode`` returns one embedding for a string.
            k: Hits per query.
            return_text: Also return each document's text (the artifact must ship ``corpus.jsonl``: trained with
                ``corpus=`` / text pairs, or ``store_corpus_texts=True``, or ``hf-qret push --corpus``).
            output: ``"tuples"``: ``(doc_id, score)`` (``(doc_id, score, text)`` with ``return_text``);
                ``"semantic_search"``: ``{"corpus_id": doc_id, "score": score}`` dicts (plus ``"text"``), the shape
                of ``sentence_transformers.util.semantic_search`` with the document id as ``corpus_id``.

        Raises:
            ArtifactError: ``return_text`` on an artifact without document texts.

        Example:
            >>> retriever.search(["does aspirin prevent stroke?"], k=2)  # doctest: +SKIP
            [[('1234', 0.71), ('98', 0.66)]]
            >>> retriever.search(["does aspirin prevent stroke?"], k=1, output="semantic_search")  # doctest: +SKIP
            [[{'corpus_id': '1234', 'score': 0.71}]]
            >>> retriever.search("does aspirin prevent stroke?", k=2)  # doctest: +SKIP
            [('1234', 0.71), ('98', 0.66)]
        """
        if isinstance(queries, str):
            return self.search([queries], k, return_text=return_text, output=output)[0]
        if int(k) < 1:
            raise ValueError(f"k must be at least 1, got {k}.")
        if output not in SEARCH_OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(SEARCH_OUTPUTS)}, got {output!r}.")
        if return_text and self._corpus is None:
            raise ArtifactError(
                "this artifact ships no document texts (corpus.jsonl), so search cannot return them; train with "
                "corpus= (or store_corpus_texts=True), or add them with `hf-qret push --corpus DIR`."
            )
        if not queries:
            return []
        scores, rows = self.search_embeddings(self.encode_queries(queries), k)
        hits = [
            [(self.doc_ids[r], float(s)) for s, r in zip(score_row, row) if r >= 0]
            for score_row, row in zip(scores, rows)
        ]
        return [[self._format_hit(doc_id, score, return_text, output) for doc_id, score in row] for row in hits]

    def semantic_search(
        self, queries: str | Sequence[str], top_k: int = 10, return_text: bool = False
    ) -> list[list[dict]] | list[dict]:
        """``search(queries, k=top_k, output="semantic_search")``: for code written against
        ``sentence_transformers.util.semantic_search`` (``corpus_id`` is the document id); a single string gives
        that query's hits.

        Example:
            >>> retriever.semantic_search(["does aspirin prevent stroke?"], top_k=1)  # doctest: +SKIP
            [[{'corpus_id': '1234', 'score': 0.71}]]
        """
        return self.search(queries, k=top_k, return_text=return_text, output="semantic_search")

    def _format_hit(self, doc_id: str, score: float, return_text: bool, output: str) -> Any:
        if output == "semantic_search":
            hit: dict[str, Any] = {"corpus_id": doc_id, "score": score}
            if return_text:
                hit["text"] = self._corpus.get(doc_id)
            return hit
        return (doc_id, score, self._corpus.get(doc_id)) if return_text else (doc_id, score)
