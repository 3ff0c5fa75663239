"""QRetTrainer with a tiny random BERT: the bank, mining, refresh, logging, saving and resuming."""

from __future__ import annotations

import json
import os
from functools import partial

import numpy as np
import pytest
import torch

from hf_qret import (
    IndexRefreshCallback,
    QRetTrainer,
    QRetTrainingArguments,
    RetrievalEvaluator,
    TargetBank,
    build_pairs_dataset,
    load_beir,
)
from hf_qret.serving.encoder import encode_texts


def make_args(tmp_path, **overrides) -> QRetTrainingArguments:
    options = dict(
        output_dir=str(tmp_path / "out"),
        index_factory="PQ4",
        num_negatives=8,
        per_device_train_batch_size=8,
        max_steps=6,
        learning_rate=1e-3,
        bank_learning_rate=1e-2,
        logging_steps=2,
        report_to="none",
        save_strategy="no",
        seed=0,
        use_cpu=True,
        dataloader_pin_memory=False,
    )
    options.update(overrides)
    return QRetTrainingArguments(**options)


def make_trainer(model, beir_dir, tmp_path, **overrides):
    data = load_beir(beir_dir, split="train")
    bank = TargetBank.from_encoder(partial(encode_texts, model), data.doc_texts(), data.doc_ids)
    evaluator = overrides.pop("evaluator", None)
    callbacks = overrides.pop("callbacks", None)
    trainer = QRetTrainer(
        model,
        make_args(tmp_path, **overrides),
        train_dataset=build_pairs_dataset(data),
        bank=bank,
        evaluator=evaluator,
        callbacks=callbacks,
    )
    return trainer, data


def record_candidates(trainer) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    original = trainer.miner.mine

    def mine(*args, **kwargs):
        mined = original(*args, **kwargs)
        seen.append(mined.candidates.clone())
        return mined

    trainer.miner.mine = mine
    return seen


def test_step_touches_only_candidate_rows(tiny_model, beir_dir, tmp_path):
    """The seed method (bank_update='all', row-wise Adam): every candidate row takes a row-Adam step."""
    # the row optimizer alone (the document adapter, which moves every row at the final refresh, is off)
    trainer, _ = make_trainer(
        tiny_model, beir_dir, tmp_path, bank_update="all", bank_optimizer="adam", doc_adapter_rank=0
    )
    seen = record_candidates(trainer)
    before = trainer.bank.weight.detach().clone()
    trainer.train()
    after = trainer.bank.weight.detach()
    touched = torch.unique(torch.cat(seen))
    changed = (after != before).any(dim=1).nonzero().squeeze(1)
    assert len(seen) == 6
    assert set(changed.tolist()) <= set(touched.tolist())
    assert len(changed) > 0.5 * len(touched)
    untouched = torch.ones(len(before), dtype=torch.bool)
    untouched[touched] = False
    assert torch.equal(after[untouched], before[untouched])
    # every touched row's own Adam step count equals how often it was a candidate
    counts = torch.zeros(len(before), dtype=torch.int64)
    for candidates in seen:
        counts[candidates] += 1
    assert torch.equal(trainer.bank_optimizer.row_steps.cpu(), counts)


def test_bank_and_encoder_learning_rates_are_separate(tiny_model_dir, beir_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(tiny_model_dir, device="cpu")
    trainer, _ = make_trainer(model, beir_dir, tmp_path, bank_learning_rate=0.0)
    bank_before = trainer.bank.weight.detach().clone()
    encoder_before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    assert torch.equal(trainer.bank.weight.detach(), bank_before)
    assert any(not torch.equal(v, encoder_before[k]) for k, v in model.state_dict().items())

    model = SentenceTransformer(tiny_model_dir, device="cpu")
    trainer, _ = make_trainer(model, beir_dir, tmp_path / "b", learning_rate=0.0, bank_learning_rate=1e-2)
    bank_before = trainer.bank.weight.detach().clone()
    encoder_before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    assert not torch.equal(trainer.bank.weight.detach(), bank_before)
    assert all(torch.equal(v, encoder_before[k]) for k, v in model.state_dict().items())


def test_training_logs_rank_and_candidates(tiny_model, beir_dir, tmp_path):
    trainer, _ = make_trainer(tiny_model, beir_dir, tmp_path)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert entry["mean_positive_rank"] >= 1.0
        assert entry["num_candidates"] >= 8  # at least the batch's positives
        assert 0 < entry["bank_learning_rate"] <= 1e-2
        assert np.isfinite(entry["loss"])


def test_refresh_callback_reencodes_bank_with_current_codebooks(tiny_model, beir_dir, tmp_path):
    import faiss

    trainer, _ = make_trainer(
        tiny_model, beir_dir, tmp_path, refresh_mode="reencode", refresh_steps=2, refresh_on_epoch_end=False,
        final_refresh_mode="reencode",  # the last refresh too (unset: the run's last refresh retrains)
    )  # fmt: skip
    trainer.ensure_index()
    pq_before = faiss.vector_to_array(faiss.downcast_index(trainer.index.index).pq.centroids).copy()
    trainer.train()
    assert trainer.refresh_callback.refreshes == 3
    inner = faiss.downcast_index(trainer.index.index)
    assert np.array_equal(faiss.vector_to_array(inner.pq.centroids), pq_before)  # codebooks kept
    codes = faiss.vector_to_array(inner.codes).reshape(trainer.index.ntotal, -1)
    assert np.array_equal(codes, inner.sa_encode(trainer.bank.numpy()))  # codes of the final bank


def test_refresh_retrain_mode_and_train_end_refresh(tiny_model, beir_dir, tmp_path):
    import faiss

    trainer, _ = make_trainer(
        tiny_model, beir_dir, tmp_path, refresh_mode="retrain", refresh_steps=4, refresh_on_epoch_end=False
    )
    trainer.ensure_index()
    pq_before = faiss.vector_to_array(faiss.downcast_index(trainer.index.index).pq.centroids).copy()
    trainer.train()
    # step 4, then at train end because steps 5-6 changed the bank
    assert trainer.refresh_callback.refreshes == 2
    inner = faiss.downcast_index(trainer.index.index)
    assert not np.array_equal(faiss.vector_to_array(inner.pq.centroids), pq_before)
    codes = faiss.vector_to_array(inner.codes).reshape(trainer.index.ntotal, -1)
    assert np.array_equal(codes, inner.sa_encode(trainer.bank.numpy()))


def test_evaluate_reports_flat_and_quantized(tiny_model, beir_dir, tmp_path):
    data = load_beir(beir_dir, split="train")
    evaluator = RetrievalEvaluator(data.queries, data.qrels, seen_doc_ids=["d0"])
    trainer, _ = make_trainer(tiny_model, beir_dir, tmp_path, evaluator=evaluator, eval_strategy="steps", eval_steps=3)
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_quantized_ndcg@10" in entry]
    assert [entry["step"] for entry in evals] == [0, 3, 6]  # step 0: the safety net's evaluation before training
    for key in ("flat_ndcg@10", "flat_recall@100", "flat_mrr@10", "quantized_ndcg@10", "quantized_ndcg@10_unseen"):
        assert 0.0 <= evals[-1][f"eval_{key}"] <= 1.0


def test_save_model_writes_a_loadable_artifact(tiny_model, beir_dir, tmp_path):
    import faiss
    from sentence_transformers import SentenceTransformer

    trainer, data = make_trainer(tiny_model, beir_dir, tmp_path)
    trainer.train()
    out = tmp_path / "artifact"
    trainer.save_model(str(out))
    names = set(os.listdir(out))
    assert {"index.faiss", "doc_ids.json", "bank.safetensors", "qret_config.json", "modules.json"} <= names
    assert not any(name.endswith(".tmp") for name in names)
    config = json.loads((out / "qret_config.json").read_text())
    assert config["index_factory"] == "PQ4" and config["bytes_per_vector"] == 4 and config["num_vectors"] == 300
    assert json.loads((out / "doc_ids.json").read_text()) == data.doc_ids
    index = faiss.read_index(str(out / "index.faiss"))
    assert index.ntotal == 300
    reloaded = SentenceTransformer(str(out), device="cpu")
    texts = ["protein gene", "virus vaccine immune"]
    np.testing.assert_allclose(
        reloaded.encode(texts, convert_to_numpy=True), encode_texts(tiny_model, texts), rtol=1e-5, atol=1e-6
    )


def test_resume_from_checkpoint_matches_unbroken_run(tiny_model_dir, beir_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    def run(output, max_steps, resume=None, **overrides):
        model = SentenceTransformer(tiny_model_dir, device="cpu")
        trainer, _ = make_trainer(model, beir_dir, output, max_steps=max_steps, **overrides)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    unbroken = run(tmp_path / "a", 8, refresh_steps=2)
    first = run(tmp_path / "b", 8, refresh_steps=2, save_strategy="steps", save_steps=4)
    checkpoint = tmp_path / "b" / "out" / "checkpoint-4"
    assert (checkpoint / "bank.safetensors").is_file() and (checkpoint / "bank_optimizer.safetensors").is_file()
    resumed = run(tmp_path / "c", 8, resume=str(checkpoint), refresh_steps=2)
    torch.testing.assert_close(resumed.bank.weight, unbroken.bank.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first.bank.weight, unbroken.bank.weight, rtol=1e-4, atol=1e-5)
    assert torch.equal(resumed.bank_optimizer.row_steps, unbroken.bank_optimizer.row_steps)


def test_plain_transformers_encoder_with_tokenizer(tiny_model_dir, beir_dir, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = load_beir(beir_dir, split="train")
    bank = TargetBank.from_encoder(partial(encode_texts, model, tokenizer=tokenizer), data.doc_texts(), data.doc_ids)
    trainer = QRetTrainer(
        model, make_args(tmp_path), train_dataset=build_pairs_dataset(data), bank=bank, processing_class=tokenizer
    )
    before = bank.weight.detach().clone()
    trainer.train()
    assert not torch.equal(bank.weight.detach(), before)
    trainer.save_model(str(tmp_path / "plain"))
    assert (tmp_path / "plain" / "index.faiss").is_file() and (tmp_path / "plain" / "config.json").is_file()


def test_user_refresh_callback_replaces_the_default(tiny_model, beir_dir, tmp_path):
    data = load_beir(beir_dir, split="train")
    bank = TargetBank.from_encoder(partial(encode_texts, tiny_model), data.doc_texts(), data.doc_ids)
    from hf_qret import QuantizedIndex

    index = QuantizedIndex(bank.dim, "PQ4")
    index.build(bank.numpy())
    callback = IndexRefreshCallback(bank, index, every_n_steps=3, on_epoch_end=False)
    trainer = QRetTrainer(
        tiny_model,
        make_args(tmp_path),
        train_dataset=build_pairs_dataset(data),
        bank=bank,
        index=index,
        callbacks=[callback],
    )
    assert trainer.refresh_callback is callback
    trainer.train()
    assert callback.refreshes == 2


def test_trainer_rejects_bank_of_wrong_dimension(tiny_model, beir_dir, tmp_path):
    from hf_qret import ArtifactError

    data = load_beir(beir_dir, split="train")
    bank = TargetBank(torch.randn(len(data.doc_ids), 16), data.doc_ids)
    with pytest.raises(ArtifactError, match="dimension 16"):
        QRetTrainer(tiny_model, make_args(tmp_path), train_dataset=build_pairs_dataset(data), bank=bank)


def test_evaluation_callback_schedules_each_step_once(tiny_model, beir_dir, tmp_path):
    from hf_qret import RetrievalEvaluationCallback

    data = load_beir(beir_dir, split="train")
    trainer, _ = make_trainer(
        tiny_model,
        beir_dir,
        tmp_path,
        evaluator=RetrievalEvaluator(data.queries, data.qrels),
        callbacks=[RetrievalEvaluationCallback(every_n_steps=3, on_epoch_end=True)],
    )
    trainer.train()  # 6 steps end part-way through the first epoch: step 6 is a step *and* the epoch's end
    steps = [entry["step"] for entry in trainer.state.log_history if "eval_quantized_ndcg@10" in entry]
    assert steps == [0, 3, 6]  # step 0: the safety net's evaluation before training
