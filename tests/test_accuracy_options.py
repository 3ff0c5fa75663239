"""Issue 6 options: trainable PQ codebooks, quantization-aware scoring, drift control (anchor, norm, positives-only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_qret import QRetTrainingArguments
from hf_qret.codebook import TrainableCodebooks, supports_codebook_learning
from hf_qret.errors import ConfigError
from hf_qret.index import QuantizedIndex

from test_trainer import make_trainer


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 16)).astype("float32")
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("factory", ["PQ4", "OPQ4,PQ4"])
def test_codebooks_decode_exactly_what_faiss_stores(vectors, factory):
    index = QuantizedIndex(16, factory)
    index.build(vectors)
    codebooks = TrainableCodebooks(index)
    decoded = codebooks.reconstruct(torch.arange(len(vectors))).detach().numpy()
    np.testing.assert_allclose(decoded, index.reconstruct_all(), atol=1e-5)
    # Scores of a faiss search equal dot products with the decoded vectors.
    scores, rows = index.search(vectors[:5], 4)
    np.testing.assert_allclose(scores, np.take_along_axis(vectors[:5] @ decoded.T, rows, 1), atol=1e-4)


def test_written_back_centroids_drive_search_and_reencoding(vectors):
    index = QuantizedIndex(16, "OPQ4,PQ4")
    index.build(vectors)
    codebooks = TrainableCodebooks(index)
    with torch.no_grad():
        codebooks.centroids.mul_(2.0)
    codebooks.write_back()
    scores, _ = index.search(vectors[:3], 2)
    decoded = codebooks.reconstruct(torch.arange(len(vectors))).detach().numpy()
    np.testing.assert_allclose(scores[:, 0], (vectors[:3] @ decoded.T).max(axis=1), atol=1e-4)
    index.refresh(vectors, mode="reencode")  # codes recomputed with the learned centroids
    assert codebooks.maybe_sync() is False  # same codebooks, new codes
    np.testing.assert_allclose(
        codebooks.reconstruct(torch.arange(len(vectors))).detach().numpy(), index.reconstruct_all(), atol=1e-5
    )
    index.refresh(vectors, mode="retrain")
    assert codebooks.maybe_sync() is True  # retrained: centroids reloaded
    np.testing.assert_allclose(
        codebooks.reconstruct(torch.arange(len(vectors))).detach().numpy(), index.reconstruct_all(), atol=1e-5
    )


@pytest.mark.parametrize("factory", ["Flat", "IVF4,PQ4", "SQ8", "PQ4x4"])
def test_codebook_learning_refuses_other_indexes(vectors, factory):
    index = QuantizedIndex(16, factory)
    index.build(vectors)
    assert not supports_codebook_learning(index)
    with pytest.raises(ConfigError, match="OPQ<M>,PQ<M>"):
        TrainableCodebooks(index)


def test_learn_codebooks_needs_quantized_scores(tmp_path):
    with pytest.raises(ConfigError, match="quantized_score_weight"):
        QRetTrainingArguments(output_dir=str(tmp_path), learn_codebooks=True, report_to="none")
    with pytest.raises(ConfigError, match="bank_update"):
        QRetTrainingArguments(output_dir=str(tmp_path), bank_update="some", report_to="none")


def test_learned_centroids_move_and_reach_the_index(tiny_model, beir_dir, tmp_path):
    trainer, _ = make_trainer(
        tiny_model, beir_dir, tmp_path, learn_codebooks=True, quantized_score_weight=1.0,
        codebook_learning_rate=1e-2, refresh_on_epoch_end=False,
    )  # fmt: skip
    before = trainer.loss.codebooks.centroids.detach().clone()
    trainer.train()
    after = trainer.loss.codebooks.centroids.detach()
    assert not torch.allclose(before, after)
    assert trainer.refresh_callback.mode == "reencode"  # refreshes keep the learned codebooks
    assert trainer.loss.codebooks.maybe_sync() is False  # the train-end refresh re-encoded, it did not retrain
    # The faiss index searches with the learned centroids (written back after every step).
    np.testing.assert_allclose(
        trainer.loss.codebooks.reconstruct(torch.arange(trainer.index.ntotal)).detach().numpy(),
        trainer.index.reconstruct_all(),
        atol=1e-5,
    )


def test_positives_only_update_leaves_negatives_untouched(tiny_model, beir_dir, tmp_path):
    trainer, data = make_trainer(tiny_model, beir_dir, tmp_path, bank_update="positives", max_steps=4)
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
    assert len(batch_positives) == 4 and counts.sum() > 0 and torch.equal(trainer.bank_optimizer.row_steps.cpu(), counts)


def test_drift_control_keeps_norms_and_pulls_rows_back(tiny_model_dir, beir_dir, tmp_path):
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

    start, free = run("free")
    _, norm = run("norm", bank_keep_norm=True)
    _, anchored = run("anchor", bank_anchor_weight=10.0)
    assert ((norm - start).abs().sum(dim=1) > 0).any()
    torch.testing.assert_close(norm.norm(dim=1), start.norm(dim=1), rtol=1e-5, atol=1e-5)
    assert (anchored - start).norm(dim=1).sum() < 0.75 * (free - start).norm(dim=1).sum()


def test_initial_encoder_targets_decouple_the_encoder_from_the_bank(tiny_model_dir, beir_dir, tmp_path):
    """With encoder_targets='initial' the encoder trains exactly as with a frozen bank, while the bank still moves."""
    from sentence_transformers import SentenceTransformer

    def run(name, **options):
        model = SentenceTransformer(tiny_model_dir, device="cpu")
        trainer, _ = make_trainer(model, beir_dir, tmp_path / name, max_steps=3, refresh_on_epoch_end=False, **options)
        start = trainer.bank.weight.detach().clone()
        trainer.train()
        return model, (trainer.bank.weight.detach() - start).abs().sum()

    frozen, frozen_moved = run("frozen", bank_learning_rate=0.0)
    decoupled, decoupled_moved = run("decoupled", encoder_targets="initial")
    coupled, _ = run("coupled", encoder_targets="bank")
    assert frozen_moved == 0 and decoupled_moved > 0
    for a, b in zip(frozen.parameters(), decoupled.parameters()):
        torch.testing.assert_close(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(frozen.parameters(), coupled.parameters()))


def test_positives_only_needs_the_training_positives():
    from datasets import Dataset

    from hf_qret import TargetBank
    from hf_qret.trainer import training_positive_rows

    bank = TargetBank(torch.zeros(3, 4), ["a", "b", "c"])
    rows = training_positive_rows(Dataset.from_dict({"positive_id": ["c"], "positive_ids": [["c", "a"]]}), bank)
    assert rows.tolist() == [True, False, True]
    with pytest.raises(ConfigError, match="'positive_id'.*--bank_update all"):
        training_positive_rows(Dataset.from_dict({"query": ["q"], "doc": ["c"]}), bank)


def test_initial_rows_are_kept_only_for_rows_that_can_move(tiny_model, beir_dir, tmp_path):
    """positives + initial targets: the pretrained copy holds the trainable rows only, yet returns every row."""
    trainer, _ = make_trainer(tiny_model, beir_dir, tmp_path, max_steps=3)  # the defaults
    assert trainer.args.bank_update == "positives" and trainer.args.encoder_targets == "initial"
    pretrained = trainer.bank.weight.detach().clone()
    trainer.train()
    movable = trainer.trainable_rows
    assert trainer.initial_rows.values.shape[0] == int(movable.sum()) < len(pretrained)
    moved = (trainer.bank.weight.detach() != pretrained).any(dim=1)
    assert moved.any() and not moved[~movable].any()
    everything = torch.arange(len(pretrained))
    torch.testing.assert_close(trainer.initial_rows.rows(everything), pretrained, rtol=0, atol=0)
