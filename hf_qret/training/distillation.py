"""The run's last index step: the flat ranking distilled into the served index's codebooks
(:func:`hf_qret.index.distill.distill_codebooks`), at train end after the final refresh and before the safety net
compares the trained model with the untrained one.

The queries are the training queries, encoded by the trained query encoder, plus up to
``args.distill_doc_queries`` bank rows used as queries (a fixed random sample), so the codebooks are fitted to rank
every region of the corpus, not only the documents training touched. ``args.distill_codebooks`` is the number of
epochs (0: off). Indexes that are not 8-bit additive quantizers (``PQ``, ``OPQ..,IVF..,PQ16``) and banks sharded
across processes are left as they are, with one log line saying why.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from transformers import TrainerCallback

from ..index.distill import CodebookDistillation, distill_codebooks, distillable
from ..serving.encoder import encode_texts
from .sharded import is_sharded

__all__ = ["CodebookDistillationCallback", "distill_trainer_index", "training_query_texts"]

logger = logging.getLogger("hf_qret")


def training_query_texts(dataset: Any) -> list[str]:
    """The distinct query texts of a training dataset: its ``query`` (or ``anchor``) column, else its first column
    that is not an id column (sentence-transformers' convention: the query comes first).

    Example:
        >>> from datasets import Dataset
        >>> pairs = Dataset.from_dict({"query_id": ["q1", "q2", "q3"], "query": ["a", "b", "a"], "positive": ["x", "y", "z"]})
        >>> training_query_texts(pairs)
        ['a', 'b']
    """
    names = list(getattr(dataset, "column_names", None) or [])
    named = [n for n in ("query", "anchor") if n in names]
    texts = named or [n for n in names if not (n.endswith("_id") or n.endswith("_ids"))]
    if not texts:
        return []
    return list(dict.fromkeys(str(text) for text in dataset[texts[0]]))


def distill_trainer_index(trainer: Any) -> CodebookDistillation | str:
    """Distils the flat ranking into ``trainer.index``'s codebooks (see the module); returns the report or why not.

    Example:
        >>> distill_trainer_index(trainer).kl_last  # doctest: +SKIP
        0.031
    """
    args = trainer.args
    epochs = int(getattr(args, "distill_codebooks", 0) or 0)
    if epochs <= 0:
        return "off (distill_codebooks 0)"
    if is_sharded(trainer.bank):
        return "the bank is sharded across processes (the teacher needs every row)"
    reason = distillable(trainer.index.faiss, trainer.index.index)
    if reason:
        return reason
    trainer.ensure_index()
    vectors = trainer.bank.float32_rows()  # float32 rows by slice or index array: the bank is never copied whole
    texts = training_query_texts(trainer.train_dataset)
    model = trainer.accelerator.unwrap_model(trainer.model)
    was_training = model.training
    model.eval()
    try:
        queries = encode_texts(model, texts, role="query", tokenizer=getattr(trainer, "processing_class", None))
    finally:
        model.train(was_training)
    sample = int(min(len(vectors), max(0, int(getattr(args, "distill_doc_queries", 0) or 0))))
    if sample:
        rows = np.sort(np.random.default_rng(args.seed).choice(len(vectors), sample, replace=False))
        queries = np.concatenate([queries.reshape(-1, trainer.bank.dim), vectors[rows]])
    if len(queries) == 0:
        return "no queries to distill over"
    return distill_codebooks(
        trainer.index, vectors, queries, cosine=bool(trainer.index.normalize_decoded), epochs=epochs, seed=args.seed
    )


class CodebookDistillationCallback(TrainerCallback):
    """Runs :func:`distill_trainer_index` at train end (after the index's final refresh, before the safety net) and
    keeps what it did in :attr:`result` (``qret_config.json``'s ``index_state.codebook_distillation``).

    Example:
        >>> callback = CodebookDistillationCallback(trainer)  # doctest: +SKIP
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.result: CodebookDistillation | str | None = None

    def on_train_end(self, args, state, control, **kwargs):
        self.result = distill_trainer_index(self.trainer)
        if isinstance(self.result, str):
            logger.info("codebook distillation skipped: %s", self.result)
        self.trainer._served = None  # the served index is the mining index with its new codebooks

    def record(self) -> dict[str, Any] | str | None:
        """What :attr:`result` holds, as JSON.

        Example:
            >>> CodebookDistillationCallback(None).record() is None
            True
        """
        return self.result.record() if isinstance(self.result, CodebookDistillation) else self.result
