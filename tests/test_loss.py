"""Unit tests of hf_qret.loss.CandidateCrossEntropyLoss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_qret.loss import CandidateCrossEntropyLoss


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
