"""The document adapter: a shared transform of every bank row, so that documents no query touched move too.

The bank's row optimizer moves only the rows training reaches (a few percent of a real corpus: InsuranceQA's
training positives are 3 % of its answers). :class:`DocumentAdapter` is a small residual MLP applied to *every*
candidate row in the loss, ``x -> (x + W_up gelu(W_down x)) * |x| / |...|`` (the row keeps its norm), trained with the
query encoder through the same loss. Because it is shared, what it learns from the rows training reaches carries over
to the rows it never reaches, the way a fine-tuned document encoder moves the whole corpus, without re-encoding a
single document: at each index refresh it is *baked* into the bank (every row replaced by its adapted row, one
small matmul per row, chunked) and restarts from the identity, so the bank always holds what the index serves and
the artifact, its rescoring copy and the codebook distillation need nothing new. The baked layers are saved with the
artifact (:mod:`hf_qret.serving.document_adapter`) so that documents added to it later are encoded like the bank's.

:class:`AdapterOptimizer` steps it with AdamW after the encoder's optimizer step (the loss's
``after_optimizer_step`` hook), averages its gradients across processes, and is saved with checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..serving.document_adapter import adapter_step

if TYPE_CHECKING:
    from ..bank.core import TargetBank

__all__ = ["AdaptedBankView", "AdapterLossMixin", "AdapterOptimizer", "DocumentAdapter", "attach_adapter"]

#: Rows adapted at a time when the adapter is baked into the bank (bounded memory at a million rows).
BAKE_CHUNK_ROWS = 65_536


class DocumentAdapter(nn.Module):
    """A residual MLP shared by every bank row, identity at start (its up-projection is zero).

    Args:
        dim: The embedding dimension.
        rank: Width of the hidden layer.
        seed: Seed of the down-projection's initialisation (its own generator: the global RNG is left alone, and
            every process of a distributed run builds the same adapter).

    Example:
        >>> import torch
        >>> adapter = DocumentAdapter(8, rank=4)
        >>> rows = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
        >>> torch.equal(adapter(rows), rows), adapter.is_identity()
        (True, True)
    """

    def __init__(self, dim: int, rank: int, seed: int = 0) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        generator = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            bound = dim**-0.5
            self.down.weight.copy_(torch.empty(rank, dim).uniform_(-bound, bound, generator=generator))
            self.down.bias.zero_()
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the identity (after it was baked into the bank)."""
        self.up.weight.zero_()
        self.up.bias.zero_()

    def is_identity(self) -> bool:
        """Whether the adapter leaves every row as it is (nothing learned since the last :meth:`reset`)."""
        return not (bool(self.up.weight.detach().any()) or bool(self.up.bias.detach().any()))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """The adapted rows, each at its input's norm (``rows`` themselves for the identity outside autograd)."""
        if not torch.is_grad_enabled() and self.is_identity():
            return rows
        return adapter_step(rows, self.layer(detach=False))

    def layer(self, detach: bool = True) -> dict[str, torch.Tensor]:
        """The parameters as one layer of :func:`~hf_qret.serving.document_adapter.adapter_step` (CPU copies when
        ``detach``: what an artifact saves)."""
        params = {"down.weight": self.down.weight, "down.bias": self.down.bias, "up.weight": self.up.weight,
                  "up.bias": self.up.bias}  # fmt: skip
        return {k: v.detach().cpu().clone() for k, v in params.items()} if detach else params

    @torch.no_grad()
    def adapted_numpy(self, bank: TargetBank, chunk_rows: int = BAKE_CHUNK_ROWS) -> np.ndarray:
        """Every row of ``bank`` (this process's) through the adapter, as a new float32 array; the bank is unchanged."""
        weight = bank.local_weight
        out = np.empty((weight.shape[0], weight.shape[1]), dtype=np.float32)
        for start, adapted in self._adapted_chunks(bank, chunk_rows):
            out[start : start + adapted.shape[0]] = adapted.cpu().numpy()
        return out

    def _adapted_chunks(self, bank: TargetBank, chunk_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start row, float32 adapted rows)`` over this process's rows of ``bank``, ``chunk_rows`` at a time."""
        weight = bank.local_weight
        for start in range(0, weight.shape[0], chunk_rows):
            yield start, self(weight[start : start + chunk_rows].detach().to(self.up.weight.device, torch.float32))

    @torch.no_grad()
    def bake(self, bank: TargetBank, chunk_rows: int = BAKE_CHUNK_ROWS, write: bool = True) -> int:
        """Replaces every row of ``bank`` (this process's rows in a sharded bank) by its adapted row, then resets to
        the identity. Returns the number of rows adapted (0 when the adapter is the identity).

        With ``write=False`` (a process that maps a bank file another process writes) the rows are left to that
        process; the bank still counts every row as changed.

        Example:
            >>> from hf_qret.bank.core import TargetBank
            >>> bank = TargetBank(torch.nn.functional.normalize(torch.randn(4, 8), dim=-1), list("abcd"))
            >>> adapter = DocumentAdapter(8, rank=4)
            >>> _ = adapter.up.bias.data.fill_(0.1)
            >>> adapter.bake(bank), adapter.is_identity(), bank.num_changed
            (4, True, 4)
        """
        if self.is_identity():
            return 0
        if write:
            for start, adapted in self._adapted_chunks(bank, chunk_rows):
                bank.write_rows(start, adapted.to(bank.local_weight.dtype))
        bank.mark_all_changed()
        bank.version += 1
        self.reset()
        return int(bank.local_weight.shape[0])


class AdapterOptimizer:
    """AdamW over a :class:`DocumentAdapter`, stepped once per optimizer step at the encoder schedule's ratio.

    Args:
        adapter: The adapter.
        lr: Base learning rate (multiplied by the schedule's ratio at each step).
        weight_decay: AdamW's decoupled decay.

    Example:
        >>> adapter = DocumentAdapter(8, rank=4)
        >>> optimizer = AdapterOptimizer(adapter, lr=1e-2)
        >>> rows = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
        >>> (adapter(rows) @ torch.randn(8)).sum().backward()
        >>> optimizer.step(1.0); adapter.is_identity()  # it moved away from the identity
        False
    """

    def __init__(self, adapter: DocumentAdapter, lr: float, weight_decay: float = 0.0) -> None:
        self.adapter = adapter
        self.lr = float(lr)
        self.optimizer = torch.optim.AdamW(adapter.parameters(), lr=self.lr, weight_decay=weight_decay)

    def step(self, lr_ratio: float = 1.0, world_size: int = 1) -> None:
        """One AdamW step on the accumulated gradients (averaged over ``world_size`` processes), then zeroes them."""
        params = [p for p in self.adapter.parameters() if p.grad is not None]
        if world_size > 1 and params:
            import torch.distributed as dist

            for param in params:
                dist.all_reduce(param.grad)
                param.grad.div_(world_size)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * float(lr_ratio)
        if params:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def reset_state(self) -> None:
        """Forgets the moments (the adapter was baked into the bank and restarts from the identity)."""
        self.optimizer.state.clear()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's parameters and AdamW's moments, flat, for a checkpoint (``safetensors``)."""
        out = {f"adapter.{name}": p.detach().clone() for name, p in self.adapter.named_parameters()}
        for name, param in self.adapter.named_parameters():
            for key, value in self.optimizer.state.get(param, {}).items():
                out[f"adapter_adamw.{name}.{key}"] = torch.as_tensor(value).detach().clone()
        return out

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Restores :meth:`state_tensors` output."""
        with torch.no_grad():
            for name, param in self.adapter.named_parameters():
                if f"adapter.{name}" in state:
                    param.copy_(state[f"adapter.{name}"])
        self.optimizer.state.clear()
        for name, param in self.adapter.named_parameters():
            prefix = f"adapter_adamw.{name}."
            entries = {k[len(prefix) :]: v.clone() for k, v in state.items() if k.startswith(prefix)}
            if entries:
                self.optimizer.state[param] = entries


class AdaptedBankView:
    """A bank whose rows read as ``rows`` (the adapted rows of a pending adapter); everything else is ``bank``'s.
    What a mid-training evaluation scores as the flat index, so that it sees what the quantized one serves.

    Example:
        >>> from hf_qret.bank.core import TargetBank
        >>> bank = TargetBank(torch.eye(2), ["a", "b"])
        >>> view = AdaptedBankView(bank, np.zeros((2, 2), dtype="float32"))
        >>> view.local_float32_rows().sum(), view.doc_ids
        (np.float32(0.0), ['a', 'b'])
    """

    def __init__(self, bank: TargetBank, rows: np.ndarray) -> None:
        self._bank = bank
        self._rows = rows

    def local_float32_rows(self) -> np.ndarray:
        """The adapted rows."""
        return self._rows

    def __getattr__(self, name: str):
        return getattr(self._bank, name)


class AdapterLossMixin:
    """The document adapter's part of :class:`~hf_qret.training.loss.MinedNegativesLoss`: its optimizer step, its
    checkpoint state, baking it into the bank, and the layers an artifact ships (the loss's hooks the trainer and the
    refresh callback call).

    Example:
        >>> from hf_qret.training.loss import MinedNegativesLoss
        >>> issubclass(MinedNegativesLoss, AdapterLossMixin)
        True
    """

    adapter: DocumentAdapter | None
    adapter_optimizer: AdapterOptimizer | None
    bank: TargetBank

    def _init_adapter(self, adapter: DocumentAdapter | None, adapter_optimizer: AdapterOptimizer | None) -> None:
        #: The shared document adapter (every candidate row goes through it), or ``None``.
        self.adapter = adapter
        self.adapter_optimizer = adapter_optimizer
        #: Whether this process writes the baked rows (``False`` on the processes that map a bank file another one
        #: writes), and what waits for that write (a barrier), set by the trainer.
        self.adapter_writes_rows = True
        self.adapter_sync: Any = None
        #: The layers baked into the bank so far, in order (what an artifact's new documents go through).
        self.baked_layers: list[dict[str, torch.Tensor]] = []

    def after_optimizer_step(self, lr_ratio: float, world_size: int = 1) -> None:
        """Steps the document adapter (if any) at the encoder schedule's ratio."""
        if self.adapter_optimizer is not None:
            self.adapter_optimizer.step(lr_ratio, world_size)

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """The document adapter's parameters and moments, and the layers baked so far (none without an adapter)."""
        if self.adapter_optimizer is None:
            return {}
        state = self.adapter_optimizer.state_tensors()
        for i, layer in enumerate(self.baked_layers):
            state.update({f"baked.{i}.{name}": value for name, value in layer.items()})
        return state

    def load_optimizer_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restores the document adapter from :meth:`optimizer_state` output."""
        if self.adapter_optimizer is not None and state:
            self.adapter_optimizer.load_state_tensors(state)
            count = len({key.split(".")[1] for key in state if key.startswith("baked.")})
            prefixes = [f"baked.{i}." for i in range(count)]
            self.baked_layers = [{k[len(p) :]: v for k, v in state.items() if k.startswith(p)} for p in prefixes]

    def adapter_layers(self) -> list[dict[str, torch.Tensor]]:
        """Every layer the bank's rows go through as served now: the baked ones, and a pending one."""
        pending = [self.adapter.layer()] if self.adapter_pending() else []
        return [*self.baked_layers, *pending]

    def set_adapter_layers(self, layers: list[dict[str, torch.Tensor]]) -> None:
        """The model was restored from a saved folder whose bank went through ``layers``: they become the baked
        layers and the adapter restarts from the identity."""
        self.baked_layers = list(layers)
        if self.adapter is not None:
            self.adapter.reset()
        if self.adapter_optimizer is not None:
            self.adapter_optimizer.reset_state()

    def bake_adapter(self) -> int:
        """Bakes the document adapter into the bank (every row adapted; the adapter back to the identity, its moments
        forgotten) before an index refresh; returns the rows written (0: no adapter, or nothing learned)."""
        if self.adapter is None:
            return 0
        layer = self.adapter.layer() if self.adapter_pending() else None
        written = self.adapter.bake(self.bank, write=self.adapter_writes_rows)
        if written and layer is not None:
            self.baked_layers.append(layer)
        if written and self.adapter_optimizer is not None:
            self.adapter_optimizer.reset_state()
        if written and self.adapter_sync is not None:
            self.adapter_sync()  # the writing process has written every row before any process reads them
        return written

    def adapter_pending(self) -> bool:
        """Whether the adapter learned something not yet baked into the bank."""
        return self.adapter is not None and not self.adapter.is_identity()

    def adapted_rows(self) -> Any:
        """Every local bank row through the adapter (float32 array), or ``None`` when nothing is pending."""
        if not self.adapter_pending():
            return None
        return self.adapter.adapted_numpy(self.bank)

    @contextlib.contextmanager
    def _frozen_adapter(self) -> Iterator[None]:
        """The document adapter's parameters take no gradient inside (the bank rows' term)."""
        if self.adapter is None:
            yield
            return
        flags = [p.requires_grad for p in self.adapter.parameters()]
        self.adapter.requires_grad_(False)
        try:
            yield
        finally:
            for param, flag in zip(self.adapter.parameters(), flags):
                param.requires_grad_(flag)


def attach_adapter(loss: AdapterLossMixin, args: Any) -> None:
    """Gives ``loss`` the document adapter ``args.doc_adapter_rank`` asks for (none at 0, with a frozen bank
    (``bank_learning_rate`` 0), or if it has one), on the device the candidate rows are scored on.

    Example:
        >>> attach_adapter(loss, args)  # doctest: +SKIP
        >>> loss.adapter  # doctest: +SKIP
        DocumentAdapter(...)
    """
    rank = int(getattr(args, "doc_adapter_rank", 0) or 0)
    if rank <= 0 or loss.adapter is not None or args.bank_learning_rate <= 0:  # bank_learning_rate 0: a frozen bank
        return
    device = loss.bank.compute_device or loss.bank.local_weight.device
    loss.adapter = DocumentAdapter(loss.bank.dim, rank, seed=args.seed).to(device)
    loss.adapter_optimizer = AdapterOptimizer(loss.adapter, args.doc_adapter_learning_rate)
