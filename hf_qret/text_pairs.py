"""Training data in sentence-transformers' text-pair convention, rewritten into hf-qret's id rows.

sentence-transformers reads a training dataset's columns by position: the first is the query (anchor), the second the
positive, every further column a hard negative; ``score``/``scores`` columns are labels. :func:`text_columns` names
them, :func:`pairs_from_texts` rewrites the rows into ``query`` / ``positive_id`` rows (the id rows of
:func:`hf_qret.data.build_pairs_dataset`) and :func:`texts_of` lists the document texts a bank is built from.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .errors import DataError

__all__ = ["TextColumns", "text_columns", "pairs_from_texts", "texts_of"]

#: Columns sentence-transformers treats as labels, not inputs (``mine_hard_negatives(output_scores=True)`` adds
#: ``scores``); they are ignored.
LABEL_COLUMNS = ("score", "scores")
#: Label columns of the *labeled* formats (``labeled-pair`` / ``labeled-list``): their rows are not (query, positive)
#: pairs, so they are refused.
LABELED_COLUMNS = ("label", "labels")
#: The columns of hf-qret's own id rows (:func:`hf_qret.data.build_pairs_dataset`).
ID_COLUMNS = ("query", "positive_id")


@dataclass(frozen=True)
class TextColumns:
    """Which columns of a text-pair dataset are the query, the positive and the hard negatives.

    Example:
        >>> TextColumns("anchor", "positive", ("negative",)).negatives
        ('negative',)
    """

    query: str
    positive: str
    negatives: tuple[str, ...] = ()


def text_columns(dataset) -> TextColumns | None:
    """The sentence-transformers column convention of ``dataset``, or ``None`` for hf-qret's id rows.

    sentence-transformers reads columns by position: the first is the query (anchor), the second the positive, every
    further column a hard negative (``sentence_transformers.util.mine_hard_negatives`` writes ``negative`` or
    ``negative_1`` ... ``negative_n``); ``score``/``scores`` columns are labels and are ignored. A dataset with
    ``query`` and ``positive_id`` columns is hf-qret's own format (:func:`hf_qret.data.build_pairs_dataset`) and
    returns ``None``.

    Raises:
        DataError: Fewer than two text columns, or a labeled format (``label``/``labels`` column).

    Example:
        >>> from datasets import Dataset
        >>> text_columns(Dataset.from_dict({"anchor": ["q"], "positive": ["p"], "negative": ["n"]}))
        TextColumns(query='anchor', positive='positive', negatives=('negative',))
    """
    columns = list(getattr(dataset, "column_names", None) or [])
    if all(name in columns for name in ID_COLUMNS):
        return None
    labeled = [c for c in columns if c in LABELED_COLUMNS]
    if labeled:
        raise DataError(
            f"the training data has a {labeled[0]!r} column: a labeled format (e.g. mine_hard_negatives' "
            "'labeled-pair' / 'labeled-list'), whose rows are not (query, positive) pairs. Use output_format="
            "'triplet' or 'n-tuple' (query, positive, negatives...) or rows of 'query' and 'positive_id'."
        )
    inputs = [c for c in columns if c not in LABEL_COLUMNS]
    if len(inputs) < 2:
        raise DataError(
            f"the training data needs a query text and a positive text column (sentence-transformers' convention: "
            f"first column the query, second the positive, further columns hard negatives) or 'query' and "
            f"'positive_id' columns; it has {columns}."
        )
    return TextColumns(inputs[0], inputs[1], tuple(inputs[2:]))


def _texts(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None]
    return [str(value)]


def pairs_from_texts(dataset, columns: TextColumns, doc_id_of) -> Any:
    """Rewrites text-pair rows into hf-qret's id rows.

    Every row becomes ``query`` (the query text), ``positive_id`` (the id of its positive text), ``positive_ids``
    (the ids of every positive of the same query text in the data set, so another positive of the query is never
    its negative) and ``negative_ids`` (the ids of its hard-negative texts; they join the mined candidates).

    Args:
        dataset: A ``datasets.Dataset`` in sentence-transformers' column convention.
        columns: Its columns (:func:`text_columns`).
        doc_id_of: Maps a document text to its bank id.

    Raises:
        DataError: A row has an empty query or positive.

    Example:
        >>> from datasets import Dataset
        >>> rows = Dataset.from_dict({"anchor": ["q", "q"], "positive": ["a", "b"]})
        >>> pairs = pairs_from_texts(rows, text_columns(rows), {"a": "1", "b": "2"}.__getitem__)
        >>> pairs[0]["positive_id"], pairs[0]["positive_ids"]
        ('1', ['1', '2'])
    """
    from datasets import Dataset

    queries = [str(q) if q is not None else "" for q in dataset[columns.query]]
    positives = dataset[columns.positive]
    negative_columns = [dataset[name] for name in columns.negatives]
    rows: dict[str, list] = {"query": [], "positive_id": [], "positive_ids": [], "negative_ids": []}
    by_query: dict[str, list[str]] = {}
    for i, (query, positive) in enumerate(zip(queries, positives)):
        if not query.strip():
            raise DataError(f"training row {i}: the query ({columns.query!r}) is empty; remove the row or fill it.")
        texts = _texts(positive)
        if not texts or not texts[0].strip():
            raise DataError(
                f"training row {i}: the positive ({columns.positive!r}) is empty; remove the row or fill it."
            )
        doc_id = doc_id_of(texts[0])
        known = by_query.setdefault(query, [])
        if doc_id not in known:
            known.append(doc_id)
        rows["query"].append(query)
        rows["positive_id"].append(doc_id)
        negatives = [doc_id_of(t) for column in negative_columns for t in _texts(column[i]) if t.strip()]
        rows["negative_ids"].append(list(dict.fromkeys(negatives)))
    rows["positive_ids"] = [by_query[q] for q in rows["query"]]
    return Dataset.from_dict(rows)


def texts_of(dataset, columns: TextColumns) -> Iterator[str]:
    """Every document text of a text-pair dataset: positives, then hard negatives, row by row.

    Example:
        >>> from datasets import Dataset
        >>> rows = Dataset.from_dict({"anchor": ["q"], "positive": ["p"], "negative": ["n"]})
        >>> list(texts_of(rows, text_columns(rows)))
        ['p', 'n']
    """
    names = (columns.positive, *columns.negatives)
    for column in (dataset[name] for name in names):
        for value in column:
            for text in _texts(value):
                if text.strip():
                    yield text
