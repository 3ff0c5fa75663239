"""Writing a loaded artifact back: :class:`SavingMixin`, the part of
:class:`~hf_qret.serving.retriever.QuantizedRetriever` that saves it, with the documents added since loading
(:class:`~hf_qret.serving.growing.GrowingMixin`), to a folder or pushes it to the Hub in one commit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ArtifactError
from .artifact import CONFIG_NAME, DOC_IDS_NAME, INDEX_NAME, write_json

__all__ = ["SavingMixin"]


class SavingMixin:
    """Saves a loaded artifact (with the documents added since loading) and pushes it (mixed into
    :class:`~hf_qret.serving.retriever.QuantizedRetriever`, which provides ``index``, ``files``, ``config``,
    ``folder``, ``doc_ids`` and the added rows of :class:`~hf_qret.serving.growing.GrowingMixin`).

    Example:
        >>> from hf_qret import QuantizedRetriever
        >>> issubclass(QuantizedRetriever, SavingMixin)
        True
    """

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Writes the artifact, with the documents added since loading, to ``save_directory``.

        Another folder gets a copy of the loaded artifact first (encoders, model card...: the files of
        :func:`hf_qret.serving.artifact.artifact_files`, never checkpoints, pickles or working files); the loaded folder
        itself is updated in place. The doc-id map, the bank (grown with the new documents' embeddings), the corpus
        (when shipped), ``qret_config.json`` and, last, ``index.faiss`` are each written atomically; an hf-qret model
        card is re-rendered for the new size (when the ``train`` extra is installed).

        Returns:
            The folder.

        Example:
            >>> retriever.save_pretrained("runs/scifact-grown")  # doctest: +SKIP
            PosixPath('runs/scifact-grown')
        """
        if self.folder is None:
            raise ArtifactError("this retriever was not loaded from an artifact folder; nothing to copy it from.")
        from .artifact import copy_artifact_files

        target = Path(save_directory).expanduser()
        self._fetch_skipped()  # a Hub download: the bank, document_encoder/ (and corpus) belong to the saved artifact
        source = self.folder
        if not (target.exists() and target.resolve() == source.resolve()):
            copy_artifact_files(source, target)  # the artifact's files only (hf_qret.serving.artifact's manifest)
        config = dict(self.config)
        added = sum(len(rows) for rows in self._added_rows)
        if self._corpus is not None:
            _write_corpus(target / "corpus.jsonl", self.doc_ids, self._corpus)
            stale = target / "corpus.jsonl.gz"
            if stale.exists():
                stale.unlink()
        if config.get("bank_file"):
            self._write_bank(source / config["bank_file"], target / config["bank_file"])
        write_json(self.doc_ids, target / config.get("doc_ids_file", DOC_IDS_NAME))
        config["num_vectors"] = len(self.doc_ids)
        config["documents_added"] = int(config.get("documents_added") or 0) + added
        write_json(config, target / CONFIG_NAME)
        self.index.save(target / config.get("index_file", INDEX_NAME))
        self.config.update(config)
        self._added_rows = []
        self.folder = target
        self._refresh_card(target)
        return target

    def _write_bank(self, source: Path, target: Path) -> None:
        from safetensors.torch import save_file

        from ..bank.storage import BANK_KEY

        if self.files.bank is not None:
            self.files.bank.save(target)
            return
        if not self._added_rows and source.resolve() == target.resolve():
            return
        grown = self._grown_bank(source)
        if len(grown) != len(self.doc_ids):
            added = sum(map(len, self._added_rows))
            raise ArtifactError(
                f"{source}: the bank has {len(grown) - added} rows, the index {len(self.doc_ids) - added}."
            )
        tmp = target.with_name(target.name + ".tmp")
        save_file({BANK_KEY: grown.contiguous()}, str(tmp))
        os.replace(tmp, target)

    @staticmethod
    def _refresh_card(folder: Path) -> None:
        try:
            from .model_card import MODEL_CARD_NAME, is_qret_model_card, write_model_card

            if is_qret_model_card(folder / MODEL_CARD_NAME):
                write_model_card(folder)
        except ImportError as exc:
            import logging

            logging.getLogger(__name__).warning(
                "README.md not re-rendered (%s); `pip install 'hf-qret[train]'` and run `hf-qret card %s`.", exc, folder
            )

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                    token: str | bool | None = None, commit_message: str | None = None) -> Any:  # fmt: skip
        """Saves the artifact (with the added documents) into a temporary folder and pushes it in one commit
        (:func:`hf_qret.serving.upload.push_artifact`).

        Example:
            >>> retriever.push_to_hub("me/minilm-scifact-opq16")  # doctest: +SKIP
        """
        import tempfile

        from .upload import push_artifact

        folder, unsaved, config = self.folder, list(self._added_rows), dict(self.config)
        with tempfile.TemporaryDirectory(prefix="hf-qret-push-") as tmp:
            try:
                saved = self.save_pretrained(Path(tmp) / "artifact")
                return push_artifact(
                    saved, repo_id, private=private, revision=revision, token=token, commit_message=commit_message
                )
            finally:  # the loaded folder still lacks the added documents: a later save_pretrained writes them
                self.folder, self._added_rows = folder, unsaved
                self.config.clear()
                self.config.update(config)


def _write_corpus(path: Path, doc_ids: Sequence[str], corpus: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for doc_id in doc_ids:
            if doc_id in corpus:
                handle.write(
                    json.dumps({"_id": doc_id, "title": "", "text": corpus[doc_id]}, ensure_ascii=False) + "\n"
                )
    os.replace(tmp, path)
