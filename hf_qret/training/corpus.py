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
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..bank.core import TargetBank
from ..bank.precomputed import check_texts
from ..errors import DataError
from .distributed import barrier, encode_corpus, process_rank, world_size

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


def _cache_paths(output_dir: str | os.PathLike) -> tuple[Path, Path]:
    folder = Path(output_dir) / CACHE_DIR
    return folder / "bank_init.npy", folder / "bank_init.json"


def _cache_matches(rows_path: Path, meta_path: Path, key: dict[str, Any]) -> bool:
    if not (rows_path.is_file() and meta_path.is_file()):
        return False
    try:
        return json.loads(meta_path.read_text(encoding="utf-8")) == key
    except (OSError, json.JSONDecodeError):
        return False


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
    """The bank of ``texts``: encoded once per run, under one or several processes, or read from a file.

    Under several processes (``torchrun``, ``accelerate launch``) the texts are split across the processes
    (:func:`hf_qret.training.distributed.encode_corpus`), and every file (the init file, the cache, the memory-mapped
    working file) is written by one process while the others wait, then open it.

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
    cached = cache_dir is not None and cache_key is not None
    from_file = not cached and bool(init_file) and os.path.isfile(init_file)
    if not (cached or from_file):  # rows from precomputed embeddings (text None) cannot be encoded
        check_texts(texts, ids)
    bank = _make_bank(encode, texts, ids, dim, dtype, init_file, mmap_path, cache_dir, cache_key, shard)
    bank.encode_precision = init_precision if from_file else getattr(encode, "precision", None)
    return bank


def _make_bank(
    encode: Any,
    texts: Sequence[str],
    ids: Sequence[str],
    dim: int | None,
    dtype: str,
    init_file: Any,
    mmap_path: Any,
    cache_dir: Any,
    cache_key: dict[str, Any] | None,
    shard: bool,
) -> TargetBank:
    """:func:`encode_bank`'s rows: from the cache, the init file, or encoded (each process its share)."""
    if cache_dir is not None and cache_key is not None:
        rows_path, meta_path = _cache_paths(cache_dir)
        if _cache_matches(rows_path, meta_path, cache_key):
            logger.info("bank: loading the %d encoded documents cached in %s", len(ids), rows_path)
            return _bank_from_file(rows_path, ids, dtype, mmap_path)
        bank = _encoded_bank(encode, texts, ids, dim, dtype, rows_path, mmap_path)
        if process_rank() == 0:
            meta_tmp = meta_path.with_name(meta_path.name + ".tmp")
            meta_tmp.write_text(json.dumps(cache_key) + "\n", encoding="utf-8")
            os.replace(meta_tmp, meta_path)
        return bank
    sharded = shard and world_size() > 1 and mmap_path is None
    if init_file and os.path.isfile(init_file):
        return (
            _sharded_from_file(init_file, ids, dtype) if sharded else _bank_from_file(init_file, ids, dtype, mmap_path)
        )
    if sharded and not init_file:
        from ..bank.collectives import ShardLayout
        from ..bank.sharding import ShardedTargetBank

        rows = encode_corpus(encode, texts, local=True)  # this process's rows: the whole bank is never in one place
        return ShardedTargetBank(torch.from_numpy(rows), ids, ShardLayout.create(len(ids)), dtype)
    return _encoded_bank(encode, texts, ids, dim, dtype, init_file, mmap_path)


def _sharded_from_file(path: str | os.PathLike, ids: Sequence[str], dtype: str) -> TargetBank:
    """This process's rows of a saved bank file, read chunk by chunk."""
    from ..bank.collectives import ShardLayout
    from ..bank.sharding import ShardedTargetBank
    from ..bank.storage import read_bank_chunks

    shape, _, chunks = read_bank_chunks(Path(path))
    del chunks
    layout = ShardLayout.create(len(ids))
    bank = ShardedTargetBank.zeros(layout, shape[1], ids, dtype)
    bank.load_rows_from_file(path)
    return bank


def _from_main(make: Callable[[], TargetBank], mmap_path: Path, ids: Sequence[str], dtype: str) -> TargetBank:
    """``make()`` on the main process (which writes ``mmap_path``); the others open the file it wrote."""
    main = process_rank() == 0
    bank = make() if main else None
    barrier()
    return bank if main else TargetBank.open_mmap(mmap_path, ids, dtype)


def _bank_from_file(path: str | os.PathLike, ids: Sequence[str], dtype: str, mmap_path: Any) -> TargetBank:
    """The bank read from a file of rows; into one memory-mapped working file written by the main process."""
    if mmap_path is None:
        return TargetBank.from_file(path, ids, dtype=dtype)
    if world_size() == 1:
        return TargetBank.from_file(path, ids, dtype=dtype, mmap_path=mmap_path)
    return _from_main(lambda: TargetBank.from_file(path, ids, dtype=dtype, mmap_path=mmap_path), mmap_path, ids, dtype)


def _encoded_bank(
    encode: Any, texts: Sequence[str], ids: Sequence[str], dim: int | None, dtype: str, init_file: Any, mmap_path: Any
) -> TargetBank:
    """Encodes ``texts`` once into the bank (written to ``init_file`` first, in float32, when given)."""
    if world_size() == 1:  # one process: stream the encoding straight into the bank
        if not init_file:
            return TargetBank.from_encoder(encode, texts, ids, dtype, mmap_path)
        bank = TargetBank.from_encoder(encode, texts, ids)  # the init file keeps float32 rows
        Path(init_file).parent.mkdir(parents=True, exist_ok=True)
        bank.save(init_file)
        if dtype == "fp32" and mmap_path is None:
            return bank
        del bank
        return TargetBank.from_file(init_file, ids, dtype=dtype, mmap_path=mmap_path)
    if not init_file and mmap_path is not None:
        # the main process creates the (sparse, zero) file; each process writes the rows it encoded into it
        bank = _from_main(lambda: TargetBank.create_mmap(mmap_path, len(ids), dim, ids, dtype), mmap_path, ids, dtype)
        encode_corpus(encode, texts, write=lambda start, rows: (bank.write_rows(start, rows), bank.flush()))
        bank.mark_all_changed()  # on every process, as with one process
        return bank
    rows = torch.from_numpy(encode_corpus(encode, texts))
    if not init_file:
        return TargetBank(rows, ids, dtype)
    if process_rank() == 0:
        Path(init_file).parent.mkdir(parents=True, exist_ok=True)
        TargetBank(rows, ids).save(init_file)
    barrier()
    if mmap_path is None:
        return TargetBank(rows, ids, dtype)
    del rows
    return _bank_from_file(init_file, ids, dtype, mmap_path)
