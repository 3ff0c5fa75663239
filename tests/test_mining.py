"""Unit tests of hf_qret.index.mining.IndexMiner over a Flat index (exact search, so retrieval is predictable)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from hf_qret.index.core import QuantizedIndex
from hf_qret.index.mining import IndexMiner, MinedBatch

DIM = 12


@pytest.fixture()
def eye_index() -> QuantizedIndex:
    index = QuantizedIndex(DIM, "Flat", use_gpu=False)
    index.build(np.eye(DIM, dtype=np.float32))
    return index


def _query(first: int, second: int) -> np.ndarray:
    """A query whose exact top-2 over the one-hot bank is [first, second]."""
    vector = np.zeros(DIM, dtype=np.float32)
    vector[first], vector[second] = 1.0, 0.5
    return vector


def _expected_mask(candidates: list[int], positive_rows: list[int], positive_sets: list[list[int]]) -> np.ndarray:
    mask = np.zeros((len(positive_rows), len(candidates)), dtype=bool)
    for i, (own, known) in enumerate(zip(positive_rows, positive_sets)):
        for j, row in enumerate(candidates):
            mask[i, j] = row in known and row != own
    return mask


def _check_invariants(mined: MinedBatch, positive_rows: torch.Tensor) -> None:
    candidates = mined.candidates.tolist()
    assert len(candidates) == len(set(candidates))  # unique
    assert mined.num_candidates == len(candidates)
    retrieved = {int(r) for r in mined.retrieved.reshape(-1) if r >= 0}
    assert retrieved <= set(candidates)
    assert set(positive_rows.tolist()) <= set(candidates)
    assert set(candidates) == retrieved | set(positive_rows.tolist())  # nothing else
    assert [candidates[t] for t in mined.targets.tolist()] == positive_rows.tolist()
    assert mined.targets.dtype == torch.long
    assert mined.mask.dtype == torch.bool and tuple(mined.mask.shape) == (len(positive_rows), len(candidates))
    for i, target in enumerate(mined.targets.tolist()):
        assert not mined.mask[i, target]  # never an example's own positive


def test_candidates_targets_and_mask_hand_example(eye_index):
    miner = IndexMiner(eye_index, num_negatives=2)
    queries = np.stack([_query(0, 1), _query(2, 3), _query(6, 7)])
    positive_rows = torch.tensor([5, 2, 7])
    positive_sets = torch.tensor([[5, 1, 9], [2, -1, -1], [7, 0, -1]])
    mined = miner.mine(queries, positive_rows, positive_sets)

    assert mined.retrieved.tolist() == [[0, 1], [2, 3], [6, 7]]
    assert mined.candidates.tolist() == [0, 1, 2, 3, 5, 6, 7]
    assert mined.targets.tolist() == [4, 2, 6]
    expected = np.zeros((3, 7), dtype=bool)
    expected[0, 1] = True  # row 1: query 0's other positive, retrieved -> masked; row 9 is not a candidate
    expected[2, 0] = True  # row 0: query 2's other positive, retrieved by another query -> masked
    np.testing.assert_array_equal(mined.mask.numpy(), expected)
    _check_invariants(mined, positive_rows)


def test_same_query_two_positives_mask_each_other(eye_index):
    miner = IndexMiner(eye_index, num_negatives=2)
    query = _query(0, 1)
    queries = np.stack([query, query, _query(4, 10)])
    positive_rows = torch.tensor([3, 8, 4])
    positive_sets = torch.tensor([[3, 8], [3, 8], [4, -1]])
    mined = miner.mine(queries, positive_rows, positive_sets)
    candidates = mined.candidates.tolist()
    assert candidates == [0, 1, 3, 4, 8, 10]
    col = {row: j for j, row in enumerate(candidates)}
    mask = mined.mask
    assert mask[0, col[8]] and not mask[0, col[3]]
    assert mask[1, col[3]] and not mask[1, col[8]]
    assert int(mask.sum()) == 2
    assert not mask[2].any()
    _check_invariants(mined, positive_rows)


def test_without_positive_sets_nothing_is_masked(eye_index):
    miner = IndexMiner(eye_index, num_negatives=3)
    mined = miner.mine(np.stack([_query(0, 1), _query(0, 1)]), torch.tensor([1, 9]))
    assert not mined.mask.any()
    retrieved = {int(r) for r in mined.retrieved.reshape(-1)}
    assert {0, 1} <= retrieved and len(retrieved) == 3
    assert mined.candidates.tolist() == sorted(retrieved | {1, 9})
    _check_invariants(mined, torch.tensor([1, 9]))


def test_torch_query_embeddings_are_accepted(eye_index):
    miner = IndexMiner(eye_index, num_negatives=2)
    queries = np.stack([_query(3, 4), _query(9, 11)])
    as_tensor = torch.tensor(queries, dtype=torch.float64, requires_grad=True)
    a = miner.mine(queries, torch.tensor([0, 1]))
    b = miner.mine(as_tensor, torch.tensor([0, 1]))
    assert a.candidates.tolist() == b.candidates.tolist() == [0, 1, 3, 4, 9, 11]
    np.testing.assert_array_equal(a.retrieved, b.retrieved)


def test_padding_rows_are_not_candidates():
    retrieved = np.array([[4, 2, -1], [-1, -1, -1]])
    mined = IndexMiner.candidates_from(retrieved, torch.tensor([7, 2]), torch.tensor([[7, 2], [2, -1]]))
    assert mined.candidates.tolist() == [2, 4, 7]
    assert mined.targets.tolist() == [2, 0]
    np.testing.assert_array_equal(mined.mask.numpy(), [[True, False, False], [False, False, False]])


def test_random_batches_match_brute_force():
    rng = np.random.default_rng(5)
    bank = rng.standard_normal((200, 16)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    index = QuantizedIndex(16, "Flat", use_gpu=False)
    index.build(bank)
    miner = IndexMiner(index, num_negatives=7)
    for trial in range(5):
        queries = rng.standard_normal((8, 16)).astype(np.float32)
        sets = [list(rng.choice(200, size=int(rng.integers(1, 5)), replace=False)) for _ in range(8)]
        # half of the known positives come from what the query retrieves, so masking is exercised
        exact_top = np.argsort(-(queries @ bank.T), axis=1)[:, :7]
        for i in range(0, 8, 2):
            sets[i].append(int(exact_top[i, 3]))
        positive_rows = torch.tensor([int(s[0]) for s in sets])
        width = max(len(s) for s in sets)
        padded = torch.tensor([[int(r) for r in s] + [-1] * (width - len(s)) for s in sets])
        mined = miner.mine(queries, positive_rows, padded)
        np.testing.assert_array_equal(mined.retrieved, exact_top)
        _check_invariants(mined, positive_rows)
        expected = _expected_mask(
            mined.candidates.tolist(), positive_rows.tolist(), [[int(r) for r in s] for s in sets]
        )
        np.testing.assert_array_equal(mined.mask.numpy(), expected)
        assert mined.mask.any()


def test_num_negatives_larger_than_index_clamps_and_warns_once(eye_index, caplog):
    miner = IndexMiner(eye_index, num_negatives=50)
    with caplog.at_level(logging.WARNING, logger="hf_qret.index.mining"):
        first = miner.mine(np.stack([_query(0, 1)]), torch.tensor([0]))
        second = miner.mine(np.stack([_query(2, 3), _query(5, 6)]), torch.tensor([2, 5]))
    assert first.retrieved.shape == (1, DIM)
    assert second.retrieved.shape == (2, DIM)
    assert sorted(first.retrieved[0].tolist()) == list(range(DIM))
    assert first.candidates.tolist() == list(range(DIM))
    warnings = [r for r in caplog.records if r.name == "hf_qret.index.mining" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "num_negatives=50" in warnings[0].getMessage()


def test_num_negatives_within_index_does_not_warn(eye_index, caplog):
    miner = IndexMiner(eye_index, num_negatives=DIM)
    with caplog.at_level(logging.WARNING, logger="hf_qret.index.mining"):
        mined = miner.mine(np.stack([_query(0, 1)]), torch.tensor([0]))
    assert mined.retrieved.shape == (1, DIM)
    assert not [r for r in caplog.records if r.name == "hf_qret.index.mining"]


@pytest.mark.parametrize("k", [0, -1, -100])
def test_num_negatives_below_one_raises(eye_index, k):
    with pytest.raises(ValueError, match="num_negatives"):
        IndexMiner(eye_index, num_negatives=k)


def test_global_batch_mining_takes_the_union_over_processes(eye_index):
    """With a gather (DDP), the candidates are the union of every process's positives and top-k; targets stay local."""
    other_process = torch.tensor([7, 8, 9, 10])  # another process's positives + retrieved rows
    seen = []

    def gather(local: torch.Tensor) -> torch.Tensor:
        seen.append(local.tolist())
        return torch.cat([local, other_process])

    miner = IndexMiner(eye_index, num_negatives=2)
    queries = np.stack([_query(0, 1), _query(2, 3)])
    positive_rows = torch.tensor([0, 2])
    mined = miner.mine(queries, positive_rows, torch.tensor([[0, 9], [2, -1]]), gather=gather)
    assert sorted(seen[0]) == [0, 0, 1, 2, 2, 3]  # this process's positives and retrieved rows
    assert mined.candidates.tolist() == [0, 1, 2, 3, 7, 8, 9, 10]
    assert [mined.candidates.tolist()[t] for t in mined.targets.tolist()] == [0, 2]
    assert mined.mask.tolist()[0] == [False] * 6 + [True, False]  # row 9: query 0's other positive, from elsewhere
    local = miner.mine(queries, positive_rows)
    assert local.candidates.tolist() == [0, 1, 2, 3]
