"""The document-disjoint evaluation split (hf_qret.splits) and the recipe's --heldout_docs_fraction."""

import random

import pytest

from hf_qret.data import BeirData
from hf_qret.errors import DataError
from hf_qret.recipe import heldout_docs_data
from hf_qret.splits import carve_document_disjoint_split

pytestmark = pytest.mark.unit


def _qrels(num_queries=200, num_docs=300, seed=0):
    rng = random.Random(seed)
    qrels = {}
    for q in range(num_queries):
        k = rng.choice([1, 1, 2, 3, 8])
        qrels[f"q{q}"] = {f"d{d}": 1 for d in rng.sample(range(num_docs), k)}
    qrels["q0"]["d299"] = 0  # a judged non-relevant pair is not a positive
    return qrels


def test_no_evaluation_document_is_a_training_positive():
    qrels = _qrels()
    split = carve_document_disjoint_split(qrels, doc_fraction=0.2, seed=3)
    train_docs = {d for docs in split.train.values() for d, s in docs.items() if s > 0}
    assert split.held_out_docs.isdisjoint(train_docs)
    for query_id, docs in split.eval.items():
        assert {d for d, s in docs.items() if s > 0} <= split.held_out_docs
        assert docs == qrels[query_id]  # evaluation judgements are kept whole
    assert set(split.train).isdisjoint(split.eval)
    relevant = {d for docs in qrels.values() for d, s in docs.items() if s > 0}
    assert 0 < len(split.held_out_docs) <= round(0.2 * len(relevant))
    # every query is either evaluated, trained on (minus held-out pairs), or lost all its positives
    for query_id, docs in qrels.items():
        if query_id in split.train:
            assert split.train[query_id] == {d: s for d, s in docs.items() if d not in split.held_out_docs}
        elif query_id not in split.eval:
            assert {d for d, s in docs.items() if s > 0} <= split.held_out_docs
    dropped = sum(
        1
        for q, docs in qrels.items()
        if q not in split.eval
        for d, s in docs.items()
        if s > 0 and d in split.held_out_docs
    )
    assert split.dropped_pairs == dropped > 0


def test_the_split_is_reproducible_and_seeded():
    qrels = _qrels()
    a = carve_document_disjoint_split(qrels, 0.2, seed=5)
    b = carve_document_disjoint_split(dict(reversed(list(qrels.items()))), 0.2, seed=5)
    c = carve_document_disjoint_split(qrels, 0.2, seed=6)
    assert a.held_out_docs == b.held_out_docs and set(a.eval) == set(b.eval)
    assert a.held_out_docs != c.held_out_docs


def test_a_query_whose_documents_are_all_held_out_by_others_is_evaluated_not_trained():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d1": 1, "d2": 1}, **{f"t{i}": {f"x{i}": 1} for i in range(7)}}
    for seed in range(20):
        split = carve_document_disjoint_split(qrels, 0.2, seed=seed)
        if {"d1", "d2"} <= split.held_out_docs:
            assert "q3" in split.eval
            break
    else:
        pytest.fail("no seed held out both d1 and d2")


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_an_out_of_range_fraction_is_refused(fraction):
    with pytest.raises(DataError, match="doc_fraction"):
        carve_document_disjoint_split(_qrels(), fraction)


def test_a_split_that_leaves_no_evaluation_query_says_what_to_do():
    qrels = {f"q{i}": {f"d{j}": 1 for j in range(10)} for i in range(3)}  # every query needs all 10 documents
    with pytest.raises(DataError, match="raise or lower doc_fraction"):
        carve_document_disjoint_split(qrels, 0.5)


def test_the_recipe_carves_training_and_evaluation_data_over_the_same_corpus():
    qrels = _qrels(50, 80)
    corpus = {f"d{d}": {"title": "", "text": f"doc {d}"} for d in range(80)}
    queries = {q: f"query {q}" for q in qrels}
    data = BeirData(corpus, queries, qrels, split="train", path="x")
    train, held = heldout_docs_data(data, 0.25)
    assert held.split == "heldout_docs" and train.split == "train"
    assert train.corpus is corpus and held.corpus is corpus
    assert set(held.queries) == set(held.qrels) and set(train.queries) == set(train.qrels)
    assert set(train.qrels).isdisjoint(held.qrels)


def test_the_recipe_s_heldout_split_replaces_the_eval_split(two_split_dir):
    from hf_qret.config import DataArguments
    from hf_qret.recipe import load_splits

    train, held = load_splits(DataArguments(str(two_split_dir), eval_split="dev", heldout_docs_fraction=0.25))
    assert held.split == "heldout_docs" and set(held.qrels) <= set(load_beir_train(two_split_dir).qrels)
    train, dev = load_splits(DataArguments(str(two_split_dir), eval_split="dev"))
    assert dev.split == "dev" and set(train.qrels).isdisjoint(dev.qrels)
    assert load_splits(DataArguments(str(two_split_dir)))[1] is None


def load_beir_train(folder):
    from hf_qret.data import load_beir

    return load_beir(folder, split="train")
