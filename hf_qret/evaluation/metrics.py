"""Information-retrieval metrics (nDCG@10, Recall@100, MRR@10) computed with ``pytrec_eval``.

``pytrec_eval`` wraps TREC's own ``trec_eval``, the reference implementation BEIR uses. MRR@10 is the reciprocal
rank of the first relevant document within the top 10 (``recip_rank`` over the run cut at 10), as BEIR reports it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_METRICS", "compute_metrics", "per_query_metrics", "write_trec_run", "Run"]

#: ``{query id: {document id: score}}``
Run = Mapping[str, Mapping[str, float]]

DEFAULT_METRICS = ("ndcg@10", "recall@100", "mrr@10")

_TREC_NAMES = {"ndcg": "ndcg_cut", "recall": "recall", "precision": "P", "map": "map_cut"}


def _ranked(docs: Mapping[str, float]) -> list[tuple[str, float]]:
    # trec_eval's order: score descending, ties broken by document id descending.
    return sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)


def _cut(run: Run, k: int) -> dict[str, dict[str, float]]:
    cut = {}
    for query_id, docs in run.items():
        top = _ranked(docs)[:k]
        cut[query_id] = {doc_id: float(score) for doc_id, score in top}
    return cut


def per_query_metrics(
    run: Run, qrels: Mapping[str, Mapping[str, int]], metrics: Iterable[str] = DEFAULT_METRICS
) -> dict[str, dict[str, float]]:
    """Scores every judged query of ``run``.

    Args:
        run: Query id to ``{document id: score}``; higher scores rank first.
        qrels: Query id to ``{document id: relevance}``.
        metrics: Names like ``"ndcg@10"``, ``"recall@100"``, ``"mrr@10"``, ``"precision@5"``, ``"map@100"``.

    Returns:
        Metric name to ``{query id: value}``. Judged queries missing from ``run`` score 0.

    Example:
        >>> run = {"q1": {"d1": 2.0, "d2": 1.0}, "q2": {"d3": 1.0}}
        >>> per_query_metrics(run, {"q1": {"d2": 1}, "q2": {"d3": 1}}, metrics=["mrr@10"])
        {'mrr@10': {'q1': 0.5, 'q2': 1.0}}
    """
    import pytrec_eval

    qrels = {q: {d: int(s) for d, s in docs.items()} for q, docs in qrels.items()}
    run = {q: {d: float(s) for d, s in docs.items()} for q, docs in run.items() if q in qrels}
    out: dict[str, dict[str, float]] = {}
    for name in metrics:
        base, _, k_text = name.partition("@")
        if not k_text.isdigit():
            raise ValueError(f"metric {name!r} needs a cutoff, like 'ndcg@10'.")
        k = int(k_text)
        if base == "mrr":
            evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"})
            scores = evaluator.evaluate(_cut(run, k))
            key = "recip_rank"
        elif base in _TREC_NAMES:
            trec = f"{_TREC_NAMES[base]}.{k}"
            evaluator = pytrec_eval.RelevanceEvaluator(qrels, {trec})
            scores = evaluator.evaluate(run)
            key = f"{_TREC_NAMES[base]}_{k}"
        else:
            raise ValueError(f"unknown metric {name!r}; use ndcg, recall, mrr, precision or map with '@k'.")
        out[name] = {q: float(scores[q][key]) if q in scores else 0.0 for q in qrels}
    return out


def compute_metrics(
    run: Run,
    qrels: Mapping[str, Mapping[str, int]],
    metrics: Iterable[str] = DEFAULT_METRICS,
    query_ids: Iterable[str] | None = None,
) -> dict[str, float]:
    """Mean of each metric over the judged queries (or over ``query_ids``).

    Example:
        >>> run = {"q1": {"d1": 2.0, "d2": 1.0}}
        >>> compute_metrics(run, {"q1": {"d2": 1}})["mrr@10"]
        0.5
    """
    per_query = per_query_metrics(run, qrels, metrics)
    selected = list(qrels) if query_ids is None else [q for q in query_ids if q in qrels]
    return {
        name: (float(np.mean([values[q] for q in selected])) if selected else float("nan"))
        for name, values in per_query.items()
    }


def write_trec_run(run: Run, path: str | os.PathLike, tag: str = "hf-qret") -> None:
    """Writes a run in TREC format (``qid Q0 docid rank score tag``), atomically.

    Scores are written with full (round-trip) precision, so evaluating the file gives exactly the in-memory metrics.

    Example:
        >>> import pathlib, tempfile; path = pathlib.Path(tempfile.mkdtemp(), "run.trec")
        >>> write_trec_run({"q1": {"d1": 2.0, "d2": 1.0}}, path)
        >>> print(path.read_text(), end="")
        q1 Q0 d1 1 2.0 hf-qret
        q1 Q0 d2 2 1.0 hf-qret
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for query_id, docs in run.items():
            for rank, (doc_id, score) in enumerate(_ranked(docs), start=1):
                handle.write(f"{query_id} Q0 {doc_id} {rank} {float(score)!r} {tag}\n")
    os.replace(tmp, path)
