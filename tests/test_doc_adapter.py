"""The document adapter (``doc_adapter_rank``): every bank row moves, baked into the bank at each refresh."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_trainer import make_args, make_trainer

from hf_qret.bank.core import TargetBank
from hf_qret.errors import ConfigError
from hf_qret.index.mining import IndexMiner
from hf_qret.training.adapter import AdapterOptimizer, DocumentAdapter
from hf_qret.training.loss import MinedNegativesLoss


def unit_rows(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_adapter_moves_rows_no_candidate_ever_reached():
    """Trained on candidates 0-3 only, the shared adapter moves rows 4-7 too, and keeps every row's norm."""
    bank = TargetBank(unit_rows(8, 16), [f"d{i}" for i in range(8)])
    adapter = DocumentAdapter(16, rank=8)
    optimizer = AdapterOptimizer(adapter, lr=1e-2)
    loss_fn = MinedNegativesLoss(bank, train_bank=False, adapter=adapter, adapter_optimizer=optimizer)
    queries = unit_rows(4, 16, seed=1)
    for _ in range(5):
        mined = IndexMiner.candidates_from(np.array([[1, 2], [0, 3], [0, 1], [2, 3]]), torch.tensor([0, 1, 2, 3]))
        loss, _ = loss_fn(queries, mined)
        loss.backward()
        loss_fn.after_optimizer_step(1.0)
    before = bank.weight.detach().clone()
    assert loss_fn.adapter_pending()
    assert loss_fn.bake_adapter() == 8
    after = bank.weight.detach()
    untouched = slice(4, 8)
    assert (after[untouched] - before[untouched]).norm(dim=1).min() > 1e-4  # rows no candidate reached moved
    torch.testing.assert_close(after.norm(dim=1), before.norm(dim=1))
    assert not loss_fn.adapter_pending() and bank.num_changed == 8 and bank.version == 1


def test_rank_zero_builds_no_adapter_and_bad_rate_is_refused(tmp_path):
    assert make_args(tmp_path).doc_adapter_rank == 0
    with pytest.raises(ConfigError, match="doc_adapter_learning_rate"):
        make_args(tmp_path, doc_adapter_rank=8, doc_adapter_learning_rate=0.0)


def test_trainer_bakes_adapter_before_final_refresh(tiny_model, beir_dir, tmp_path):
    """The index that is evaluated and saved holds the adapted rows: after training the adapter is baked (identity
    again), every row of the bank moved (not only training positives'), and the index was rebuilt over them."""
    trainer, data = make_trainer(tiny_model, beir_dir, tmp_path, doc_adapter_rank=8, doc_adapter_learning_rate=1e-2)
    assert trainer.loss.adapter is not None
    initial = trainer.bank.weight.detach().clone()
    trainer.train()
    assert trainer.loss.adapter.is_identity()
    moved = (trainer.bank.weight.detach() - initial).norm(dim=1) > 1e-6
    never_positive = ~trainer.trainable_rows
    assert bool(moved[never_positive].all())
    # the bake bumped the bank's version before the train-end refresh read it: the index serves the adapted rows
    assert trainer.refresh_callback.bank_version_at_refresh == trainer.bank.version
    assert trainer.refresh_callback.last_refresh_step == trainer.state.global_step
    assert trainer.served_index() is trainer.index


def test_adapter_resumes_exactly(tiny_model_dir, beir_dir, tmp_path):
    """Its parameters and AdamW moments travel with checkpoints: a resumed run ends where the unbroken one does."""
    from sentence_transformers import SentenceTransformer

    def run(output, resume=None, **overrides):
        model = SentenceTransformer(tiny_model_dir, device="cpu")
        options = {"max_steps": 8, "doc_adapter_rank": 8, "doc_adapter_learning_rate": 1e-2, **overrides}
        trainer, _ = make_trainer(model, beir_dir, output, **options)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    unbroken = run(tmp_path / "a")
    run(tmp_path / "b", save_strategy="steps", save_steps=4)
    resumed = run(tmp_path / "c", resume=str(tmp_path / "b" / "out" / "checkpoint-4"))
    torch.testing.assert_close(resumed.bank.weight, unbroken.bank.weight, rtol=1e-4, atol=1e-5)
    assert not torch.equal(unbroken.bank.weight, run(tmp_path / "d", doc_adapter_rank=0).bank.weight)
