"""Training objectives: each query's softmax cross-entropy over its batch's mined candidate set.

The losses follow sentence-transformers' habit of small ``nn.Module``\\ s. :class:`CandidateCrossEntropyLoss` is the
scoring primitive (scaled dot products, masked, cross-entropy). :class:`MinedNegativesLoss` is the method's loss:
given the query embeddings and a :class:`~hf_qret.index.mining.MinedBatch`, it gathers the candidates' bank rows (with a
sparse gradient, only for the rows allowed to move), scores the bank rows against the frozen pretrained queries when
the batch carries them (``bank_queries='initial'``), and masks a query's other known positives. :func:`build_loss`
makes it from :class:`~hf_qret.config.QRetTrainingArguments`.

Any subclass of :class:`QRetLoss` can be passed to :class:`~hf_qret.training.trainer.QRetTrainer` as ``loss=``;
:func:`resolve_loss` fills in what it leaves to the arguments and refuses what contradicts them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConfigError
from .adapter import AdapterLossMixin, attach_adapter

if TYPE_CHECKING:
    from ..bank.core import TargetBank
    from ..config import QRetTrainingArguments
    from ..index.core import QuantizedIndex
    from ..index.mining import MinedBatch
    from .adapter import AdapterOptimizer, DocumentAdapter

__all__ = [
    "CandidateCrossEntropyLoss",
    "MinedNegativesLoss",
    "QRetLoss",
    "attach_adapter",
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
    """Base class of the losses :class:`~hf_qret.training.trainer.QRetTrainer` takes.

    ``forward(query_embeddings, mined)`` returns ``(loss, stats)`` (stats: floats logged with the training loss). The
    trainer sets the loss's train/eval mode to the model's before calling it. With ``bank_queries='initial'`` the
    trainer puts the frozen pretrained encoder's queries in ``mined.bank_queries`` (training only): a loss that
    trains the bank should score the bank rows against them, as :class:`MinedNegativesLoss` does. The hooks below
    let a loss own trainable state of its own without the trainer knowing about it; their defaults do nothing.

    Example:
        >>> import torch
        >>> class SumLoss(QRetLoss):  # a loss without state of its own implements forward only
        ...     def forward(self, query_embeddings, mined):
        ...         return query_embeddings.sum(), {"candidates": float(mined.num_candidates)}
        >>> loss = SumLoss()
        >>> loss.refresh_mode("incremental"), loss.optimizer_state()
        ('incremental', {})
    """

    def forward(self, query_embeddings: torch.Tensor, mined: MinedBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Returns ``(loss, stats)`` for a batch of query embeddings and its mined candidates; subclasses implement it."""
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

    def bake_adapter(self) -> int:
        """Writes a transform of the bank rows the loss trains into the bank before an index refresh; returns the
        rows written (default: none)."""
        return 0

    def adapter_pending(self) -> bool:
        """Whether the loss holds a transform of the bank not yet baked into it (default: no)."""
        return False

    def adapted_rows(self) -> Any:
        """Every local bank row as the loss scores it now, float32 (default: ``None``, the bank rows themselves)."""
        return None

    def adapter_layers(self) -> list[dict[str, torch.Tensor]]:
        """The layers of a document transform the bank's rows went through, saved with the artifact (default: none)."""
        return []

    def set_adapter_layers(self, layers: list[dict[str, torch.Tensor]]) -> None:
        """The model was restored from a folder whose bank went through ``layers`` (default: nothing to do)."""


class MinedNegativesLoss(AdapterLossMixin, QRetLoss):
    """The method's loss: each query against the bank rows of its batch's mined candidates.

    Candidate rows are gathered from the bank with a sparse gradient when the bank trains; with ``trainable_rows``
    only those rows get a gradient (the others are scored, but take no row step). When the batch
    carries ``mined.bank_queries`` (the frozen pretrained encoder's queries, ``bank_queries='initial'``), the query
    encoder learns against the (detached) bank rows it will be served with while the bank rows learn against those
    fixed queries: the loss is the sum of both terms. Otherwise one loss trains both sides against each other.

    ``scale``, ``train_bank`` and ``trainable_rows`` left at ``None`` are taken from the training arguments when the
    loss is passed to :class:`~hf_qret.training.trainer.QRetTrainer` (``scale``, ``bank_learning_rate``, ``bank_update``); a
    value given here that contradicts them is refused there (:func:`resolve_loss`).

    Args:
        bank: The :class:`~hf_qret.bank.core.TargetBank` (the trainer's own).
        scale: Inverse temperature of the softmax (``None``: the trainer's; 20 outside a trainer).
        train_bank: Whether candidate rows get a gradient in training (``None``: ``bank_learning_rate > 0`` in a
            trainer; yes outside one).
        trainable_rows: ``(num_docs,)`` mask of the rows that may move (``None``: the trainer's ``bank_update``;
            all of them outside a trainer).
        adapter: A :class:`~hf_qret.training.adapter.DocumentAdapter` applied to every candidate row before scoring
            (``None``: the trainer's ``doc_adapter_rank``; none outside a trainer), stepped by ``adapter_optimizer``
            in :meth:`after_optimizer_step`.
        adapter_optimizer: The adapter's :class:`~hf_qret.training.adapter.AdapterOptimizer`.

    Example:
        >>> import torch
        >>> from hf_qret.bank.core import TargetBank
        >>> from hf_qret.index.mining import IndexMiner
        >>> bank = TargetBank(torch.eye(4), ["a", "b", "c", "d"])
        >>> mined = IndexMiner.candidates_from(torch.tensor([[1, 2]]).numpy(), torch.tensor([0]))
        >>> loss, stats = MinedNegativesLoss(bank)(torch.eye(4)[:1], mined)
        >>> loss.backward(); bank.weight.grad.is_sparse, stats["num_candidates"]
        (True, 3.0)
    """

    def __init__(
        self,
        bank: TargetBank,
        scale: float | None = None,
        train_bank: bool | None = None,
        trainable_rows: torch.Tensor | None = None,
        adapter: DocumentAdapter | None = None,
        adapter_optimizer: AdapterOptimizer | None = None,
    ) -> None:
        super().__init__()
        self.bank = bank
        #: The settings given here (not left to the trainer's arguments); see :func:`resolve_loss`.
        self.given_settings = frozenset(
            name
            for name, value in (("scale", scale), ("train_bank", train_bank), ("trainable_rows", trainable_rows))
            if value is not None
        )
        self.cross_entropy = CandidateCrossEntropyLoss(20.0 if scale is None else scale)
        self.train_bank = True if train_bank is None else bool(train_bank)
        self.trainable_rows = trainable_rows
        self._init_adapter(adapter, adapter_optimizer)

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
        # (the row optimizer neither steps them nor decays their moments); only the document adapter moves them.
        with torch.no_grad():
            candidates = self.bank.gather(mined.candidates)
        moving = self.trainable_rows[mined.candidates].nonzero().squeeze(1)
        moving_rows = self.bank.gather(mined.candidates[moving])
        return candidates.index_copy(0, moving.to(candidates.device), moving_rows)

    def scored_targets(self, mined: MinedBatch, rows: torch.Tensor) -> torch.Tensor:
        """What the queries are scored against for candidate ``rows``: the rows through the document adapter when
        there is one, else the bank rows themselves; subclasses override it to change the scoring."""
        return rows if self.adapter is None else self.adapter(rows)

    def forward(self, query_embeddings: torch.Tensor, mined: MinedBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Returns the loss of the batch and its statistics (mean positive rank, candidate count)."""
        rows = self.candidate_rows(mined)
        if self.training and self.train_bank and mined.bank_queries is not None:
            # bank_queries='initial': the encoder (and the document adapter, if any) follow the bank they will be
            # served with, the bank rows learn against the frozen pretrained queries.
            served = self.scored_targets(mined, rows.detach())
            with self._frozen_adapter():
                targets = self.scored_targets(mined, rows)
            loss, stats = self.cross_entropy(query_embeddings, served, mined.targets, mined.mask, mined.weights)
            bank_queries = mined.bank_queries.detach().to(query_embeddings.device, query_embeddings.dtype)
            bank_loss, _ = self.cross_entropy(bank_queries, targets, mined.targets, mined.mask, mined.weights)
            return loss + bank_loss, stats
        targets = self.scored_targets(mined, rows)
        return self.cross_entropy(query_embeddings, targets, mined.targets, mined.mask, mined.weights)


def build_loss(
    args: QRetTrainingArguments,
    bank: TargetBank,
    index: QuantizedIndex | None = None,
    trainable_rows: torch.Tensor | None = None,
    scale: float | None = None,
) -> QRetLoss:
    """The method's :class:`MinedNegativesLoss` as the training arguments ask for it.

    ``scale`` overrides ``args.scale`` (the trainer passes :func:`hf_qret.serving.encoder.resolve_scale`'s value);
    ``index`` is unused (kept for custom loss factories with the same signature).

    Example:
        >>> loss = build_loss(args, bank, index, scale=20.0)  # doctest: +SKIP
    """
    scale = args.scale if scale is None else scale
    loss = MinedNegativesLoss(bank, 20.0 if scale is None else scale, args.bank_learning_rate > 0, trainable_rows)
    attach_adapter(loss, args)
    return loss


def _conflict(what: str, loss_value: Any, arg: str, arg_value: Any, fix: str) -> ConfigError:
    return ConfigError(
        f"the loss passed to QRetTrainer has {what} {loss_value!r} but the training arguments have {arg}="
        f"{arg_value!r}: {fix}"
    )


def resolve_loss(
    loss: QRetLoss | CandidateCrossEntropyLoss | None,
    args: QRetTrainingArguments,
    model: nn.Module,
    bank: TargetBank,
    index: QuantizedIndex,
    trainable_rows: torch.Tensor | None = None,
) -> QRetLoss:
    """The loss a :class:`~hf_qret.training.trainer.QRetTrainer` trains with: :func:`build_loss` from ``args``; the default
    loss scoring with a given :class:`CandidateCrossEntropyLoss`; or a given :class:`QRetLoss`.

    A passed loss never silently drops an argument: what a :class:`MinedNegativesLoss` leaves unset (``scale``,
    ``train_bank``, ``trainable_rows``) is taken from ``args``, and a setting it (or a
    :class:`CandidateCrossEntropyLoss`) gives that contradicts ``args`` is refused.

    Raises:
        ConfigError: The passed loss contradicts the arguments: another ``scale`` than ``args.scale``, another bank
            than the trainer's, a bank that trains (or not) against ``bank_learning_rate``, or rows restricted
            under ``bank_update='all'``.
        TypeError: ``loss`` is neither.

    Example:
        >>> resolve_loss(CandidateCrossEntropyLoss(scale=30.0), args, model, bank, index)  # doctest: +SKIP
        Traceback (most recent call last):
        hf_qret.errors.ConfigError: the loss passed to QRetTrainer has scale 30.0 but the training arguments ...
    """
    from ..serving.encoder import resolve_scale

    if loss is None:
        # scale None: 20 for cosine (unit-norm) models, 1 for dot-product models (hf_qret.serving.encoder.resolve_scale)
        return build_loss(args, bank, index, trainable_rows, scale=resolve_scale(model, args.scale))
    if not isinstance(loss, (QRetLoss, CandidateCrossEntropyLoss)):
        raise TypeError(
            f"loss must be a hf_qret.training.loss.QRetLoss (forward(query_embeddings, mined) -> (loss, stats)), got "
            f"{type(loss).__name__}; subclass MinedNegativesLoss to change the scoring."
        )
    given_scale = loss.scale if isinstance(loss, CandidateCrossEntropyLoss) else None
    if isinstance(loss, MinedNegativesLoss) and "scale" in loss.given_settings:
        given_scale = loss.scale
    if given_scale is not None and args.scale is not None and float(given_scale) != float(args.scale):
        raise _conflict("scale", given_scale, "scale", args.scale, "set one of them only (or the same value in both).")
    if isinstance(loss, CandidateCrossEntropyLoss):  # the scoring primitive: use it inside the default loss
        resolve_scale(model, given_scale)  # the model's similarity function must allow training at all
        default = MinedNegativesLoss(bank, loss.scale, args.bank_learning_rate > 0, trainable_rows)
        attach_adapter(default, args)
        return default
    if isinstance(loss, MinedNegativesLoss):
        _honour_arguments(loss, args, model, bank, trainable_rows)
    return loss


def _honour_arguments(
    loss: MinedNegativesLoss,
    args: QRetTrainingArguments,
    model: nn.Module,
    bank: TargetBank,
    trainable_rows: torch.Tensor | None,
) -> None:
    """Fills in what ``loss`` left to the arguments; refuses what contradicts them (see :func:`resolve_loss`)."""
    from ..serving.encoder import resolve_scale

    if loss.bank is not bank:
        raise ConfigError(
            "the loss passed to QRetTrainer scores another TargetBank than the one the trainer trains and indexes: "
            "build the loss with the trainer's bank (pass the same bank= to QRetTrainer), or leave loss= unset."
        )
    given = loss.given_settings
    loss.cross_entropy.scale = resolve_scale(model, loss.scale if "scale" in given else args.scale)
    trains = args.bank_learning_rate > 0
    if "train_bank" in given and loss.train_bank != trains:
        raise _conflict(
            "train_bank", loss.train_bank, "bank_learning_rate", args.bank_learning_rate,
            "set bank_learning_rate to 0 to freeze the bank (or > 0 to train it), or leave train_bank unset.",
        )  # fmt: skip
    loss.train_bank = trains
    if "trainable_rows" in given:
        if args.bank_update == "all":
            raise _conflict(
                "trainable_rows for", f"{int(loss.trainable_rows.sum())} of {len(bank)} rows", "bank_update", "all",
                "set bank_update='positives', or leave trainable_rows unset.",
            )  # fmt: skip
        if tuple(loss.trainable_rows.shape) != (len(bank),):
            raise ConfigError(
                f"the loss passed to QRetTrainer has trainable_rows of shape {tuple(loss.trainable_rows.shape)}, "
                f"not one flag per bank row ({len(bank)}): leave it unset to move the training positives' rows."
            )
    else:
        loss.trainable_rows = trainable_rows
    attach_adapter(loss, args)
