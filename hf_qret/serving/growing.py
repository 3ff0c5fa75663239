"""Growing a served index without training: :class:`GrowingMixin`, the part of
:class:`~hf_qret.serving.retriever.QuantizedRetriever` that adds documents (encoded with the artifact's document
encoder, coded with the index's current codebooks) and retrains the codebooks over every served row.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactError, DataError
from .artifact import CONFIG_NAME, load_shipped_corpus
from .encoder import embedding_dim

__all__ = ["GrowingMixin"]


class GrowingMixin:
    """Adds documents to a loaded artifact's index and retrains its codebooks (mixed into
    :class:`~hf_qret.serving.retriever.QuantizedRetriever`, which provides ``index``, ``files``, ``config``,
    ``folder`` and ``_encode``).

    Example:
        >>> from hf_qret import QuantizedRetriever
        >>> issubclass(QuantizedRetriever, GrowingMixin)
        True
    """

    @property
    def document_encoder(self) -> Any:
        """The encoder the bank was built with (loaded on first use from the artifact's ``document_encoder/``).

        Raises:
            ArtifactError: The artifact records no document encoder and none was given.
        """
        if self._document_encoder is None:
            from .artifact import DOCUMENT_ENCODER_DIR
            from .sentence_encoder import load_encoder

            name = self.config.get("document_encoder")
            if name:
                self._fetch([f"{name}/*"])
            path = self.folder / str(name) if (self.folder is not None and name) else None
            if path is None or not path.is_dir():
                raise ArtifactError(
                    f"{self.folder}: the artifact has no document encoder ({DOCUMENT_ENCODER_DIR}/, recorded in "
                    f"{CONFIG_NAME}), so new documents cannot be encoded like its bank; pass document_encoder= (the "
                    "model the bank was encoded with) to from_pretrained, or re-train with the recipe, which saves it."
                )
            self._document_encoder = load_encoder(path, self._device, what="document encoder")
        return self._document_encoder

    @document_encoder.setter
    def document_encoder(self, model: Any) -> None:
        """Sets the document encoder: a model or a sentence-transformers folder (loaded with
        :func:`hf_qret.serving.sentence_encoder.load_encoder`), of the index's dimension."""
        if isinstance(model, (str, os.PathLike)):
            from .sentence_encoder import load_encoder

            model = load_encoder(model, self._device, what="document encoder")
        dim = embedding_dim(model)
        if dim != self.index.dim:
            raise ArtifactError(
                f"the document encoder produces {dim}-d embeddings but the index holds {self.index.dim}-d vectors; "
                "pass the encoder the bank was built with."
            )
        self._document_encoder = model

    def add_documents(self, texts: Sequence[str], ids: Sequence[str], batch_size: int = 64) -> None:
        """Adds documents to the served index: encodes them with the :attr:`document_encoder` as the bank's rows were
        encoded (the document prompt and normalisation ``qret_config.json`` records), appends their codes
        with the index's current codebooks (nothing is retrained), and extends the doc-id map (and the corpus and
        bank, when loaded). :meth:`save_pretrained` / :meth:`push_to_hub` write the grown artifact.

        Args:
            texts: The documents' texts (title and text joined, as the corpus was encoded).
            ids: Their ids, new to the index and unique.
            batch_size: Document encoding batch size.

        Raises:
            DataError: An id is already in the index or repeated, or ``texts`` and ``ids`` differ in length.
            ArtifactError: The artifact has no document encoder (see :attr:`document_encoder`).

        Example:
            >>> retriever = QuantizedRetriever.from_pretrained("runs/scifact")  # doctest: +SKIP
            >>> retriever.add_documents(["A new abstract about vitamin D."], ["new-1"])  # doctest: +SKIP
            >>> retriever.save_pretrained("runs/scifact-grown")  # doctest: +SKIP
        """
        if isinstance(texts, str) or isinstance(ids, str):
            raise TypeError("add_documents takes lists: texts=[text, ...], ids=[doc_id, ...].")
        texts, ids = list(texts), list(ids)
        if len(texts) != len(ids):
            raise DataError(f"add_documents got {len(texts)} texts but {len(ids)} ids; give one id per text.")
        bad = [i for i in ids if not isinstance(i, str) or not i]
        if bad:
            raise DataError(f"document ids must be non-empty strings; got {bad[0]!r}.")
        if not ids:
            return
        known = set(self.doc_ids)
        taken = [i for i in ids if i in known]
        if taken:
            raise DataError(
                f"{len(taken)} of the {len(ids)} ids are already in the index (first: {taken[0]!r}); document ids "
                "must be unique, give new ids (updating an existing document is not supported)."
            )
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            repeated = next(i for i in ids if i in seen or seen.add(i))
            raise DataError(f"the id {repeated!r} is given twice; document ids must be unique.")
        embeddings = self._adapted(self._encode(self.document_encoder, texts, "document", batch_size))
        self._load_shipped_corpus()  # before the doc ids grow: the file lists only the old ones
        self.index.add(embeddings)
        self.files.doc_ids.extend(ids)
        if self.files.bank is not None:
            from ..bank.core import TargetBank

            bank = self.files.bank
            rows = np.concatenate([bank.float32_rows()[: len(bank)], embeddings])
            self.files.bank = TargetBank(rows, self.files.doc_ids, dtype=bank.weight.dtype)
        self._added_rows.append(embeddings)
        if self._corpus is not None:
            self._corpus.update(zip(ids, texts))

    def _adapted(self, embeddings: np.ndarray) -> np.ndarray:
        """New documents' embeddings through the document adapter's layers the bank's rows went through in training
        (``qret_config.json``'s ``document_adapter``; :mod:`hf_qret.serving.document_adapter`)."""
        recorded = self.config.get("document_adapter")
        if not recorded:
            return embeddings
        from .document_adapter import DOCUMENT_ADAPTER_NAME, adapt_rows, load_document_adapters

        layers = load_document_adapters(self._folder_path())
        if len(layers) != int(recorded.get("layers", 0)):
            raise ArtifactError(
                f"{CONFIG_NAME} records {recorded.get('layers')} document adapter layers but {DOCUMENT_ADAPTER_NAME} "
                f"in {self._folder_path()} holds {len(layers)}: new documents cannot be encoded like the bank's rows; "
                "copy the artifact's document_adapter.safetensors back."
            )
        return adapt_rows(embeddings, layers)

    def retrain_index(self) -> None:
        """Trains the index's codebooks again on every row it serves (the artifact's trained bank plus the documents
        added since) and re-encodes them all. Neither the query encoder nor any bank row changes: no model training.

        :meth:`add_documents` codes new documents with the codebooks trained on the rows the artifact was built on.
        After growing by a large share, train them again: on SciFact, an artifact trained over half of the corpus
        and grown by the other half (``benchmarks/grow_index.py``, ``RQ16x8``) scored dev nDCG@10 0.801 as grown
        and 0.821 after ``retrain_index()``, against 0.825 for the recipe trained over the whole corpus.

        Raises:
            ArtifactError: The artifact has no bank (``bank.safetensors``) to train on.

        Example:
            >>> retriever.add_documents(texts, ids); retriever.retrain_index()  # doctest: +SKIP
            >>> retriever.save_pretrained("runs/scifact-grown")  # doctest: +SKIP
        """
        rows = self._bank_rows()
        if len(rows) != self.index.ntotal:
            raise ArtifactError(
                f"the bank has {len(rows)} rows but the index {self.index.ntotal}; the artifact is inconsistent, "
                "re-create it."
            )
        if self.config.get("opq_niter"):
            self.index.opq_niter = int(self.config["opq_niter"])
        self.index.build(rows)
        self.config.update(index_factory=self.index.factory, bytes_per_vector=self.index.bytes_per_vector)

    def _bank_rows(self) -> np.ndarray:
        """Every served row as float32: the loaded (or stored) bank plus the rows added since loading."""
        if self.files.bank is not None:
            return np.ascontiguousarray(self.files.bank.float32_rows()[:], dtype=np.float32)
        name = self.config.get("bank_file")
        if name:
            self._fetch([str(name)])
        if not name or self.folder is None or not (self.folder / name).is_file():
            raise ArtifactError(
                f"{self.folder}: no bank (bank.safetensors) to train the index on; load an artifact saved with its bank."
            )
        import torch

        return np.ascontiguousarray(self._grown_bank(self.folder / name, torch.float32).numpy())

    def _grown_bank(self, source: Path, dtype: Any = None) -> Any:
        """The stored bank's rows followed by the rows added since loading, as one tensor (``dtype``: the stored
        one by default)."""
        import torch

        from ..bank.storage import read_bank_file

        stored = read_bank_file(source)
        dtype = stored.dtype if dtype is None else dtype
        added = [torch.from_numpy(rows).to(dtype) for rows in self._added_rows]
        return torch.cat([stored.to(dtype), *added]) if added else stored.to(dtype)

    def _fetch(self, patterns: Sequence[str]) -> None:
        """Downloads the parts of a Hub artifact (``patterns``) that its serving download skipped, once; nothing for
        a local folder."""
        skipped = getattr(self, "_skipped", ())
        wanted = [p for p in patterns if p in skipped]
        if getattr(self, "_hub", None) is None or self.folder is None or not wanted:
            return
        from .artifact import fetch_artifact_part

        fetch_artifact_part(self._hub, self.folder, wanted)
        self._skipped = [p for p in skipped if p not in wanted]

    def _fetch_skipped(self) -> None:
        """Downloads everything a Hub artifact's serving download skipped, before the artifact is copied."""
        self._fetch(list(getattr(self, "_skipped", ())))

    def _load_shipped_corpus(self) -> None:
        # A shipped corpus.jsonl must grow with the index; read it now if from_pretrained skipped it.
        if self._corpus is None and self.folder is not None:
            from .artifact import CORPUS_NAMES

            self._fetch(list(CORPUS_NAMES))  # when from_pretrained(load_corpus=False) skipped it
            self._corpus = load_shipped_corpus(self.folder, self.doc_ids)
