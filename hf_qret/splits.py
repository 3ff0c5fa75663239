"""Evaluation splits that measure what a deployment sees: queries whose relevant documents training never touched.

A random split of the queries (:func:`hf_qret.data.carve_dev_split`) leaves most held-out queries with a relevant
document that is also some training query's positive: the documents training moved. In a real deployment most
documents are never a training positive. :func:`carve_document_disjoint_split` holds out a set of *documents* instead:
the evaluation queries are those whose relevant documents are all held out, and every training pair whose positive is
held out is dropped, so no evaluation document is ever a training positive.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .errors import DataError

__all__ = ["DocumentDisjointSplit", "carve_document_disjoint_split"]


@dataclass
class DocumentDisjointSplit:
    """What :func:`carve_document_disjoint_split` returns.

    Attributes:
        train: Query id to ``{document id: relevance}`` for training: no pair names a held-out document.
        eval: The evaluation queries' judgements: every relevant document of each is held out.
        held_out_docs: The held-out documents (never a training positive).
        dropped_pairs: Training pairs removed because their document is held out.

    Example:
        >>> split = carve_document_disjoint_split({"q1": {"d1": 1}, "q2": {"d2": 1}}, doc_fraction=0.5, seed=0)
        >>> len(split.train) + len(split.eval), split.held_out_docs.isdisjoint(
        ...     {d for docs in split.train.values() for d in docs})
        (2, True)
    """

    train: dict[str, dict[str, int]]
    eval: dict[str, dict[str, int]]
    held_out_docs: set[str]
    dropped_pairs: int


def carve_document_disjoint_split(
    qrels: dict[str, dict[str, int]], doc_fraction: float = 0.2, seed: int = 13
) -> DocumentDisjointSplit:
    """Carves a document-disjoint evaluation split out of one split's qrels.

    The queries are visited in a seeded random order; a query joins the evaluation part when holding out all its
    relevant documents keeps the held-out set within ``doc_fraction`` of the relevant documents. Its documents are
    then held out. Every other query trains on its remaining positives; a query left with none is dropped. Queries
    with few relevant documents are therefore more likely to be held out (a query with 40 positives rarely fits),
    which is what lets the split work on corpora with many positives per query (NFCorpus) as well as few (SciFact).

    Args:
        qrels: Query id to ``{document id: relevance}`` (relevance > 0 is relevant).
        doc_fraction: Largest share of the relevant documents to hold out, strictly between 0 and 1.
        seed: Seed of the query order, so the split is reproducible.

    Returns:
        The training qrels, the evaluation qrels, the held-out documents and how many pairs were dropped.

    Raises:
        DataError: ``doc_fraction`` is out of range, or no query fits (no evaluation query, or none left to train).

    Example:
        >>> qrels = {f"q{i}": {f"d{i}": 1} for i in range(10)}
        >>> split = carve_document_disjoint_split(qrels, doc_fraction=0.2)
        >>> len(split.eval), len(split.train), len(split.held_out_docs)
        (2, 8, 2)
    """
    if not 0.0 < doc_fraction < 1.0:
        raise DataError(f"doc_fraction must lie strictly between 0 and 1, got {doc_fraction}.")
    relevant = {q: {d for d, s in docs.items() if s > 0} for q, docs in qrels.items()}
    all_docs = set().union(*relevant.values()) if relevant else set()
    budget = int(round(doc_fraction * len(all_docs)))
    order = sorted(q for q in relevant if relevant[q])
    random.Random(seed).shuffle(order)
    held_out: set[str] = set()
    eval_ids: set[str] = set()
    for query_id in order:
        grown = held_out | relevant[query_id]
        if len(grown) <= budget:
            held_out = grown
            eval_ids.add(query_id)
    # A query that was not chosen but whose relevant documents all ended up held out is an evaluation query too.
    eval_ids |= {q for q in order if relevant[q] <= held_out}
    train: dict[str, dict[str, int]] = {}
    dropped = 0
    for query_id, docs in qrels.items():
        if query_id in eval_ids:
            continue
        kept = {d: s for d, s in docs.items() if d not in held_out}
        dropped += sum(1 for d, s in docs.items() if d in held_out and s > 0)
        if any(s > 0 for s in kept.values()):
            train[query_id] = kept
    if not eval_ids or not train:
        raise DataError(
            f"a document-disjoint split holding out at most {doc_fraction:.0%} of {len(all_docs)} relevant documents "
            f"left {len(eval_ids)} evaluation and {len(train)} training queries; raise or lower doc_fraction."
        )
    return DocumentDisjointSplit(
        train=train, eval={q: qrels[q] for q in qrels if q in eval_ids}, held_out_docs=held_out, dropped_pairs=dropped
    )
