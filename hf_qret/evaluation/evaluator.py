"""Retrieval evaluation of a query encoder against the flat bank and the quantized index."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from torch import nn

from ..bank.core import TargetBank
from ..index.auto import faiss_sees_gpu
from ..index.core import QuantizedIndex
from ..index.exact import ExactSearch
from ..serving.encoder import encode_texts
from .metrics import DEFAULT_METRICS, compute_metrics

__all__ = ["RetrievalEvaluator", "search_run"]


def _run_from(scores: np.ndarray, rows: np.ndarray, query_ids: list[str], doc_ids: list[str]) -> dict:
    run: dict[str, dict[str, float]] = {}
    for i, query_id in enumerate(query_ids):
        run[query_id] = {doc_ids[r]: float(s) for s, r in zip(scores[i], rows[i]) if r >= 0}
    return run


def search_run(
    query_embeddings: np.ndarray,
    query_ids: list[str],
    searcher: QuantizedIndex | ExactSearch,
    doc_ids: list[str],
    k: int = 100,
) -> dict[str, dict[str, float]]:
    """Top-``k`` run (``{query id: {doc id: score}}``) of ``searcher`` for the given query embeddings.

    Example:
        >>> import numpy as np
        >>> from hf_qret.index.core import QuantizedIndex
        >>> index = QuantizedIndex(4, "Flat", use_gpu=False)
        >>> index.build(np.eye(4, dtype="float32"))
        >>> search_run(np.eye(4, dtype="float32")[:1], ["q1"], index, ["d0", "d1", "d2", "d3"], k=1)
        {'q1': {'d0': 1.0}}
    """
    scores, rows = searcher.search(query_embeddings, k)
    return _run_from(scores, rows, query_ids, doc_ids)


class RetrievalEvaluator:
    """Encodes queries with the model and scores retrieval from the flat bank and from the quantized index.

    Queries are encoded as training and serving encode them (:func:`hf_qret.serving.encoder.encode_texts` with
    ``role="query"``): with the model's query prompt (sentence-transformers' ``model.prompts``, as ``encode_query``
    picks it), so the metric scores the query encoding that is trained and served.

    Metric keys are ``flat_<metric>`` and ``quantized_<metric>`` (``ndcg@10``, ``recall@100``, ``mrr@10``). When
    ``seen_doc_ids`` (the training positives) is given, every metric is also reported on the queries with at least
    one seen relevant document (``..._seen``) and on the rest (``..._unseen``).

    Args:
        queries: Query id to text.
        qrels: Query id to ``{doc id: relevance}``.
        batch_size: Query encoding batch size.
        k: Depth of the retrieved run (at least the largest metric cutoff).
        seen_doc_ids: Documents that were training positives, for the seen/unseen slices.
        name: Optional prefix of the metric keys.

    Example:
        >>> evaluator = RetrievalEvaluator(dev.queries, dev.qrels)  # doctest: +SKIP
        >>> evaluator(model, bank, index)["quantized_ndcg@10"]  # doctest: +SKIP
        0.71
    """

    def __init__(
        self,
        queries: Mapping[str, str],
        qrels: Mapping[str, Mapping[str, int]],
        batch_size: int = 64,
        k: int = 100,
        metrics: Iterable[str] = DEFAULT_METRICS,
        seen_doc_ids: Iterable[str] | None = None,
        name: str = "",
    ) -> None:
        self.query_ids = [q for q in qrels if q in queries]
        self.queries = [queries[q] for q in self.query_ids]
        self.qrels = {q: dict(qrels[q]) for q in self.query_ids}
        self.batch_size = batch_size
        self.k = k
        self.metrics = tuple(metrics)
        self.name = name
        self.slices: dict[str, list[str]] = {}
        if seen_doc_ids is not None:
            seen = set(seen_doc_ids)
            is_seen = {q: any(d in seen and s > 0 for d, s in self.qrels[q].items()) for q in self.query_ids}
            self.slices = {
                "seen": [q for q in self.query_ids if is_seen[q]],
                "unseen": [q for q in self.query_ids if not is_seen[q]],
            }

    def runs(
        self, model: nn.Module, bank: TargetBank, index: QuantizedIndex, tokenizer: Any = None
    ) -> dict[str, dict[str, dict[str, float]]]:
        """The flat and quantized runs: ``{"flat": run, "quantized": run}``."""
        query_embeddings = encode_texts(
            model, self.queries, batch_size=self.batch_size, tokenizer=tokenizer, role="query"
        )
        rows = bank.local_float32_rows()  # a sharded bank: this shard's rows, for its shard of the flat index
        if hasattr(index, "flat_index"):  # a sharded index (bank_sharding='rows'): a flat index over every shard
            flat = index.flat_index(rows)
        elif index.use_gpu is not False and faiss_sees_gpu():  # a GPU flat index searches there
            flat = QuantizedIndex(bank.dim, "Flat", use_gpu=index.use_gpu)
            flat.add(rows)
        else:  # the bank's own rows, chunk by chunk: an IndexFlat would hold a second copy of the bank
            flat = ExactSearch(rows)
        return {
            "flat": search_run(query_embeddings, self.query_ids, flat, bank.doc_ids, self.k),
            "quantized": search_run(query_embeddings, self.query_ids, index, bank.doc_ids, self.k),
        }

    def score(self, runs: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, float]:
        """Flattened metrics (``flat_ndcg@10``...) of the runs, with seen/unseen slices when configured.

        Computed with :func:`~hf_qret.evaluation.metrics.compute_metrics` (``pytrec_eval``), the one metrics path; the
        ``evaluate`` module :mod:`hf_qret.evaluation.ir_metric` wraps the same function for outside users.
        """
        prefix = f"{self.name}_" if self.name else ""
        out: dict[str, float] = {}
        for kind, run in runs.items():
            for metric, value in compute_metrics(run, self.qrels, self.metrics).items():
                out[f"{prefix}{kind}_{metric}"] = value
            for slice_name, query_ids in self.slices.items():
                for metric, value in compute_metrics(run, self.qrels, self.metrics, query_ids).items():
                    out[f"{prefix}{kind}_{metric}_{slice_name}"] = value
        return out

    def __call__(
        self, model: nn.Module, bank: TargetBank, index: QuantizedIndex, tokenizer: Any = None
    ) -> dict[str, float]:
        """Encodes, searches both indexes and returns the metrics."""
        return self.score(self.runs(model, bank, index, tokenizer))
