"""Unit tests of hf_qret.bank.core: the TargetBank and the row-wise Adam optimiser."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_qret.bank.core import TargetBank
from hf_qret.errors import ArtifactError
from hf_qret.training.optim import RowAdam

LR, BETAS, EPS = 0.05, (0.9, 0.999), 1e-8


def _bank(n: int = 6, dim: int = 4, seed: int = 0) -> TargetBank:
    generator = torch.Generator().manual_seed(seed)
    return TargetBank(torch.randn(n, dim, generator=generator), [f"d{i}" for i in range(n)])


# ----------------------------------------------------------------------------- TargetBank


def test_bank_shape_ids_and_rows():
    init = np.arange(12, dtype=np.float64).reshape(4, 3)
    bank = TargetBank(init, ["a", "b", "c", "d"])
    assert len(bank) == 4 and bank.dim == 3
    assert bank.weight.dtype == torch.float32
    assert bank.doc_ids == ["a", "b", "c", "d"]
    assert bank.row_of("c") == 2
    assert bank.rows_of(["d", "a"]) == [3, 0]
    assert bank.version == 0
    np.testing.assert_array_equal(bank.numpy(), init.astype(np.float32))
    assert bank.numpy().flags["C_CONTIGUOUS"] and bank.numpy().dtype == np.float32
    assert [p for p in bank.parameters()] == [bank.weight]


def test_bank_copies_its_input():
    init = torch.zeros(2, 2)
    bank = TargetBank(init, ["a", "b"])
    init += 1
    assert torch.count_nonzero(bank.weight) == 0


def test_row_of_unknown_id_is_key_error():
    bank = _bank()
    with pytest.raises(KeyError, match="'nope'"):
        bank.row_of("nope")
    with pytest.raises(KeyError):
        bank.rows_of(["d0", "zzz"])


def test_bank_construction_errors():
    with pytest.raises(ArtifactError, match="3 rows but 2 document ids"):
        TargetBank(torch.zeros(3, 4), ["a", "b"])
    with pytest.raises(ArtifactError, match="duplicates"):
        TargetBank(torch.zeros(3, 4), ["a", "b", "a"])
    with pytest.raises(ArtifactError, match="2-D"):
        TargetBank(torch.zeros(3), ["a", "b", "c"])
    with pytest.raises(ArtifactError, match="2-D"):
        TargetBank(torch.zeros(3, 2, 2), ["a", "b", "c"])


def test_gather_values_and_sparse_gradient():
    bank = _bank()
    rows = torch.tensor([4, 1, 4])
    gathered = bank.gather(rows)
    assert torch.equal(gathered, bank.weight.detach()[rows])
    weights = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    (gathered * weights).sum().backward()
    grad = bank.weight.grad
    assert grad is not None and grad.is_sparse
    dense = grad.to_dense()
    expected = torch.zeros(6, 4)
    expected[4] = weights[0] + weights[2]
    expected[1] = weights[1]
    assert torch.equal(dense, expected)


def test_check_dim():
    bank = _bank(dim=4)
    bank.check_dim(4)
    with pytest.raises(ArtifactError, match="dimension 4 but the model produces 8-d"):
        bank.check_dim(8, "the model")


# ----------------------------------------------------------------------------- RowAdam against torch.optim.Adam

# step -> rows gathered at that step (duplicates allowed, empty = no gradient at all)
SCHEDULE = [[0, 1], [1, 2], [0], [], [3, 1, 1], [5], [0, 5, 2], [5]]
NEVER_TOUCHED = [4]


def _grad_weights(step: int, count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(count, 4, generator=generator)


def _run_row_adam(bank: TargetBank, opt: RowAdam, schedule=SCHEDULE) -> list[int]:
    updated = []
    for step, rows in enumerate(schedule):
        if rows:
            gathered = bank.gather(torch.tensor(rows))
            (gathered * _grad_weights(step, len(rows))).sum().backward()
        updated.append(opt.step())
        opt.zero_grad()
    return updated


def _row_gradients(schedule=SCHEDULE) -> dict[int, list[torch.Tensor]]:
    """Per row, the gradient of each step where that row had one (summing duplicates)."""
    grads: dict[int, list[torch.Tensor]] = {}
    for step, rows in enumerate(schedule):
        weights = _grad_weights(step, len(rows)) if rows else None
        per_row: dict[int, torch.Tensor] = {}
        for i, row in enumerate(rows):
            per_row[row] = per_row.get(row, torch.zeros(4)) + weights[i]
        for row, grad in per_row.items():
            grads.setdefault(row, []).append(grad)
    return grads


def test_row_adam_matches_torch_adam_per_row():
    bank = _bank()
    initial = bank.weight.detach().clone()
    opt = RowAdam(bank, lr=LR, betas=BETAS, eps=EPS)
    updated = _run_row_adam(bank, opt)
    assert updated == [len(set(rows)) for rows in SCHEDULE]

    grads = _row_gradients()
    assert len(grads[5]) == 3  # row 5 is first touched at step 5, long after the others
    for row, row_grads in grads.items():
        param = torch.nn.Parameter(initial[row].clone())
        reference = torch.optim.Adam([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
        for grad in row_grads:
            param.grad = grad.clone()
            reference.step()
        torch.testing.assert_close(bank.weight.detach()[row], param.detach(), atol=1e-6, rtol=1e-5)
        assert int(opt.row_steps[row]) == len(row_grads)
    for row in NEVER_TOUCHED:
        assert torch.equal(bank.weight.detach()[row], initial[row])
        assert int(opt.row_steps[row]) == 0
        assert torch.count_nonzero(opt.exp_avg[row]) == 0 and torch.count_nonzero(opt.exp_avg_sq[row]) == 0


def test_row_adam_late_row_gets_a_first_step_update():
    # A first Adam step moves every coordinate by lr * sign(grad) (up to eps), whatever the global step count.
    bank = _bank()
    opt = RowAdam(bank, lr=LR)
    for step in range(5):
        bank.gather(torch.tensor([0])).sum().backward()
        opt.step()
        opt.zero_grad()
    before = bank.weight.detach()[3].clone()
    grad = torch.tensor([[0.3, -2.0, 1e-3, -5.0]])
    (bank.gather(torch.tensor([3])) * grad).sum().backward()
    opt.step()
    delta = bank.weight.detach()[3] - before
    torch.testing.assert_close(delta, -LR * torch.sign(grad[0]), atol=1e-5, rtol=0)


def test_row_adam_weight_decay_matches_adamw():
    bank = _bank()
    initial = bank.weight.detach().clone()
    opt = RowAdam(bank, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.1)
    _run_row_adam(bank, opt)
    for row, row_grads in _row_gradients().items():
        param = torch.nn.Parameter(initial[row].clone())
        reference = torch.optim.AdamW([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.1)
        for grad in row_grads:
            param.grad = grad.clone()
            reference.step()
        torch.testing.assert_close(bank.weight.detach()[row], param.detach(), atol=1e-6, rtol=1e-5)
    assert torch.equal(bank.weight.detach()[4], initial[4])  # no decay without a gradient


def test_row_adam_dense_gradient_updates_only_nonzero_rows():
    bank = _bank()
    initial = bank.weight.detach().clone()
    opt = RowAdam(bank, lr=LR)
    (bank.weight[[1, 3]] * 2.0).sum().backward()  # dense gradient, non-zero on rows 1 and 3
    assert not bank.weight.grad.is_sparse
    assert opt.step() == 2
    changed = (bank.weight.detach() != initial).any(dim=1).tolist()
    assert changed == [False, True, False, True, False, False]


def test_version_counts_steps_with_gradients():
    bank = _bank()
    opt = RowAdam(bank, lr=LR)
    _run_row_adam(bank, opt)
    assert bank.version == sum(1 for rows in SCHEDULE if rows)  # the empty step does not count
    assert opt.step() == 0 and bank.version == 7  # no gradient: nothing happens


def test_zero_grad_clears_and_step_after_is_noop():
    bank = _bank()
    opt = RowAdam(bank, lr=LR)
    bank.gather(torch.tensor([2])).sum().backward()
    assert bank.weight.grad is not None
    opt.zero_grad()
    assert bank.weight.grad is None
    before = bank.weight.detach().clone()
    assert opt.step() == 0
    assert torch.equal(bank.weight.detach(), before)
    assert bank.version == 0 and int(opt.row_steps.sum()) == 0


def test_accumulated_sparse_gradients_are_summed():
    bank = _bank()
    initial = bank.weight.detach().clone()
    opt = RowAdam(bank, lr=LR)
    g1, g2 = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[-3.0, 0.5, 1.0, -4.5]])
    (bank.gather(torch.tensor([2])) * g1).sum().backward()
    (bank.gather(torch.tensor([2])) * g2).sum().backward()
    assert opt.step() == 1
    assert int(opt.row_steps[2]) == 1
    param = torch.nn.Parameter(initial[2].clone())
    reference = torch.optim.Adam([param], lr=LR)
    param.grad = (g1 + g2)[0]
    reference.step()
    torch.testing.assert_close(bank.weight.detach()[2], param.detach(), atol=1e-6, rtol=1e-5)


def test_state_dict_round_trip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    bank_a = _bank()
    bank_b = _bank()
    opt_a = RowAdam(bank_a, lr=LR)
    _run_row_adam(bank_a, opt_a, SCHEDULE[:5])
    save_file({k: v.contiguous() for k, v in opt_a.state_dict().items()}, str(tmp_path / "opt.safetensors"))
    state = load_file(str(tmp_path / "opt.safetensors"))
    assert set(state) == {"exp_avg", "exp_avg_sq", "row_steps"}

    with torch.no_grad():
        bank_b.weight.copy_(bank_a.weight)
    opt_b = RowAdam(bank_b, lr=LR)
    opt_b.load_state_dict(state)
    for name in ("exp_avg", "exp_avg_sq", "row_steps"):
        assert torch.equal(getattr(opt_b, name), getattr(opt_a, name))
    # Continuing from the restored state gives exactly the same updates.
    _run_row_adam(bank_a, opt_a, SCHEDULE[5:])
    _run_row_adam(bank_b, opt_b, SCHEDULE[5:])
    assert torch.equal(bank_a.weight, bank_b.weight)


def test_load_state_dict_wrong_shape_or_missing():
    opt = RowAdam(_bank(n=6), lr=LR)
    other = RowAdam(_bank(n=7), lr=LR).state_dict()
    with pytest.raises(ArtifactError, match="wrong shape"):
        opt.load_state_dict(other)
    good = {k: v.clone() for k, v in opt.state_dict().items()}
    del good["row_steps"]
    with pytest.raises(ArtifactError, match="row_steps"):
        opt.load_state_dict(good)


# ----------------------------------------------------------------------------- files


def test_save_from_file_safetensors_round_trip(tmp_path):
    bank = _bank(n=5, dim=3)
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    assert not (tmp_path / "bank.safetensors.tmp").exists()
    loaded = TargetBank.from_file(path, bank.doc_ids)
    assert torch.equal(loaded.weight, bank.weight)
    assert loaded.doc_ids == bank.doc_ids


def test_from_file_npy(tmp_path):
    array = np.random.default_rng(0).standard_normal((5, 3))  # float64 on disk, float32 in the bank
    path = tmp_path / "bank.npy"
    np.save(path, array)
    loaded = TargetBank.from_file(path, list("abcde"))
    np.testing.assert_array_equal(loaded.numpy(), array.astype(np.float32))


def test_save_from_file_npy_round_trip(tmp_path):
    bank = _bank(n=5, dim=3)
    path = tmp_path / "bank.npy"
    bank.save(path)
    loaded = TargetBank.from_file(path, bank.doc_ids)
    assert torch.equal(loaded.weight, bank.weight)


def test_from_file_pickled_npy_is_rejected(tmp_path):
    path = tmp_path / "bank.npy"
    np.save(path, np.array([{"a": 1}, {"b": 2}], dtype=object), allow_pickle=True)
    with pytest.raises(ArtifactError, match="cannot be read as a bank"):
        TargetBank.from_file(path, ["a", "b"])


def test_from_file_missing_corrupt_and_mismatched(tmp_path):
    with pytest.raises(ArtifactError, match="no such bank file"):
        TargetBank.from_file(tmp_path / "missing.safetensors", ["a"])

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not safetensors at all")
    with pytest.raises(ArtifactError, match="cannot be read"):
        TargetBank.from_file(garbage, ["a"])

    from safetensors.numpy import save_file

    wrong_key = tmp_path / "wrong_key.safetensors"
    save_file({"vectors": np.zeros((2, 3), dtype=np.float32)}, str(wrong_key))
    with pytest.raises(ArtifactError, match="'embeddings'"):
        TargetBank.from_file(wrong_key, ["a", "b"])

    bank = _bank(n=5, dim=3)
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    with pytest.raises(ArtifactError, match="5 rows but 4 document ids"):
        TargetBank.from_file(path, ["a", "b", "c", "d"])


def test_from_encoder():
    texts = ["x", "yy", "zzz"]

    def encode(batch: list[str]) -> np.ndarray:
        return np.array([[len(t), 1.0] for t in batch], dtype=np.float64)

    bank = TargetBank.from_encoder(encode, texts, ["a", "b", "c"])
    np.testing.assert_array_equal(bank.numpy(), np.array([[1, 1], [2, 1], [3, 1]], dtype=np.float32))
    bank.check_dim(2)
