"""Integration: a sentence-transformers script converted by the class swap trains the real
all-MiniLM-L6-v2 on a SciFact sample: text pairs, the corpus as ``{doc_id: text}``, InformationRetrievalEvaluators."""

from __future__ import annotations

import random

import pytest
from conftest import SCIFACT_DIR, minilm_path

from hf_qret.data import doc_text, load_beir

pytestmark = pytest.mark.integration


def test_minilm_text_pairs_with_corpus_and_ir_evaluators(tmp_path):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator, SequentialEvaluator

    from hf_qret import QRetTrainer, QRetTrainingArguments, QuantizedRetriever

    train, dev = load_beir(SCIFACT_DIR, split="train"), load_beir(SCIFACT_DIR, split="dev")
    train_qrels, dev_qrels = dict(list(train.qrels.items())[:96]), dict(list(dev.qrels.items())[:40])
    needed = {d for qrels in (train_qrels, dev_qrels) for docs in qrels.values() for d in docs}
    others = random.Random(0).sample([d for d in train.doc_ids if d not in needed], 200)
    corpus = {d: doc_text(train.corpus[d]) for d in train.doc_ids if d in needed or d in set(others)}
    pairs = [(train.queries[q], corpus[d]) for q, docs in train_qrels.items() for d in docs]
    train_dataset = Dataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [p for _, p in pairs]})

    def ir(qrels, queries, name):
        return InformationRetrievalEvaluator(queries, corpus, {q: set(d) for q, d in qrels.items()}, name=name)

    evaluator = SequentialEvaluator([ir(train_qrels, train.queries, "seen"), ir(dev_qrels, dev.queries, "dev")])
    out = tmp_path / "out"
    args = QRetTrainingArguments(output_dir=str(out), index_factory="PQ16", num_train_epochs=1,
                                 per_device_train_batch_size=32, report_to="none", save_strategy="no",
                                 use_cpu=True, dataloader_pin_memory=False, faiss_threads=1)  # fmt: skip
    model = SentenceTransformer(minilm_path(), device="cpu")
    trainer = QRetTrainer(model=model, args=args, train_dataset=train_dataset, corpus=corpus, evaluator=evaluator)
    assert trainer.bank.doc_ids == list(corpus)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    trainer.save_model()
    assert after["eval_dev_quantized_ndcg@10"] > 0.4 and after["eval_dev_flat_ndcg@10"] > 0.5
    # the claims it trained on are retrieved better through the 16-byte index
    assert after["eval_seen_quantized_ndcg@10"] > before["eval_seen_quantized_ndcg@10"] + 0.03
    retriever = QuantizedRetriever.from_pretrained(out, device="cpu")
    hits = retriever.search(["Vitamin D deficiency increases cancer risk."], k=10, return_text=True)[0]
    assert len(hits) == 10 and all(doc_id in corpus and text == corpus[doc_id] for doc_id, _, text in hits)
    assert retriever.bytes_per_vector == 16
