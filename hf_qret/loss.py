"""The training objective: softmax cross-entropy of each query over its batch's candidate set."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CandidateCrossEntropyLoss"]


class CandidateCrossEntropyLoss(nn.Module):
    """Cross-entropy of scaled dot products between queries and candidate target embeddings.

    ``logits = scale * queries @ candidates.T``; masked candidates (a query's other known positives) get ``-inf``.

    Args:
        scale: Inverse temperature of the softmax (20 is the sentence-transformers default for cosine scores).

    Example:
        >>> import torch
        >>> loss_fn = CandidateCrossEntropyLoss(scale=20.0)
        >>> q = torch.nn.functional.normalize(torch.randn(2, 4), dim=-1)
        >>> loss, stats = loss_fn(q, q, torch.tensor([0, 1]), torch.zeros(2, 2, dtype=torch.bool))
        >>> sorted(stats)
        ['mean_positive_rank', 'num_candidates']
    """

    def __init__(self, scale: float = 20.0) -> None:
        super().__init__()
        self.scale = float(scale)

    def forward(
        self,
        queries: torch.Tensor,
        candidates: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Returns the mean loss and statistics (mean rank of the positive, 1 = first; candidate count)."""
        logits = self.scale * queries @ candidates.to(queries.dtype).T
        if mask is not None:
            logits = logits.masked_fill(mask.to(logits.device), float("-inf"))
        targets = targets.to(logits.device)
        loss = nn.functional.cross_entropy(logits.float(), targets)
        with torch.no_grad():
            positive = logits.gather(1, targets.unsqueeze(1))
            rank = (logits > positive).sum(dim=1).float() + 1.0
        return loss, {"mean_positive_rank": float(rank.mean()), "num_candidates": float(candidates.shape[0])}
