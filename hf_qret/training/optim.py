"""The bank's optimizer: Adam over the rows of a :class:`~hf_qret.bank.core.TargetBank`, and the schedule it follows.

:class:`RowAdam` is a ``torch.optim.Optimizer`` over the bank's single (sparse-gradient) parameter. It keeps
per-row state (moments and step count) for the rows it has updated only, and owns drift control (moved rows keep
their initial norm). :class:`FollowScheduler` drives its learning
rate with the encoder's schedule, read from the encoder's scheduler itself (warm-up, decay, or a scheduler the user
passed in ``optimizers=``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from ..errors import ArtifactError
from .distributed import row_gradients

if TYPE_CHECKING:
    from ..bank.core import TargetBank

__all__ = ["RowAdam", "RowSGD", "FollowScheduler"]


class RowAdam(torch.optim.Optimizer):
    """Adam over the rows of a :class:`TargetBank`, with per-row state and per-row step counts.

    Only rows that received a gradient (the candidate rows of the accumulated batches) are read or written. A row's
    moments and step count belong to that row alone, so the first update of a row always gets the full bias
    correction of a first Adam step, however late in training it happens.

    State is kept only for rows that were ever updated: a row-to-slot map (4 bytes per bank row) and slot tensors of
    moments and step counts allocated in blocks of ``block_rows`` rows as new rows are touched, so the memory grows
    with the number of touched rows, not with the corpus. The update is computed in float32 whatever the bank's
    storage dtype, and written back in that dtype.

    Drift control runs on the rows a step moved, right after it: ``keep_norms`` rescales each row to its initial
    norm.

    Args:
        bank: The bank to optimise.
        lr: Learning rate (``param_groups[0]["lr"]``, what a scheduler sets).
        betas: Adam's moment coefficients.
        eps: Adam's epsilon.
        weight_decay: Decoupled (AdamW-style) weight decay on the updated rows.
        block_rows: Rows of optimizer state allocated at a time.
        keep_norms: ``(num_docs,)`` norms the moved rows are rescaled to (``None``: no norm keeping).

    Example:
        >>> import torch
        >>> from hf_qret.bank.core import TargetBank
        >>> bank = TargetBank(torch.zeros(3, 2), ["a", "b", "c"])
        >>> opt = RowAdam(bank, lr=0.1)
        >>> bank.gather(torch.tensor([1])).sum().backward()
        >>> opt.step()  # rows updated
        1
        >>> opt.zero_grad()
        >>> [round(v, 4) for v in bank.weight[1].tolist()], bank.weight[0].tolist()
        ([-0.1, -0.1], [0.0, 0.0])
        >>> opt.num_touched_rows
        1
    """

    STATE_NAMES = ("exp_avg", "exp_avg_sq", "row_steps")

    def __init__(
        self,
        bank: TargetBank,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        block_rows: int = 16384,
        keep_norms: torch.Tensor | None = None,
    ) -> None:
        if block_rows < 1:
            raise ValueError(f"block_rows must be at least 1, got {block_rows}.")
        super().__init__([bank.local_weight], {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.bank = bank
        self.block_rows = int(block_rows)
        self.keep_norms = keep_norms
        #: ``False``: :meth:`step` updates the state only and leaves the rows to the process that writes them (a
        #: memory-mapped bank shared by several processes: one update per step, written once).
        self.write_rows = True
        weight = bank.local_weight
        self._num_rows = int(weight.shape[0])
        self._dim = int(weight.shape[1])
        self._device = weight.device
        index_dtype = torch.int32 if self._num_rows < 2**31 else torch.int64
        self._slot_of = torch.full((self._num_rows,), -1, dtype=index_dtype, device=self._device)
        self._reset_slots()

    @property
    def lr(self) -> float:
        """The current learning rate (set by a scheduler through ``param_groups``)."""
        return float(self.param_groups[0]["lr"])

    @lr.setter
    def lr(self, value: float) -> None:
        self.param_groups[0]["lr"] = float(value)

    @property
    def betas(self) -> tuple[float, float]:
        """The ``(beta1, beta2)`` moment decay rates of the (single) parameter group."""
        return tuple(self.param_groups[0]["betas"])

    @property
    def eps(self) -> float:
        """Adam's epsilon, of the (single) parameter group."""
        return float(self.param_groups[0]["eps"])

    @property
    def weight_decay(self) -> float:
        """The decoupled (AdamW-style) weight decay of the (single) parameter group (``0.0``: none)."""
        return float(self.param_groups[0]["weight_decay"])

    def _reset_slots(self) -> None:
        self._slot_of.fill_(-1)
        self._avg_blocks: list[torch.Tensor] = []
        self._sq_blocks: list[torch.Tensor] = []
        self._step_blocks: list[torch.Tensor] = []
        self._capacity = 0
        self.num_touched_rows = 0

    # ------------------------------------------------------------------ slot store
    def _grow(self, needed: int) -> None:
        while self._capacity < needed:
            rows = min(self.block_rows, self._num_rows - self._capacity)
            self._avg_blocks.append(torch.zeros(rows, self._dim, dtype=torch.float32, device=self._device))
            self._sq_blocks.append(torch.zeros(rows, self._dim, dtype=torch.float32, device=self._device))
            self._step_blocks.append(torch.zeros(rows, dtype=torch.int64, device=self._device))
            self._capacity += rows

    def _slots(self, rows: torch.Tensor) -> torch.Tensor:
        """The slots of ``rows`` (unique), allocating fresh zeroed slots for rows seen for the first time."""
        slots = self._slot_of[rows].long()
        fresh = slots < 0
        count = int(fresh.sum())
        if count:
            start = self.num_touched_rows
            self._grow(start + count)
            new_slots = torch.arange(start, start + count, device=self._device)
            self._slot_of[rows[fresh]] = new_slots.to(self._slot_of.dtype)
            slots[fresh] = new_slots
            self.num_touched_rows += count
        return slots

    def _read(self, blocks: list[torch.Tensor], slots: torch.Tensor) -> torch.Tensor:
        if len(blocks) == 1:
            return blocks[0][slots]
        block, offset = slots // self.block_rows, slots % self.block_rows
        out = blocks[0].new_empty((slots.numel(), *blocks[0].shape[1:]))
        for b in torch.unique(block).tolist():
            where = (block == b).nonzero().squeeze(1)
            out[where] = blocks[b][offset[where]]
        return out

    def _write(self, blocks: list[torch.Tensor], slots: torch.Tensor, values: torch.Tensor) -> None:
        if len(blocks) == 1:
            blocks[0][slots] = values
            return
        block, offset = slots // self.block_rows, slots % self.block_rows
        for b in torch.unique(block).tolist():
            where = (block == b).nonzero().squeeze(1)
            blocks[b][offset[where]] = values[where]

    # ------------------------------------------------------------------ optimisation
    @torch.no_grad()
    def step(self, closure: Any = None) -> int:
        """Updates the rows that have a gradient, then applies drift control to them; returns how many rows moved."""
        rows, grads = self._gradient_rows(closure)
        if rows.numel() == 0:
            return 0
        eps = self.eps
        beta1, beta2 = self.betas
        slots = self._slots(rows)
        row_steps = self._read(self._step_blocks, slots) + 1
        self._write(self._step_blocks, slots, row_steps)
        steps = row_steps.to(torch.float32).unsqueeze(1)
        exp_avg = self._read(self._avg_blocks, slots).mul_(beta1).add_(grads, alpha=1 - beta1)
        exp_avg_sq = self._read(self._sq_blocks, slots).mul_(beta2).addcmul_(grads, grads, value=1 - beta2)
        self._write(self._avg_blocks, slots, exp_avg)
        self._write(self._sq_blocks, slots, exp_avg_sq)
        bias1 = 1 - beta1**steps
        bias2 = 1 - beta2**steps
        denom = (exp_avg_sq / bias2).sqrt_().add_(eps)
        update = (exp_avg / bias1) / denom
        return self._move(rows, update)

    def _gradient_rows(self, closure: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows that have a gradient and their gradients (float32); optimizers over rows take no closure."""
        if closure is not None:
            raise ValueError(f"{type(self).__name__} does not take a closure.")
        rows, grads = row_gradients(self.bank.local_weight)
        return rows, grads.float()

    def _move(self, rows: torch.Tensor, update: torch.Tensor) -> int:
        """``row -= lr * update`` (after decoupled weight decay), drift control, written back in the bank's dtype."""
        lr, weight_decay, weight = self.lr, self.weight_decay, self.bank.local_weight
        if not self.write_rows:
            self.bank.version += 1
            if hasattr(self.bank, "mark_changed"):
                self.bank.mark_changed(rows)
            return int(rows.numel())
        current = weight[rows].float()
        if weight_decay:
            current = current * (1 - lr * weight_decay)
        current = self._control_drift(rows, current - lr * update)
        weight[rows] = current.to(weight.dtype)
        self.bank.version += 1
        if hasattr(self.bank, "mark_changed"):
            self.bank.mark_changed(rows)
        return int(rows.numel())

    def _control_drift(self, rows: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """The norm keeping applied to the float32 new values ``current`` of ``rows``."""
        if self.keep_norms is not None:
            norms = self.keep_norms[rows.to(self.keep_norms.device)].to(current.device, current.dtype)
            current = current * (norms.unsqueeze(1) / current.norm(dim=1, keepdim=True).clamp_min(1e-12))
        return current

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drops the accumulated (sparse) gradient of the bank."""
        self.bank.local_weight.grad = None

    # ------------------------------------------------------------------ inspection
    def touched_rows(self) -> torch.Tensor:
        """The sorted bank rows that have optimizer state (were updated at least once)."""
        return (self._slot_of >= 0).nonzero().squeeze(1)

    @property
    def nbytes(self) -> int:
        """Bytes of optimizer state: the row-to-slot map plus the allocated slot blocks."""
        blocks = self._avg_blocks + self._sq_blocks + self._step_blocks
        return self._slot_of.numel() * self._slot_of.element_size() + sum(b.numel() * b.element_size() for b in blocks)

    def _dense(self, blocks: list[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        out = torch.zeros(shape, dtype=dtype, device=self._device)
        rows = self.touched_rows()
        if rows.numel():
            out[rows] = self._read(blocks, self._slot_of[rows].long())
        return out

    @property
    def row_steps(self) -> torch.Tensor:
        """Every row's own step count, ``(num_docs,)`` int64 (a copy; 0 for rows never updated)."""
        return self._dense(self._step_blocks, (self._num_rows,), torch.int64)

    @property
    def exp_avg(self) -> torch.Tensor:
        """A dense ``(num_docs, dim)`` copy of the first moments (zeros where untouched): for small banks only."""
        return self._dense(self._avg_blocks, (self._num_rows, self._dim), torch.float32)

    @property
    def exp_avg_sq(self) -> torch.Tensor:
        """A dense ``(num_docs, dim)`` copy of the second moments (zeros where untouched): for small banks only."""
        return self._dense(self._sq_blocks, (self._num_rows, self._dim), torch.float32)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """The optimizer state as tensors (safetensors-friendly), compact; the learning rate is the scheduler's.

        ``row_steps`` is ``(num_docs,)``; ``exp_avg`` and ``exp_avg_sq`` are ``(T, dim)`` for the ``T`` rows with
        ``row_steps > 0``, in increasing row order.
        """
        rows = self.touched_rows()
        slots = self._slot_of[rows].long()
        empty = torch.zeros(0, self._dim, dtype=torch.float32, device=self._device)
        steps = torch.zeros(self._num_rows, dtype=torch.int64, device=self._device)
        if rows.numel():
            steps[rows] = self._read(self._step_blocks, slots)
        return {
            "exp_avg": self._read(self._avg_blocks, slots) if rows.numel() else empty,
            "exp_avg_sq": self._read(self._sq_blocks, slots) if rows.numel() else empty.clone(),
            "row_steps": steps,
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:  # type: ignore[override]
        """Restores :meth:`state_dict` output; also reads the older dense format (``(num_docs, dim)`` moments).

        Raises:
            ArtifactError: A tensor is missing or its shape does not fit this bank.
        """

        def wrong(name: str) -> ArtifactError:
            return ArtifactError(
                f"bank optimizer state {name!r} is missing or has the wrong shape; the checkpoint belongs to another "
                "corpus."
            )

        for name in self.STATE_NAMES:
            if name not in state:
                raise wrong(name)
        steps = state["row_steps"].to(self._device, torch.int64)
        if tuple(steps.shape) != (self._num_rows,):
            raise wrong("row_steps")
        rows = steps.gt(0).nonzero().squeeze(1)
        moments = {}
        for name in ("exp_avg", "exp_avg_sq"):
            tensor = state[name].to(self._device, torch.float32)
            if tensor.ndim != 2 or tensor.shape[1] != self._dim:
                raise wrong(name)
            if tensor.shape[0] == rows.numel():
                moments[name] = tensor
            elif tensor.shape[0] == self._num_rows:  # the dense format of earlier versions
                moments[name] = tensor[rows]
            else:
                raise wrong(name)
        self._reset_slots()
        if rows.numel():
            slots = self._slots(rows)
            self._write(self._step_blocks, slots, steps[rows])
            self._write(self._avg_blocks, slots, moments["exp_avg"])
            self._write(self._sq_blocks, slots, moments["exp_avg_sq"])


class RowSGD(RowAdam):
    """Plain (sparse) SGD over the rows of a :class:`TargetBank`: a row moves by ``lr * gradient``.

    A row's step is proportional to its gradient, so a row the loss hardly cares about (a far negative whose
    softmax weight is 1e-4) hardly moves, and a row that is touched at every step (on a small corpus where every
    document is mined for every batch) drifts only as far as its gradients add up to. Row-wise Adam instead moves
    every touched row by about ``lr`` per coordinate whatever its gradient's size (its first step is
    ``lr * sign(g)``), which on such corpora turns the noise of tiny gradients into large drift (see the README,
    "Accuracy options"). No optimizer state is kept beyond :class:`RowAdam`'s empty row map, so checkpoints keep
    the same layout. Drift control (``keep_norms``) and decoupled weight decay work as in
    :class:`RowAdam`.

    Example:
        >>> import torch
        >>> from hf_qret.bank.core import TargetBank
        >>> bank = TargetBank(torch.zeros(3, 2), ["a", "b", "c"])
        >>> opt = RowSGD(bank, lr=0.5)
        >>> (bank.gather(torch.tensor([1, 2])) * torch.tensor([[1.0], [0.001]])).sum().backward()
        >>> opt.step()
        2
        >>> [[round(v, 4) for v in bank.weight[r].tolist()] for r in (1, 2)]
        [[-0.5, -0.5], [-0.0005, -0.0005]]
    """

    def __init__(
        self,
        bank: TargetBank,
        lr: float = 0.2,
        weight_decay: float = 0.0,
        keep_norms: torch.Tensor | None = None,
    ) -> None:
        super().__init__(bank, lr=lr, weight_decay=weight_decay, keep_norms=keep_norms)

    @torch.no_grad()
    def step(self, closure: Any = None) -> int:
        """Moves the rows that have a gradient by ``-lr * gradient``, then applies drift control to them."""
        rows, grads = self._gradient_rows(closure)
        if rows.numel() == 0:
            return 0
        return self._move(rows, grads)


class FollowScheduler(LRScheduler):
    """Sets each group's learning rate to its base learning rate times the leader scheduler's current ratio.

    The ratio is ``leader.get_last_lr()[0] / leader.base_lrs[0]``: the bank follows the encoder's warm-up and decay
    whatever the encoder's own learning rate, also for a scheduler the user built (``optimizers=(opt, sched)``).
    Step it right before the optimizer it drives, after the leader's optimizer stepped (the Trainer's
    ``on_optimizer_step``): the bank then uses the ratio the encoder's step just used.

    Args:
        optimizer: The optimizer to drive (the bank's :class:`RowAdam`).
        leader: The encoder's scheduler; ``None`` keeps the base learning rates.

    Example:
        >>> import torch
        >>> encoder = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> leader = torch.optim.lr_scheduler.LambdaLR(encoder, lambda step: 0.5)
        >>> bank_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> FollowScheduler(bank_opt, leader).get_last_lr()
        [0.5]
    """

    def __init__(self, optimizer: torch.optim.Optimizer, leader: LRScheduler | None) -> None:
        self.leader = leader
        super().__init__(optimizer)

    def ratio(self) -> float:
        """The leader's current learning rate over its base learning rate (1.0 without a leader, or when the leader's
        base learning rate is 0: the encoder is frozen, the bank keeps its own rate)."""
        leader = self.leader
        if leader is None or not getattr(leader, "base_lrs", None):
            return 1.0
        base = float(leader.base_lrs[0])
        return float(leader.get_last_lr()[0]) / base if base > 0 else 1.0  # a frozen encoder: no schedule to follow

    def get_lr(self) -> list[float]:
        """Each group's base learning rate times the leader's current :meth:`ratio`."""
        ratio = self.ratio()
        return [base * ratio for base in self.base_lrs]

    def step(self, epoch: int | None = None) -> None:
        """Sets the learning rates from the leader's current ratio (no step counting: the leader counts)."""
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr
