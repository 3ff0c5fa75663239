"""Many positives per query (NFCorpus, ~43): weighted examples and frozen bank queries."""

from __future__ import annotations

import pytest
import torch
from test_trainer import make_trainer

from hf_qret import QRetTrainingArguments, TargetBank
from hf_qret.errors import ConfigError
from hf_qret.index.mining import IndexMiner
from hf_qret.serving.encoder import embed
from hf_qret.training.loss import CandidateCrossEntropyLoss, MinedNegativesLoss


def test_weights_make_a_weighted_mean_of_the_examples():
    torch.manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    candidates = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    targets = torch.tensor([0, 1, 2])
    loss_fn = CandidateCrossEntropyLoss(scale=20.0)
    each = [loss_fn(queries[i : i + 1], candidates, targets[i : i + 1])[0] for i in range(3)]
    weighted, _ = loss_fn(queries, candidates, targets, weights=torch.tensor([1.0, 0.5, 0.5]))
    torch.testing.assert_close(weighted, (each[0] + 0.5 * each[1] + 0.5 * each[2]) / 2.0)


def test_bank_rows_learn_against_the_given_bank_queries():
    """mined.bank_queries: the bank's term scores the rows against them; the encoder's term is unchanged."""
    torch.manual_seed(0)
    rows = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1).requires_grad_(True)
    frozen = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)

    def grads(bank_queries):
        bank = TargetBank(rows.clone(), [str(i) for i in range(6)])
        mined = IndexMiner.candidates_from(torch.tensor([[2, 3], [4, 5]]).numpy(), torch.tensor([0, 1]))
        mined.bank_queries = bank_queries
        queries.grad = None
        loss, _ = MinedNegativesLoss(bank)(queries, mined)
        loss.backward()
        return bank.weight.grad.to_dense(), queries.grad.clone()

    bank_default, encoder_default = grads(None)
    bank_frozen, encoder_frozen = grads(frozen)
    torch.testing.assert_close(encoder_default, encoder_frozen)
    expected = torch.zeros(6, 8).requires_grad_(True)
    logits = 20.0 * frozen @ (rows + expected)[torch.tensor([0, 1, 2, 3, 4, 5])].T
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    torch.testing.assert_close(bank_frozen, expected.grad)
    assert not torch.allclose(bank_default, bank_frozen)


def test_encoder_follows_the_bank_that_learns_against_frozen_queries():
    """bank_queries='initial': the encoder's term scores the (detached) bank rows, the bank's
    term scores the rows against the frozen queries."""
    torch.manual_seed(1)
    rows = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1).requires_grad_(True)
    frozen = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    bank = TargetBank(rows.clone(), [str(i) for i in range(6)])
    mined = IndexMiner.candidates_from(torch.tensor([[2, 3], [4, 5]]).numpy(), torch.tensor([0, 1]))
    mined.bank_queries = frozen
    loss, _ = MinedNegativesLoss(bank)(queries, mined)
    loss.backward()
    q = queries.detach().clone().requires_grad_(True)
    d = rows.clone().requires_grad_(True)
    labels = torch.tensor([0, 1])
    torch.nn.functional.cross_entropy(20.0 * q @ rows.T, labels).backward()
    torch.nn.functional.cross_entropy(20.0 * frozen @ d.T, labels).backward()
    torch.testing.assert_close(queries.grad, q.grad)
    torch.testing.assert_close(bank.weight.grad.to_dense(), d.grad)


def record_batches(trainer) -> list:
    seen = []
    original = trainer.loss.forward

    def forward(query_embeddings, mined):
        seen.append((query_embeddings.detach().clone(), mined))
        return original(query_embeddings, mined)

    trainer.loss.forward = forward
    return seen


def test_initial_bank_queries_come_from_the_frozen_pretrained_encoder(tiny_model_dir, beir_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(tiny_model_dir, device="cpu")
    pretrained = SentenceTransformer(tiny_model_dir, device="cpu").eval()
    trainer, _ = make_trainer(
        model, beir_dir, tmp_path, max_steps=4, bank_queries="initial", refresh_on_epoch_end=False
    )
    seen = record_batches(trainer)
    batches = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        batches.append(
            {k: v.clone() for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        )
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    trainer.train()
    for features, (queries, mined) in zip(batches, seen):
        with torch.no_grad():
            torch.testing.assert_close(mined.bank_queries, embed(pretrained, features))
    # The encoder moved (its queries are no longer the pretrained ones); the frozen copy did not.
    assert not torch.allclose(seen[-1][0], seen[-1][1].bank_queries, atol=1e-4)
    for a, b in zip(trainer.frozen_encoder.parameters(), pretrained.parameters()):
        torch.testing.assert_close(a, b)


def test_bank_queries_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="bank_queries"):
        QRetTrainingArguments(output_dir=str(tmp_path), bank_queries="bank", report_to="none")
