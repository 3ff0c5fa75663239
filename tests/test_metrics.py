"""hf_qret.evaluation.metrics (pytrec_eval based) cross-checked against an independent plain-Python implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytrec_eval

from hf_qret.evaluation.metrics import DEFAULT_METRICS, compute_metrics, per_query_metrics, write_trec_run

TOL = 1e-9

# ----------------------------------------------------------------------------- independent reference


def _order(docs: dict[str, float]) -> list[str]:
    """trec_eval's ranking: score descending, ties by document id descending."""
    return [d for d, _ in sorted(docs.items(), key=lambda item: (-item[1], _Desc(item[0])))]


class _Desc:
    """Sort key that reverses string order."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __lt__(self, other: _Desc) -> bool:
        return self.text > other.text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and self.text == other.text


def ref_ndcg(docs: dict[str, float], rels: dict[str, int], k: int = 10) -> float:
    # trec_eval ndcg_cut: gain = relevance (linear), discount log2(rank + 1); ideal from the qrels.
    ranked = _order(docs)[:k]
    dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked) if rels.get(d, 0) > 0)
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def ref_recall(docs: dict[str, float], rels: dict[str, int], k: int = 100) -> float:
    relevant = {d for d, r in rels.items() if r > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(_order(docs)[:k])) / len(relevant)


def ref_mrr(docs: dict[str, float], rels: dict[str, int], k: int = 10) -> float:
    for i, d in enumerate(_order(docs)[:k]):
        if rels.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


REFS = {"ndcg@10": ref_ndcg, "recall@100": ref_recall, "mrr@10": ref_mrr}


def _random_case(seed: int = 0, num_queries: int = 50, num_docs: int = 400):
    """Random qrels (graded 0..3, every query has a relevant doc) and runs with distinct, well separated scores."""
    rng = np.random.default_rng(seed)
    doc_ids = [f"doc{i}" for i in range(num_docs)]
    run, qrels = {}, {}
    for j in range(num_queries):
        qid = f"q{j}"
        length = int(rng.integers(5, 160))
        retrieved = [doc_ids[i] for i in rng.choice(num_docs, size=length, replace=False)]
        scores = (rng.permutation(length) + 1) / 7.0  # distinct, gaps >= 0.14: no ties, survive %.6f
        run[qid] = {d: float(s) for d, s in zip(retrieved, scores)}
        judged_in_run = [
            retrieved[i] for i in rng.choice(length, size=min(length, int(rng.integers(0, 6))), replace=False)
        ]
        judged_outside = [doc_ids[i] for i in rng.choice(num_docs, size=int(rng.integers(0, 4)), replace=False)]
        judged = dict.fromkeys(judged_in_run + judged_outside)
        rels = {d: int(rng.integers(0, 4)) for d in judged}
        rels[doc_ids[int(rng.integers(num_docs))]] = int(rng.integers(1, 4))  # at least one relevant
        qrels[qid] = rels
    # judged queries that the run misses, and a run query nobody judged
    qrels["missing1"] = {"doc1": 1}
    qrels["missing2"] = {"doc2": 2, "doc3": 0}
    run["unjudged"] = {"doc1": 1.0, "doc2": 0.5}
    return run, qrels


def test_random_runs_match_independent_implementation():
    run, qrels = _random_case(seed=0)
    per_query = per_query_metrics(run, qrels)
    assert set(per_query) == set(DEFAULT_METRICS)
    checked_nonzero = 0
    for name, ref in REFS.items():
        assert set(per_query[name]) == set(qrels)  # every judged query, not the unjudged run query
        for qid, rels in qrels.items():
            expected = ref(run.get(qid, {}), rels)
            assert per_query[name][qid] == pytest.approx(expected, abs=TOL), (name, qid)
            checked_nonzero += expected > 0
    assert checked_nonzero > 40  # the comparison is not vacuous
    means = compute_metrics(run, qrels)
    for name, ref in REFS.items():
        expected = float(np.mean([ref(run.get(q, {}), qrels[q]) for q in qrels]))
        assert means[name] == pytest.approx(expected, abs=TOL)


def test_other_cutoffs_match_independent_implementation():
    run, qrels = _random_case(seed=1, num_queries=30)
    values = per_query_metrics(run, qrels, ["ndcg@5", "recall@20", "mrr@3"])
    for qid, rels in qrels.items():
        docs = run.get(qid, {})
        assert values["ndcg@5"][qid] == pytest.approx(ref_ndcg(docs, rels, 5), abs=TOL)
        assert values["recall@20"][qid] == pytest.approx(ref_recall(docs, rels, 20), abs=TOL)
        assert values["mrr@3"][qid] == pytest.approx(ref_mrr(docs, rels, 3), abs=TOL)


# ----------------------------------------------------------------------------- hand-computed examples


def test_hand_example_exact_values():
    run = {"q1": {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6}}
    qrels = {"q1": {"b": 2, "d": 1, "z": 1}}  # z is never retrieved
    values = compute_metrics(run, qrels)
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert values["ndcg@10"] == pytest.approx(dcg / idcg, abs=TOL)
    assert values["ndcg@10"] == pytest.approx(0.5405857679, abs=1e-9)  # 1.692536 / 3.130930
    assert values["recall@100"] == pytest.approx(2 / 3, abs=TOL)
    assert values["mrr@10"] == pytest.approx(0.5, abs=TOL)


def test_perfect_and_empty_rankings():
    qrels = {"q1": {"a": 3, "b": 1}, "q2": {"x": 1}}
    run = {"q1": {"a": 2.0, "b": 1.0, "c": 0.5}, "q2": {"y": 1.0, "w": 0.5}}
    per_query = per_query_metrics(run, qrels)
    assert per_query["ndcg@10"] == {"q1": pytest.approx(1.0, abs=TOL), "q2": 0.0}
    assert per_query["recall@100"] == {"q1": pytest.approx(1.0, abs=TOL), "q2": 0.0}
    assert per_query["mrr@10"] == {"q1": pytest.approx(1.0, abs=TOL), "q2": 0.0}
    assert compute_metrics(run, qrels)["ndcg@10"] == pytest.approx(0.5, abs=TOL)


def test_mrr_cutoff_excludes_relevant_after_rank_k():
    docs = {f"d{i:02d}": 100.0 - i for i in range(20)}
    qrels = {"q": {"d10": 1}}  # rank 11
    values = compute_metrics({"q": docs}, qrels, ["mrr@10", "mrr@11", "recall@10", "recall@11"])
    assert values == {
        "mrr@10": 0.0,
        "mrr@11": pytest.approx(1 / 11, abs=TOL),
        "recall@10": 0.0,
        "recall@11": pytest.approx(1.0, abs=TOL),
    }


def test_ties_follow_trec_eval_order():
    run = {"q": {"dA": 0.5, "dB": 0.5, "dC": 0.5}}
    qrels = {"q": {"dA": 1}}
    # trec_eval itself ranks ties by document id descending: dC, dB, dA
    assert pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run)["q"]["recip_rank"] == pytest.approx(
        1 / 3
    )
    values = compute_metrics(run, qrels, ["mrr@2", "mrr@3"])
    assert values["mrr@2"] == 0.0
    assert values["mrr@3"] == pytest.approx(1 / 3, abs=TOL)


def test_judged_query_absent_from_run_counts_zero():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    run = {"q1": {"a": 1.0}}
    per_query = per_query_metrics(run, qrels)
    for name in DEFAULT_METRICS:
        assert per_query[name]["q2"] == 0.0
        assert per_query[name]["q1"] == pytest.approx(1.0, abs=TOL)
    means = compute_metrics(run, qrels)
    assert means == {name: pytest.approx(0.5, abs=TOL) for name in DEFAULT_METRICS}


def test_query_ids_restricts_the_mean():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 1}}
    run = {"q1": {"a": 1.0}, "q2": {"x": 1.0, "b": 0.5}, "q3": {"x": 1.0}}
    assert compute_metrics(run, qrels, ["mrr@10"], query_ids=["q1", "q2"])["mrr@10"] == pytest.approx(0.75)
    assert compute_metrics(run, qrels, ["mrr@10"], query_ids=["q2", "unknown"])["mrr@10"] == pytest.approx(0.5)
    assert math.isnan(compute_metrics(run, qrels, ["mrr@10"], query_ids=["unknown"])["mrr@10"])


def test_precision_and_map_names():
    run = {"q": {"a": 3.0, "b": 2.0, "c": 1.0}}
    qrels = {"q": {"a": 1, "c": 1}}
    values = compute_metrics(run, qrels, ["precision@2", "map@100"])
    assert values["precision@2"] == pytest.approx(0.5)
    assert values["map@100"] == pytest.approx((1 / 1 + 2 / 3) / 2)


@pytest.mark.parametrize("name", ["ndcg", "ndcg@", "ndcg@ten", "bleu@10"])
def test_bad_metric_names(name):
    with pytest.raises(ValueError):
        compute_metrics({"q": {"a": 1.0}}, {"q": {"a": 1}}, [name])


# ----------------------------------------------------------------------------- TREC run files


def _read_run_lines(path):
    rows = [line.split() for line in path.read_text().splitlines()]
    assert all(len(row) == 6 for row in rows)
    return rows


def test_write_trec_run_format(tmp_path):
    run = {"q1": {"a": 0.1, "b": 0.9, "c": 0.5}, "q2": {"x": -1.0, "y": 2.5}}
    path = tmp_path / "out" / "run.trec"
    write_trec_run(run, path, tag="mytag")
    rows = _read_run_lines(path)
    assert [(r[0], r[1], r[2], r[3], r[5]) for r in rows] == [
        ("q1", "Q0", "b", "1", "mytag"),
        ("q1", "Q0", "c", "2", "mytag"),
        ("q1", "Q0", "a", "3", "mytag"),
        ("q2", "Q0", "y", "1", "mytag"),
        ("q2", "Q0", "x", "2", "mytag"),
    ]
    assert [float(r[4]) for r in rows] == [0.9, 0.5, 0.1, 2.5, -1.0]
    assert not path.with_name("run.trec.tmp").exists()


def test_write_trec_run_reevaluates_the_same(tmp_path):
    run, qrels = _random_case(seed=2, num_queries=40)
    path = tmp_path / "run.trec"
    write_trec_run(run, path)
    rows = _read_run_lines(path)
    by_query: dict[str, list[tuple[int, float, str]]] = {}
    for qid, _, doc, rank, score, tag in rows:
        assert tag == "hf-qret"
        by_query.setdefault(qid, []).append((int(rank), float(score), doc))
    assert set(by_query) == set(run)
    for qid, entries in by_query.items():
        ranks = [r for r, _, _ in entries]
        scores = [s for _, s, _ in entries]
        assert ranks == list(range(1, len(run[qid]) + 1))
        assert scores == sorted(scores, reverse=True)
        assert [d for _, _, d in entries] == _order(run[qid])

    with open(path) as handle:
        parsed = pytrec_eval.parse_run(handle)
    judged = {q: docs for q, docs in parsed.items() if q in qrels}
    from_file = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(judged)
    expected = per_query_metrics(run, qrels, ["ndcg@10"])["ndcg@10"]
    for qid in qrels:
        value = from_file[qid]["ndcg_cut_10"] if qid in from_file else 0.0
        assert value == pytest.approx(expected[qid], abs=TOL)
    mean_from_file = float(np.mean([from_file[q]["ndcg_cut_10"] if q in from_file else 0.0 for q in qrels]))
    assert mean_from_file == pytest.approx(compute_metrics(run, qrels)["ndcg@10"], abs=TOL)


def test_write_trec_run_keeps_close_scores_ordered(tmp_path):
    run = {"q": {"dA": 0.5000004, "dB": 0.5000001}}
    qrels = {"q": {"dA": 1}}
    assert compute_metrics(run, qrels, ["mrr@10"])["mrr@10"] == 1.0
    path = tmp_path / "run.trec"
    write_trec_run(run, path)
    with open(path) as handle:
        parsed = pytrec_eval.parse_run(handle)
    from_file = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(parsed)
    assert from_file["q"]["recip_rank"] == 1.0
