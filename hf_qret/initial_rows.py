"""The pretrained (initial) embeddings of the bank rows that can move: what drift control pulls toward and what the
decoupled loss term scores against, kept without a second copy of a large bank."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .bank import TargetBank

__all__ = ["InitialRows"]


class InitialRows:
    """The pretrained (initial) embedding of the bank rows that can move, for drift control and decoupled scoring.

    With ``movable`` (the rows of training positives under ``bank_update='positives'``) only those rows are copied
    (float32): every other row never moves, so the bank itself still holds its initial value. 10 M rows of which
    100 k train cost 100 k copied rows plus a 4-byte slot per row, not a second bank. Without it the whole bank is
    copied with :meth:`TargetBank.frozen_copy` (storage dtype; a memory-mapped bank into ``path``, copy-on-write).

    Args:
        bank: The bank, before training.
        movable: ``(num_docs,)`` mask of the rows that can move; ``None`` means all of them.
        path: Where a memory-mapped bank's full copy goes (only used for a memory-mapped bank when ``movable`` is
            ``None``).

    Example:
        >>> import torch
        >>> from hf_qret.bank import TargetBank
        >>> bank = TargetBank(torch.arange(6.0).reshape(3, 2), ["a", "b", "c"])
        >>> initial = InitialRows(bank, torch.tensor([False, True, False]))
        >>> with torch.no_grad():
        ...     bank.weight[1] = 9.0  # row 1 trains
        >>> initial.rows(torch.tensor([1, 2])).tolist()
        [[2.0, 3.0], [4.0, 5.0]]
    """

    def __init__(self, bank: TargetBank, movable: torch.Tensor | None = None, path: str | None = None) -> None:
        self.bank = bank
        weight = bank.weight.detach()
        if movable is None:
            self.slot = None
            if path is not None and bank.is_mmap:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.values = bank.frozen_copy(path if bank.is_mmap else None)
        else:
            rows = movable.nonzero().squeeze(1)
            self.slot = torch.full((len(movable),), -1, dtype=torch.int32)
            self.slot[rows] = torch.arange(len(rows), dtype=torch.int32)
            self.values = weight[rows.to(weight.device)].to(torch.float32, copy=True)

    @torch.no_grad()
    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The initial embeddings of ``rows`` as float32, on the bank's device."""
        if self.slot is None:
            return self.values[rows.to(self.values.device)].float()
        weight = self.bank.weight.detach()
        current = weight[rows.to(weight.device)].to(torch.float32, copy=True)
        slots = self.slot[rows.cpu()]
        kept = (slots >= 0).nonzero().squeeze(1)
        if kept.numel():
            current[kept.to(current.device)] = self.values[slots[kept].long().to(self.values.device)]
        return current
