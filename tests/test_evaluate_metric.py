"""The IR metrics as an ``evaluate`` metric module: loads offline from the package, equals hf_qret.evaluation.metrics (pytrec_eval)
and the numbers the trainer's retrieval evaluation logs."""

from __future__ import annotations

import math
import random

import pytest
from test_trainer import make_trainer

from hf_qret import RetrievalEvaluationCallback, RetrievalEvaluator, load_beir
from hf_qret.evaluation.evaluate_metric import IR_RETRIEVAL_PATH
from hf_qret.evaluation.ir_metric import compute_ir_metrics, load_ir_metric, to_metric_inputs
from hf_qret.evaluation.metrics import compute_metrics

ALL_METRICS = ["ndcg@10", "recall@100", "mrr@10", "precision@5", "map@100", "ndcg@3"]


def random_run_and_qrels(seed: int = 0):
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(400)]
    run, qrels = {}, {}
    for q in range(50):
        query_id = f"q{q}"
        qrels[query_id] = {d: rng.choice([1, 1, 2, 0]) for d in rng.sample(docs, rng.randint(1, 4))}
        if q % 10 == 9:
            continue  # judged but not retrieved: scores 0
        retrieved = rng.sample(docs, 120)
        scores = [round(rng.random(), 2) for _ in retrieved]  # rounded: many ties, broken by doc id
        run[query_id] = dict(zip(retrieved, scores))
        if q % 4 == 0:  # make some hits
            for doc_id in list(qrels[query_id])[:2]:
                run[query_id][doc_id] = rng.random()
    run["unjudged"] = {"d1": 1.0}
    return run, qrels


def test_evaluate_load_offline_equals_compute_metrics(monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    run, qrels = random_run_and_qrels()
    metric = evaluate.load(IR_RETRIEVAL_PATH, keep_in_memory=True)
    predictions, references = to_metric_inputs(run, qrels)
    assert len(predictions) == len(references) == 50
    got = metric.compute(predictions=predictions, references=references, metrics=ALL_METRICS)
    assert got == compute_metrics(run, qrels, ALL_METRICS)  # exactly: the same implementation
    assert 0 < got["ndcg@10"] < 1 and 0 < got["mrr@10"] < 1
    # the default metrics, a prefix, and the script file path as well as its folder
    by_file = evaluate.load(f"{IR_RETRIEVAL_PATH}/ir_retrieval.py", keep_in_memory=True)
    prefixed = by_file.compute(predictions=predictions, references=references, prefix="quantized_")
    assert prefixed == {f"quantized_{k}": v for k, v in compute_metrics(run, qrels).items()}


def test_predictions_are_matched_by_query_id_not_position():
    run, qrels = random_run_and_qrels(1)
    predictions, references = to_metric_inputs(run, qrels)
    metric = load_ir_metric()
    shuffled = list(reversed(predictions))
    got = metric.compute(predictions=shuffled, references=references, metrics=["ndcg@10", "recall@100"])
    assert got == compute_metrics(run, qrels, ["ndcg@10", "recall@100"])


def test_to_metric_inputs_and_slices():
    run = {"q1": {"d1": 0.9, "d2": 0.5}, "q3": {"d3": 0.1}}
    qrels = {"q1": {"d2": 1}, "q2": {"d3": 2}, "q3": {"d3": 1}}
    predictions, references = to_metric_inputs(run, qrels, query_ids=["q3", "q2", "nope"])
    assert [p["query_id"] for p in predictions] == ["q3", "q2"]
    assert predictions[1] == {"query_id": "q2", "doc_ids": [], "scores": []}
    assert references[0] == {"query_id": "q3", "doc_ids": ["d3"], "relevance": [1]}
    assert compute_ir_metrics(run, qrels, ["mrr@10"], query_ids=["q1", "q2"]) == {"mrr@10": 0.25}
    assert compute_ir_metrics(run, qrels, ["mrr@10"]) == compute_metrics(run, qrels, ["mrr@10"])
    empty = compute_ir_metrics(run, qrels, ["mrr@10"], query_ids=[])
    assert math.isnan(empty["mrr@10"])


def test_bad_inputs_are_reported():
    metric = load_ir_metric()
    with pytest.raises(ValueError, match="2 doc_ids but 1 scores"):
        metric.compute(
            predictions=[{"query_id": "q", "doc_ids": ["a", "b"], "scores": [1.0]}],
            references=[{"query_id": "q", "doc_ids": ["a"], "relevance": [1]}],
        )
    with pytest.raises(ValueError, match="unknown metric"):
        compute_ir_metrics({"q": {"a": 1.0}}, {"q": {"a": 1}}, ["bleu@4"])


def test_load_is_cached():
    assert load_ir_metric() is load_ir_metric()
    assert load_ir_metric(cache=False) is not load_ir_metric()


def test_metric_equals_the_evaluation_callback_numbers(tiny_model, beir_dir, tmp_path):
    """The retrieval evaluation scheduled by RetrievalEvaluationCallback logs exactly what the evaluate module gives
    for the runs it searched (flat, quantized, seen/unseen slices)."""
    data = load_beir(beir_dir, split="train")
    evaluator = RetrievalEvaluator(data.queries, data.qrels, seen_doc_ids=[d for d in data.doc_ids[:100]])
    searched = []
    runs = evaluator.runs
    evaluator.runs = lambda *args, **kwargs: searched.append(runs(*args, **kwargs)) or searched[-1]
    schedule = RetrievalEvaluationCallback(every_n_steps=3, on_epoch_end=False)
    trainer, _ = make_trainer(tiny_model, beir_dir, tmp_path, evaluator=evaluator, callbacks=[schedule],
                              keep_untrained_if_better=False)  # only the scheduled evaluations  # fmt: skip
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "eval_quantized_ndcg@10" in entry]
    assert [entry["step"] for entry in logged] == [3, 6] and len(searched) == 2
    metric = load_ir_metric(cache=False)
    for entry, searched_runs in zip(logged, searched):
        expected = {}
        for kind, run in searched_runs.items():
            predictions, references = to_metric_inputs(run, evaluator.qrels)
            for name, value in metric.compute(predictions=predictions, references=references).items():
                expected[f"eval_{kind}_{name}"] = value
            for slice_name, query_ids in evaluator.slices.items():
                predictions, references = to_metric_inputs(run, evaluator.qrels, query_ids)
                for name, value in metric.compute(predictions=predictions, references=references).items():
                    expected[f"eval_{kind}_{name}_{slice_name}"] = value
            # and the reference implementation directly
            assert compute_metrics(run, evaluator.qrels)["ndcg@10"] == entry[f"eval_{kind}_ndcg@10"]
        assert len(expected) == 18
        assert {key: entry[key] for key in expected} == expected
