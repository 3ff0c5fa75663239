"""hf_qret.training.loss: CandidateCrossEntropyLoss, and a loss passed to QRetTrainer honouring or refusing the arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_qret.training.loss import CandidateCrossEntropyLoss


def _inputs(batch: int = 4, num_candidates: int = 9, dim: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    queries = F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1)
    candidates = F.normalize(torch.randn(num_candidates, dim, generator=generator, dtype=torch.float64), dim=-1)
    targets = torch.randint(0, num_candidates, (batch,), generator=generator)
    return queries.requires_grad_(), candidates.requires_grad_(), targets


@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_loss_equals_cross_entropy_by_hand(scale):
    queries, candidates, targets = _inputs()
    loss, stats = CandidateCrossEntropyLoss(scale=scale)(queries, candidates, targets)
    logits = scale * queries.detach() @ candidates.detach().T
    expected = -torch.log_softmax(logits, dim=1)[torch.arange(4), targets].mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.float(), targets).item(), abs=1e-6)
    assert stats["num_candidates"] == 9.0

    no_mask, _ = CandidateCrossEntropyLoss(scale=scale)(
        queries, candidates, targets, torch.zeros(4, 9, dtype=torch.bool)
    )
    assert no_mask.item() == pytest.approx(loss.item(), abs=1e-7)


def test_masked_columns_equal_removed_columns_value_and_gradients():
    queries, candidates, targets = _inputs(batch=3, num_candidates=7)
    targets = torch.tensor([0, 2, 5])
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, [1, 4]] = True
    mask[1, 6] = True
    mask[2, 0] = True
    scale = 20.0
    loss, _ = CandidateCrossEntropyLoss(scale=scale)(queries, candidates, targets, mask)
    loss.backward()
    grads = queries.grad.clone(), candidates.grad.clone()

    q2, c2 = queries.detach().clone().requires_grad_(), candidates.detach().clone().requires_grad_()
    per_row = []
    for i in range(3):
        keep = (~mask[i]).nonzero().squeeze(1)
        logits = scale * q2[i] @ c2[keep].T
        target = int((keep == targets[i]).nonzero())
        per_row.append(-torch.log_softmax(logits, dim=0)[target])
    reference = torch.stack(per_row).mean()
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), abs=1e-6)
    torch.testing.assert_close(grads[0], q2.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[1], c2.grad, atol=1e-6, rtol=1e-5)


def test_column_masked_for_every_query_gets_no_gradient_and_no_probability():
    queries, candidates, targets = _inputs(batch=4, num_candidates=6)
    targets = torch.tensor([0, 1, 2, 0])
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, 4] = True
    loss, _ = CandidateCrossEntropyLoss(scale=20.0)(queries, candidates, targets, mask)
    loss.backward()
    assert torch.count_nonzero(candidates.grad[4]) == 0
    assert all(torch.count_nonzero(candidates.grad[j]) > 0 for j in (0, 1, 2))
    # the masked candidate, made the best match of every query, changes nothing
    boosted = candidates.detach().clone()
    boosted[4] = queries.detach().mean(0) * 10
    loss_boosted, _ = CandidateCrossEntropyLoss(scale=20.0)(queries.detach(), boosted, targets, mask)
    assert loss_boosted.item() == pytest.approx(loss.item(), abs=1e-9)
    unmasked, _ = CandidateCrossEntropyLoss(scale=20.0)(queries.detach(), boosted, targets)
    assert unmasked.item() > loss.item() + 1.0  # without the mask it would have been a strong negative


def test_mean_positive_rank_hand_example():
    # queries = identity, so logits[i, j] = candidates[j, i] (scale 1)
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 5.0]])
    queries, candidates = torch.eye(3), logits.T.contiguous()
    targets = torch.tensor([2, 0, 1])
    loss_fn = CandidateCrossEntropyLoss(scale=1.0)
    loss, stats = loss_fn(queries, candidates, targets)
    # ranks: row 0 -> 2 (3 > 2), row 1 -> 4, row 2 -> 2 (only 5 beats it; ties do not count)
    assert stats["mean_positive_rank"] == pytest.approx(8 / 3)
    assert stats["num_candidates"] == 4.0
    assert loss.item() == pytest.approx(F.cross_entropy(logits, targets).item(), abs=1e-6)

    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[1, 3] = True  # row 1's best competitor is another of its positives: rank 3
    _, masked_stats = loss_fn(queries, candidates, targets, mask)
    assert masked_stats["mean_positive_rank"] == pytest.approx(7 / 3)

    perfect = torch.tensor([0, 3, 3])
    _, perfect_stats = loss_fn(queries, candidates, perfect)
    assert perfect_stats["mean_positive_rank"] == pytest.approx(1.0)


def test_float32_inputs_and_candidate_dtype_cast():
    queries, candidates, targets = _inputs()
    q32 = queries.detach().float()
    loss, _ = CandidateCrossEntropyLoss(scale=20.0)(q32, candidates.detach(), targets)  # float64 candidates cast
    expected = F.cross_entropy(20.0 * q32 @ candidates.detach().float().T, targets)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


# ----------------------------------------------------------------------------- a loss passed to QRetTrainer


@pytest.fixture()
def passed_loss_setup(tiny_model, beir_dir, tmp_path):
    """A trainer factory taking ``loss=``, over one bank of the synthetic corpus."""
    from functools import partial

    from test_trainer import make_args

    from hf_qret import QRetTrainer, TargetBank, build_pairs_dataset, load_beir
    from hf_qret.serving.encoder import encode_texts

    data = load_beir(beir_dir, split="train")
    bank = TargetBank.from_encoder(partial(encode_texts, tiny_model), data.doc_texts(), data.doc_ids)

    def trainer(loss, **overrides):
        args = make_args(tmp_path, **overrides)
        return QRetTrainer(tiny_model, args, train_dataset=build_pairs_dataset(data), bank=bank, loss=loss)

    return trainer, bank


def test_a_passed_loss_with_another_scale_than_the_arguments_is_refused(passed_loss_setup):
    from hf_qret.errors import ConfigError
    from hf_qret.training.loss import MinedNegativesLoss

    trainer, bank = passed_loss_setup
    with pytest.raises(ConfigError, match=r"scale 30\.0 but the training arguments have scale=20\.0"):
        trainer(CandidateCrossEntropyLoss(scale=30.0), scale=20.0)
    with pytest.raises(ConfigError, match=r"scale 30\.0 but the training arguments have scale=20\.0"):
        trainer(MinedNegativesLoss(bank, scale=30.0), scale=20.0)
    assert trainer(CandidateCrossEntropyLoss(scale=30.0)).loss.scale == 30.0  # args.scale unset: the loss's own
    assert trainer(CandidateCrossEntropyLoss(scale=20.0), scale=20.0).loss.scale == 20.0  # the same: no conflict


def test_a_passed_loss_takes_what_it_leaves_unset_from_the_arguments(passed_loss_setup):
    """MinedNegativesLoss(bank) in a trainer trains what the arguments say: positives-only rows, the model's scale
    (or args.scale), a frozen bank at bank_learning_rate 0, the frozen pretrained queries for the bank's term."""
    from hf_qret.training.loss import MinedNegativesLoss

    trainer, bank = passed_loss_setup
    loss = MinedNegativesLoss(bank)
    default = trainer(loss)
    assert default.loss is loss and default.args.bank_update == "positives"
    assert loss.trainable_rows is default.trainable_rows and 0 < int(loss.trainable_rows.sum()) < len(bank)
    assert loss.scale == 20.0 and loss.train_bank and default.frozen_encoder is not None
    assert trainer(MinedNegativesLoss(bank), scale=7.0).loss.scale == 7.0
    assert trainer(MinedNegativesLoss(bank), bank_update="all").loss.trainable_rows is None
    assert trainer(MinedNegativesLoss(bank), bank_learning_rate=0.0).loss.train_bank is False


def test_a_passed_loss_that_contradicts_the_arguments_is_refused(passed_loss_setup):
    from hf_qret import TargetBank
    from hf_qret.errors import ConfigError
    from hf_qret.training.loss import MinedNegativesLoss

    trainer, bank = passed_loss_setup
    with pytest.raises(ConfigError, match=r"train_bank True but the training arguments have bank_learning_rate=0\.0"):
        trainer(MinedNegativesLoss(bank, train_bank=True), bank_learning_rate=0.0)
    some_rows = torch.zeros(len(bank), dtype=torch.bool)
    some_rows[:3] = True
    with pytest.raises(ConfigError, match=r"trainable_rows for '3 of 300 rows' .* bank_update='all'"):
        trainer(MinedNegativesLoss(bank, trainable_rows=some_rows), bank_update="all")
    assert trainer(MinedNegativesLoss(bank, trainable_rows=some_rows)).loss.trainable_rows is some_rows
    other = TargetBank(bank.weight.detach().clone(), list(bank.doc_ids))
    with pytest.raises(ConfigError, match="another TargetBank"):
        trainer(MinedNegativesLoss(other))
