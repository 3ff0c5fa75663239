"""The library's safety net: any QRetTrainer run with an evaluator keeps the untrained model if training hurt it."""

from __future__ import annotations

import json

import faiss
import numpy as np
import torch
from test_trainer import make_trainer

from hf_qret import QuantizedRetriever, RetrievalEvaluator
from hf_qret.training.safety_net import UNTRAINED_DIR, SafetyNetCallback, stage_metrics, training_verdict


def _evaluator(beir_dir):
    from hf_qret import load_beir

    data = load_beir(beir_dir, split="train")
    return RetrievalEvaluator(data.queries, data.qrels)


def _hurt_after_training(monkeypatch, delta: float) -> None:
    """Shifts every nDCG of evaluations after the first step by ``delta`` (a run that training hurt or helped)."""
    from hf_qret import QRetTrainer

    original = QRetTrainer.retrieval_metrics

    def retrieval_metrics(self, metric_key_prefix="eval"):
        metrics = original(self, metric_key_prefix)
        if self.state.global_step > 0:
            metrics = {k: v + delta if "ndcg" in k else v for k, v in metrics.items()}
        return metrics

    monkeypatch.setattr(QRetTrainer, "retrieval_metrics", retrieval_metrics)


def _state(trainer):
    model = trainer.accelerator.unwrap_model(trainer.model)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    codes = faiss.vector_to_array(faiss.downcast_index(trainer.index.index).codes).copy()
    return weights, trainer.bank.weight.detach().clone(), codes


def test_a_run_that_hurts_the_metric_keeps_the_untrained_encoder_bank_and_index(
    tiny_model, beir_dir, tmp_path, monkeypatch, caplog
):
    _hurt_after_training(monkeypatch, -0.5)
    trainer, _ = make_trainer(tiny_model, beir_dir, tmp_path, evaluator=_evaluator(beir_dir))
    assert isinstance(trainer.safety_net, SafetyNetCallback)  # on by default with an evaluator
    trainer.ensure_index()
    weights, bank, codes = _state(trainer)
    trainer.train()
    after_weights, after_bank, after_codes = _state(trainer)
    assert all(torch.equal(weights[k], after_weights[k]) for k in weights)
    torch.testing.assert_close(after_bank, bank)
    np.testing.assert_array_equal(after_codes, codes)
    assert trainer.bank.changed_rows().size == 0  # the index encodes exactly the restored bank
    verdict = trainer.safety_net.verdict
    assert verdict.shipped == "untrained" and "TRAINING MADE THE MODEL WORSE" in verdict.warning
    assert any("TRAINING MADE THE MODEL WORSE" in r.getMessage() for r in caplog.records)
    # the step-0 evaluation is in the log history, at step 0, like any other evaluation
    assert any(e.get("step") == 0 and "eval_quantized_ndcg@10" in e for e in trainer.state.log_history)
    out = tmp_path / "out"
    assert not (out / UNTRAINED_DIR).exists()  # the snapshot is a working folder
    trainer.save_model()
    results = json.loads((out / "eval_results.json").read_text())
    assert results["shipped"] == "untrained" and "TRAINING MADE THE MODEL WORSE" in results["notes"][0]
    config = json.loads((out / "qret_config.json").read_text())
    assert config["global_step"] == 0 and config["safety_net"]["shipped"] == "untrained"
    # one record of what was shipped: the untrained index was built at step 0 and never refreshed
    assert trainer.state.global_step == 6 and trainer.refresh_callback.last_refresh_step == 6
    assert config["index_state"]["step"] == 0 and config["index_state"]["last_refresh_step"] is None
    assert config["index_state"]["last_refresh_mode"] is None
    trainer.create_model_card()
    assert "TRAINING MADE THE MODEL WORSE" in (out / "README.md").read_text()
    # the saved artifact serves the untrained bank and index
    served = QuantizedRetriever.from_pretrained(out, device="cpu", load_bank=True)
    np.testing.assert_allclose(served.files.bank.float32_rows()[:], bank.numpy(), rtol=0, atol=1e-6)


def test_a_run_that_helps_keeps_the_trained_model(tiny_model, beir_dir, tmp_path, monkeypatch):
    _hurt_after_training(monkeypatch, +0.5)
    trainer, _ = make_trainer(tiny_model, beir_dir, tmp_path, evaluator=_evaluator(beir_dir))
    trainer.ensure_index()
    _, bank, _ = _state(trainer)
    trainer.train()
    assert trainer.safety_net.verdict.shipped == "trained"
    assert not torch.equal(trainer.bank.weight.detach(), bank)
    trainer.save_model()
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert results["shipped"] == "trained" and "notes" not in results
    assert results["trained"]["trained_quantized_ndcg@10"] > results["untrained"]["untrained_quantized_ndcg@10"]


def test_the_net_can_be_turned_off_and_needs_an_evaluator(tiny_model, beir_dir, tmp_path):
    trainer, _ = make_trainer(tiny_model, beir_dir, tmp_path, evaluator=_evaluator(beir_dir),
                              keep_untrained_if_better=False)  # fmt: skip
    assert trainer.safety_net is None
    trainer, _ = make_trainer(tiny_model, beir_dir, tmp_path / "b")
    assert trainer.safety_net is None  # nothing to compare without an evaluator


def test_a_resumed_run_keeps_its_safety_net(tiny_model_dir, beir_dir, tmp_path, monkeypatch):
    """The step-0 metrics come back from the checkpoint's log history, the untrained model from its snapshot."""
    from sentence_transformers import SentenceTransformer

    _hurt_after_training(monkeypatch, -0.5)
    first, _ = make_trainer(SentenceTransformer(tiny_model_dir, device="cpu"), beir_dir, tmp_path,
                            evaluator=_evaluator(beir_dir), save_strategy="steps", save_steps=3)  # fmt: skip
    first.ensure_index()
    weights, bank, _ = _state(first)
    # a run that stops after its checkpoint at step 3 (as a crash would): the snapshot stays on disk
    monkeypatch.setattr(SafetyNetCallback, "on_train_end", lambda *a, **k: None)
    first.args.max_steps = 3
    first.train()
    assert (tmp_path / "out" / UNTRAINED_DIR / "qret_config.json").is_file()
    monkeypatch.undo()
    _hurt_after_training(monkeypatch, -0.5)
    resumed, _ = make_trainer(SentenceTransformer(tiny_model_dir, device="cpu"), beir_dir, tmp_path,
                              evaluator=_evaluator(beir_dir), save_strategy="steps", save_steps=3)  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    assert resumed.safety_net.verdict.shipped == "untrained"
    after_weights, after_bank, _ = _state(resumed)
    assert all(torch.equal(weights[k], after_weights[k]) for k in weights)
    torch.testing.assert_close(after_bank, bank)


def test_verdict_and_stage_names():
    assert stage_metrics({"eval_quantized_ndcg@10": 0.4, "eval_loss": 1.0, "step": 3}, "trained") == {
        "trained_quantized_ndcg@10": 0.4, "trained_loss": 1.0,
    }  # fmt: skip
    worse = {"untrained": {"untrained_quantized_ndcg@10": 0.3}, "trained": {"trained_quantized_ndcg@10": 0.2}}
    assert training_verdict(worse)[0] == "untrained"
    assert training_verdict({"untrained": {"untrained_quantized_ndcg@10": 0.3}}) == ("trained", None)


def test_the_untrained_model_is_the_step_0_point_of_load_best_model_at_end(tiny_model, beir_dir, tmp_path, monkeypatch):
    """No checkpoint beats the untrained model: none is "best", nothing is loaded, the untrained model is kept."""
    _hurt_after_training(monkeypatch, -0.5)
    trainer, _ = make_trainer(
        tiny_model, beir_dir, tmp_path, evaluator=_evaluator(beir_dir), eval_strategy="steps", eval_steps=3,
        save_strategy="steps", save_steps=3, load_best_model_at_end=True, metric_for_best_model="quantized_ndcg@10",
    )  # fmt: skip
    trainer.ensure_index()
    weights, bank, _ = _state(trainer)
    trainer.train()
    step0 = next(e["eval_quantized_ndcg@10"] for e in trainer.state.log_history if e.get("step") == 0)
    assert trainer.state.best_metric == step0 and trainer.state.best_model_checkpoint is None
    assert trainer.safety_net.verdict.shipped == "untrained"
    after_weights, after_bank, _ = _state(trainer)
    assert all(torch.equal(weights[k], after_weights[k]) for k in weights)
    torch.testing.assert_close(after_bank, bank)
