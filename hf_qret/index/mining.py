"""Negative mining from the quantized index: cross-batch top-k candidates.

For every query of a batch the top-k rows are retrieved from the *quantized* index built over the bank. The union of
those rows over the whole batch, plus the batch's positives, is the candidate set that every query is scored against
(an approximation of the softmax over the full corpus). A query's other known positives that land in the candidate
set are masked out: they are never used as its negatives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .core import QuantizedIndex

__all__ = ["MinedBatch", "IndexMiner"]

logger = logging.getLogger(__name__)


@dataclass
class MinedBatch:
    """The candidate set of a batch.

    Attributes:
        candidates: ``(C,)`` bank rows, unique.
        targets: ``(B,)`` position in ``candidates`` of each example's positive.
        mask: ``(B, C)`` ``True`` where a candidate is another known positive of that example's query.
        retrieved: ``(B, k)`` the raw top-k rows of each query (``-1`` where none).
        weights: ``(B,)`` weight of each example in the loss (``None``: equal weights).
        bank_queries: ``(B, dim)`` the query embeddings the bank rows learn against (``None``: the detached queries
            being trained).

    Example:
        >>> import numpy as np, torch
        >>> batch = MinedBatch(
        ...     candidates=torch.tensor([7, 3, 9]),
        ...     targets=torch.tensor([0, 1]),
        ...     mask=torch.zeros(2, 3, dtype=torch.bool),
        ...     retrieved=np.array([[7, 9], [3, 9]]),
        ... )
        >>> batch.num_candidates, batch.weights is None
        (3, True)
    """

    candidates: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    retrieved: np.ndarray
    weights: torch.Tensor | None = None
    bank_queries: torch.Tensor | None = None

    @property
    def num_candidates(self) -> int:
        """``C``, the number of candidate rows every query of the batch is scored against."""
        return int(self.candidates.numel())


class IndexMiner:
    """Mines cross-batch top-k candidates from a :class:`~hf_qret.index.core.QuantizedIndex`.

    Args:
        index: The quantized index over the bank.
        num_negatives: ``k``, the rows retrieved per query. Larger than the index: clamped, with one warning.

    Example:
        >>> import numpy as np, torch
        >>> from hf_qret.index.core import QuantizedIndex
        >>> vectors = np.eye(8, dtype="float32")
        >>> index = QuantizedIndex(8, "Flat"); index.build(vectors)
        >>> miner = IndexMiner(index, num_negatives=2)
        >>> mined = miner.mine(vectors[:2], torch.tensor([0, 1]), torch.tensor([[0, 1], [1, -1]]))
        >>> mined.mask.tolist()[0][mined.candidates.tolist().index(1)]  # row 1 is query 0's other positive
        True
    """

    def __init__(self, index: QuantizedIndex, num_negatives: int = 100) -> None:
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be at least 1, got {num_negatives}.")
        self.index = index
        self.num_negatives = int(num_negatives)
        self._warned = False

    def _k(self) -> int:
        k = self.num_negatives
        total = getattr(self.index, "global_ntotal", None)  # a sharded index: every shard's rows
        total = self.index.ntotal if total is None else total
        if k > total:
            if not self._warned:
                logger.warning(
                    "num_negatives=%d is larger than the corpus (%d documents); mining the whole corpus instead.",
                    k,
                    total,
                )
                self._warned = True
            k = total
        return k

    def retrieve(self, query_embeddings: np.ndarray) -> np.ndarray:
        """The top-k rows of each query, ``(B, k)``."""
        _, rows = self.index.mine(query_embeddings, self._k())
        return rows

    def mine(
        self,
        query_embeddings: np.ndarray | torch.Tensor,
        positive_rows: torch.Tensor,
        positive_sets: torch.Tensor | None = None,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
        extra_rows: torch.Tensor | None = None,
    ) -> MinedBatch:
        """Builds the candidate set of a batch.

        Args:
            query_embeddings: ``(B, dim)`` query embeddings (detached).
            positive_rows: ``(B,)`` bank row of each example's positive.
            positive_sets: ``(B, M)`` every known positive row of each example's query, ``-1``-padded. ``None``
                means each example knows only its own positive.
            gather: Under DDP, :func:`hf_qret.training.distributed.all_gather_rows`: the candidate set is then the union over
                the *global* batch (every process's positives and top-k rows), the same on every process; the
                targets and the mask stay this process's.
            extra_rows: Rows that join the candidate set besides the mined ones (the batch's hard negatives,
                ``-1``-padded, any shape).
        """
        if torch.is_tensor(query_embeddings):
            query_embeddings = query_embeddings.detach().float().cpu().numpy()
        retrieved = self.retrieve(query_embeddings)
        pool = None
        if gather is not None or extra_rows is not None:
            pool = self._pool(retrieved, positive_rows)
            if extra_rows is not None:
                pool = np.concatenate([pool, extra_rows.detach().cpu().long().numpy().reshape(-1)])
            if gather is not None:
                pool = gather(torch.from_numpy(pool)).cpu().numpy()
        return self.candidates_from(retrieved, positive_rows, positive_sets, pool=pool)

    @staticmethod
    def _pool(retrieved: np.ndarray, positive_rows: torch.Tensor) -> np.ndarray:
        """A batch's own candidate pool: its positives, then every retrieved row (``-1`` where none)."""
        return np.concatenate([positive_rows.detach().cpu().long().numpy(), retrieved.reshape(-1)])

    @staticmethod
    def candidates_from(
        retrieved: np.ndarray,
        positive_rows: torch.Tensor,
        positive_sets: torch.Tensor | None = None,
        pool: np.ndarray | None = None,
    ) -> MinedBatch:
        """The candidate set, targets and mask from already retrieved rows (see :meth:`mine`).

        ``pool`` (rows, ``-1`` ignored) replaces the batch's own positives + retrieved rows as the candidate pool; it
        must contain this batch's positives.
        """
        if pool is None:
            pool = IndexMiner._pool(retrieved, positive_rows)
        positive_rows = positive_rows.detach().cpu().long()
        candidates = torch.from_numpy(np.unique(pool[pool >= 0]))
        position = {int(row): i for i, row in enumerate(candidates.tolist())}
        targets = torch.tensor([position[int(r)] for r in positive_rows.tolist()], dtype=torch.long)
        mask = torch.zeros(len(positive_rows), len(candidates), dtype=torch.bool)
        if positive_sets is not None:
            for i, rows in enumerate(positive_sets.detach().cpu().tolist()):
                for row in rows:
                    if row >= 0 and row != int(positive_rows[i]) and row in position:
                        mask[i, position[row]] = True
        return MinedBatch(candidates=candidates, targets=targets, mask=mask, retrieved=retrieved)
