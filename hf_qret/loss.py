"""Training objectives: each query's softmax cross-entropy over its batch's mined candidate set.

The losses follow sentence-transformers' habit of small ``nn.Module``\\ s. :class:`CandidateCrossEntropyLoss` is the
scoring primitive (scaled dot products, masked, cross-entropy). :class:`MinedNegativesLoss` is the method's default
loss: given the query embeddings and a :class:`~hf_qret.mining.MinedBatch`, it gathers the candidates' bank rows
(with a sparse gradient, only for the rows allowed to move), adds the decoupled initial-target term, and masks a
query's other known positives. :class:`QuantizationAwareLoss` and :class:`CodebookLearningLoss` are its variants that
score (partly) against what the quantized index stores, and, for the latter, learn the PQ centroids (JPQ-style).
:func:`build_loss` picks the one :class:`~hf_qret.config.QRetTrainingArguments` asks for.

Any subclass of :class:`QRetLoss` can be passed to :class:`~hf_qret.trainer.QRetTrainer` as ``loss=``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .bank import TargetBank
    from .config import QRetTrainingArguments
    from .index import QuantizedIndex
    from .initial_rows import InitialRows
    from .mining import MinedBatch

__all__ = [
    "CandidateCrossEntropyLoss",
    "CodebookLearningLoss",
    "MinedNegativesLoss",
    "QRetLoss",
    "QuantizationAwareLoss",
    "build_loss",
    "resolve_loss",
]


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
        weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Returns the (``weights``-weighted) mean loss and statistics (mean rank of the positive, 1 = first;
        candidate count)."""
        logits = self.scale * queries @ candidates.to(queries.dtype).T
        if mask is not None:
            logits = logits.masked_fill(mask.to(logits.device), float("-inf"))
        targets = targets.to(logits.device)
        if weights is None:
            loss = nn.functional.cross_entropy(logits.float(), targets)
        else:
            weights = weights.to(logits.device, torch.float32)
            per_example = nn.functional.cross_entropy(logits.float(), targets, reduction="none")
            loss = (weights * per_example).sum() / weights.sum()
        with torch.no_grad():
            positive = logits.gather(1, targets.unsqueeze(1))
            rank = (logits > positive).sum(dim=1).float() + 1.0
        return loss, {"mean_positive_rank": float(rank.mean()), "num_candidates": float(candidates.shape[0])}


class QRetLoss(nn.Module):
    """Base class of the losses :class:`~hf_qret.trainer.QRetTrainer` takes.

    ``forward(query_embeddings, mined)`` returns ``(loss, stats)`` (stats: floats logged with the training loss). The
    trainer sets the loss's train/eval mode to the model's before calling it. The hooks below let a loss own state
    of its own (e.g. learned codebooks) without the trainer knowing about it; their defaults do nothing.
    """

    def forward(self, query_embeddings: torch.Tensor, mined: MinedBatch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def refresh_mode(self, requested: str) -> str:
        """The index refresh mode this loss needs given the requested one (default: the requested one)."""
        return requested

    def after_optimizer_step(self, lr_ratio: float, world_size: int = 1) -> None:
        """Called after every encoder optimizer step with the schedule's current ratio (1.0 = base rate)."""

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """Tensors of the loss's own optimizer state, saved with checkpoints (default: none)."""
        return {}

    def load_optimizer_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restores :meth:`optimizer_state` output from a checkpoint."""


class MinedNegativesLoss(QRetLoss):
    """The method's loss: each query against the bank rows of its batch's mined candidates.

    Candidate rows are gathered from the bank with a sparse gradient when the bank trains; with ``trainable_rows``
    only those rows get a gradient (the others are scored, but keep their pretrained embedding). With
    ``initial_targets`` (decoupled scoring) the query encoder learns against the pretrained targets (what documents
    that never train look like) while the bank rows learn against the detached queries: the loss is the sum of both
    terms.

    Args:
        bank: The :class:`~hf_qret.bank.TargetBank`.
        scale: Inverse temperature of the softmax.
        train_bank: Whether candidate rows get a gradient in training (``bank_learning_rate > 0``).
        trainable_rows: ``(num_docs,)`` mask of the rows that may move (``None``: all of them).
        initial_targets: The pretrained rows (:class:`~hf_qret.bank.InitialRows`) for decoupled scoring.

    Example:
        >>> import torch
        >>> from hf_qret.bank import TargetBank
        >>> from hf_qret.mining import IndexMiner
        >>> bank = TargetBank(torch.eye(4), ["a", "b", "c", "d"])
        >>> mined = IndexMiner.candidates_from(torch.tensor([[1, 2]]).numpy(), torch.tensor([0]))
        >>> loss, stats = MinedNegativesLoss(bank)(torch.eye(4)[:1], mined)
        >>> loss.backward(); bank.weight.grad.is_sparse, stats["num_candidates"]
        (True, 3.0)
    """

    def __init__(
        self,
        bank: TargetBank,
        scale: float = 20.0,
        train_bank: bool = True,
        trainable_rows: torch.Tensor | None = None,
        initial_targets: InitialRows | None = None,
    ) -> None:
        super().__init__()
        self.bank = bank
        self.cross_entropy = CandidateCrossEntropyLoss(scale)
        self.train_bank = bool(train_bank)
        self.trainable_rows = trainable_rows
        self.initial_targets = initial_targets

    @property
    def scale(self) -> float:
        """The softmax's inverse temperature."""
        return self.cross_entropy.scale

    def candidate_rows(self, mined: MinedBatch) -> torch.Tensor:
        """The candidates' bank rows, with a sparse gradient for the rows that train."""
        if not (self.training and self.train_bank):
            return self.bank.gather(mined.candidates).detach()
        if self.trainable_rows is None:
            return self.bank.gather(mined.candidates)
        # Positives-only: documents that are never a training positive are scored but get no gradient at all
        # (the row optimizer neither steps them nor decays their moments): they keep their pretrained embedding.
        with torch.no_grad():
            candidates = self.bank.gather(mined.candidates)
        moving = self.trainable_rows[mined.candidates].nonzero().squeeze(1)
        moving_rows = self.bank.gather(mined.candidates[moving])
        return candidates.index_copy(0, moving.to(candidates.device), moving_rows)

    def scored_targets(self, mined: MinedBatch, rows: torch.Tensor, initial: bool = False) -> torch.Tensor:
        """What the queries are scored against for candidate ``rows`` (the bank rows themselves here).

        ``initial`` says ``rows`` are the pretrained targets of decoupled scoring. Variants override it.
        """
        return rows

    def forward(self, query_embeddings: torch.Tensor, mined: MinedBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Returns the loss of the batch and its statistics (mean positive rank, candidate count)."""
        targets = self.scored_targets(mined, self.candidate_rows(mined))
        if self.training and self.train_bank and self.initial_targets is not None:
            initial = self.initial_targets.rows(mined.candidates).to(targets.device, targets.dtype)
            initial = self.scored_targets(mined, initial, initial=True)
            loss, stats = self.cross_entropy(query_embeddings, initial, mined.targets, mined.mask, mined.weights)
            # The bank rows learn against the detached queries, or (bank_queries='initial') the frozen pretrained ones.
            bank_queries = query_embeddings if mined.bank_queries is None else mined.bank_queries
            bank_queries = bank_queries.detach().to(query_embeddings.device, query_embeddings.dtype)
            bank_loss, _ = self.cross_entropy(bank_queries, targets, mined.targets, mined.mask, mined.weights)
            return loss + bank_loss, stats
        if self.training and self.train_bank and mined.bank_queries is not None:
            # bank_queries='initial' with encoder_targets='bank': the encoder follows the bank it will be served with,
            # the bank rows learn against the frozen pretrained queries.
            loss, stats = self.cross_entropy(query_embeddings, targets.detach(), mined.targets, mined.mask, mined.weights)
            bank_queries = mined.bank_queries.detach().to(query_embeddings.device, query_embeddings.dtype)
            bank_loss, _ = self.cross_entropy(bank_queries, targets, mined.targets, mined.mask, mined.weights)
            return loss + bank_loss, stats
        return self.cross_entropy(query_embeddings, targets, mined.targets, mined.mask, mined.weights)


class QuantizationAwareLoss(MinedNegativesLoss):
    """Scores (partly) against what the quantized index stores: ``rows + weight * (decoded - rows)``.

    Straight-through: the bank rows get the full gradient, the decoded vectors come from the index's codebooks.
    Measured worse than the default on SciFact (``benchmarks/results/ablation.md``); kept for other corpora.

    Args:
        bank: The bank.
        index: The :class:`~hf_qret.index.QuantizedIndex` over the bank.
        weight: How much of the score is against the decoded vectors (0..1).
        **kwargs: :class:`MinedNegativesLoss` arguments.
    """

    def __init__(self, bank: TargetBank, index: QuantizedIndex, weight: float = 0.5, **kwargs: Any) -> None:
        super().__init__(bank, **kwargs)
        self.index = index
        self.weight = float(weight)

    def decoded(self, mined: MinedBatch, rows: torch.Tensor, initial: bool) -> torch.Tensor:
        """The vectors the index would store for ``rows``."""
        return torch.from_numpy(self.index.quantize(rows.detach().float().cpu().numpy()))

    def scored_targets(self, mined: MinedBatch, rows: torch.Tensor, initial: bool = False) -> torch.Tensor:
        decoded = self.decoded(mined, rows, initial).to(rows.device, rows.dtype)
        return rows + self.weight * (decoded - rows.detach())


class CodebookLearningLoss(QuantizationAwareLoss):
    """JPQ-style: the candidates' stored vectors are decoded with trainable PQ centroids, which the loss learns.

    The centroids (:class:`~hf_qret.codebook.TrainableCodebooks`) have their own Adam, stepped after every encoder
    step at ``learning_rate`` times the schedule's ratio, and are written back into the FAISS index (mining and the
    next refresh use them); refreshes re-encode instead of retraining the codebooks. Measured worse than the default
    on SciFact, most on documents that never train (``benchmarks/results/ablation.md``); kept for other corpora.

    Args:
        bank: The bank.
        index: A ``PQ<M>`` or ``OPQ<M>,PQ<M>`` index over the bank.
        weight: How much of the score is against the decoded vectors (0..1).
        learning_rate: The centroids' learning rate.
        device: Where the centroids live.
        **kwargs: :class:`MinedNegativesLoss` arguments.
    """

    def __init__(
        self,
        bank: TargetBank,
        index: QuantizedIndex,
        weight: float = 1.0,
        learning_rate: float = 1e-4,
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> None:
        super().__init__(bank, index, weight, **kwargs)
        self.learning_rate = float(learning_rate)
        self.device = torch.device(device)
        self._codebooks: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def codebooks(self) -> Any:
        """The :class:`~hf_qret.codebook.TrainableCodebooks`, made from the index on first use (once it is built)."""
        if self._codebooks is None:
            from .codebook import TrainableCodebooks

            self._codebooks = TrainableCodebooks(self.index).to(self.device)
            self.optimizer = self._new_optimizer()
        return self._codebooks

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.codebooks.centroids], lr=self.learning_rate)

    def forward(self, query_embeddings: torch.Tensor, mined: MinedBatch) -> tuple[torch.Tensor, dict[str, float]]:
        if self.codebooks.maybe_sync():
            self.optimizer = self._new_optimizer()  # retrained codebooks: fresh state
        return super().forward(query_embeddings, mined)

    def decoded(self, mined: MinedBatch, rows: torch.Tensor, initial: bool) -> torch.Tensor:
        if initial:  # the pretrained targets are decoded by the index as it stands
            return super().decoded(mined, rows, initial)
        decoded = self.codebooks.reconstruct(mined.candidates)
        return decoded if self.training else decoded.detach()

    def refresh_mode(self, requested: str) -> str:
        # Learned codebooks are the codebooks: refreshes re-encode the bank with them instead of retraining.
        return "reencode" if requested == "retrain" else requested

    def after_optimizer_step(self, lr_ratio: float, world_size: int = 1) -> None:
        if self._codebooks is None:
            return
        centroids = self.codebooks.centroids
        if centroids.grad is not None:
            if world_size > 1:
                torch.distributed.all_reduce(centroids.grad)
                centroids.grad /= world_size
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rate * lr_ratio
            self.optimizer.step()
            self.codebooks.write_back()  # mining and the next refresh use the learned centroids
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        if self._codebooks is None:
            return {}
        state = self.optimizer.state.get(self.codebooks.centroids) or {}
        return {k: torch.as_tensor(v).detach().cpu().contiguous() for k, v in state.items()}

    def load_optimizer_state(self, state: dict[str, torch.Tensor]) -> None:
        self.codebooks.maybe_sync()  # the checkpoint's index (and learned centroids) replaced ours
        self.optimizer = self._new_optimizer()
        device = self.codebooks.centroids.device
        self.optimizer.state[self.codebooks.centroids] = {
            k: (v if k == "step" else v.to(device)) for k, v in state.items()
        }


def build_loss(
    args: QRetTrainingArguments,
    bank: TargetBank,
    index: QuantizedIndex,
    trainable_rows: torch.Tensor | None = None,
    initial_rows: InitialRows | None = None,
    scale: float | None = None,
) -> QRetLoss:
    """The loss the training arguments ask for: the default, quantization-aware, or codebook-learning variant.

    ``scale`` overrides ``args.scale`` (the trainer passes :func:`hf_qret.encoder.resolve_scale`'s value).

    Example:
        >>> loss = build_loss(args, bank, index)  # doctest: +SKIP
    """
    common: dict[str, Any] = {
        "scale": args.scale if scale is None else scale,
        "train_bank": args.bank_learning_rate > 0,
        "trainable_rows": trainable_rows,
        "initial_targets": initial_rows if args.encoder_targets == "initial" else None,
    }
    if args.learn_codebooks:
        return CodebookLearningLoss(
            bank, index, args.quantized_score_weight, args.codebook_learning_rate, device=args.device, **common
        )
    if args.quantized_score_weight > 0:
        return QuantizationAwareLoss(bank, index, args.quantized_score_weight, **common)
    return MinedNegativesLoss(bank, **common)


def resolve_loss(
    loss: QRetLoss | CandidateCrossEntropyLoss | None,
    args: QRetTrainingArguments,
    model: nn.Module,
    bank: TargetBank,
    index: QuantizedIndex,
    trainable_rows: torch.Tensor | None = None,
    initial_rows: InitialRows | None = None,
) -> QRetLoss:
    """The loss a :class:`~hf_qret.trainer.QRetTrainer` trains with: ``loss`` as given (a :class:`QRetLoss`), the
    default loss scoring with a given :class:`CandidateCrossEntropyLoss`, or :func:`build_loss` from ``args``.

    Raises:
        TypeError: ``loss`` is neither.
    """
    from .encoder import resolve_scale

    if loss is None:
        # scale None: 20 for cosine (unit-norm) models, 1 for dot-product models (hf_qret.encoder.resolve_scale)
        scale = resolve_scale(model, args.scale)
        loss = build_loss(args, bank, index, trainable_rows, initial_rows, scale=scale)
    elif isinstance(loss, CandidateCrossEntropyLoss):  # the scoring primitive: use it inside the default loss
        loss = MinedNegativesLoss(bank, loss.scale, args.bank_learning_rate > 0, trainable_rows)
    elif not isinstance(loss, QRetLoss):
        raise TypeError(
            f"loss must be a hf_qret.loss.QRetLoss (forward(query_embeddings, mined) -> (loss, stats)), got "
            f"{type(loss).__name__}; subclass MinedNegativesLoss to change the scoring."
        )
    return loss
