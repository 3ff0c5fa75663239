"""The recipe's safety net (never ship a model that training made worse) and training on train + eval split."""

from __future__ import annotations

import json
import logging
import time
from functools import partial

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_cli import recipe_argv

from hf_qret.data import load_beir
from hf_qret.recipe import train_main, training_verdict
from hf_qret.training.trainer import QRetTrainer


def _pretrained_weights(model_dir: str) -> dict[str, torch.Tensor]:
    from sentence_transformers import SentenceTransformer

    return {k: v.clone() for k, v in SentenceTransformer(model_dir, device="cpu").state_dict().items()}


def _artifact_weights(out) -> dict[str, torch.Tensor]:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(out), device="cpu").state_dict()


def _bank(out) -> torch.Tensor:
    config = json.loads((out / "qret_config.json").read_text())
    return next(iter(load_file(str(out / config["bank_file"])).values()))


def test_verdict_keeps_the_untrained_model_only_when_training_made_it_worse():
    better = {"untrained": {"untrained_quantized_ndcg@10": 0.3}, "trained": {"trained_quantized_ndcg@10": 0.31}}
    worse = {"untrained": {"untrained_quantized_ndcg@10": 0.3}, "trained": {"trained_quantized_ndcg@10": 0.2}}
    assert training_verdict(better) == ("trained", None)
    shipped, warning = training_verdict(worse)
    assert shipped == "untrained" and "0.3000" in warning and "0.2000" in warning
    assert training_verdict({}) == ("trained", None)  # no evaluation: nothing to compare


def _after_training(trainer, metric_key_prefix: str) -> bool:
    """An evaluation of the trained model: the safety net's after training, or the recipe's own ("trained")."""
    return metric_key_prefix == "trained" or (metric_key_prefix == "eval" and trainer.state.global_step > 0)


@pytest.fixture()
def degrading(monkeypatch):
    """Every evaluation after training scores lower than the untrained one (a forced-degrading run)."""
    original = QRetTrainer.retrieval_metrics

    def retrieval_metrics(self, metric_key_prefix="eval"):
        metrics = original(self, metric_key_prefix)
        if _after_training(self, metric_key_prefix):
            metrics = {k: (v - 0.5 if "ndcg" in k else v) for k, v in metrics.items()}
        return metrics

    monkeypatch.setattr(QRetTrainer, "retrieval_metrics", retrieval_metrics)


@pytest.mark.parametrize("train_on_eval_split", ["false", "true"])
def test_a_run_that_gets_worse_ships_the_untrained_model_loudly(
    degrading, tiny_model_dir, two_split_dir, tmp_path, caplog, train_on_eval_split
):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="hf_qret"):
        results = train_main(recipe_argv(
            tiny_model_dir, two_split_dir, out, "--bank_learning_rate", "0.5", "--learning_rate", "0.01",
            "--train_on_eval_split", train_on_eval_split,
        ))  # fmt: skip
    assert results["shipped"] == "untrained" and results["trained_on"] == []
    assert any("TRAINING MADE THE MODEL WORSE" in r.getMessage() for r in caplog.records)
    # the artifact is the pretrained encoder and bank (training moved both)
    pretrained = _pretrained_weights(tiny_model_dir)
    shipped = _artifact_weights(out)
    assert all(torch.equal(pretrained[k], shipped[k]) for k in pretrained)
    from sentence_transformers import SentenceTransformer

    from hf_qret.bank.core import TargetBank
    from hf_qret.serving.encoder import encode_texts

    data = load_beir(two_split_dir, split="train")
    model = SentenceTransformer(tiny_model_dir, device="cpu")
    # the bank as the recipe encoded it (bank_encode_precision 'auto': bfloat16 on a CPU with AMX)
    encode = partial(encode_texts, model, precision="auto")
    initial = TargetBank.from_encoder(encode, data.doc_texts(), data.doc_ids).weight
    torch.testing.assert_close(_bank(out).float(), initial.detach().float())
    assert json.loads((out / "qret_config.json").read_text())["global_step"] == 0
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["shipped"] == "untrained"
    card = (out / "README.md").read_text()
    assert "TRAINING MADE THE MODEL WORSE" in card and "untrained model is shipped" in card
    assert not list(out.glob("bank_init.tmp*"))


def test_a_run_that_improves_ships_the_trained_model(tiny_model_dir, two_split_dir, tmp_path, monkeypatch):
    original = QRetTrainer.retrieval_metrics

    def retrieval_metrics(self, metric_key_prefix="eval"):
        metrics = original(self, metric_key_prefix)
        return {
            k: (v + 0.5 if "ndcg" in k and _after_training(self, metric_key_prefix) else v) for k, v in metrics.items()
        }

    monkeypatch.setattr(QRetTrainer, "retrieval_metrics", retrieval_metrics)
    out = tmp_path / "out"
    results = train_main(recipe_argv(tiny_model_dir, two_split_dir, out, "--train_on_eval_split", "false"))
    assert results["shipped"] == "trained" and results["trained_on"] == ["train"]
    assert json.loads((out / "qret_config.json").read_text())["global_step"] == 4
    assert "TRAINING MADE THE MODEL WORSE" not in (out / "README.md").read_text()


def test_train_on_eval_split_ships_a_model_trained_on_both_splits(tiny_model_dir, two_split_dir, tmp_path, monkeypatch):
    original = QRetTrainer.retrieval_metrics
    trained_sets: list[set[str]] = []
    original_train = QRetTrainer.train

    def train(self, *args, **kwargs):
        trained_sets.append(set(self.train_dataset["query_id"]))
        return original_train(self, *args, **kwargs)

    def retrieval_metrics(self, metric_key_prefix="eval"):
        metrics = original(self, metric_key_prefix)
        return {
            k: (v + 0.5 if "ndcg" in k and _after_training(self, metric_key_prefix) else v) for k, v in metrics.items()
        }

    monkeypatch.setattr(QRetTrainer, "retrieval_metrics", retrieval_metrics)
    monkeypatch.setattr(QRetTrainer, "train", train)
    out = tmp_path / "out"
    start = time.perf_counter()
    results = train_main(recipe_argv(
        tiny_model_dir, two_split_dir, out, "--train_on_eval_split", "true", "--bank_learning_rate", "0.05",
    ))  # fmt: skip
    wall = time.perf_counter() - start
    train_ids = set(load_beir(two_split_dir, split="train").qrels)
    dev = load_beir(two_split_dir, split="dev")
    # first the selection run on train alone (its dev numbers are held out), then the shipped run on both
    assert trained_sets == [train_ids, train_ids | set(dev.qrels)]
    assert results["shipped"] == "trained" and results["trained_on"] == ["train", "dev"]
    # where the time went, both runs (what benchmarks/end_to_end.py reports)
    timings = json.loads((out / "eval_results.json").read_text())["timings_s"]
    assert set(timings) == {"encode_bank", "train", "index", "train_on_eval_split_train",
                            "train_on_eval_split_index", "save"}  # fmt: skip
    # every phase took time, and the phases are disjoint parts of the run (each rounded to 1 ms)
    assert all(seconds > 0 for seconds in timings.values()), timings
    assert sum(timings.values()) <= wall + 0.0005 * len(timings), (timings, wall)
    # documents that are positives of dev queries only moved: the shipped bank learned from the dev split
    train_docs = {d for docs in load_beir(two_split_dir, split="train").qrels.values() for d in docs}
    dev_only = sorted({d for docs in dev.qrels.values() for d in docs} - train_docs)
    assert dev_only
    doc_ids = json.loads((out / "doc_ids.json").read_text())
    rows = [doc_ids.index(d) for d in dev_only]
    from sentence_transformers import SentenceTransformer

    from hf_qret.serving.encoder import encode_texts

    model = SentenceTransformer(tiny_model_dir, device="cpu")
    initial = encode_texts(model, [dev.doc_texts()[r] for r in rows])
    assert not np.allclose(_bank(out).float().numpy()[rows], initial, atol=1e-4)
    card = (out / "README.md").read_text()
    assert "Trained on | train + dev" in card and "would not be held out" in card
