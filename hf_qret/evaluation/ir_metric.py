"""hf-qret's IR metrics as a Hugging Face ``evaluate`` metric, loaded offline from the installed package.

A thin wrapper for outside users: the metric module (``hf_qret/evaluation/evaluate_metric/ir_retrieval/ir_retrieval.py``)
computes with :func:`hf_qret.evaluation.metrics.compute_metrics` (``pytrec_eval``), the same function
:class:`~hf_qret.evaluation.evaluator.RetrievalEvaluator` (the evaluation :class:`~hf_qret.training.trainer.QRetTrainer` runs and logs)
calls directly, so the numbers are the same by construction without the trainer going through ``evaluate``.

Example:
    >>> from hf_qret.evaluation.ir_metric import load_ir_metric, to_metric_inputs
    >>> ir = load_ir_metric()  # doctest: +SKIP
    >>> predictions, references = to_metric_inputs({"q1": {"d1": 2.0, "d2": 1.0}}, {"q1": {"d2": 1}})
    >>> ir.compute(predictions=predictions, references=references, metrics=["mrr@10"])  # doctest: +SKIP
    {'mrr@10': 0.5}
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

from .evaluate_metric import IR_RETRIEVAL_PATH
from .metrics import DEFAULT_METRICS, Run

__all__ = ["IR_RETRIEVAL_PATH", "load_ir_metric", "to_metric_inputs", "compute_ir_metrics"]

_CACHE: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def load_ir_metric(cache: bool = True, **kwargs: Any):
    """``evaluate.load`` of the packaged ``ir_retrieval`` metric (a local path: never downloads anything).

    Args:
        cache: Reuse the instance loaded before with the same ``kwargs`` (loading imports ``evaluate`` and
            ``datasets`` and copies the script into the modules cache once per process).
        **kwargs: Passed to ``evaluate.load`` (``keep_in_memory`` defaults to ``True``: the examples are not
            written to the evaluate cache folder).

    Returns:
        An ``evaluate.EvaluationModule``; ``compute(predictions=..., references=..., metrics=[...], prefix="")``.

    Example:
        >>> ir = load_ir_metric()
        >>> ir.compute(
        ...     predictions=[{"query_id": "q1", "doc_ids": ["d1", "d2"], "scores": [2.0, 1.0]}],
        ...     references=[{"query_id": "q1", "doc_ids": ["d2"], "relevance": [1]}],
        ...     metrics=["mrr@10"],
        ... )
        {'mrr@10': 0.5}
    """
    kwargs.setdefault("keep_in_memory", True)
    key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
    with _LOCK:
        if cache and key in _CACHE:
            return _CACHE[key]
        import evaluate

        metric = evaluate.load(IR_RETRIEVAL_PATH, **kwargs)
        if cache:
            _CACHE[key] = metric
        return metric


def to_metric_inputs(
    run: Run, qrels: Mapping[str, Mapping[str, int]], query_ids: Iterable[str] | None = None
) -> tuple[list[dict], list[dict]]:
    """Turns a run and qrels (hf-qret's / pytrec_eval's dicts) into the metric's ``predictions`` and ``references``.

    One example per judged query (of ``query_ids`` when given, in that order; else of ``qrels``); a judged query
    missing from ``run`` gets an empty prediction (it scores 0).

    Example:
        >>> predictions, references = to_metric_inputs({"q1": {"d1": 0.9}}, {"q1": {"d1": 1}, "q2": {"d3": 1}})
        >>> predictions[1]
        {'query_id': 'q2', 'doc_ids': [], 'scores': []}
    """
    selected = list(qrels) if query_ids is None else [q for q in query_ids if q in qrels]
    predictions, references = [], []
    for query_id in selected:
        docs = run.get(query_id) or {}
        judged = qrels[query_id]
        predictions.append(
            {"query_id": str(query_id), "doc_ids": [str(d) for d in docs], "scores": [float(s) for s in docs.values()]}
        )
        references.append(
            {
                "query_id": str(query_id),
                "doc_ids": [str(d) for d in judged],
                "relevance": [int(r) for r in judged.values()],
            }
        )
    return predictions, references


def compute_ir_metrics(
    run: Run,
    qrels: Mapping[str, Mapping[str, int]],
    metrics: Iterable[str] = DEFAULT_METRICS,
    query_ids: Iterable[str] | None = None,
    metric: Any = None,
) -> dict[str, float]:
    """:func:`hf_qret.evaluation.metrics.compute_metrics`, computed through the ``evaluate`` metric module.

    Args:
        run: Query id to ``{document id: score}``.
        qrels: Query id to ``{document id: relevance}``.
        metrics: Metric names (``"ndcg@10"``...).
        query_ids: Restrict the mean to these queries (a slice).
        metric: A loaded metric (default: :func:`load_ir_metric`).

    Returns:
        Metric name to its mean over the (selected) judged queries; NaN for every metric when none is selected.

    Example:
        >>> compute_ir_metrics({"q1": {"d1": 2.0, "d2": 1.0}}, {"q1": {"d2": 1}}, metrics=["mrr@10", "recall@1"])
        {'mrr@10': 0.5, 'recall@1': 0.0}
    """
    metrics = tuple(metrics)
    predictions, references = to_metric_inputs(run, qrels, query_ids)
    if not references:
        return {name: float("nan") for name in metrics}
    metric = metric if metric is not None else load_ir_metric()
    return metric.compute(predictions=predictions, references=references, metrics=list(metrics))
