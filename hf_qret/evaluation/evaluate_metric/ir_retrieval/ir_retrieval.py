"""IR retrieval metrics (nDCG@k, Recall@k, MRR@k, P@k, MAP@k) as a Hugging Face ``evaluate`` metric.

The numbers come from :func:`hf_qret.evaluation.metrics.compute_metrics` (``pytrec_eval``, TREC's own ``trec_eval``), the same
function hf-qret's :class:`~hf_qret.evaluation.evaluator.RetrievalEvaluator` uses, so they are identical to the metrics logged
during training. Load it offline from the installed package::

    import evaluate
    from hf_qret.evaluation.evaluate_metric import IR_RETRIEVAL_PATH
    ir = evaluate.load(IR_RETRIEVAL_PATH)
"""

import datasets
import evaluate

from hf_qret.evaluation.metrics import DEFAULT_METRICS, compute_metrics

_CITATION = """\
@inproceedings{VanGysel2018pytreceval,
  title = {Pytrec\\_eval: An Extremely Fast Python Interface to trec\\_eval},
  author = {Van Gysel, Christophe and de Rijke, Maarten},
  booktitle = {SIGIR},
  year = {2018},
}
"""

_DESCRIPTION = """\
Ranked-retrieval metrics of a run against relevance judgements (qrels), computed with pytrec_eval. One example per
query: the prediction is the query's retrieved documents with their scores (higher ranks first; ties are broken by
document id, as trec_eval does), the reference is the query's judged documents with their relevance. Each metric is
the mean over the references' queries; a judged query with no retrieved document scores 0. MRR@k is the reciprocal
rank of the first relevant document within the top k (BEIR's definition).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one dict per query, ``{"query_id": str, "doc_ids": list[str], "scores": list[float]}``.
    references: one dict per query, ``{"query_id": str, "doc_ids": list[str], "relevance": list[int]}``.
        Predictions and references are matched by ``query_id``, not by position.
    metrics: metric names with a cutoff (default ``["ndcg@10", "recall@100", "mrr@10"]``); bases: ``ndcg``,
        ``recall``, ``mrr``, ``precision``, ``map``.
    prefix: a string put before every key of the result (e.g. ``"quantized_"``).
Returns:
    ``{metric name: mean over the references' queries}``.
Examples:
    >>> import evaluate
    >>> from hf_qret.evaluation.evaluate_metric import IR_RETRIEVAL_PATH
    >>> ir = evaluate.load(IR_RETRIEVAL_PATH)
    >>> ir.compute(
    ...     predictions=[{"query_id": "q1", "doc_ids": ["d1", "d2"], "scores": [2.0, 1.0]}],
    ...     references=[{"query_id": "q1", "doc_ids": ["d2"], "relevance": [1]}],
    ...     metrics=["mrr@10"],
    ... )
    {'mrr@10': 0.5}
"""

_FEATURES = datasets.Features(
    {
        "predictions": {
            "query_id": datasets.Value("string"),
            "doc_ids": datasets.Sequence(datasets.Value("string")),
            "scores": datasets.Sequence(datasets.Value("float64")),
        },
        "references": {
            "query_id": datasets.Value("string"),
            "doc_ids": datasets.Sequence(datasets.Value("string")),
            "relevance": datasets.Sequence(datasets.Value("int64")),
        },
    }
)


def _as_mapping(examples, value_key):
    out = {}
    for example in examples:
        docs = out.setdefault(str(example["query_id"]), {})
        doc_ids, values = list(example["doc_ids"]), list(example[value_key])
        if len(doc_ids) != len(values):
            raise ValueError(
                f"query {example['query_id']!r}: {len(doc_ids)} doc_ids but {len(values)} {value_key}; "
                "give one value per document."
            )
        docs.update(zip(doc_ids, values))
    return out


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class IrRetrieval(evaluate.Metric):
    """nDCG / Recall / MRR / P / MAP at cutoffs, computed by ``hf_qret.evaluation.metrics.compute_metrics`` (pytrec_eval)."""

    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=_FEATURES,
            codebase_urls=["https://github.com/cvangysel/pytrec_eval"],
            reference_urls=["https://trec.nist.gov/trec_eval/"],
        )

    def _compute(self, predictions, references, metrics=None, prefix=""):
        run = _as_mapping(predictions, "scores")
        qrels = {q: {d: int(r) for d, r in docs.items()} for q, docs in _as_mapping(references, "relevance").items()}
        scores = compute_metrics(run, qrels, tuple(metrics) if metrics else DEFAULT_METRICS)
        return {f"{prefix}{name}": value for name, value in scores.items()}
