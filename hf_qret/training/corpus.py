"""The documents of a bank built from texts: a corpus in any of the usual shapes plus the document texts of the
training data, deduplicated by text, encoded once and cached in the output folder.

``QRetTrainer(..., corpus=...)`` without ``bank=`` uses it: the corpus (a ``{doc_id: text}`` dict, a
``datasets.Dataset`` with id and text columns, or a BEIR folder) keeps its ids; a training text that is not in the
corpus gets the stable id :func:`text_doc_id` (a hash of the text, the same in every run). The encoded rows are cached
under ``OUTPUT_DIR/_qret_cache/``, keyed by the texts and the encoder, so a re-run or a resume does not encode again.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..bank.build import CACHE_DIR, BankSource, BankSpec, CacheSource, EncodeSource, FileSource, build_bank
from ..bank.core import TargetBank
from ..errors import DataError

__all__ = [
    "DocumentSet",
    "load_corpus",
    "text_doc_id",
    "encoder_fingerprint",
    "document_encode",
    "encode_bank",
    "CACHE_DIR",
    "TEXT_ID_PREFIX",
]

logger = logging.getLogger(__name__)

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
    """A cheap identity of an encoder: its class, name, parameter shapes and the first 64 MiB of its weights.

    Example:
        >>> encoder_fingerprint(model) == encoder_fingerprint(model)  # doctest: +SKIP
        True
    """
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


def document_encode(
    model: nn.Module, batch_size: int = 64, tokenizer: Any = None, precision: str = "fp32"
) -> Callable[[list[str]], np.ndarray]:
    """The function a bank's documents are encoded with: ``model``'s document embeddings (the document prompt,
    ``role="document"``), batched, with a progress bar (:func:`hf_qret.serving.encoder.encode_texts`), in
    ``precision`` (``"fp32"``, ``"bf16"`` or ``"auto"``: see :func:`hf_qret.serving.encoder.encode_autocast_dtype`).
    Its ``precision`` attribute is what that resolves to here (``"fp32"`` or ``"bf16"``), what the bank records.

    Example:
        >>> encode = document_encode(model, batch_size=128, precision="auto")  # doctest: +SKIP
        >>> encode(["a document"]).shape  # doctest: +SKIP
        (1, 384)
    """
    from ..serving.encoder import encode_autocast_dtype, encode_texts

    device = next(model.parameters()).device
    dtype = encode_autocast_dtype(precision, device)
    logger.info("bank: documents encoded in %s", "float32" if dtype is None else str(dtype).replace("torch.", ""))
    encode = partial(
        encode_texts,
        model,
        batch_size=batch_size,
        tokenizer=tokenizer,
        show_progress_bar=True,
        desc="Encoding corpus",
        role="document",
        precision=precision,
    )
    encode.precision = "fp32" if dtype is None else "bf16"  # what the bank records (TargetBank.encode_precision)
    return encode


def encode_bank(
    encode: Callable[[list[str]], Any] | None,
    texts: Sequence[str],
    ids: Sequence[str],
    *,
    dim: int | None = None,
    dtype: str = "fp32",
    init_file: str | os.PathLike | None = None,
    mmap_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_key: dict[str, Any] | None = None,
    shard: bool = False,
    init_precision: str | None = None,
) -> TargetBank:
    """The bank of ``texts``: encoded once per run, under one or several processes, or read from a file. The
    arguments choose the source of :func:`hf_qret.bank.build.build_bank`, which builds it: the cache
    (:class:`~hf_qret.bank.build.CacheSource`) with ``cache_dir`` and ``cache_key``, else an existing ``init_file``
    (:class:`~hf_qret.bank.build.FileSource`), else the texts encoded now
    (:class:`~hf_qret.bank.build.EncodeSource`, written to ``init_file`` first when one is given).

    Args:
        encode: Maps a list of texts to their ``(n, dim)`` embeddings (:func:`document_encode`); not called when
            the rows come from ``init_file`` or the cache (may then be ``None``).
        texts: The document texts, in row order.
        ids: The document ids, in row order.
        dim: The embedding dimension (needed to create ``mmap_path`` before encoding under several processes).
        dtype: Storage dtype of the bank (``"fp32"``, ``"bf16"``, ``"fp16"``).
        init_file: Read the rows from this file when it exists; else encode and write them there (float32) first.
        mmap_path: Keep the bank in this memory-mapped ``.npy`` working file instead of RAM.
        cache_dir: With ``cache_key``: the rows are cached in ``cache_dir/_qret_cache/bank_init.npy`` (and
            ``bank_init.json``, the key); a cache of the same key is read instead of encoding, any other replaced.
        cache_key: What the cached rows depend on (e.g. the documents' digest and the encoder's fingerprint).
        shard: Under several processes (``bank_sharding='rows'``), return each process's
            :class:`~hf_qret.bank.sharding.ShardedTargetBank`: it encodes (or reads) its own rows only, which are
            never gathered (not with ``cache_key`` or an ``init_file`` still to write: those need the whole bank once,
            which the trainer then splits).
        init_precision: How the rows of an existing ``init_file`` were encoded, when known (``None``: not known).

    The bank's :attr:`~hf_qret.bank.core.TargetBank.encode_precision` records what happened: ``encode``'s
    ``precision`` when the rows were encoded now or come from the cache (whose key includes the precision),
    ``init_precision`` when they were read from ``init_file``.

    Example:
        >>> bank = encode_bank(document_encode(model), ["a text"], ["d1"], dtype="fp16")  # doctest: +SKIP
    """
    source: BankSource
    if cache_dir is not None and cache_key is not None:
        source = CacheSource(encode, texts, cache_dir, cache_key)
    elif init_file and os.path.isfile(init_file):
        source = FileSource(init_file, init_precision)
    else:
        source = EncodeSource(encode, texts, init_file or None)
    return build_bank(BankSpec(ids, dtype, dim, mmap_path, shard), source)
