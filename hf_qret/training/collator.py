"""Batches of (query, positive document) pairs for :class:`~hf_qret.training.trainer.QRetTrainer`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..bank.core import TargetBank
from ..errors import ConfigError

__all__ = ["QRetDataCollator", "positives_by_query", "training_positive_rows"]


class QRetDataCollator:
    """Tokenizes the queries of a batch and maps positive document ids to bank rows.

    Each example is a mapping with ``query`` (text), ``positive_id`` (document id) and, optionally,
    ``positive_ids`` (every relevant document id of that query, to mask them out as negatives) and ``negative_ids``
    (hard-negative document ids; they join the batch's mined candidates). An example without ``positive_ids`` but
    with a ``query_id`` found in ``positives_of`` (:func:`positives_by_query` of the training rows) gets those
    positives instead; otherwise only its own positive is masked.

    The batch holds the tokenized queries plus ``positive_rows`` ``(B,)`` and ``positive_sets`` ``(B, M)``
    (``-1``-padded), and ``negative_rows`` ``(B, N)`` (``-1``-padded) when some example has hard negatives.

    Args:
        tokenize_fn: Maps a list of query texts to model inputs.
        bank: The target bank (its doc-id to row map).
        query_column: Name of the query text column.
        positive_column: Name of the positive document id column.
        positives_column: Name of the column listing all positives of the query.
        negatives_column: Name of the column listing hard-negative document ids.
        positives_of: Query id to every positive document id of that query (``None``: none).
        query_id_column: Name of the query id column ``positives_of`` is looked up with.

    Example:
        >>> collate = QRetDataCollator(model.preprocess, bank)  # doctest: +SKIP
        >>> batch = collate([{"query": "q", "positive_id": "d1", "positive_ids": ["d1", "d7"]}])  # doctest: +SKIP
    """

    def __init__(
        self,
        tokenize_fn: Callable[[list[str]], Mapping[str, Any]],
        bank: TargetBank,
        query_column: str = "query",
        positive_column: str = "positive_id",
        positives_column: str = "positive_ids",
        negatives_column: str = "negative_ids",
        positives_of: Mapping[str, Sequence[str]] | None = None,
        query_id_column: str = "query_id",
    ) -> None:
        self.tokenize_fn = tokenize_fn
        self.bank = bank
        self.query_column = query_column
        self.positive_column = positive_column
        self.positives_column = positives_column
        self.negatives_column = negatives_column
        self.positives_of = positives_of or {}
        self.query_id_column = query_id_column

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        for name in (self.query_column, self.positive_column):
            if name not in features[0]:
                raise KeyError(
                    f"training examples need a {name!r} column; got {sorted(features[0])}. "
                    "Build them with hf_qret.data.build_pairs_dataset or rename your columns."
                )
        batch = dict(self.tokenize_fn([str(f[self.query_column]) for f in features]))
        positive_rows = [self.bank.row_of(str(f[self.positive_column])) for f in features]
        sets = [self.bank.rows_of([str(d) for d in self._positives(f)]) for f in features]
        width = max(len(s) for s in sets)
        batch["positive_rows"] = torch.tensor(positive_rows, dtype=torch.long)
        batch["positive_sets"] = torch.tensor([s + [-1] * (width - len(s)) for s in sets], dtype=torch.long)
        negatives = [self.bank.rows_of([str(d) for d in f.get(self.negatives_column) or []]) for f in features]
        width = max(len(n) for n in negatives)
        if width:
            batch["negative_rows"] = torch.tensor([n + [-1] * (width - len(n)) for n in negatives], dtype=torch.long)
        return batch

    def _positives(self, feature: Mapping[str, Any]) -> Sequence[Any]:
        listed = feature.get(self.positives_column)
        if listed:
            return listed
        query_id = feature.get(self.query_id_column)
        if query_id is not None and str(query_id) in self.positives_of:
            return self.positives_of[str(query_id)]
        return [feature[self.positive_column]]


def positives_by_query(dataset: Any) -> dict[str, list[str]] | None:
    """Query id to its positive document ids, from pair rows (``query_id``, ``positive_id``): one query's rows are
    its positives (:func:`~hf_qret.data.build_pairs_dataset`). ``None`` when the rows have no ``query_id`` and
    ``positive_id`` columns, or list each query's positives themselves (``positive_ids``).

    Example:
        >>> from datasets import Dataset
        >>> positives_by_query(Dataset.from_dict({"query_id": ["q1", "q1", "q2"], "positive_id": ["a", "b", "c"]}))
        {'q1': ['a', 'b'], 'q2': ['c']}
    """
    columns = getattr(dataset, "column_names", None) or []
    if "query_id" not in columns or "positive_id" not in columns or "positive_ids" in columns:
        return None
    if not hasattr(dataset, "__len__"):  # a streamed (iterable) data set is read once, by the Trainer
        return None
    grouped: dict[str, list[str]] = {}
    for query_id, doc_id in zip(dataset["query_id"], dataset["positive_id"]):
        known = grouped.setdefault(str(query_id), [])
        if str(doc_id) not in known:
            known.append(str(doc_id))
    return grouped


def training_positive_rows(dataset: Any, bank: TargetBank) -> torch.Tensor:
    """``(num_docs,)`` mask of the bank rows that are a training positive (``positive_id`` / ``positive_ids``).

    Raises:
        ConfigError: the dataset has no ``positive_id`` column to read them from.

    Example:
        >>> training_positive_rows(trainer.train_dataset, trainer.bank).sum()  # doctest: +SKIP
    """
    mask = torch.zeros(len(bank), dtype=torch.bool)
    if dataset is None:
        return mask
    columns = getattr(dataset, "column_names", None) or []
    if "positive_id" not in columns:
        raise ConfigError(
            "bank_update='positives' moves only the rows of training positives, read from the train_dataset's "
            "'positive_id' (and 'positive_ids') columns, which it does not have; build it with build_pairs_dataset "
            "or pass --bank_update all."
        )
    doc_ids = {str(d) for d in dataset["positive_id"]}
    if "positive_ids" in columns:
        doc_ids.update(str(d) for docs in dataset["positive_ids"] for d in (docs or []))
    mask[bank.rows_of(sorted(doc_ids))] = True
    return mask
