"""Accuracy options of the bank: drift control (rows keep their norm) and positives-only updates."""

from __future__ import annotations

import pytest
import torch
from test_trainer import make_trainer

from hf_qret import QRetTrainingArguments
from hf_qret.errors import ConfigError


def test_unknown_bank_update_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="bank_update"):
        QRetTrainingArguments(output_dir=str(tmp_path), bank_update="some", report_to="none")


def test_positives_only_update_leaves_negatives_untouched(tiny_model, beir_dir, tmp_path):
    trainer, data = make_trainer(
        tiny_model, beir_dir, tmp_path, bank_update="positives", bank_optimizer="adam", max_steps=4, doc_adapter_rank=0
    )  # Adam: its per-row step counts show which rows stepped; the row optimizer alone (no document adapter)
    batch_positives = []
    mine = trainer.miner.mine

    def recording_mine(*args, **kwargs):
        mined = mine(*args, **kwargs)
        batch_positives.append(mined.candidates[trainer.trainable_rows[mined.candidates]])
        return mined

    trainer.miner.mine = recording_mine
    before = trainer.bank.weight.detach().clone()
    trainer.train()
    moved = (trainer.bank.weight.detach() - before).abs().sum(dim=1) > 0
    positives = {trainer.bank.row_of(d) for q in data.qrels for d, s in data.qrels[q].items() if s > 0}
    assert moved.any()
    assert set(moved.nonzero().squeeze(1).tolist()) <= positives
    assert trainer.trainable_rows.nonzero().squeeze(1).tolist() == sorted(positives)
    # a row's own Adam step count is how often it was a candidate while being a training positive: other documents
    # never take a (zero-gradient) step
    counts = torch.zeros(len(before), dtype=torch.int64)
    for rows in batch_positives:
        counts[rows] += 1
    assert (
        len(batch_positives) == 4 and counts.sum() > 0 and torch.equal(trainer.bank_optimizer.row_steps.cpu(), counts)
    )


def test_drift_control_keeps_norms(tiny_model_dir, beir_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    def run(name, **options):
        model = SentenceTransformer(tiny_model_dir, device="cpu")
        trainer, _ = make_trainer(
            model, beir_dir, tmp_path / name, max_steps=4, bank_learning_rate=5e-2, refresh_on_epoch_end=False,
            **options,
        )  # fmt: skip
        start = trainer.bank.weight.detach().clone()
        trainer.train()
        return start, trainer.bank.weight.detach()

    start, free = run("free", bank_keep_norm=False)
    _, norm = run("norm", bank_keep_norm=True)
    assert ((norm - start).abs().sum(dim=1) > 0).any()
    torch.testing.assert_close(norm.norm(dim=1), start.norm(dim=1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(free.norm(dim=1), start.norm(dim=1), rtol=1e-5, atol=1e-5)


def test_positives_only_needs_the_training_positives():
    from datasets import Dataset

    from hf_qret import TargetBank
    from hf_qret.training.trainer import training_positive_rows

    bank = TargetBank(torch.zeros(3, 4), ["a", "b", "c"])
    rows = training_positive_rows(Dataset.from_dict({"positive_id": ["c"], "positive_ids": [["c", "a"]]}), bank)
    assert rows.tolist() == [True, False, True]
    with pytest.raises(ConfigError, match="'positive_id'.*--bank_update all"):
        training_positive_rows(Dataset.from_dict({"query": ["q"], "doc": ["c"]}), bank)
