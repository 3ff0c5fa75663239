"""``QRetTrainer``: a ``transformers.Trainer`` that trains a query encoder together with a TargetBank of corpus
embeddings, scoring each query against candidates mined from the quantized index built over that bank."""

from __future__ import annotations

import copy
import logging
import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Trainer

from ..bank.core import TargetBank
from ..bank.storage import place_bank
from ..config import QRetTrainingArguments
from ..errors import TrainingDivergedError
from ..index.core import QuantizedIndex, set_faiss_threads
from ..index.mining import IndexMiner, MinedBatch
from ..serving.encoder import (
    configure_encoder,
    embed,
    embedding_dim,
    is_sentence_transformer,
    make_tokenize_fn,
    normalizes_embeddings,
)
from .adapter import AdaptedBankView
from .callbacks import BankStepCallback, IndexRefreshCallback
from .checkpoint import BANK_OPTIMIZER_NAME
from .collator import QRetDataCollator, positives_by_query, training_positive_rows
from .distillation import CodebookDistillationCallback
from .distributed import all_gather_rows, all_reduce_row_grad, barrier, is_row_writer
from .dropin import prepare_dropin
from .hub_mixin import HubMixin
from .loss import CandidateCrossEntropyLoss, MinedNegativesLoss, QRetLoss, resolve_loss
from .optim import FollowScheduler, RowAdam, RowSGD
from .persistence import CheckpointMixin
from .safety_net import SafetyNetCallback
from .sharded import is_sharded, require_every_process, shard_for_training

__all__ = ["QRetTrainer", "BANK_OPTIMIZER_NAME", "training_positive_rows"]

logger = logging.getLogger(__name__)


class QRetTrainer(CheckpointMixin, HubMixin, Trainer):
    """A ``Trainer`` whose ``compute_loss`` scores queries against index-mined candidates from a trainable bank.

    Per batch: the model encodes the queries; the miner retrieves each query's top-k rows from the *quantized* index;
    the union over the batch (the *global* batch under DDP) plus the positives is the candidate set; the candidates' bank rows are gathered with a
    sparse gradient; the loss is the cross-entropy of the scaled dot products (other known positives masked). After
    the encoder's optimizer step the bank's :class:`~hf_qret.training.optim.RowSGD` (``args.bank_optimizer``) updates only
    the candidate rows that may move, at
    ``args.bank_learning_rate`` following the encoder's schedule. :class:`~hf_qret.training.callbacks.IndexRefreshCallback`
    rebuilds the index from the bank (added automatically from ``args.refresh_*``).

    Saving (checkpoints and ``save_model``) writes the encoder as a sentence-transformers (or transformers) folder
    plus ``index.faiss``, ``doc_ids.json``, ``bank.safetensors`` and ``qret_config.json``; checkpoints also hold the
    bank's optimizer state.

    Args:
        model: A ``SentenceTransformer`` or a transformers encoder (``AutoModel``; ``args.pooling``: mean or cls).
        args: :class:`~hf_qret.config.QRetTrainingArguments`.
        train_dataset: Text pairs in sentence-transformers' convention (query, positive, hard negatives...) or
            rows with ``query``, ``positive_id`` and optionally ``positive_ids`` or ``query_id`` (a query's rows
            are its positives; see :func:`hf_qret.data.build_pairs_dataset`).
        bank: The :class:`~hf_qret.bank.core.TargetBank` over the corpus; built from ``corpus`` and the data's texts
            when omitted (see :mod:`hf_qret.training.dropin`).
        corpus: ``{doc_id: text}``, a ``datasets.Dataset`` with id/text columns or a BEIR folder.
        index: The quantized index; built from ``args.index_factory`` over the bank when omitted.
        loss: A :class:`~hf_qret.training.loss.QRetLoss`; default :func:`hf_qret.training.loss.build_loss` from ``args`` (the
            method's :class:`~hf_qret.training.loss.MinedNegativesLoss`). A bare
            :class:`~hf_qret.training.loss.CandidateCrossEntropyLoss` is used as the default loss's scoring. What a passed
            loss leaves unset comes from ``args``; a setting that contradicts ``args`` (e.g. another ``scale``) is
            a :class:`~hf_qret.errors.ConfigError` (:func:`hf_qret.training.loss.resolve_loss`).
        evaluator: A :class:`~hf_qret.evaluation.evaluator.RetrievalEvaluator`, or a sentence-transformers
            ``InformationRetrievalEvaluator`` / ``SequentialEvaluator`` of them (scored through the bank and the
            index), run by :meth:`evaluate`.
        **kwargs: Everything else a ``Trainer`` takes (``eval_dataset``, ``data_collator``, ``processing_class``,
            ``callbacks``, ``optimizers``...).

    Example:
        >>> from sentence_transformers import SentenceTransformer
        >>> from hf_qret import QRetTrainer, QRetTrainingArguments, TargetBank, load_beir, build_pairs_dataset
        >>> data = load_beir("recipes/data/scifact", split="train")  # doctest: +SKIP
        >>> model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")  # doctest: +SKIP
        >>> bank = TargetBank.from_encoder(lambda t: model.encode(t), data.doc_texts(), data.doc_ids)  # doctest: +SKIP
        >>> args = QRetTrainingArguments("out", num_train_epochs=4)  # RQ16x8, the method's defaults  # doctest: +SKIP
        >>> trainer = QRetTrainer(model, args, train_dataset=build_pairs_dataset(data), bank=bank)  # doctest: +SKIP
        >>> trainer.train(); trainer.save_model()  # doctest: +SKIP
    """

    # compute_loss returns the mean over the micro-batch (never normalised by ``num_items_in_batch``), so the Trainer
    # divides it by the number of accumulated micro-batches: with gradient accumulation the encoder and the bank get
    # the gradient of the mean over the whole accumulated batch (see README, "Gradient accumulation").
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: nn.Module,
        args: QRetTrainingArguments,
        train_dataset: Any = None,
        *,
        bank: TargetBank | None = None,
        corpus: Any = None,
        index: QuantizedIndex | None = None,
        loss: QRetLoss | CandidateCrossEntropyLoss | None = None,
        evaluator: Any = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, QRetTrainingArguments):
            raise TypeError("QRetTrainer needs QRetTrainingArguments (a TrainingArguments subclass) as `args`.")
        configure_encoder(model, args.pooling)  # plain encoders: --pooling (mean | cls), before any encoding
        # Drop-in (hf_qret.training.dropin): text pairs, a bank built from corpus=, sentence-transformers evaluators.
        #: The trainer encodes the bank itself (corpus= / text pairs): its model, untrained, is the document encoder.
        self.encodes_bank = bank is None
        ready = prepare_dropin(
            model,
            args,
            train_dataset,
            bank=bank,
            corpus=corpus,
            evaluator=evaluator,
            eval_dataset=kwargs.get("eval_dataset"),
            tokenizer=kwargs.get("processing_class"),
        )
        bank, train_dataset, evaluator = ready.bank, ready.train_dataset, ready.evaluator
        self.corpus_texts = ready.corpus_texts  # {doc_id: text} shipped as corpus.jsonl, or None
        if kwargs.get("eval_dataset") is not None:
            kwargs["eval_dataset"] = ready.eval_dataset
        bank.check_dim(embedding_dim(model), "the model")
        set_faiss_threads(args.faiss_threads)
        if index is None:
            from ..index.auto import resolve_auto_index

            resolve_auto_index(args, len(bank))  # index_factory "auto": chosen from the bank's size, logged once
            index = QuantizedIndex.from_args(bank.dim, args)
        # a quantizer shrinks badly fitted rows: a cosine model scores each row's decoded vector at unit norm
        decoded_norm = args.normalize_decoded
        index.normalize_decoded = normalizes_embeddings(model) if decoded_norm is None else bool(decoded_norm)
        bank, index = shard_for_training(bank, index, args)  # bank_sharding='rows': this process's rows only
        if index.local_ntotal not in (0, len(bank.local_weight)):  # this process's rows (all unsharded)
            raise ValueError(f"the index holds {index.local_ntotal} vectors but the bank has {len(bank)} rows.")
        self.bank = bank
        #: The index training mines from (built over the bank on first use, unless a checkpoint provides it).
        self.index = index
        self._served: tuple[tuple[int, int], QuantizedIndex] | None = None
        self._defer_push = False
        if args.num_negatives > len(bank):
            logger.warning(
                "--num_negatives %d is larger than the corpus (%d documents); clamping it to the corpus size.",
                args.num_negatives, len(bank),
            )  # fmt: skip
        self.miner = IndexMiner(index, min(args.num_negatives, len(bank)))
        # bank_update='positives': only the rows of documents that are training positives ever move.
        self.trainable_rows = training_positive_rows(train_dataset, bank) if args.bank_update == "positives" else None
        place_bank(bank, args.device, args.bank_device, args.bank_dtype, args.bank_pin_memory)
        self.loss = resolve_loss(loss, args, model, bank, index, self.trainable_rows)
        self.evaluator = evaluator
        self._qret_stats: dict[str, list[float]] = defaultdict(list)

        processing_class = kwargs.get("processing_class")
        if kwargs.get("data_collator") is None:
            tokenizer = None if is_sentence_transformer(model) else processing_class
            kwargs["data_collator"] = QRetDataCollator(
                make_tokenize_fn(model, tokenizer, role="query"), bank, positives_of=positives_by_query(train_dataset)
            )
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(cb, IndexRefreshCallback) for cb in callbacks):
            mode = self.loss.refresh_mode(args.refresh_mode)
            final_mode = self.loss.refresh_mode(args.final_refresh_mode or args.refresh_mode)
            callbacks.append(
                IndexRefreshCallback(
                    bank,
                    index,
                    args.refresh_steps,
                    args.refresh_on_epoch_end,
                    mode=mode,
                    final_mode=final_mode,
                    loss=self.loss,
                )
            )
        self.refresh_callback = next(cb for cb in callbacks if isinstance(cb, IndexRefreshCallback))
        #: At train end, after the final refresh and before the safety net: codebooks fitted to the flat ranking.
        self.distillation = CodebookDistillationCallback(self)
        callbacks.insert(callbacks.index(self.refresh_callback) + 1, self.distillation)

        # The Trainer refuses an eval strategy without eval_dataset; an evaluator is enough for us.
        restore_strategy = None
        if evaluator is not None and kwargs.get("eval_dataset") is None and str(args.eval_strategy) != "no":
            restore_strategy, args.eval_strategy = args.eval_strategy, "no"
        try:
            super().__init__(model=model, args=args, train_dataset=train_dataset, callbacks=callbacks, **kwargs)
        finally:
            if restore_strategy is not None:
                args.eval_strategy = restore_strategy
        self.add_callback(BankStepCallback(self._step_bank))
        #: The safety net (hf_qret.training.safety_net): with an evaluator, the untrained model is kept if training hurts it.
        self.safety_net: SafetyNetCallback | None = next(
            (cb for cb in self.callback_handler.callbacks if isinstance(cb, SafetyNetCallback)), None
        )
        if self.safety_net is None and evaluator is not None and args.keep_untrained_if_better:
            self.safety_net = SafetyNetCallback()
            self.add_callback(self.safety_net)  # last: it runs after the index's train-end refresh
        self._bind_callbacks()
        self.bank_optimizer = (RowSGD if args.bank_optimizer == "sgd" else RowAdam)(
            bank,
            lr=args.bank_learning_rate,
            weight_decay=args.bank_weight_decay,
            keep_norms=bank.local_row_norms() if args.bank_keep_norm else None,
        )
        #: bank_queries='initial': a frozen copy of the pretrained encoder, whose queries the bank rows learn against.
        self.frozen_encoder: nn.Module | None = None
        if args.bank_queries == "initial" and args.bank_learning_rate > 0:
            self.frozen_encoder = copy.deepcopy(self.accelerator.unwrap_model(self.model)).eval().requires_grad_(False)
        #: Drives the bank's learning rate with the encoder's schedule; made with the encoder's scheduler.
        self.bank_scheduler: FollowScheduler | None = None
        # Several processes mapping one bank file: one of them writes each step's rows, the others wait for it.
        self._shared_bank = bank.is_mmap and self.accelerator.num_processes > 1
        if self._shared_bank:
            self.bank_optimizer.write_rows = is_row_writer(bank.mmap_path)
            if isinstance(self.loss, MinedNegativesLoss):  # the document adapter's bake writes rows too
                self.loss.adapter_writes_rows, self.loss.adapter_sync = self.bank_optimizer.write_rows, barrier

    # ------------------------------------------------------------------ index
    def ensure_index(self) -> None:
        """Builds the index over the bank now, if nothing built or loaded it yet (``train()`` does it first, unless
        it resumes from a checkpoint, whose index it loads instead; evaluation and saving do it too)."""
        if self.index.local_ntotal == 0:
            start = time.perf_counter()
            self.index.build(self.bank.local_float32_rows())
            self.refresh_callback.total_index_seconds += time.perf_counter() - start
            self.refresh_callback.bank_version_at_refresh = self.bank.version
            self.bank.clear_changed()

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; the index over the bank is built first, unless the run resumes from a checkpoint
        (whose index is loaded instead)."""
        self.restored_record = None  # the model is again the one training leaves (CheckpointMixin.restore_snapshot)
        if not resume_from_checkpoint:
            self.ensure_index()
            self._save_document_encoder()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def served_index(self) -> QuantizedIndex:
        """The index of the bank as it is now, as it would be served: the mining index with the rows moved since its
        last refresh re-encoded with the current codebooks (:meth:`QuantizedIndex.synced_copy`).

        Evaluation, checkpoints, ``save_model`` and pushes use it; the mining index itself is left as the method
        has it (stale between refreshes), so evaluating or saving never changes what the run mines next.
        """
        self.ensure_index()
        if self.loss.adapter_pending():  # a document adapter not yet baked: every row is served adapted
            key = ("adapted", self.bank.version, self.index.version, self.state.global_step)
            if self._served is None or self._served[0] != key:
                rows = self.loss.adapted_rows()
                self._served = (key, self.index.synced_copy(rows, np.arange(len(rows))))
            return self._served[1]
        changed = self.bank.local_changed_rows()
        if changed.size == 0:
            return self.index
        key = (self.bank.version, self.index.version)
        if self._served is None or self._served[0] != key:
            self._served = (key, self.index.synced_copy(self.bank.local_float32_rows(), changed))
        return self._served[1]

    # ------------------------------------------------------------------ loss
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
        """Encode queries, mine candidates from the quantized index, cross-entropy over candidate bank rows."""
        inputs = dict(inputs)
        rows = {key: inputs.pop(key, None) for key in ("positive_rows", "positive_sets", "negative_rows")}
        query_embeddings = embed(model, inputs)
        mined = self.mine(query_embeddings, **rows, global_batch=model.training)
        if self.frozen_encoder is not None and model.training:  # bank_queries='initial'
            with torch.no_grad():
                mined.bank_queries = embed(self.frozen_encoder, inputs)
        self.loss.train(model.training)
        loss, stats = self.loss(query_embeddings, mined)
        if model.training:
            self._track(loss, stats)
        return (loss, {"query_embeddings": query_embeddings}) if return_outputs else loss

    def mine(
        self,
        query_embeddings: torch.Tensor,
        positive_rows: torch.Tensor,
        positive_sets: torch.Tensor | None = None,
        negative_rows: torch.Tensor | None = None,
        global_batch: bool = True,
    ) -> MinedBatch:
        """The batch's candidates from the (stale between refreshes) mining index: each query's top
        ``num_negatives`` rows, unioned over the batch (the global batch under DDP when ``global_batch``), plus the
        positives and the data's hard negatives (``negative_rows``)."""
        self.ensure_index()
        gather = all_gather_rows if global_batch and self.accelerator.num_processes > 1 else None
        return self.miner.mine(query_embeddings, positive_rows, positive_sets, gather, extra_rows=negative_rows)

    def _track(self, loss: torch.Tensor, stats: dict[str, float]) -> None:
        """Stops on a non-finite loss (before the step changes anything); keeps the loss's stats for the next log."""
        if not torch.isfinite(loss.detach()).all():
            raise TrainingDivergedError.at(
                float(loss.detach()), self.state.global_step + 1, self.state.epoch or 0.0, self.args.output_dir
            )
        for key, value in stats.items():
            self._qret_stats[key].append(value)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        """The encoder's scheduler (the Trainer's, or the one passed in ``optimizers=``), and the bank's, which
        follows it."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        self.bank_scheduler = FollowScheduler(self.bank_optimizer, scheduler)
        return scheduler

    def _step_bank(self) -> None:
        """One bank optimizer step (and the loss's own step) after the encoder's optimizer step."""
        world_size = self.accelerator.num_processes
        if self.args.bank_learning_rate > 0:
            if is_sharded(self.bank):
                self.bank.exchange_gradients()  # each row's averaged gradient goes to the process that owns it
            elif world_size > 1:
                all_reduce_row_grad(
                    self.bank.local_weight
                )  # DDP averages the encoder's gradients, we average the bank's
            if self.bank_scheduler is not None:
                self.bank_scheduler.step()
            self.bank_optimizer.step()
            if self._shared_bank:
                barrier()  # the rows are written before any process reads them again
        self.bank_optimizer.zero_grad()
        self.loss.after_optimizer_step(self.bank_scheduler.ratio() if self.bank_scheduler else 1.0, world_size)

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the mean positive rank, the candidate count and the bank learning rate to training logs."""
        if "loss" in logs and self._qret_stats:
            for key, values in self._qret_stats.items():
                logs[key] = sum(values) / len(values)
            logs["bank_learning_rate"] = self.bank_optimizer.lr
            self._qret_stats.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Runs the loss evaluation (when an ``eval_dataset`` is set) and the retrieval evaluator (when set), logged
        together once (one ``on_evaluate``).

        Retrieval metrics are logged as ``{prefix}_flat_ndcg@10``, ``{prefix}_quantized_ndcg@10``, ..., measured on
        :meth:`served_index`. With ``bank_sharding='rows'``, every process calls it.
        """
        require_every_process(self, "evaluate()")
        if eval_dataset is not None or self.eval_dataset is not None:
            self._retrieval_prefix = metric_key_prefix  # evaluation_loop adds the retrieval metrics
            try:
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            finally:
                self._retrieval_prefix = None
        metrics = self.retrieval_metrics(metric_key_prefix)
        if metrics:
            self.log(dict(metrics))
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def retrieval_metrics(self, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The evaluator's metrics (flat bank and :meth:`served_index`), prefixed; ``{}`` without an evaluator."""
        if self.evaluator is None:
            return {}
        tokenizer = None if is_sentence_transformer(self.model) else self.processing_class
        adapted = self.loss.adapted_rows()  # a document adapter not yet baked: the flat figure scores its rows too
        bank = self.bank if adapted is None else AdaptedBankView(self.bank, adapted)
        scores = self.evaluator(self.model, bank, self.served_index(), tokenizer=tokenizer)
        return {f"{metric_key_prefix}_{key}": value for key, value in scores.items()}

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.evaluation_loop``, with the retrieval metrics added when :meth:`evaluate` runs both."""
        output = super().evaluation_loop(*args, **kwargs)
        prefix = getattr(self, "_retrieval_prefix", None)
        if prefix is not None:
            output.metrics.update(self.retrieval_metrics(prefix))
        return output

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Eval loss of a batch of ``eval_dataset`` through :meth:`compute_loss` (mined candidates, bank detached).

        Returns ``(loss, None, None)``, or ``(loss, query_embeddings, positive_rows)`` when predictions are asked for.
        """
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach().mean()
        if prediction_loss_only:
            return loss, None, None
        return loss, outputs["query_embeddings"].detach(), inputs["positive_rows"]
