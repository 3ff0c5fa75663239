"""``QRetTrainer``: a ``transformers.Trainer`` that trains a query encoder together with a TargetBank of corpus
embeddings, scoring each query against candidates mined from the quantized index built over that bank."""

from __future__ import annotations

import copy
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ..bank.core import TargetBank
from ..bank.storage import place_bank
from ..config import QRetTrainingArguments
from ..data import training_positive_rows
from ..errors import TrainingDivergedError
from ..index.core import QuantizedIndex, set_faiss_threads
from ..index.mining import IndexMiner, MinedBatch
from ..serving.artifact import (
    ARTIFACT_IGNORE_PATTERNS,
    WORKING_FILE_PATTERNS,
    copy_artifact_files,
    save_document_encoder,
    save_retrieval_files,
    training_record,
    write_json,
)
from ..serving.encoder import configure_encoder, embed, embedding_dim, is_sentence_transformer, make_tokenize_fn
from ..serving.peft_utils import has_adapter
from .callbacks import BankStepCallback, IndexRefreshCallback
from .checkpoint import (
    BANK_OPTIMIZER_NAME,
    load_anchors,
    load_bank_rows,
    load_mining_index,
    load_optimizer_states,
    load_refresh_state,
    publish_checkpoint,
    save_training_state,
    staging_folder,
)
from .collator import QRetDataCollator
from .distributed import all_gather_rows, all_reduce_row_grad, barrier, is_row_writer
from .dropin import prepare_dropin, write_corpus_texts
from .loss import CandidateCrossEntropyLoss, QRetLoss, resolve_loss
from .optim import FollowScheduler, RowAdam, RowSGD
from .safety_net import SafetyNetCallback

__all__ = ["QRetTrainer", "BANK_OPTIMIZER_NAME", "training_positive_rows"]

logger = logging.getLogger(__name__)


class QRetTrainer(Trainer):
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
            rows with ``query``, ``positive_id`` and optionally ``positive_ids`` (see
            :func:`hf_qret.data.build_pairs_dataset`).
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
            index = QuantizedIndex.from_args(bank.dim, args)
        if index.ntotal not in (0, len(bank)):
            raise ValueError(f"the index holds {index.ntotal} vectors but the bank has {len(bank)} rows.")
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
        place_bank(bank, args)
        self.loss = resolve_loss(loss, args, model, bank, index, self.trainable_rows)
        self.evaluator = evaluator
        self._qret_stats: dict[str, list[float]] = defaultdict(list)

        processing_class = kwargs.get("processing_class")
        if kwargs.get("data_collator") is None:
            tokenizer = None if is_sentence_transformer(model) else processing_class
            kwargs["data_collator"] = QRetDataCollator(make_tokenize_fn(model, tokenizer, role="query"), bank)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(cb, IndexRefreshCallback) for cb in callbacks):
            mode = self.loss.refresh_mode(args.refresh_mode)
            callbacks.append(
                IndexRefreshCallback(bank, index, args.refresh_steps, on_epoch_end=args.refresh_on_epoch_end, mode=mode)
            )
        self.refresh_callback = next(cb for cb in callbacks if isinstance(cb, IndexRefreshCallback))

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
            keep_norms=bank.row_norms() if args.bank_keep_norm else None,
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

    # ------------------------------------------------------------------ index
    def ensure_index(self) -> None:
        """Builds the index over the bank now, if nothing built or loaded it yet (``train()`` does it first, unless
        it resumes from a checkpoint, whose index it loads instead; evaluation and saving do it too)."""
        if self.index.ntotal == 0:
            self.index.build(self.bank.float32_rows())
            self.refresh_callback.bank_version_at_refresh = self.bank.version
            self.bank.clear_changed()

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; the index over the bank is built first, unless the run resumes from a checkpoint
        (whose index is loaded instead)."""
        if not resume_from_checkpoint:
            self.ensure_index()
            self._save_document_encoder()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_document_encoder(self) -> None:
        """When the trainer encoded the bank (``corpus=`` / text pairs), saves the untrained model as the artifact's
        document encoder before the first step, so ``QuantizedRetriever.add_documents`` encodes new documents as the
        bank's were (the recipe does the same). A ``bank=`` built elsewhere: call
        :func:`hf_qret.serving.artifact.save_document_encoder` with its encoder yourself."""
        model = self.accelerator.unwrap_model(self.model)
        untrained = self.state.global_step == 0
        if untrained and self.encodes_bank and self.args.should_save and is_sentence_transformer(model):
            if not has_adapter(model):
                save_document_encoder(self.args.output_dir, model)
        self.accelerator.wait_for_everyone()

    def served_index(self) -> QuantizedIndex:
        """The index of the bank as it is now, as it would be served: the mining index with the rows moved since its
        last refresh re-encoded with the current codebooks (:meth:`QuantizedIndex.synced_copy`).

        Evaluation, checkpoints, ``save_model`` and pushes use it; the mining index itself is left as the method
        has it (stale between refreshes), so evaluating or saving never changes what the run mines next.
        """
        self.ensure_index()
        changed = self.bank.changed_rows()
        if changed.size == 0:
            return self.index
        key = (self.bank.version, self.index.version)
        if self._served is None or self._served[0] != key:
            self._served = (key, self.index.synced_copy(self.bank.float32_rows(), changed))
        return self._served[1]

    def index_record(self) -> dict[str, Any]:
        """How the saved / evaluated index was built: ``qret_config.json``'s ``"index_state"``."""
        callback = self.refresh_callback
        return {
            "step": self.state.global_step,
            "last_refresh_step": None if callback.last_refresh_step < 0 else callback.last_refresh_step,
            "refresh_mode": callback.mode,
            "rows_reencoded_since_refresh": int(self.bank.num_changed),
        }

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
            if world_size > 1:
                all_reduce_row_grad(self.bank.weight)  # DDP averages the encoder's gradients, we average the bank's
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
        :meth:`served_index`.
        """
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
        scores = self.evaluator(self.model, self.bank, self.served_index(), tokenizer=tokenizer)
        return {f"{metric_key_prefix}_{key}": value for key, value in scores.items()}

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
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

    # ------------------------------------------------------------------ saving
    def artifact_config(self) -> dict[str, Any]:
        """What ``qret_config.json`` records about the training run (:func:`hf_qret.serving.artifact.training_record`)."""
        return training_record(self)

    def save_merged_model(self, output_dir: str | None = None) -> str:
        """Saves the artifact with the encoder's peft adapter merged into a copy of the base weights (a plain,
        self-contained model); see :func:`hf_qret.serving.peft_utils.save_merged`. ``save_model`` keeps the adapter."""
        from ..serving.peft_utils import save_merged

        return save_merged(self, output_dir)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.bank.flush()
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if is_sentence_transformer(model):
            model.save_pretrained(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
        else:
            super()._save(output_dir, state_dict)
        if self.corpus_texts is not None:  # documents come back from QuantizedRetriever.search(return_text=True)
            write_corpus_texts(output_dir, self.corpus_texts)
        save_retrieval_files(output_dir, self.bank, self.served_index(), self.artifact_config())
        verdict = self.safety_net.verdict if self.safety_net is not None else None
        if verdict is not None and os.path.abspath(output_dir) == os.path.abspath(self.args.output_dir):
            from ..hub.model_card import EVAL_RESULTS_NAME

            write_json(verdict.as_results(), os.path.join(output_dir, EVAL_RESULTS_NAME))  # the card reads it

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Writes the checkpoint into a staging folder and renames it into place: never half-written. A push
        (``push_to_hub``) then reads the final folder."""
        run_dir = self._get_output_dir(trial=trial)
        staging = staging_folder(run_dir, self.state.global_step)
        self._get_output_dir = lambda trial=None: staging  # type: ignore[method-assign]
        self._defer_push = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
            self._defer_push = False
        # Every process writes its own files into the staging folder (rng_state_<rank>.pth): all of them must be
        # there before the main process moves it, or a late one recreates the staging folder beside the checkpoint.
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = publish_checkpoint(staging, run_dir, self.state, self.args.save_total_limit)
            if self.args.push_to_hub:
                self._push_from_checkpoint(final)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_training_state(
                output_dir,
                bank=self.bank,
                bank_optimizer=self.bank_optimizer,
                loss=self.loss,
                mining_index=self.index,
                served_index=self.served_index(),
                refresh_state=self.refresh_callback.state_dict(),
            )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            load_optimizer_states(checkpoint, bank=self.bank, bank_optimizer=self.bank_optimizer, loss=self.loss)

    def _load_encoder(self, folder: str, model: nn.Module | None = None) -> None:
        """Loads a checkpoint's encoder weights into the model (sentence-transformers, peft adapter or transformers)."""
        target = model if model is not None else self.model
        if is_sentence_transformer(target) and has_adapter(target):
            from ..serving.peft_utils import load_adapter_weights

            load_adapter_weights(self.accelerator.unwrap_model(target), folder)
        elif is_sentence_transformer(target):
            from sentence_transformers import SentenceTransformer

            loaded = SentenceTransformer(folder, device="cpu")
            self.accelerator.unwrap_model(target).load_state_dict(loaded.state_dict())
        else:
            super()._load_from_checkpoint(folder, model)

    def _load_bank(self, folder: str) -> Any:
        """Streams a checkpoint's bank into the bank's own storage (dtype, device, memory map); returns its files.

        Every row then counts as changed, until the bank optimizer state says which rows changed since the
        checkpoint's index was refreshed.
        """
        files = load_bank_rows(folder, self.bank)
        self.refresh_callback.bank_version_at_refresh = self.bank.version
        self._served = None
        return files

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume: the encoder, the bank, the index the run mined from (and its shortlist), the index refresh schedule
        and the drift-control anchors of the checkpoint (see :mod:`hf_qret.training.checkpoint`)."""
        self._load_encoder(resume_from_checkpoint, model)
        files = self._load_bank(resume_from_checkpoint)
        load_refresh_state(resume_from_checkpoint, self.refresh_callback)
        load_mining_index(resume_from_checkpoint, self.index, files.index.index)
        load_anchors(resume_from_checkpoint, bank_optimizer=self.bank_optimizer)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the best checkpoint's encoder, bank and served index (the base ``Trainer``
        would load only transformers weights, and not into a sentence-transformers model)."""
        folder = self.state.best_model_checkpoint
        logger.info("Loading the best model from %s (score: %s).", folder, self.state.best_metric)
        self.restore_snapshot(folder)

    def save_untrained_snapshot(self, folder: str) -> None:
        """Saves the model as it is now (encoder, bank, served index) for :meth:`restore_snapshot`: the safety
        net's untrained model. Written by the main process; the others wait."""
        self._save(folder)
        self.accelerator.wait_for_everyone()

    def restore_snapshot(self, folder: str) -> None:
        """Loads encoder, bank and index from a saved folder (a checkpoint or the safety net's snapshot) on every
        process; the index is that folder's, so nothing is stale."""
        self._load_encoder(folder)
        files = self._load_bank(folder)
        self.index.replace(files.index.index)
        self.bank.clear_changed()

    # ------------------------------------------------------------------ Hub
    def _bind_callbacks(self) -> None:
        """Attaches this trainer to callbacks that need it (``bind_trainer``, e.g. ``hf_qret.hub.callback.PushToHubCallback``)."""
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, "bind_trainer") and getattr(callback, "trainer", None) is None:
                callback.bind_trainer(self)

    def add_callback(self, callback: Any) -> None:
        super().add_callback(callback)
        if hasattr(self, "callback_handler"):
            self._bind_callbacks()

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None, **kwargs) -> None:  # fmt: skip
        """Writes hf-qret's model card (``README.md`` + ``quality_vs_bytes.png``) into ``args.output_dir``.

        ``push_to_hub`` calls it after saving. Metrics come from ``output_dir/eval_results.json`` when the recipe
        wrote one, else from the latest retrieval evaluation in the log history.
        """
        if not self.is_world_process_zero():
            return
        from ..hub.model_card import write_training_card

        datasets = dataset_tags or dataset
        write_training_card(
            self.args.output_dir,
            self.state.log_history,
            repo_id=self.hub_model_id or self.args.hub_model_id,
            base_model=finetuned_from,
            datasets=[datasets] if isinstance(datasets, str) else datasets,
            tags=[tags] if isinstance(tags, str) else (tags or ()),
            license=license,
            language=language,
        )

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """``Trainer.push_to_hub`` for the artifact: saves it (``save_model``: the encoder and the index of the final
        bank), renders hf-qret's model card and uploads ``args.output_dir`` in one commit, leaving out what
        :mod:`hf_qret.serving.artifact`'s manifest says is not part of an artifact (checkpoints, training state, pickles such
        as ``training_args.bin``, working files such as ``bank_mmap.npy``), which the base ``Trainer`` would upload.

        Args:
            commit_message: The commit's message.
            blocking: Wait for the upload; else return a ``Future`` of it.
            token: A Hub token with write access (default: ``args.hub_token``).
            revision: The branch to commit to (default: ``args.hub_revision``).
            private: Visibility of a newly created repository.
            **kwargs: Passed to :meth:`create_model_card` (``language``, ``license``, ``tags``, ``dataset``...).

        Returns:
            The ``CommitInfo`` of the upload (a ``Future`` of it when not ``blocking``; ``None`` on other processes).

        Example:
            >>> args = QRetTrainingArguments("out", hub_model_id="me/minilm-scifact-opq16")  # doctest: +SKIP
            >>> trainer.train(); trainer.push_to_hub(license="apache-2.0")  # doctest: +SKIP
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        model_name = kwargs.pop("model_name", None)
        if model_name is None and self.args.should_save:
            model_name = (self.args.hub_model_id or Path(self.args.output_dir).name).split("/")[-1]
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:  # push_to_hub=False in the arguments
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)  # every process (sharded saving); only the main one uploads
        if not self.is_world_process_zero():
            return None
        model_tags = getattr(self.model, "model_tags", None)
        if model_tags:
            tags = kwargs.get("tags") or []
            tags = [tags] if isinstance(tags, str) else list(tags)
            kwargs["tags"] = tags + [tag for tag in model_tags if tag not in tags]
        self.create_model_card(model_name=model_name, **kwargs)
        self._finish_current_push()
        return self._upload_artifact(
            commit_message, token=token, revision=revision or self.args.hub_revision, run_as_future=not blocking
        )

    def _upload_artifact(self, commit_message: str | None, *, token: str | None, revision: str | None,
                         run_as_future: bool) -> Any:  # fmt: skip
        """One ``upload_folder`` commit of ``args.output_dir``'s artifact files (the manifest's ignore patterns),
        through the ``HfApi`` the base ``Trainer`` uses."""
        from transformers import trainer as hf_trainer

        return hf_trainer.hf_api().upload_folder(
            repo_id=self.hub_model_id,
            folder_path=self.args.output_dir,
            commit_message=commit_message,
            token=token,
            run_as_future=run_as_future,
            ignore_patterns=list(ARTIFACT_IGNORE_PATTERNS),
            revision=revision,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Mid-training push (``push_to_hub=True``, ``hub_strategy`` other than ``"end"``): copies the checkpoint's
        artifact files (the sentence-transformers modules, ``index.faiss``, ``doc_ids.json``, ``bank.safetensors``,
        ``qret_config.json``; :func:`hf_qret.serving.artifact.copy_artifact_files`) into ``args.output_dir``, renders the
        model card and uploads the artifact as :meth:`push_to_hub` does; never training state, pickles or working
        files. ``hub_strategy="checkpoint"`` / ``"all_checkpoints"`` also upload the whole checkpoint folder (training
        state included, to resume from) to ``last-checkpoint/`` / ``checkpoint-N/``, which
        :class:`~hf_qret.serving.retriever.QuantizedRetriever` never downloads."""
        if self._defer_push:  # inside _save_checkpoint: pushed once the checkpoint is in its final folder
            return
        strategy = getattr(self.args.hub_strategy, "value", self.args.hub_strategy)
        pushing = self.args.hub_always_push or self.push_in_progress is None or self.push_in_progress.is_done()
        if not self.is_world_process_zero() or strategy == "end" or not pushing:
            return
        from transformers import trainer as hf_trainer
        from transformers.utils import PushInProgress

        from ..hub.model_card import write_training_card

        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        copy_artifact_files(checkpoint_folder, self.args.output_dir)
        write_training_card(self.args.output_dir, self.state.log_history, repo_id=self.hub_model_id)
        if getattr(self.args.save_strategy, "value", self.args.save_strategy) == "steps":
            commit_message = f"Training in progress, step {self.state.global_step}"
        else:
            commit_message = f"Training in progress, epoch {int(self.state.epoch)}"
        jobs = [
            self._upload_artifact(
                commit_message, token=self.args.hub_token, revision=self.args.hub_revision, run_as_future=True
            )
        ]
        if strategy in ("checkpoint", "all_checkpoints"):
            jobs.append(
                hf_trainer.hf_api().upload_folder(
                    repo_id=self.hub_model_id,
                    folder_path=checkpoint_folder,
                    path_in_repo="last-checkpoint" if strategy == "checkpoint" else Path(checkpoint_folder).name,
                    commit_message=commit_message + ", checkpoint",
                    token=self.args.hub_token,
                    run_as_future=True,
                    ignore_patterns=list(WORKING_FILE_PATTERNS),
                    revision=self.args.hub_revision,
                )
            )
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)
