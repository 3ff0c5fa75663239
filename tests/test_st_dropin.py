"""A sentence-transformers (or plain transformers) script runs under QRetTrainer by swapping the trainer and
arguments classes: text-pair data, corpus= instead of a bank, sentence-transformers evaluators, documents back from
search."""

from __future__ import annotations

import dataclasses
import json
import os
from functools import partial

import numpy as np
import pytest
import torch
from conftest import synthetic_beir, write_beir
from datasets import Dataset
from test_trainer import make_args

from hf_qret import QRetTrainer, QRetTrainingArguments, QuantizedRetriever, TargetBank
from hf_qret.data import TextColumns, doc_text, pairs_from_texts, text_columns
from hf_qret.errors import ArtifactError, ConfigError, DataError
from hf_qret.serving.encoder import encode_texts, make_tokenize_fn
from hf_qret.training.collator import QRetDataCollator
from hf_qret.training.corpus import CACHE_DIR, DocumentSet, load_corpus, text_doc_id

#: What a sentence-transformers script leaves at the library's defaults (test_trainer's arguments set them).
_LIBRARY_DEFAULTS = {
    field.name: field.default
    for field in dataclasses.fields(QRetTrainingArguments)
    if field.name in ("bank_learning_rate", "logging_steps")
}


def st_args(tmp_path, **overrides) -> QRetTrainingArguments:
    """test_trainer's tiny-run arguments, 3 steps, with the library's own bank learning rate and logging."""
    return make_args(tmp_path, **{"max_steps": 3, **_LIBRARY_DEFAULTS, **overrides})


@pytest.fixture()
def st_data():
    """The synthetic set the sentence-transformers way: {id: text} corpus, text pairs, dev queries and relevant docs."""
    corpus, queries, qrels = synthetic_beir()
    texts = {doc_id: doc_text(doc) for doc_id, doc in corpus.items()}
    train_q, dev_q = list(qrels)[:40], list(qrels)[40:]
    pairs = Dataset.from_dict(
        {
            "anchor": [queries[q] for q in train_q for d in qrels[q]],
            "positive": [texts[d] for q in train_q for d in qrels[q]],
        }
    )
    dev = ({q: queries[q] for q in dev_q}, {q: set(qrels[q]) for q in dev_q})
    return texts, pairs, dev, (corpus, queries, qrels)


def ir_evaluator(corpus, dev, name="dev", **kwargs):
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    return InformationRetrievalEvaluator(queries=dev[0], corpus=corpus, relevant_docs=dev[1], name=name, **kwargs)


# ------------------------------------------------------------------------------------------------- the contract
def test_contract_text_pairs_corpus_and_ir_evaluator(tiny_model, st_data, tmp_path):
    """Points 1-4: anchor/positive rows + corpus= + InformationRetrievalEvaluator; train, evaluate, save, search."""
    corpus, pairs, dev, _ = st_data
    out = tmp_path / "out"
    trainer = QRetTrainer(
        model=tiny_model,
        args=st_args(tmp_path),
        train_dataset=pairs,
        corpus=corpus,
        evaluator=ir_evaluator(corpus, dev),
    )
    assert trainer.bank.doc_ids == list(corpus)  # every positive text is a corpus document: no extra rows
    trainer.train()
    metrics = trainer.evaluate()
    for kind in ("flat", "quantized"):
        assert 0.0 <= metrics[f"eval_dev_{kind}_ndcg@10"] <= 1.0
        assert f"eval_dev_{kind}_mrr@10" in metrics and f"eval_dev_{kind}_map@100" in metrics
    trainer.save_model()
    retriever = QuantizedRetriever.from_pretrained(out, device="cpu")
    hits = retriever.search(["protein gene"], k=10)
    assert len(hits[0]) == 10 and all(doc_id in corpus for doc_id, _ in hits[0])
    # point 4: the documents come back, and a semantic_search-shaped output
    with_text = retriever.search(["protein gene"], k=3, return_text=True)[0]
    assert [(d, s) for d, s, _ in with_text] == hits[0][:3]
    assert all(text == corpus[d] for d, _, text in with_text)
    shaped = retriever.search(["protein gene"], k=3, output="semantic_search")[0]
    assert shaped == [{"corpus_id": d, "score": s} for d, s in hits[0][:3]]
    assert retriever.semantic_search(["protein gene"], top_k=2, return_text=True)[0][0]["text"] == corpus[hits[0][0][0]]
    lines = [json.loads(line) for line in (out / "corpus.jsonl").read_text().splitlines()]
    assert [line["_id"] for line in lines] == json.loads((out / "doc_ids.json").read_text())
    from hf_qret.hub.push import artifact_upload_files

    uploaded = artifact_upload_files(out)
    assert "corpus.jsonl" in uploaded and (out / CACHE_DIR).is_dir()
    assert not any(name.startswith(CACHE_DIR) for name in uploaded)  # the bank cache never goes to the Hub


def test_search_output_checks(tiny_model, st_data, tmp_path):
    corpus, pairs, _, _ = st_data
    trainer = QRetTrainer(tiny_model, st_args(tmp_path, store_corpus_texts=False), train_dataset=pairs, corpus=corpus)
    trainer.save_model()
    assert not (tmp_path / "out" / "corpus.jsonl").exists()
    retriever = QuantizedRetriever.from_pretrained(tmp_path / "out", device="cpu")
    with pytest.raises(ArtifactError, match="no document texts"):
        retriever.search(["protein"], k=2, return_text=True)
    with pytest.raises(ValueError, match="output must be one of"):
        retriever.search(["protein"], k=2, output="dicts")


# ------------------------------------------------------------------------------------------ 1. column convention
def test_text_columns_follow_sentence_transformers_positions():
    assert text_columns(Dataset.from_dict({"q": ["a"], "d": ["b"]})).negatives == ()
    tuples = Dataset.from_dict(
        {"anchor": ["a"], "positive": ["b"], "negative_1": ["c"], "negative_2": ["d"], "scores": [[1.0, 0.5, 0.2]]}
    )
    assert text_columns(tuples).negatives == ("negative_1", "negative_2")  # scores are labels, not inputs
    assert text_columns(Dataset.from_dict({"query": ["a"], "positive_id": ["d1"]})) is None  # hf-qret's id rows
    with pytest.raises(DataError, match="labeled format"):
        text_columns(Dataset.from_dict({"anchor": ["a"], "positive": ["b"], "label": [1]}))
    with pytest.raises(DataError, match="needs a query text and a positive text"):
        text_columns(Dataset.from_dict({"anchor": ["a"]}))


def test_pairs_from_texts_groups_a_querys_positives_and_maps_negatives():
    rows = Dataset.from_dict({"anchor": ["q1", "q1", "q2"], "positive": ["a", "b", "a"], "negative": ["c", "c", "b"]})
    ids = {"a": "1", "b": "2", "c": "3"}
    pairs = pairs_from_texts(rows, text_columns(rows), ids.__getitem__)
    assert pairs["positive_id"] == ["1", "2", "1"]
    assert pairs["positive_ids"] == [["1", "2"], ["1", "2"], ["1"]]  # q1's other positive is never its negative
    assert pairs["negative_ids"] == [["3"], ["3"], ["2"]]
    with pytest.raises(DataError, match="row 0: the positive"):
        pairs_from_texts(Dataset.from_dict({"a": ["q"], "p": [" "]}), TextColumns("a", "p"), ids.get)


def test_hard_negative_texts_join_the_mined_candidates(tiny_model, st_data, tmp_path):
    """A mine_hard_negatives-style n-tuple: the negatives' rows are in every batch's candidate set."""
    corpus, pairs, _, _ = st_data
    ids = list(corpus)
    negatives = [corpus[ids[(7 * i + 3) % len(ids)]] for i in range(len(pairs))]
    tuples = pairs.add_column("negative_1", negatives).add_column("negative_2", [corpus[ids[-1]]] * len(pairs))
    trainer = QRetTrainer(tiny_model, st_args(tmp_path, num_negatives=1), train_dataset=tuples, corpus=corpus)
    assert trainer.train_dataset["negative_ids"][0] == [ids[3], ids[-1]]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["negative_rows"].shape == (4, 2)
    seen = []
    original = trainer.miner.mine

    def spy(*args, **kwargs):
        mined = original(*args, **kwargs)
        seen.append((kwargs.get("extra_rows"), set(mined.candidates.tolist())))
        return mined

    trainer.miner.mine = spy
    trainer.train()
    assert seen and all(extra is not None for extra, _ in seen)
    for extra, candidates in seen:
        assert set(extra[extra >= 0].tolist()) <= candidates


def test_collator_without_negatives_adds_no_negative_rows(tiny_model):
    bank = TargetBank(torch.randn(3, 32), ["a", "b", "c"])
    collate = QRetDataCollator(make_tokenize_fn(tiny_model), bank)
    assert "negative_rows" not in collate([{"query": "q", "positive_id": "a"}])
    batch = collate(
        [
            {"query": "q", "positive_id": "a", "negative_ids": ["c"]},
            {"query": "r", "positive_id": "b", "negative_ids": []},
        ]
    )
    assert batch["negative_rows"].tolist() == [[2], [-1]]


def test_mine_hard_negatives_output_trains_as_is(tiny_model, st_data, tmp_path):
    from sentence_transformers.util import mine_hard_negatives

    corpus, pairs, _, _ = st_data
    mined = mine_hard_negatives(
        pairs, tiny_model, corpus=list(corpus.values()), num_negatives=2, output_format="n-tuple", verbose=False
    )
    trainer = QRetTrainer(tiny_model, st_args(tmp_path), train_dataset=mined, corpus=corpus)
    assert all(len(n) >= 1 for n in trainer.train_dataset["negative_ids"])
    trainer.train()
    assert trainer.state.global_step == 3


def test_id_rows_keep_working_with_corpus(tiny_model, beir_dir, tmp_path):
    from hf_qret import build_pairs_dataset, load_beir

    data = load_beir(beir_dir, split="train")
    trainer = QRetTrainer(tiny_model, st_args(tmp_path), train_dataset=build_pairs_dataset(data), corpus=beir_dir)
    assert trainer.bank.doc_ids == data.doc_ids
    trainer.train()


# ------------------------------------------------------------------------------------------------ 2. the bank
def test_bank_from_corpus_plus_training_texts_with_stable_ids(tiny_model, st_data, tmp_path):
    corpus, pairs, _, _ = st_data
    extra = Dataset.from_dict(
        {"anchor": ["new query", "again"], "positive": ["a brand new document", "  a brand new document "]}
    )
    rows = Dataset.from_dict(
        {
            "anchor": list(pairs["anchor"]) + ["new query", "again"],
            "positive": list(pairs["positive"]) + list(extra["positive"]),
        }
    )
    trainer = QRetTrainer(tiny_model, st_args(tmp_path), train_dataset=rows, corpus=corpus)
    new_id = text_doc_id("a brand new document")
    assert trainer.bank.doc_ids == list(corpus) + [new_id]  # deduplicated by (stripped) text
    assert trainer.train_dataset["positive_id"][-2:] == [new_id, new_id]
    assert new_id == text_doc_id("a brand new document")  # the same in every run
    # the bank rows are the model's embeddings of the texts
    np.testing.assert_allclose(
        trainer.bank.numpy()[-1],
        encode_texts(tiny_model, ["a brand new document"], precision=trainer.args.bank_encode_precision)[0],
        rtol=1e-4,
        atol=1e-5,
    )


def test_corpus_shapes(tmp_path, st_data):
    corpus, _, _, (beir_corpus, queries, qrels) = st_data
    folder = write_beir(tmp_path / "beir", beir_corpus, queries, qrels)
    assert load_corpus(folder) == corpus
    assert load_corpus(beir_corpus) == corpus  # BEIR {"title", "text"} documents
    as_dataset = Dataset.from_dict({"_id": list(corpus), "text": list(corpus.values())})
    assert load_corpus(as_dataset) == corpus
    with pytest.raises(DataError, match="id column"):
        load_corpus(Dataset.from_dict({"text": ["a"]}))
    with pytest.raises(DataError, match="corpus must be"):
        load_corpus(["a", "b"])


def test_text_pairs_without_corpus_build_the_bank_from_their_texts(tiny_model, st_data, tmp_path):
    _, pairs, _, _ = st_data
    trainer = QRetTrainer(tiny_model, st_args(tmp_path, index_factory="PQ4x4"), train_dataset=pairs)
    assert len(trainer.bank) == len(set(pairs["positive"]))
    assert all(d.startswith("text-") for d in trainer.bank.doc_ids)


def test_no_bank_no_corpus_no_texts_is_a_config_error(tiny_model, beir_dir, tmp_path):
    from hf_qret import build_pairs_dataset, load_beir

    with pytest.raises(ConfigError, match="needs the documents"):
        QRetTrainer(
            tiny_model, st_args(tmp_path), train_dataset=build_pairs_dataset(load_beir(beir_dir, split="train"))
        )


def test_bank_is_encoded_once_and_cached_in_the_output_folder(tiny_model, st_data, tmp_path, monkeypatch):
    import hf_qret.serving.encoder

    corpus, pairs, _, _ = st_data
    calls = []
    real = hf_qret.serving.encoder.encode_texts
    monkeypatch.setattr(
        hf_qret.serving.encoder, "encode_texts", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k)
    )
    first = QRetTrainer(tiny_model, st_args(tmp_path), train_dataset=pairs, corpus=corpus)
    assert calls == [len(corpus)]
    assert (tmp_path / "out" / CACHE_DIR / "bank_init.npy").is_file()
    again = QRetTrainer(tiny_model, st_args(tmp_path), train_dataset=pairs, corpus=corpus)  # a re-run
    assert calls == [len(corpus)]
    assert torch.equal(first.bank.weight, again.bank.weight)
    changed = dict(corpus, extra="one more document")
    QRetTrainer(tiny_model, st_args(tmp_path), train_dataset=pairs, corpus=changed)
    assert calls == [len(corpus), len(corpus) + 1]  # other documents: encoded again


def test_resume_does_not_encode_again(tiny_model_dir, st_data, tmp_path, monkeypatch):
    from sentence_transformers import SentenceTransformer

    import hf_qret.serving.encoder

    corpus, pairs, _, _ = st_data
    args = dict(save_strategy="steps", save_steps=2, max_steps=4)
    QRetTrainer(
        SentenceTransformer(tiny_model_dir, device="cpu"), st_args(tmp_path, **args), train_dataset=pairs, corpus=corpus
    ).train()
    calls = []
    real = hf_qret.serving.encoder.encode_texts
    monkeypatch.setattr(
        hf_qret.serving.encoder, "encode_texts", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k)
    )
    trainer = QRetTrainer(
        SentenceTransformer(tiny_model_dir, device="cpu"), st_args(tmp_path, **args), train_dataset=pairs, corpus=corpus
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert trainer.state.global_step == 4 and calls == []


def test_given_bank_wins_and_text_pairs_map_to_its_rows(tiny_model, st_data, tmp_path):
    corpus, pairs, _, _ = st_data
    bank = TargetBank.from_encoder(partial(encode_texts, tiny_model), list(corpus.values()), list(corpus))
    before = bank.numpy().copy()
    trainer = QRetTrainer(tiny_model, st_args(tmp_path), train_dataset=pairs, bank=bank, corpus=corpus)
    assert trainer.bank is bank and np.array_equal(trainer.bank.numpy(), before)
    text_of = {v: k for k, v in corpus.items()}
    assert trainer.train_dataset["positive_id"] == [text_of[p] for p in pairs["positive"]]
    assert not (tmp_path / "out" / CACHE_DIR).exists()
    stray = Dataset.from_dict({"anchor": ["q"], "positive": ["not a bank document"]})
    with pytest.raises(DataError, match="not in the corpus"):
        QRetTrainer(tiny_model, st_args(tmp_path), train_dataset=stray, bank=bank, corpus=corpus)
    with pytest.raises(ConfigError, match="needs corpus="):
        QRetTrainer(tiny_model, st_args(tmp_path), train_dataset=pairs, bank=bank)


def test_bank_update_positives_moves_the_rows_of_positive_texts(tiny_model, st_data, tmp_path):
    corpus, pairs, _, _ = st_data
    # the row optimizer alone (the document adapter, baked at the final refresh, moves every row)
    args = st_args(tmp_path, bank_update="positives", doc_adapter_rank=0)
    trainer = QRetTrainer(tiny_model, args, train_dataset=pairs, corpus=corpus)
    text_of = {v: k for k, v in corpus.items()}
    expected = sorted(trainer.bank.row_of(text_of[p]) for p in set(pairs["positive"]))
    assert trainer.trainable_rows.nonzero().squeeze(1).tolist() == expected
    before = trainer.bank.numpy().copy()
    trainer.train()
    moved = np.flatnonzero(np.abs(trainer.bank.numpy() - before).sum(1) > 0)
    assert len(moved) and set(moved.tolist()) <= set(expected)


# -------------------------------------------------------------------------------------------- 3. the evaluators
def test_evaluator_documents_are_mapped_by_id_or_by_text(tiny_model, st_data, tmp_path):
    """An evaluator whose corpus uses other ids for the same texts scores exactly like one with the bank's ids."""
    corpus, pairs, dev, _ = st_data
    renamed = {f"x{doc_id}": text for doc_id, text in corpus.items()}
    relevant = {q: {f"x{d}" for d in docs} for q, docs in dev[1].items()}
    trainer = QRetTrainer(
        tiny_model,
        st_args(tmp_path),
        train_dataset=pairs,
        corpus=corpus,
        evaluator=ir_evaluator(renamed, (dev[0], relevant), name="renamed"),
    )
    assert trainer.bank.doc_ids == list(corpus)  # mapped by text: nothing added
    renamed_metrics = trainer.evaluate()
    trainer.evaluator = None
    from hf_qret.training.st_evaluation import adapt_evaluator, bank_resolver

    trainer.evaluator = adapt_evaluator(ir_evaluator(corpus, dev, name="renamed"), bank_resolver(set(corpus), None))
    assert trainer.evaluate() == renamed_metrics


def test_evaluator_documents_missing_from_the_corpus_are_added_or_refused(tiny_model, st_data, tmp_path):
    corpus, pairs, dev, _ = st_data
    eval_corpus = dict(corpus, extra1="an evaluation-only document")
    trainer = QRetTrainer(
        tiny_model, st_args(tmp_path), train_dataset=pairs, corpus=corpus, evaluator=ir_evaluator(eval_corpus, dev)
    )
    assert trainer.bank.doc_ids[-1] == "extra1"
    bank = TargetBank.from_encoder(partial(encode_texts, tiny_model), list(corpus.values()), list(corpus))
    with pytest.raises(ConfigError, match="1 of its 301 corpus documents are not in the bank"):
        QRetTrainer(
            tiny_model,
            st_args(tmp_path),
            train_dataset=pairs,
            bank=bank,
            corpus=corpus,
            evaluator=ir_evaluator(eval_corpus, dev),
        )


def test_unsupported_evaluator_fails_at_construction(tiny_model, st_data, tmp_path, monkeypatch):
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator, SequentialEvaluator

    import hf_qret.serving.encoder

    corpus, pairs, dev, _ = st_data
    monkeypatch.setattr(hf_qret.serving.encoder, "encode_texts", lambda *a, **k: pytest.fail("encoded before refusing"))
    similarity = EmbeddingSimilarityEvaluator(["a", "b"], ["c", "d"], [0.1, 0.9])
    for evaluator in (similarity, SequentialEvaluator([ir_evaluator(corpus, dev), similarity])):
        with pytest.raises(ConfigError, match="cannot score a EmbeddingSimilarityEvaluator"):
            QRetTrainer(tiny_model, st_args(tmp_path), train_dataset=pairs, corpus=corpus, evaluator=evaluator)
    with pytest.raises(ConfigError, match="truncate_dim"):
        QRetTrainer(
            tiny_model,
            st_args(tmp_path),
            train_dataset=pairs,
            corpus=corpus,
            evaluator=ir_evaluator(corpus, dev, truncate_dim=16),
        )


def test_sequential_evaluator_names_and_metric_for_best_model(tiny_model, st_data, tmp_path):
    from sentence_transformers.sentence_transformer.evaluation import SequentialEvaluator

    corpus, pairs, dev, _ = st_data
    half = dict(list(dev[0].items())[:10])
    evaluator = SequentialEvaluator(
        [ir_evaluator(corpus, dev, name="dev"), ir_evaluator(corpus, (half, dev[1]), name="half")]
    )
    args = st_args(
        tmp_path, eval_strategy="steps", eval_steps=2, max_steps=4, metric_for_best_model="dev_quantized_ndcg@10"
    )
    trainer = QRetTrainer(tiny_model, args, train_dataset=pairs, corpus=corpus, evaluator=evaluator)
    trainer.train()
    metrics = trainer.evaluate()
    assert {"eval_dev_quantized_ndcg@10", "eval_dev_flat_ndcg@10", "eval_half_quantized_ndcg@10"} <= set(metrics)
    assert trainer.state.best_metric is not None
    logged = [e["eval_dev_quantized_ndcg@10"] for e in trainer.state.log_history if "eval_dev_quantized_ndcg@10" in e]
    assert trainer.state.best_metric == max(logged[1:3])  # logged[0]: the safety net's step-0 evaluation


# --------------------------------------------------------------------------------- 6. plain transformers models
def test_automodel_with_tokenizer_and_text_pairs(tiny_model_dir, st_data, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    corpus, pairs, dev, _ = st_data
    transformer = os.path.join(tiny_model_dir)
    model = AutoModel.from_pretrained(transformer)
    tokenizer = AutoTokenizer.from_pretrained(transformer)
    trainer = QRetTrainer(
        model=model,
        args=st_args(tmp_path),
        train_dataset=pairs,
        corpus=corpus,
        evaluator=ir_evaluator(corpus, dev),
        processing_class=tokenizer,
    )
    np.testing.assert_allclose(
        trainer.bank.numpy()[:4],
        encode_texts(model, list(corpus.values())[:4], tokenizer=tokenizer, precision="auto"),
        rtol=1e-4,
        atol=1e-5,
    )
    trainer.train()
    assert "eval_dev_quantized_ndcg@10" in trainer.evaluate()
    trainer.save_model()
    assert (tmp_path / "out" / "corpus.jsonl").is_file()


def test_document_set_dedups_by_text_and_keeps_corpus_duplicates():
    docs = DocumentSet({"a": "same", "b": "same"})
    assert docs.ids == ["a", "b"] and docs.id_of(" same ") == "a"
    assert docs.add_text("same") == "a" and len(docs) == 2


# ------------------------------------------------------------------------------------------------- 5. examples
def test_hard_negatives_example_runs(tiny_model_dir, beir_dir, tmp_path, monkeypatch, capsys):
    import runpy
    import sys

    from conftest import REPO_ROOT

    script = REPO_ROOT / "examples" / "train_hard_negatives.py"
    out = tmp_path / "hard"
    argv = ["--model", tiny_model_dir, "--data_dir", str(beir_dir), "--eval_split", "train", "--output_dir", str(out),
            "--max_steps", "2", "--batch_size", "8", "--index_factory", "PQ4", "--num_hard_negatives", "2"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    scope = runpy.run_path(str(script), run_name="__main__")
    trainer = scope["trainer"]
    assert {"negative_1", "negative_2"} <= set(scope["train_dataset"].column_names)
    assert trainer.state.global_step == 2 and any(trainer.train_dataset["negative_ids"])
    assert "eval_dev_quantized_ndcg@10" in capsys.readouterr().out
    assert (out / "corpus.jsonl").is_file()


def test_default_schedule_is_constant_so_the_bank_keeps_its_learning_rate(tmp_path):
    """The contract trains with the defaults: a linear decay would also halve the bank's mean learning rate over a
    one-epoch run (SciFact dev, 16 bytes: 0.616 linear vs 0.664 constant, benchmarks/st_dropin.py)."""
    from transformers import SchedulerType

    assert QRetTrainingArguments(output_dir=str(tmp_path)).lr_scheduler_type == SchedulerType.CONSTANT
    assert QRetTrainingArguments(output_dir=str(tmp_path), lr_scheduler_type="linear").lr_scheduler_type == "linear"


def test_a_drop_in_artifact_grows_with_the_bank_encoder(tiny_model, st_data, tmp_path):
    """The trainer that encoded the bank saves that (untrained) model as the document encoder: add_documents encodes
    a new document exactly as the bank's rows were encoded."""
    import numpy as np

    from hf_qret import QuantizedRetriever
    from hf_qret.serving.encoder import encode_texts

    corpus, pairs, _, _ = st_data
    # bf16 bank encoding (the 'auto' choice on CPUs with AMX) on every machine: added documents follow it
    args = st_args(tmp_path, bank_encode_precision="bf16")
    trainer = QRetTrainer(tiny_model, args, train_dataset=pairs, corpus=corpus)
    doc_id = next(iter(corpus))
    untrained_row = trainer.bank.float32_rows()[[trainer.bank.row_of(doc_id)]][0].copy()
    trainer.train()
    trainer.save_model()
    retriever = QuantizedRetriever.from_pretrained(tmp_path / "out", "cpu", load_bank=True)
    assert retriever.config["document_encoder"] == "document_encoder"
    assert retriever.config["document_precision"] == "bf16"
    encoded = encode_texts(retriever.document_encoder, [corpus[doc_id]], role="document", precision="bf16")[0]
    np.testing.assert_allclose(encoded, untrained_row, atol=1e-5)
    retriever.add_documents([corpus[doc_id]], ["copy-of-" + doc_id])
    assert retriever.index.ntotal == len(corpus) + 1
