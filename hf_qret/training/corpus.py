"""The documents of a bank built from texts: a corpus in any of the usual shapes plus the document texts of the
training data, deduplicated by text, encoded once and cached in the output folder.

``QRetTrainer(..., corpus=...)`` without ``bank=`` uses it: the corpus (a ``{doc_id: text}`` dict, a
``datasets.Dataset`` with id and text columns, or a BEIR folder) keeps its ids; a training text that is not in the
corpus gets the stable id :func:`text_doc_id` (a hash of the text, the same in every run). The encoded rows are cached
under ``OUTPUT_DIR/_qret_cache/``, keyed by the texts and the encoder, so a re-run or a resume does not encode again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..bank.core import TargetBank
from ..errors import DataError

__all__ = ["DocumentSet", "load_corpus", "text_doc_id", "encode_bank", "CACHE_DIR", "TEXT_ID_PREFIX"]

logger = logging.getLogger(__name__)

#: The bank cache folder under the output folder (``_*`` folders are never pushed to the Hub).
CACHE_DIR = "_qret_cache"
#: Prefix of the ids given to texts that are not in the corpus.
TEXT_ID_PREFIX = "text-"
_ID_COLUMNS = ("_id", "id", "doc_id", "corpus_id", "corpus-id", "docid")
_FINGERPRINT_BYTES = 64 << 20  # parameter bytes hashed into the encoder's fingerprint


def text_doc_id(text: str) -> str:
    """The stable id of a document text that has none: ``"text-"`` and 16 hex digits of its SHA-256.

    Example:
        >>> text_doc_id("Vitamin D lowers cancer risk.")
        'text-6915ec490fe4d648'
    """
    return TEXT_ID_PREFIX + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _doc_string(value: Any) -> str:
    from ..data import doc_text

    if isinstance(value, Mapping):
        return doc_text(value)
    return "" if value is None else str(value)


def load_corpus(corpus: Any) -> dict[str, str]:
    """``{doc_id: text}`` from a dict, a ``datasets.Dataset``, a BEIR folder or :class:`~hf_qret.data.BeirData`.

    A dict's values may be texts or BEIR documents (``{"title", "text"}``, joined with a space). A dataset needs an
    id column (``_id``, ``id``, ``doc_id``, ``corpus_id``...) and a ``text`` column (plus an optional ``title``).

    Raises:
        DataError: An unsupported type, a dataset without id/text columns, or an empty corpus.

    Example:
        >>> load_corpus({"d1": "a text", "d2": {"title": "T", "text": "body"}})
        {'d1': 'a text', 'd2': 'T body'}
    """
    from ..data import BeirData, _find, _load_corpus, doc_text

    if isinstance(corpus, BeirData):
        out = {doc_id: doc_text(doc) for doc_id, doc in corpus.corpus.items()}
    elif isinstance(corpus, (str, os.PathLike)):
        folder = Path(corpus)
        path = _find(folder, "corpus.jsonl") if folder.is_dir() else (folder if folder.is_file() else None)
        if path is None:
            raise DataError(
                f"{corpus}: no corpus.jsonl (or .gz); pass a BEIR folder, an {{id: text}} dict or a Dataset."
            )
        out = {doc_id: doc_text(doc) for doc_id, doc in _load_corpus(path).items()}
    elif isinstance(corpus, Mapping):
        out = {str(doc_id): _doc_string(value) for doc_id, value in corpus.items()}
    elif hasattr(corpus, "column_names"):
        columns = list(corpus.column_names)
        id_column = next((c for c in _ID_COLUMNS if c in columns), None)
        if id_column is None or "text" not in columns:
            raise DataError(
                f"the corpus dataset needs an id column (one of {', '.join(_ID_COLUMNS)}) and a 'text' column; it "
                f"has {columns}."
            )
        titles = corpus["title"] if "title" in columns else None
        texts = corpus["text"]
        out = {}
        for i, doc_id in enumerate(corpus[id_column]):
            out[str(doc_id)] = _doc_string({"title": titles[i] if titles else "", "text": texts[i]})
    else:
        raise DataError(
            f"corpus must be a {{doc_id: text}} dict, a datasets.Dataset with id and text columns or a BEIR folder; "
            f"got {type(corpus).__name__}."
        )
    if not out:
        raise DataError("the corpus is empty; pass at least one document.")
    return out


class DocumentSet:
    """Ordered documents (id and text) with a text-to-id lookup: the rows of a bank built from texts.

    Texts are matched stripped of surrounding whitespace; two corpus ids with the same text both stay (the first
    one is the text's id).

    Example:
        >>> docs = DocumentSet({"d1": "alpha", "d2": "beta"})
        >>> docs.id_of("beta"), docs.add_text("gamma") == text_doc_id("gamma"), len(docs)
        ('d2', True, 3)
    """

    def __init__(self, corpus: Mapping[str, str] | None = None) -> None:
        self.ids: list[str] = []
        self.texts: list[str] = []
        self._row: dict[str, int] = {}
        self._by_text: dict[str, str] = {}
        self.added = 0  # texts that were not in the corpus
        for doc_id, text in (corpus or {}).items():
            self.add(doc_id, text)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._row

    def text(self, doc_id: str) -> str:
        """The text of ``doc_id``."""
        return self.texts[self._row[doc_id]]

    def id_of(self, text: str) -> str | None:
        """The id of a document text, ``None`` when it is not in the set."""
        return self._by_text.get(text.strip())

    def add(self, doc_id: str, text: str) -> None:
        """Adds a document under its own id (a no-op for an id already there)."""
        doc_id = str(doc_id)
        if doc_id in self._row:
            return
        self._row[doc_id] = len(self.ids)
        self.ids.append(doc_id)
        self.texts.append(text)
        self._by_text.setdefault(text.strip(), doc_id)

    def add_text(self, text: str) -> str:
        """The id of ``text``: its corpus id, or a new row under :func:`text_doc_id` when it is not in the set."""
        found = self.id_of(text)
        if found is not None:
            return found
        doc_id = text_doc_id(text.strip())
        if doc_id in self._row:
            raise DataError(f"the corpus id {doc_id!r} collides with the hash id of a training text; rename it.")
        self.add(doc_id, text)
        self.added += 1
        return doc_id

    def add_texts(self, texts: Iterable[str]) -> None:
        """Adds every text not in the set yet (see :meth:`add_text`)."""
        for text in texts:
            self.add_text(text)

    def as_dict(self) -> dict[str, str]:
        """``{doc_id: text}`` in row order."""
        return dict(zip(self.ids, self.texts))

    def digest(self) -> str:
        """SHA-256 of the ids and texts, in order (the cache key of their embeddings)."""
        digest = hashlib.sha256()
        for doc_id, text in zip(self.ids, self.texts):
            digest.update(doc_id.encode("utf-8") + b"\x00" + text.encode("utf-8") + b"\x01")
        return digest.hexdigest()


def encoder_fingerprint(model: nn.Module, tokenizer: Any = None) -> str:
    """A cheap identity of an encoder: its class, name, parameter shapes and the first 64 MiB of its weights."""
    from ..serving.encoder import _unwrap

    base = _unwrap(model)
    digest = hashlib.sha256()
    name = getattr(getattr(base, "config", None), "_name_or_path", None) or getattr(
        getattr(base, "model_card_data", None), "base_model", None
    )
    digest.update(f"{type(base).__name__}|{name}|{getattr(base, 'max_seq_length', None)}|".encode())
    digest.update(f"{type(tokenizer).__name__ if tokenizer is not None else None}|".encode())
    from ..serving.embedding import prompt_for

    digest.update(f"{prompt_for(base, 'document')!r}|".encode())  # the documents' prompt changes the rows
    remaining = _FINGERPRINT_BYTES
    for param_name, param in base.named_parameters():
        digest.update(f"{param_name}{tuple(param.shape)}".encode())
        if remaining > 0:
            data = param.detach().float().cpu().contiguous().view(-1)[: remaining // 4].numpy().tobytes()
            digest.update(data)
            remaining -= len(data)
    return digest.hexdigest()


def _cache_paths(output_dir: str | os.PathLike) -> tuple[Path, Path]:
    folder = Path(output_dir) / CACHE_DIR
    return folder / "bank_init.npy", folder / "bank_init.json"


def encode_bank(
    model: nn.Module,
    docs: DocumentSet,
    output_dir: str | os.PathLike | None = None,
    *,
    tokenizer: Any = None,
    batch_size: int = 64,
    dtype: str = "fp32",
    main_process_first: Any = None,
) -> TargetBank:
    """Encodes the documents into a bank once (with a progress bar), cached in ``output_dir``.

    The cache (``OUTPUT_DIR/_qret_cache/bank_init.npy`` and ``bank_init.json``) is keyed by the documents' ids and
    texts and the encoder's fingerprint; a matching cache is loaded instead of encoding (a re-run, a resume), any
    other is replaced.

    Args:
        model: The encoder (before training: the bank holds the pretrained embeddings).
        docs: The documents, in row order.
        output_dir: Where the cache lives; ``None`` disables it.
        tokenizer: A transformers encoder's tokenizer.
        batch_size: Encoding batch size.
        dtype: Storage dtype of the bank.
        main_process_first: Under several processes, ``TrainingArguments.main_process_first``: the main process
            encodes and writes the cache, the others load it.

    Example:
        >>> bank = encode_bank(model, DocumentSet({"d1": "a text"}), "runs/out")  # doctest: +SKIP
    """
    from contextlib import nullcontext

    from ..serving.encoder import encode_texts

    key = {"num_docs": len(docs), "documents": docs.digest(), "encoder": encoder_fingerprint(model, tokenizer)}
    context = main_process_first(desc="encoding the corpus") if main_process_first is not None else nullcontext()
    with context:
        if output_dir is not None:
            rows_path, meta_path = _cache_paths(output_dir)
            if rows_path.is_file() and meta_path.is_file():
                try:
                    cached = json.loads(meta_path.read_text(encoding="utf-8"))
                except (OSError, json.JSONDecodeError):
                    cached = None
                if cached == key:
                    logger.info("bank: loading the %d encoded documents cached in %s", len(docs), rows_path)
                    return TargetBank.from_file(rows_path, docs.ids, dtype=dtype)
        rows = encode_texts(
            model,
            docs.texts,
            batch_size=batch_size,
            tokenizer=tokenizer,
            show_progress_bar=True,
            desc="Encoding corpus",
            role="document",
        )
        if output_dir is not None and _is_main_process():
            rows_path.parent.mkdir(parents=True, exist_ok=True)
            with open(rows_path.with_name(rows_path.name + ".tmp"), "wb") as handle:
                np.save(handle, rows, allow_pickle=False)
            os.replace(rows_path.with_name(rows_path.name + ".tmp"), rows_path)
            meta_tmp = meta_path.with_name(meta_path.name + ".tmp")
            meta_tmp.write_text(json.dumps(key) + "\n", encoding="utf-8")
            os.replace(meta_tmp, meta_path)
    return TargetBank(torch.from_numpy(rows), docs.ids, dtype)


def _is_main_process() -> bool:
    return (
        not torch.distributed.is_available()
        or not torch.distributed.is_initialized()
        or (torch.distributed.get_rank() == 0)
    )
