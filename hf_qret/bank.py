"""The TargetBank: corpus embeddings computed once, then trained by backpropagation as a memory buffer.

The bank is an ``nn.Module`` whose single parameter is the ``(num_docs, dim)`` matrix of target embeddings. The
trainer gathers the rows of a batch's candidate set with a *sparse* gradient, and :class:`RowAdam` updates only those
rows. Every row keeps its own Adam moments **and its own step count**, so the bias correction of a row depends only on
how often that row was updated, and no state is ever shared between two documents.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .distributed import row_gradients
from .errors import ArtifactError

__all__ = ["TargetBank", "RowAdam"]

BANK_KEY = "embeddings"


class TargetBank(nn.Module):
    """Trainable target (document) embeddings, one row per document.

    Args:
        embeddings: ``(num_docs, dim)`` initial embeddings.
        doc_ids: Document id of each row, in row order.

    Example:
        >>> import torch
        >>> bank = TargetBank(torch.randn(4, 8), ["a", "b", "c", "d"])
        >>> rows = bank.gather(torch.tensor([2, 0]))
        >>> rows.shape
        torch.Size([2, 8])
        >>> bank.row_of("c")
        2
    """

    def __init__(self, embeddings: torch.Tensor | np.ndarray, doc_ids: Sequence[str]) -> None:
        super().__init__()
        embeddings = torch.as_tensor(np.asarray(embeddings) if not torch.is_tensor(embeddings) else embeddings)
        if embeddings.ndim != 2:
            raise ArtifactError(f"bank embeddings must be a 2-D (num_docs, dim) matrix, got shape {tuple(embeddings.shape)}.")
        if embeddings.shape[0] != len(doc_ids):
            raise ArtifactError(
                f"the bank has {embeddings.shape[0]} rows but {len(doc_ids)} document ids were given; "
                "re-encode the corpus or pass the doc-id list the bank was built from."
            )
        if len(set(doc_ids)) != len(doc_ids):
            raise ArtifactError("the doc-id list of the bank has duplicates; every row needs a unique document id.")
        self.weight = nn.Parameter(embeddings.detach().to(torch.float32).clone().contiguous())
        self.doc_ids: list[str] = [str(d) for d in doc_ids]
        self._row_of = {d: i for i, d in enumerate(self.doc_ids)}
        #: Incremented by every optimizer step that changes rows; the index refresh compares it.
        self.version = 0

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        """The embedding dimension."""
        return self.weight.shape[1]

    def row_of(self, doc_id: str) -> int:
        """The row index of ``doc_id``."""
        try:
            return self._row_of[doc_id]
        except KeyError:
            raise KeyError(f"document {doc_id!r} is not in the bank ({len(self)} documents).") from None

    def rows_of(self, doc_ids: Sequence[str]) -> list[int]:
        """Row indices of several document ids."""
        return [self.row_of(d) for d in doc_ids]

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """The embeddings of ``rows``, differentiable with a sparse gradient w.r.t. the bank."""
        return nn.functional.embedding(rows.to(self.weight.device), self.weight, sparse=True)

    def numpy(self) -> np.ndarray:
        """A float32 ``(num_docs, dim)`` copy for FAISS."""
        return np.ascontiguousarray(self.weight.detach().to("cpu", torch.float32).numpy())

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_encoder(
        cls,
        encode: Callable[[list[str]], torch.Tensor | np.ndarray],
        texts: Sequence[str],
        doc_ids: Sequence[str],
    ) -> TargetBank:
        """Builds the bank by encoding the corpus once.

        Args:
            encode: Maps a list of texts to their ``(n, dim)`` embeddings, for example
                :func:`hf_qret.encoder.encode_texts` bound to a model (batched, with a progress bar).
            texts: The document texts, in row order.
            doc_ids: The document ids, in row order.

        Example:
            >>> from functools import partial
            >>> from hf_qret.encoder import encode_texts
            >>> bank = TargetBank.from_encoder(partial(encode_texts, model), texts, ids)  # doctest: +SKIP
        """
        return cls(torch.as_tensor(np.asarray(encode(list(texts)), dtype=np.float32)), doc_ids)

    @classmethod
    def from_file(cls, path: str | os.PathLike, doc_ids: Sequence[str]) -> TargetBank:
        """Loads initial embeddings from a ``.npy`` file (no pickle) or a safetensors file (key ``embeddings``)."""
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path}: no such bank file; pass a .npy or .safetensors file of embeddings.")
        try:
            if path.suffix == ".npy":
                array = np.load(path, allow_pickle=False)
            else:
                from safetensors.numpy import load_file

                tensors = load_file(str(path))
                if BANK_KEY not in tensors:
                    raise ArtifactError(f"{path}: no {BANK_KEY!r} tensor; found {sorted(tensors)}.")
                array = tensors[BANK_KEY]
        except ArtifactError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoding failure is a corrupt file for the user
            raise ArtifactError(f"{path}: cannot be read as a bank ({exc}); re-create it.") from None
        return cls(torch.from_numpy(np.asarray(array, dtype=np.float32)), doc_ids)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the embeddings atomically: ``.npy`` for a ``.npy`` path, else safetensors (key ``embeddings``)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        if path.suffix == ".npy":
            with open(tmp, "wb") as handle:
                np.save(handle, self.numpy(), allow_pickle=False)
        else:
            from safetensors.torch import save_file

            save_file({BANK_KEY: self.weight.detach().to("cpu").contiguous()}, str(tmp))
        os.replace(tmp, path)

    def check_dim(self, dim: int, what: str = "the encoder") -> None:
        """Raises a clear error when the bank dimension differs from ``dim``."""
        if self.dim != dim:
            raise ArtifactError(
                f"the bank has dimension {self.dim} but {what} produces {dim}-d embeddings; "
                "build the bank with the same encoder."
            )


class RowAdam:
    """Adam over the rows of a :class:`TargetBank`, with per-row state and per-row step counts.

    Only rows that received a gradient (the candidate rows of the accumulated batches) are read or written. A row's
    moments and step count belong to that row alone, so the first update of a row always gets the full bias
    correction of a first Adam step, however late in training it happens.

    Args:
        bank: The bank to optimise.
        lr: Learning rate.
        betas: Adam's moment coefficients.
        eps: Adam's epsilon.
        weight_decay: Decoupled (AdamW-style) weight decay on the updated rows.

    Example:
        >>> import torch
        >>> bank = TargetBank(torch.zeros(3, 2), ["a", "b", "c"])
        >>> opt = RowAdam(bank, lr=0.1)
        >>> bank.gather(torch.tensor([1])).sum().backward()
        >>> opt.step(); opt.zero_grad()
        >>> bank.weight[1].tolist(), bank.weight[0].tolist()
        ([-0.10000000149011612, -0.10000000149011612], [0.0, 0.0])
    """

    def __init__(
        self,
        bank: TargetBank,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        self.bank = bank
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        weight = bank.weight
        self.exp_avg = torch.zeros_like(weight)
        self.exp_avg_sq = torch.zeros_like(weight)
        self.row_steps = torch.zeros(weight.shape[0], dtype=torch.int64, device=weight.device)

    @torch.no_grad()
    def step(self) -> int:
        """Updates the rows that have a gradient; returns how many rows were updated."""
        rows, grads = row_gradients(self.bank.weight)
        if rows.numel() == 0:
            return 0
        beta1, beta2 = self.betas
        weight = self.bank.weight
        self.row_steps[rows] += 1
        steps = self.row_steps[rows].to(weight.dtype).unsqueeze(1)
        exp_avg = self.exp_avg[rows].mul_(beta1).add_(grads, alpha=1 - beta1)
        exp_avg_sq = self.exp_avg_sq[rows].mul_(beta2).addcmul_(grads, grads, value=1 - beta2)
        self.exp_avg[rows] = exp_avg
        self.exp_avg_sq[rows] = exp_avg_sq
        bias1 = 1 - beta1**steps
        bias2 = 1 - beta2**steps
        denom = (exp_avg_sq / bias2).sqrt_().add_(self.eps)
        update = (exp_avg / bias1) / denom
        current = weight[rows]
        if self.weight_decay:
            current = current * (1 - self.lr * self.weight_decay)
        weight[rows] = current - self.lr * update
        self.bank.version += 1
        return int(rows.numel())

    def zero_grad(self) -> None:
        """Drops the accumulated (sparse) gradient of the bank."""
        self.bank.weight.grad = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The optimizer state as tensors (safetensors-friendly)."""
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "row_steps": self.row_steps}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores :meth:`state_dict` output; shapes must match the bank."""
        for name in ("exp_avg", "exp_avg_sq", "row_steps"):
            if name not in state or tuple(state[name].shape) != tuple(getattr(self, name).shape):
                raise ArtifactError(
                    f"bank optimizer state {name!r} is missing or has the wrong shape; "
                    "the checkpoint belongs to another corpus."
                )
            getattr(self, name).copy_(state[name])
