"""The same vectors from training to serving: a query (a document) is embedded identically by the training collator,
the evaluators, the bank, ``QuantizedRetriever.encode_queries`` / ``add_documents`` and ``SentenceTransformer(OUT)``:
the model's sentence-transformers prompts, its pooling and its normalisation, wherever it is embedded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import half_corpus_beir
from test_st_dropin import ir_evaluator, st_args, st_data  # noqa: F401  (st_data is a fixture)

from hf_qret import QRetTrainer, QuantizedRetriever
from hf_qret.errors import ConfigError
from hf_qret.serving.artifact import save_document_encoder
from hf_qret.serving.document_adapter import adapt_rows, load_document_adapters
from hf_qret.serving.encoder import configure_encoder, embed, encode_texts

QUERIES = ["insulin resistance in mice", "a vaccine trial", "sleep and memory"]
PROMPTS = {"query": "query: ", "document": "passage: "}


def e5_like(model_dir: str):
    """The tiny encoder as an e5/bge-style model: query and document prompts, cosine similarity, no Normalize."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    transformer = Transformer(model_dir, max_seq_length=64)
    return SentenceTransformer(modules=[transformer, Pooling(32, "mean")], prompts=dict(PROMPTS), device="cpu")


def reference_embeddings(model_dir, texts, pooling="mean", prompt="", precision="fp32"):
    """The vectors computed without hf-qret: a plain transformers forward pass (in float32, or under bfloat16
    autocast), then mean (or CLS) pooling and L2 normalisation in float32."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    features = tokenizer([prompt + t for t in texts], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        hidden = model(**features).last_hidden_state.float()
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = features["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@pytest.fixture()
def prompted_run(tiny_model_dir, st_data, tmp_path):  # noqa: F811
    """A 3-step run of the prompted model (bank built from corpus=), its bank before training, the artifact."""
    corpus, pairs, dev, _ = st_data
    model = e5_like(tiny_model_dir)
    out = tmp_path / "out"
    save_document_encoder(out, model)  # the bank's encoder, before training changes it
    # float32 bank encoding: the bank is then exactly what sentence-transformers' encode_document gives
    trainer = QRetTrainer(model=model, args=st_args(tmp_path, bank_encode_precision="fp32"), train_dataset=pairs,
                          corpus=corpus, evaluator=ir_evaluator(corpus, dev))  # fmt: skip
    initial_bank = trainer.bank.numpy().copy()
    trainer.train()
    trainer.save_model()
    return trainer, initial_bank, out


def test_prompted_queries_are_the_same_vectors_in_training_evaluation_and_serving(prompted_run, monkeypatch):
    import hf_qret.evaluation.evaluator

    trainer, _, out = prompted_run
    model = trainer.model
    model.eval()
    # training: the collator's tokenization, then embed (what compute_loss runs)
    batch = trainer.data_collator([{"query": q, "positive_id": "d0"} for q in QUERIES])
    with torch.no_grad():
        trained = embed(model, {k: v for k, v in batch.items() if not k.startswith(("positive", "negative"))}).numpy()
    # sentence-transformers' own query encoding: the "query: " prompt, unit vectors
    reference = model.encode_query(QUERIES, convert_to_numpy=True)
    np.testing.assert_allclose(trained, reference, rtol=1e-5, atol=1e-6)
    # evaluation: the adapted InformationRetrievalEvaluator encodes its queries as training does
    seen: list[np.ndarray] = []
    original = hf_qret.evaluation.evaluator.encode_texts

    def recording(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(hf_qret.evaluation.evaluator, "encode_texts", recording)
    evaluator = trainer.evaluator.evaluators[0] if hasattr(trainer.evaluator, "evaluators") else trainer.evaluator
    evaluator.queries, evaluator.query_ids = list(QUERIES), ["a", "b", "c"]
    evaluator.qrels = {"a": {"d0": 1}, "b": {"d0": 1}, "c": {"d0": 1}}
    evaluator(model, trainer.bank, trainer.served_index())
    np.testing.assert_allclose(seen[0], trained, rtol=1e-5, atol=1e-6)
    # serving: the saved artifact records the prompts and embeds queries identically
    config = json.loads((out / "qret_config.json").read_text())
    assert config["prompts"]["query"] == {"name": "query", "text": "query: "}
    assert config["prompts"]["document"] == {"name": "document", "text": "passage: "}
    assert config["normalize"] is True
    served = QuantizedRetriever.from_pretrained(out, device="cpu").encode_queries(QUERIES)
    np.testing.assert_allclose(served, trained, rtol=1e-5, atol=1e-6)


def test_prompted_documents_are_the_same_vectors_in_the_bank_and_add_documents(prompted_run, st_data):  # noqa: F811
    _, initial_bank, out = prompted_run
    corpus = st_data[0]
    texts = list(corpus.values())[:5]
    # the bank was encoded as sentence-transformers' encode_document encodes (the "passage: " prompt, unit vectors)
    from sentence_transformers import SentenceTransformer

    pretrained = SentenceTransformer(str(out / "document_encoder"), device="cpu")
    np.testing.assert_allclose(initial_bank[:5], pretrained.encode_document(texts, convert_to_numpy=True),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    retriever = QuantizedRetriever.from_pretrained(out, "cpu", load_bank=True)
    retriever.add_documents(texts, [f"again-{i}" for i in range(5)])
    added = retriever.files.bank.float32_rows()[-5:]
    # as the bank's rows: the same encoding, through the same document adapter layers
    layers = load_document_adapters(out)
    np.testing.assert_allclose(added, adapt_rows(initial_bank[:5], layers), rtol=1e-5, atol=1e-6)


def test_the_default_bf16_bank_and_add_documents_agree(tiny_model_dir, st_data, tmp_path, monkeypatch):  # noqa: F811
    """bank_encode_precision='auto' (the default) on a CPU with AMX (made to look so here: this machine has none)
    encodes the bank under bfloat16 autocast, and add_documents encodes new documents the same way: a document added
    again gets its bank row back within 1e-6 per component, while the bank differs from sentence-transformers' own
    float32 encode_document by more than that (and is within bf16's rounding of it: cosine >= 0.999). On a CPU
    without native bf16, add_documents gives that float32 encoding (1e-6)."""
    from sentence_transformers import SentenceTransformer

    corpus, pairs, _, _ = st_data
    texts = list(corpus.values())[:8]
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    trainer = QRetTrainer(model=e5_like(tiny_model_dir), args=st_args(tmp_path), train_dataset=pairs, corpus=corpus)
    assert trainer.args.bank_encode_precision == "auto"
    bank_rows = trainer.bank.numpy()[:8].copy()
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    assert json.loads((out / "qret_config.json").read_text())["document_precision"] == "bf16"
    reference = SentenceTransformer(str(out / "document_encoder"), device="cpu").encode_document(
        texts, convert_to_numpy=True
    )

    def cosine(a, b):
        return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    assert not np.allclose(bank_rows, reference, rtol=0, atol=1e-6)  # the bank was encoded in bf16
    assert cosine(bank_rows, reference).min() >= 0.999
    retriever = QuantizedRetriever.from_pretrained(out, "cpu", load_bank=True)
    retriever.add_documents(texts, [f"again-{i}" for i in range(8)])
    added = retriever.files.bank.float32_rows()[-8:]
    layers = load_document_adapters(out)  # new documents go through the layers the bank's rows went through
    np.testing.assert_allclose(added, adapt_rows(bank_rows, layers), rtol=0, atol=1e-6)  # float32 would be off more
    assert cosine(added, adapt_rows(reference, layers)).min() >= 0.999
    # no native bf16: add_documents encodes in float32, sentence-transformers' own encoding
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    retriever = QuantizedRetriever.from_pretrained(out, "cpu", load_bank=True)
    retriever.add_documents(texts, [f"again-{i}" for i in range(8)])
    np.testing.assert_allclose(
        retriever.files.bank.float32_rows()[-8:], adapt_rows(reference, layers), rtol=0, atol=1e-6
    )


def test_an_evaluator_prompt_other_than_the_trained_one_is_refused(tiny_model_dir, st_data, tmp_path):  # noqa: F811
    corpus, pairs, dev, _ = st_data
    args = st_args(tmp_path)
    same = ir_evaluator(corpus, dev, query_prompt="query: ")  # what training uses: accepted
    QRetTrainer(model=e5_like(tiny_model_dir), args=args, train_dataset=pairs, corpus=corpus, evaluator=same)
    other = ir_evaluator(corpus, dev, query_prompt="search_query: ")
    with pytest.raises(ConfigError, match="query prompt 'search_query: '.*training encodes queries with 'query: '"):
        QRetTrainer(model=e5_like(tiny_model_dir), args=args, train_dataset=pairs, corpus=corpus, evaluator=other)
    named = ir_evaluator(corpus, dev, corpus_prompt_name="query")
    with pytest.raises(ConfigError, match="corpus prompt 'query: '.*training encodes documents with 'passage: '"):
        QRetTrainer(model=e5_like(tiny_model_dir), args=args, train_dataset=pairs, corpus=corpus, evaluator=named)


def test_a_cosine_model_without_normalize_ships_one(prompted_run):
    from sentence_transformers import SentenceTransformer

    _, _, out = prompted_run
    modules = json.loads((out / "modules.json").read_text())
    assert modules[-1]["type"].endswith("Normalize")
    served = QuantizedRetriever.from_pretrained(out, "cpu").encode_queries(QUERIES)
    plain = SentenceTransformer(str(out), device="cpu").encode_query(QUERIES, convert_to_numpy=True)
    np.testing.assert_allclose(plain, served, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- plain-folder artifact
@pytest.fixture(scope="module")
def plain_artifact(tiny_model_dir, tmp_path_factory):
    """The recipe (2 steps) on a plain transformers folder (no modules.json, no --pooling) over 200 documents;
    the other 100 are left to add."""
    from test_cli import recipe_argv
    from transformers import AutoModel, AutoTokenizer

    from hf_qret.cli import train_main

    base = tmp_path_factory.mktemp("plain")
    plain = base / "plain_bert"
    AutoModel.from_pretrained(tiny_model_dir).save_pretrained(plain)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(plain)
    data, added = half_corpus_beir(base)
    out = base / "out"
    train_main(recipe_argv(str(plain), data, out, "--max_steps", "2", "--index_factory", "PQ4x4"))
    return out, plain, added


def test_plain_folder_artifact_adds_a_document_as_a_rebuild_would(plain_artifact):
    from sentence_transformers import SentenceTransformer

    out, plain, added = plain_artifact
    doc_id, doc = next(iter(added.items()))
    text = f"{doc['title']} {doc['text']}"
    # the row a rebuild over corpus + this document would hold: the bank's encoding (the recipe's model, configured)
    bank_model = SentenceTransformer(str(plain), device="cpu")
    configure_encoder(bank_model)
    stored = QuantizedRetriever.from_pretrained(out, "cpu", load_bank=True)
    # no prompts (the document role adds nothing), in the precision the bank was encoded in
    precision = stored.config["document_precision"]  # bank_encode_precision='auto': bf16 on a CPU with AMX
    expected = reference_embeddings(str(plain), [text], precision=precision)  # plain transformers, mean pooling
    np.testing.assert_allclose(expected, encode_texts(bank_model, [text], precision=precision), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(stored.files.bank.float32_rows()[:], axis=1), 1.0, atol=1e-4)
    # the rebuild: the artifact's index (same codebooks) with the expected row added
    rebuilt = QuantizedRetriever.from_pretrained(out, "cpu")
    rebuilt.index.add(expected)
    rebuilt.files.doc_ids.append(doc_id)
    grown = QuantizedRetriever.from_pretrained(out, "cpu", load_bank=True)
    grown.add_documents([text], [doc_id])
    np.testing.assert_allclose(grown.files.bank.float32_rows()[-1:], expected, rtol=1e-5, atol=1e-6)
    for query in (doc["text"], doc["title"]):
        mine = grown.search(query, k=len(grown.doc_ids))
        theirs = rebuilt.search(query, k=len(rebuilt.doc_ids))
        rank = [d for d, _ in mine].index(doc_id)
        assert rank == [d for d, _ in theirs].index(doc_id)
        assert mine[rank][1] == pytest.approx(theirs[rank][1], abs=1e-5)


def test_plain_folder_artifact_agrees_with_sentence_transformers(plain_artifact):
    from sentence_transformers import SentenceTransformer

    out, _, _ = plain_artifact
    assert json.loads((out / "modules.json").read_text())[-1]["type"].endswith("Normalize")
    served = QuantizedRetriever.from_pretrained(out, "cpu").encode_queries(QUERIES)
    reference = SentenceTransformer(str(out), device="cpu").encode(QUERIES, convert_to_numpy=True)
    np.testing.assert_allclose(reference, served, rtol=1e-5, atol=1e-6)


def test_plain_transformers_encoder_is_saved_as_a_sentence_transformer(tiny_model_dir, beir_dir, tmp_path):
    from sentence_transformers import SentenceTransformer
    from test_similarity import trainer_for
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModel.from_pretrained(tiny_model_dir)
    trainer = trainer_for(model, beir_dir, tmp_path, tokenizer=tokenizer, pooling="cls")
    trainer.train()
    out = tmp_path / "plain_cls"
    trainer.save_model(str(out))
    served = QuantizedRetriever.from_pretrained(out, "cpu").encode_queries(QUERIES)
    model.save_pretrained(tmp_path / "trained_plain")
    tokenizer.save_pretrained(tmp_path / "trained_plain")
    reference = reference_embeddings(str(tmp_path / "trained_plain"), QUERIES, pooling="cls")
    np.testing.assert_allclose(served, reference, rtol=1e-4, atol=1e-5)
    reference = SentenceTransformer(str(out), device="cpu").encode(QUERIES, convert_to_numpy=True)
    np.testing.assert_allclose(reference, served, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- the API
def test_device_is_the_second_positional_parameter_and_search_takes_one_query(plain_artifact):
    out, _, _ = plain_artifact
    retriever = QuantizedRetriever.from_pretrained(out, "cpu")
    assert retriever.model.device.type == "cpu"
    with pytest.raises(TypeError):
        QuantizedRetriever.from_pretrained(out, "cpu", None)  # everything after the device is keyword-only
    hits = retriever.search("protein gene cell", k=3)
    assert hits == retriever.search(["protein gene cell"], k=3)[0]
    assert len(hits) == 3 and all(isinstance(doc_id, str) for doc_id, _ in hits)
    assert (
        retriever.semantic_search("protein gene cell", top_k=2)
        == retriever.semantic_search(["protein gene cell"], 2)[0]
    )
