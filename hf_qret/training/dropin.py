"""What lets a sentence-transformers (or plain transformers) training script run under :class:`QRetTrainer`
unchanged but for the class names: text-pair data, a corpus instead of a bank, sentence-transformers evaluators.

:func:`prepare_dropin` runs in the trainer's constructor, before anything else is built:

1. **Training data** in sentence-transformers' column convention (first column the query, second the positive text,
   further columns hard-negative texts; :func:`hf_qret.text_pairs.text_columns`) becomes hf-qret's id rows
   (:func:`hf_qret.text_pairs.pairs_from_texts`); ``query`` / ``positive_id`` rows pass through.
2. **The bank**, when ``bank=`` is omitted, is built from ``corpus`` plus every document text of the training (and
   eval) data plus the documents of the evaluators' corpora, deduplicated by text, encoded once and cached in the
   output folder (:mod:`hf_qret.training.corpus`). ``bank=`` wins when given; ``corpus`` then only maps texts to its ids.
3. **Evaluators** from sentence-transformers are scored through the bank and the quantized index
   (:mod:`hf_qret.training.st_evaluation`); an evaluator type it cannot score fails here, not at the first evaluation.
4. **Corpus texts** to ship in the artifact (``corpus.jsonl``), so ``QuantizedRetriever.search(...,
   return_text=True)`` returns documents: stored when the trainer built the bank from texts, unless
   ``store_corpus_texts=False``; with ``bank=`` only when ``store_corpus_texts=True`` (and ``corpus`` covers the bank).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..bank.core import TargetBank
from ..errors import ConfigError, DataError
from ..serving.encoder import is_sentence_transformer
from ..text_pairs import pairs_from_texts, text_columns, texts_of
from .corpus import DocumentSet, document_encode, encode_bank, encoder_fingerprint, load_corpus
from .st_evaluation import adapt_evaluator, bank_resolver, check_evaluator, evaluator_documents

__all__ = ["DropIn", "prepare_dropin"]

logger = logging.getLogger(__name__)

#: Batch size of the one-time corpus encoding.
CORPUS_BATCH_SIZE = 64


@dataclass
class DropIn:
    """What :func:`prepare_dropin` hands the trainer.

    Example:
        >>> ready = prepare_dropin(model, args, pairs, corpus={"d1": "text"})  # doctest: +SKIP
        >>> isinstance(ready, DropIn)  # doctest: +SKIP
        True
    """

    bank: TargetBank
    train_dataset: Any
    eval_dataset: Any
    evaluator: Any
    #: ``{doc_id: text}`` in bank row order to ship as ``corpus.jsonl``; ``None``: ship none.
    corpus_texts: dict[str, str] | None


class _BankIds:
    """Membership in a bank's doc ids without copying them."""

    def __init__(self, bank: TargetBank) -> None:
        self.bank = bank

    def __contains__(self, doc_id: str) -> bool:
        try:
            self.bank.row_of(doc_id)
        except KeyError:
            return False
        return True


def _columns(dataset: Any):
    if dataset is None or not getattr(dataset, "column_names", None):
        return None  # no dataset, or columns unknown (a streamed IterableDataset): passed through as id rows
    return text_columns(dataset)


def prepare_dropin(
    model: nn.Module,
    args: Any,
    train_dataset: Any = None,
    *,
    bank: TargetBank | None = None,
    corpus: Any = None,
    evaluator: Any = None,
    eval_dataset: Any = None,
    tokenizer: Any = None,
) -> DropIn:
    """Resolves the bank, the datasets, the evaluator and the corpus texts of a trainer (see the module docstring).

    Args:
        model: The encoder (untrained: the bank holds its embeddings).
        args: The :class:`~hf_qret.config.QRetTrainingArguments`.
        train_dataset: Text pairs (sentence-transformers' convention) or ``query`` / ``positive_id`` rows.
        bank: A ready bank; built from ``corpus`` and the data's texts when ``None``.
        corpus: ``{doc_id: text}``, a ``datasets.Dataset`` with id/text columns or a BEIR folder.
        evaluator: An hf-qret or sentence-transformers retrieval evaluator.
        eval_dataset: Like ``train_dataset``, for the eval loss.
        tokenizer: A transformers encoder's tokenizer (``processing_class``).

    Raises:
        ConfigError: Neither ``bank`` nor ``corpus`` nor text pairs; an evaluator it cannot score.
        DataError: Text pairs whose texts are not in a given ``bank``.

    Example:
        >>> ready = prepare_dropin(model, args, pairs, corpus={"d1": "text"})  # doctest: +SKIP
        >>> ready.bank.doc_ids  # doctest: +SKIP
        ['d1', 'text-...']
    """
    check_evaluator(evaluator)
    if tokenizer is not None and is_sentence_transformer(model):
        tokenizer = None
    train_columns, eval_columns = _columns(train_dataset), _columns(eval_dataset)
    text_data = [(d, c) for d, c in ((train_dataset, train_columns), (eval_dataset, eval_columns)) if c is not None]
    store = getattr(args, "store_corpus_texts", None)

    if bank is None:
        if corpus is None and not text_data:
            raise ConfigError(
                "QRetTrainer needs the documents: pass corpus= (a {doc_id: text} dict, a datasets.Dataset or a BEIR "
                "folder) and/or text-pair training data, or a ready bank=TargetBank.from_encoder(...)."
            )
        docs = DocumentSet(load_corpus(corpus) if corpus is not None else None)
        in_corpus = len(docs)
        for dataset, columns in text_data:
            docs.add_texts(texts_of(dataset, columns))
        if docs.added and corpus is not None:
            logger.warning(
                "bank: %d document text(s) of the training data are not in the corpus (compared stripped, exactly); "
                "they were added under hash ids (text-...). If they should be corpus documents, build the pairs "
                "from the corpus texts.",
                docs.added,
            )
        extra = 0
        for doc_id, text in evaluator_documents(evaluator).items():
            if doc_id not in docs and docs.id_of(text) is None:
                docs.add(doc_id, text)
                extra += 1
        if extra:
            logger.info("bank: added %d document(s) of the evaluator's corpus that are not in the corpus", extra)
        logger.info("bank: %d documents (%d from the corpus)", len(docs), in_corpus)
        precision = getattr(args, "bank_encode_precision", "auto")
        getattr(args, "device", None)  # forms the process group: under several processes each encodes a share
        bank = encode_bank(
            document_encode(model, CORPUS_BATCH_SIZE, tokenizer, precision=precision),
            docs.texts,
            docs.ids,
            dtype=args.bank_dtype,
            cache_dir=args.output_dir,
            cache_key={
                "num_docs": len(docs),
                "documents": docs.digest(),
                "encoder": encoder_fingerprint(model, tokenizer),
                "precision": precision,
            },
        )
        members: Any = docs
        id_of_text = docs.id_of
        doc_id_of = docs.id_of
        corpus_texts = docs.as_dict() if store is not False else None
    else:
        known = DocumentSet(load_corpus(corpus)) if corpus is not None else None
        members = _BankIds(bank)
        id_of_text = known.id_of if known is not None else None
        if text_data and known is None:
            raise ConfigError(
                "the training data holds texts, but with bank= the trainer needs corpus= ({doc_id: text} of the "
                "bank's documents) to map them to bank rows; or leave bank= out and let it build the bank."
            )

        def doc_id_of(text: str) -> str:
            doc_id = known.id_of(text)
            if doc_id is None or doc_id not in members:
                where = "the corpus" if doc_id is None else f"the bank (corpus id {doc_id!r})"
                raise DataError(
                    f"the training text {text[:80]!r} is not in {where}; with bank= every positive and negative "
                    "text must be a bank document. Leave bank= out to build the bank from corpus= and the data."
                )
            return doc_id

        corpus_texts = None
        if store:
            if known is None:
                raise ConfigError("store_corpus_texts=True with bank= needs corpus= (the texts of the bank's rows).")
            missing = [d for d in bank.doc_ids if d not in known]
            if missing:
                raise ConfigError(
                    f"store_corpus_texts=True: {len(missing)} bank document(s) have no text in corpus= (first: "
                    f"{missing[0]!r}); pass the corpus the bank was built from."
                )
            corpus_texts = {d: known.text(d) for d in bank.doc_ids}

    if train_columns is not None:
        train_dataset = pairs_from_texts(train_dataset, train_columns, doc_id_of)
    if eval_columns is not None:
        eval_dataset = pairs_from_texts(eval_dataset, eval_columns, doc_id_of)
    evaluator = adapt_evaluator(evaluator, bank_resolver(members, id_of_text), model)
    return DropIn(bank, train_dataset, eval_dataset, evaluator, corpus_texts)


def write_corpus_texts(output_dir: Any, texts: dict[str, str]) -> None:
    """Writes ``OUTPUT_DIR/corpus.jsonl`` (``{"_id", "text"}`` lines in bank row order), atomically, no pickle.

    Example:
        >>> write_corpus_texts("runs/out", {"d1": "a text"})  # doctest: +SKIP
    """
    import json
    import os
    from pathlib import Path

    target = Path(output_dir) / "corpus.jsonl"
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for doc_id, text in texts.items():
            handle.write(json.dumps({"_id": doc_id, "text": text}, ensure_ascii=False) + "\n")
    os.replace(tmp, target)
