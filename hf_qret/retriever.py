"""Search with a trained artifact: the query encoder plus the quantized index, loaded in one call."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import CONFIG_NAME, RetrievalFiles, load_retrieval_files
from .encoder import embedding_dim, encode_texts
from .errors import ArtifactError

__all__ = ["QuantizedRetriever"]


class QuantizedRetriever:
    """A query encoder and the quantized index of its corpus.

    Example:
        >>> retriever = QuantizedRetriever.from_pretrained("out/scifact")  # doctest: +SKIP
        >>> retriever.search(["Vitamin D lowers cancer risk"], k=3)  # doctest: +SKIP
        [[('4983', 0.61), ('1130', 0.58), ('77', 0.55)]]
    """

    def __init__(self, model: Any, files: RetrievalFiles, batch_size: int = 64) -> None:
        self.model = model
        self.files = files
        self.index = files.index
        self.config = files.config
        self.batch_size = batch_size
        dim = embedding_dim(model)
        if dim != self.index.dim:
            raise ArtifactError(
                f"the query encoder produces {dim}-d embeddings but the index holds {self.index.dim}-d vectors; "
                "the artifact is inconsistent, re-create it."
            )

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_path: str | os.PathLike,
        revision: str | None = None,
        device: str | None = None,
        load_bank: bool = False,
    ) -> QuantizedRetriever:
        """Loads an artifact folder (or downloads a Hub repository with ``snapshot_download``).

        Args:
            repo_id_or_path: A local artifact folder or a Hub model id.
            revision: Hub revision.
            device: Torch device of the query encoder.
            load_bank: Also load the full-precision bank (``retriever.files.bank``).
        """
        folder = Path(repo_id_or_path).expanduser()
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(repo_id_or_path), revision=revision))
        if not (folder / CONFIG_NAME).is_file():
            raise ArtifactError(f"{folder}: no {CONFIG_NAME}; this is not an hf-qret artifact folder.")
        files = load_retrieval_files(folder, load_bank=load_bank)
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(folder), device=device or "cpu")
        return cls(model, files)

    @property
    def doc_ids(self) -> list[str]:
        """Document id of each index row."""
        return self.files.doc_ids

    @property
    def bytes_per_vector(self) -> int:
        return self.index.bytes_per_vector

    def encode_queries(self, queries: list[str]) -> np.ndarray:
        """``(len(queries), dim)`` float32 query embeddings."""
        return encode_texts(self.model, queries, batch_size=self.batch_size)

    def search_embeddings(self, embeddings: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Raw FAISS search: ``(scores, rows)``."""
        return self.index.search(embeddings, k)

    def search(self, queries: list[str], k: int = 10) -> list[list[tuple[str, float]]]:
        """The top-``k`` ``(doc_id, score)`` of each query, best first."""
        scores, rows = self.search_embeddings(self.encode_queries(queries), k)
        return [
            [(self.doc_ids[r], float(s)) for s, r in zip(score_row, row) if r >= 0]
            for score_row, row in zip(scores, rows)
        ]
