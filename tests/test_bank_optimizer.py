"""The bank's row optimizers: RowSGD moves a row in proportion to its gradient, RowAdam by ~lr whatever its size."""

from __future__ import annotations

import pytest
import torch

from hf_qret import QRetTrainingArguments
from hf_qret.bank.core import TargetBank
from hf_qret.errors import ConfigError
from hf_qret.training.loss import CandidateCrossEntropyLoss
from hf_qret.training.optim import RowAdam, RowSGD


def _bank(n: int = 6, dim: int = 4, seed: int = 0) -> TargetBank:
    generator = torch.Generator().manual_seed(seed)
    return TargetBank(torch.randn(n, dim, generator=generator), [f"d{i}" for i in range(n)])


def test_row_sgd_matches_torch_sgd_per_row():
    bank = _bank()
    initial = bank.weight.detach().clone()
    opt = RowSGD(bank, lr=0.3, weight_decay=0.1)
    schedule = [[0, 2], [2, 5], [], [0]]
    grads = {}
    for step, rows in enumerate(schedule):
        if rows:
            scale = torch.arange(1.0, 5.0) * (step + 1)
            (bank.gather(torch.tensor(rows)) * scale).sum().backward()
            for row in rows:
                grads.setdefault(row, []).append(scale.clone())
        opt.step()
        opt.zero_grad()
    for row in range(len(bank)):
        param = torch.nn.Parameter(initial[row].clone())
        reference = torch.optim.SGD([param], lr=0.3, weight_decay=0.0)
        for grad in grads.get(row, []):
            with torch.no_grad():
                param.mul_(1 - 0.3 * 0.1)  # decoupled weight decay, as RowAdam's
            param.grad = grad
            reference.step()
        torch.testing.assert_close(bank.weight.detach()[row], param.detach(), atol=1e-6, rtol=1e-6)


def test_a_tiny_gradient_moves_a_row_by_lr_under_adam_but_hardly_under_sgd():
    # A row's first Adam step is lr * sign(g): a 1e-6 gradient moves it as far as a 1.0 one.
    for optimizer, tiny_moves_like_large in ((RowAdam, True), (RowSGD, False)):
        bank = TargetBank(torch.zeros(2, 3), ["a", "b"])
        opt = optimizer(bank, lr=0.01)
        (bank.gather(torch.tensor([0, 1])) * torch.tensor([[1.0], [1e-6]])).sum().backward()
        opt.step()
        large, tiny = bank.weight.detach().abs().amax(dim=1).tolist()
        assert large == pytest.approx(0.01, rel=1e-3)
        assert (tiny == pytest.approx(0.01, rel=0.02)) is tiny_moves_like_large
        if not tiny_moves_like_large:
            assert tiny == pytest.approx(1e-8, rel=1e-3)


def test_far_negatives_that_are_touched_every_step_do_not_drift_under_sgd():
    # NFCorpus's shape: on a small corpus every row is mined, so every row gets a gradient at every step,
    # most of them tiny (a far negative's softmax weight). RowAdam moves each of them by ~lr per coordinate per step;
    # RowSGD by what the gradient asks for.
    generator = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=-1)
    rows = torch.nn.functional.normalize(torch.randn(64, 16, generator=generator), dim=-1)
    rows[:8] = queries  # each query's positive is itself: every other row is a far, near-zero-weight negative
    loss_fn = CandidateCrossEntropyLoss(scale=20.0)
    drift = {}
    for optimizer, lr in ((RowAdam, 0.002), (RowSGD, 0.2)):
        bank = TargetBank(rows.clone(), [f"d{i}" for i in range(64)])
        opt = optimizer(bank, lr=lr, keep_norms=bank.row_norms())
        for _ in range(50):
            loss, _ = loss_fn(queries, bank.gather(torch.arange(64)), torch.arange(8))
            loss.backward()
            opt.step()
            opt.zero_grad()
        drift[optimizer.__name__] = float((bank.weight.detach()[8:] - rows[8:]).norm(dim=1).mean())
    assert drift["RowAdam"] > 0.1  # 50 steps of up to lr per coordinate each
    assert drift["RowSGD"] < 0.01


def test_row_sgd_checkpoint_round_trip_and_drift_control():
    bank = _bank()
    norms = bank.row_norms()
    opt = RowSGD(bank, lr=0.5, keep_norms=norms)
    bank.gather(torch.tensor([1, 4])).sum().backward()
    assert opt.step() == 2
    torch.testing.assert_close(bank.weight.detach().norm(dim=1), norms)
    state = opt.state_dict()
    again = RowSGD(bank, lr=0.5)
    again.load_state_dict(state)


def test_the_trainer_uses_the_configured_bank_optimizer(tiny_model, beir_dir, tmp_path):
    from test_trainer import make_trainer

    trainer, _ = make_trainer(tiny_model, beir_dir, tmp_path, bank_optimizer="sgd", bank_learning_rate=0.2, max_steps=2)
    assert type(trainer.bank_optimizer) is RowSGD and trainer.bank_optimizer.keep_norms is not None
    before = trainer.bank.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, trainer.bank.weight.detach())
    with pytest.raises(ConfigError, match="bank_optimizer must be one of adam, sgd"):
        QRetTrainingArguments(str(tmp_path), bank_optimizer="lion", use_cpu=True, report_to="none")


def test_the_bank_learning_rate_follows_the_bank_optimizer_unless_set(tmp_path):
    """Unset, bank_learning_rate is the bank optimizer's own scale (SGD 0.2, row-wise Adam 0.002); set, it is kept."""
    from hf_qret.config import BANK_LEARNING_RATES, parse_config

    def args(**options):
        return QRetTrainingArguments(str(tmp_path), use_cpu=True, report_to="none", **options)

    assert args().bank_optimizer == "sgd" and args().bank_learning_rate == BANK_LEARNING_RATES["sgd"] == 0.2
    assert args(bank_optimizer="adam").bank_learning_rate == BANK_LEARNING_RATES["adam"] == 2e-3
    assert args(bank_optimizer="adam", bank_learning_rate=0.01).bank_learning_rate == 0.01
    assert args(bank_learning_rate=0.0).bank_learning_rate == 0.0  # 0 freezes the bank, it is not "unset"
    *_, parsed = parse_config(["--output_dir", str(tmp_path), "--bank_optimizer", "adam", "--use_cpu", "true"])
    assert parsed.bank_learning_rate == 2e-3
