"""``QRetTrainer``: a ``transformers.Trainer`` that trains a query encoder together with a TargetBank of corpus
embeddings, scoring each query against candidates mined from the quantized index built over that bank."""

from __future__ import annotations

import logging
import os
import shutil
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .artifact import save_retrieval_files
from .bank import RowAdam, TargetBank, storage_dtype
from .callbacks import IndexRefreshCallback
from .codebook import TrainableCodebooks
from .collator import QRetDataCollator
from .distributed import all_gather_rows, all_reduce_row_grad, row_gradients
from .config import QRetTrainingArguments
from .encoder import embed, embedding_dim, is_sentence_transformer, make_tokenize_fn
from .errors import ConfigError, TrainingDivergedError
from .evaluation import RetrievalEvaluator
from .index import QuantizedIndex, set_faiss_threads
from .loss import CandidateCrossEntropyLoss
from .mining import IndexMiner
from .peft_utils import adapter_info, has_adapter

__all__ = ["QRetTrainer", "InitialRows", "BANK_OPTIMIZER_NAME", "training_positive_rows"]

logger = logging.getLogger(__name__)

BANK_OPTIMIZER_NAME = "bank_optimizer.safetensors"
#: Key of the rows changed since the last index refresh, saved with the bank optimizer state.
CHANGED_ROWS_KEY = "changed_rows"
CODEBOOK_OPTIMIZER_NAME = "codebook_optimizer.safetensors"


def training_positive_rows(dataset: Any, bank: TargetBank) -> torch.Tensor:
    """``(num_docs,)`` mask of the bank rows that are a training positive (``positive_id`` / ``positive_ids``).

    Raises:
        ConfigError: the dataset has no ``positive_id`` column to read them from.
    """
    mask = torch.zeros(len(bank), dtype=torch.bool)
    if dataset is None:
        return mask
    columns = getattr(dataset, "column_names", None) or []
    if "positive_id" not in columns:
        raise ConfigError(
            "bank_update='positives' moves only the rows of training positives, read from the train_dataset's "
            "'positive_id' (and 'positive_ids') columns, which it does not have; build it with build_pairs_dataset "
            "or pass --bank_update all."
        )
    doc_ids = {str(d) for d in dataset["positive_id"]}
    if "positive_ids" in columns:
        doc_ids.update(str(d) for docs in dataset["positive_ids"] for d in (docs or []))
    mask[bank.rows_of(sorted(doc_ids))] = True
    return mask


class InitialRows:
    """The pretrained (initial) embedding of the bank rows that can move, for drift control and decoupled scoring.

    With ``movable`` (the rows of training positives under ``bank_update='positives'``) only those rows are copied
    (float32): every other row never moves, so the bank itself still holds its initial value. 10 M rows of which
    100 k train cost 100 k copied rows plus a 4-byte slot per row, not a second bank. Without it the whole bank is
    copied with :meth:`TargetBank.frozen_copy` (storage dtype; a memory-mapped bank into ``path``, copy-on-write).

    Args:
        bank: The bank, before training.
        movable: ``(num_docs,)`` mask of the rows that can move; ``None`` means all of them.
        path: Where a memory-mapped bank's full copy goes (only used when ``movable`` is ``None``).

    Example:
        >>> import torch
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
            self.values = bank.frozen_copy(path)
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


class _BankStepCallback(TrainerCallback):
    """Steps the bank's row-wise optimizer right after the encoder's optimizer step."""

    def __init__(self, trainer: QRetTrainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._step_bank()


class QRetTrainer(Trainer):
    """A ``Trainer`` whose ``compute_loss`` scores queries against index-mined candidates from a trainable bank.

    Per batch: the model encodes the queries; the miner retrieves each query's top-k rows from the *quantized* index;
    the union over the batch (the *global* batch under DDP) plus the positives is the candidate set; the candidates' bank rows are gathered with a
    sparse gradient; the loss is the cross-entropy of the scaled dot products (other known positives masked). After
    the encoder's optimizer step the bank's :class:`~hf_qret.bank.RowAdam` updates only the candidate rows, at
    ``args.bank_learning_rate`` following the encoder's schedule. :class:`~hf_qret.callbacks.IndexRefreshCallback`
    rebuilds the index from the bank (added automatically from ``args.refresh_*``).

    Saving (checkpoints and ``save_model``) writes the encoder as a sentence-transformers (or transformers) folder
    plus ``index.faiss``, ``doc_ids.json``, ``bank.safetensors`` and ``qret_config.json``; checkpoints also hold the
    bank's optimizer state.

    Args:
        model: A ``SentenceTransformer`` or a transformers encoder (``AutoModel``; mean pooling).
        args: :class:`~hf_qret.config.QRetTrainingArguments`.
        train_dataset: Rows with ``query``, ``positive_id`` and optionally ``positive_ids``
            (see :func:`hf_qret.data.build_pairs_dataset`).
        bank: The :class:`~hf_qret.bank.TargetBank` over the corpus.
        index: The quantized index; built from ``args.index_factory`` over the bank when omitted.
        loss: The loss module (default :class:`~hf_qret.loss.CandidateCrossEntropyLoss` with ``args.scale``).
        evaluator: A :class:`~hf_qret.evaluation.RetrievalEvaluator`, run by :meth:`evaluate`.
        **kwargs: Everything else a ``Trainer`` takes (``eval_dataset``, ``data_collator``, ``processing_class``,
            ``callbacks``, ``optimizers``...).

    Example:
        >>> from sentence_transformers import SentenceTransformer
        >>> from hf_qret import QRetTrainer, QRetTrainingArguments, TargetBank, load_beir, build_pairs_dataset
        >>> data = load_beir("recipes/data/scifact", split="train")  # doctest: +SKIP
        >>> model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")  # doctest: +SKIP
        >>> bank = TargetBank.from_encoder(lambda t: model.encode(t), data.doc_texts(), data.doc_ids)  # doctest: +SKIP
        >>> args = QRetTrainingArguments("out", index_factory="OPQ16,PQ16", num_train_epochs=4)  # doctest: +SKIP
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
        bank: TargetBank,
        index: QuantizedIndex | None = None,
        loss: nn.Module | None = None,
        evaluator: RetrievalEvaluator | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, QRetTrainingArguments):
            raise TypeError("QRetTrainer needs QRetTrainingArguments (a TrainingArguments subclass) as `args`.")
        if bank is None:
            raise ValueError("QRetTrainer needs a TargetBank: `bank=TargetBank.from_encoder(...)`.")
        bank.check_dim(embedding_dim(model), "the model")
        set_faiss_threads(args.faiss_threads)
        if index is None:
            index = QuantizedIndex(
                bank.dim,
                args.index_factory,
                args.index_search_params,
                opq_niter=args.opq_niter,
                mining_nlist=args.mining_nlist,
                mining_nprobe=args.mining_nprobe,
            )
        if index.ntotal == 0:
            index.build(bank.float32_rows())
        elif index.ntotal != len(bank):
            raise ValueError(f"the index holds {index.ntotal} vectors but the bank has {len(bank)} rows.")
        self.bank = bank
        self.index = index
        num_negatives = args.num_negatives
        if num_negatives > len(bank):
            logger.warning(
                "--num_negatives %d is larger than the corpus (%d documents); clamping it to the corpus size.",
                num_negatives,
                len(bank),
            )
            num_negatives = len(bank)
        self.miner = IndexMiner(index, num_negatives)
        self.loss = loss if loss is not None else CandidateCrossEntropyLoss(scale=args.scale)
        # bank_update='positives': only the rows of documents that are training positives ever move.
        self.trainable_rows = training_positive_rows(train_dataset, bank) if args.bank_update == "positives" else None
        self.evaluator = evaluator
        self._qret_stats: dict[str, list[float]] = defaultdict(list)

        processing_class = kwargs.get("processing_class")
        if kwargs.get("data_collator") is None:
            tokenizer = None if is_sentence_transformer(model) else processing_class
            kwargs["data_collator"] = QRetDataCollator(make_tokenize_fn(model, tokenizer), bank)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(cb, IndexRefreshCallback) for cb in callbacks):
            # Learned codebooks are the codebooks: refreshes re-encode the bank with them instead of retraining.
            mode = "reencode" if args.learn_codebooks and args.refresh_mode == "retrain" else args.refresh_mode
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
        self.add_callback(_BankStepCallback(self))
        self._bind_callbacks()
        self._place_bank()
        self.bank_optimizer = RowAdam(bank, lr=args.bank_learning_rate, weight_decay=args.bank_weight_decay)
        # Drift control: the initial rows (anchor) or only their norms are kept when asked for (in the bank's
        # storage dtype; a memory-mapped bank's copy is a copy-on-write mapped file in the output folder).
        keep_rows = args.bank_anchor_weight > 0 or args.encoder_targets == "initial"
        initial_file = None
        if keep_rows and bank.is_mmap and self.trainable_rows is None:
            os.makedirs(args.output_dir, exist_ok=True)
            initial_file = os.path.join(args.output_dir, "bank_initial_mmap.npy")
        self._initial_rows = InitialRows(self.bank, self.trainable_rows, initial_file) if keep_rows else None
        self._initial_norms = self.bank.row_norms() if args.bank_keep_norm else None
        self.codebooks: TrainableCodebooks | None = None
        self.codebook_optimizer: torch.optim.Optimizer | None = None
        if args.learn_codebooks:
            self.codebooks = TrainableCodebooks(index).to(self.args.device)
            self.codebook_optimizer = self._new_codebook_optimizer()

    def _place_bank(self) -> None:
        """Applies ``bank_dtype`` / ``bank_device`` / ``bank_pin_memory`` to the bank (see the README, "Scale")."""
        args, bank = self.args, self.bank
        device = torch.device(args.device)
        if args.bank_device == "cpu" or (args.bank_device == "auto" and bank.is_mmap):
            target = torch.device("cpu")
        else:
            target = device
        if bank.dtype != storage_dtype(args.bank_dtype) and not bank.is_mmap:
            logger.info("bank: storing the rows as %s (bank_dtype)", args.bank_dtype)
        bank.to_storage(args.bank_dtype, target)
        bank.compute_device = None if target == device else device
        bank.pin_memory = bool(args.bank_pin_memory)

    def _new_codebook_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.codebooks.centroids], lr=self.args.codebook_learning_rate)

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
        positive_rows = inputs.pop("positive_rows")
        positive_sets = inputs.pop("positive_sets", None)
        query_embeddings = embed(model, inputs)
        gather = None
        if model.training and self.accelerator.num_processes > 1:
            gather = all_gather_rows  # candidates mined for the global batch, identical on every process
        mined = self.miner.mine(query_embeddings, positive_rows, positive_sets, gather=gather)
        training = model.training and self.args.bank_learning_rate > 0
        if training and self.trainable_rows is not None:
            # Positives-only: documents that are never a training positive are scored but get no gradient at all
            # (the row optimizer neither steps them nor decays their moments): they keep their pretrained embedding.
            with torch.no_grad():
                candidates = self.bank.gather(mined.candidates)
            moving = self.trainable_rows[mined.candidates].nonzero().squeeze(1)
            moving_rows = self.bank.gather(mined.candidates[moving])
            candidates = candidates.index_copy(0, moving.to(candidates.device), moving_rows)
        else:
            candidates = self.bank.gather(mined.candidates)
            if not training:
                candidates = candidates.detach()
        weight = self.args.quantized_score_weight
        if weight > 0:
            # Score (partly) against what the index stores. Straight-through: the bank rows get the full gradient;
            # with --learn_codebooks the decoded vectors are differentiable in the PQ centroids as well.
            if self.codebooks is not None:
                if self.codebooks.maybe_sync():
                    self.codebook_optimizer = self._new_codebook_optimizer()  # retrained codebooks: fresh state
                decoded = self.codebooks.reconstruct(mined.candidates)
                if not model.training:
                    decoded = decoded.detach()
            else:
                decoded = torch.from_numpy(self.index.quantize(candidates.detach().float().cpu().numpy()))
            decoded = decoded.to(candidates.device, candidates.dtype)
            candidates = candidates + weight * (decoded - candidates.detach())
        if training and self.args.encoder_targets == "initial":
            # Decoupled: the query encoder learns against the pretrained targets (what documents that never train
            # look like), the bank rows learn against the (detached) queries.
            initial = self._initial_rows.rows(mined.candidates).to(candidates.device, candidates.dtype)
            if weight > 0:
                decoded = torch.from_numpy(self.index.quantize(initial.float().cpu().numpy()))
                initial = initial + weight * (decoded.to(initial.device, initial.dtype) - initial)
            loss, stats = self.loss(query_embeddings, initial, mined.targets, mined.mask)
            bank_loss, _ = self.loss(query_embeddings.detach(), candidates, mined.targets, mined.mask)
            loss = loss + bank_loss
        else:
            loss, stats = self.loss(query_embeddings, candidates, mined.targets, mined.mask)
        if model.training:
            if not torch.isfinite(loss.detach()).all():
                self._diverged(float(loss.detach()))
            for key, value in stats.items():
                self._qret_stats[key].append(value)
        if return_outputs:
            return loss, {"query_embeddings": query_embeddings}
        return loss

    def _diverged(self, value: float) -> None:
        from transformers.trainer_utils import get_last_checkpoint

        step = self.state.global_step + 1
        last = None
        if os.path.isdir(self.args.output_dir):
            last = get_last_checkpoint(self.args.output_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet (set --save_steps)"
        raise TrainingDivergedError(
            f"the loss became {value} at step {step} (epoch {self.state.epoch or 0:.2f}); training stopped before "
            f"that step changed the encoder or the bank, and {kept}. Lower --learning_rate/--bank_learning_rate "
            "or --scale, then resume with --resume_from_checkpoint."
        )

    def _step_bank(self) -> None:
        """One RowAdam step on the bank at the encoder's current schedule ratio."""
        ratio = 1.0
        if self.lr_scheduler is not None and self.args.learning_rate > 0:
            ratio = float(self.lr_scheduler.get_last_lr()[0]) / self.args.learning_rate
        self.bank_optimizer.lr = self.args.bank_learning_rate * ratio
        distributed = self.accelerator.num_processes > 1
        if self.args.bank_learning_rate > 0:
            if distributed:
                all_reduce_row_grad(self.bank.weight)  # DDP averages the encoder's gradients, we average the bank's
            rows = None
            if self._initial_norms is not None or self._initial_rows is not None:
                rows = row_gradients(self.bank.weight)[0]
            self.bank_optimizer.step()
            if rows is not None and rows.numel():
                self._control_drift(rows)
        self.bank_optimizer.zero_grad()
        if self.codebooks is not None:
            centroids = self.codebooks.centroids
            if centroids.grad is not None:
                if distributed:
                    torch.distributed.all_reduce(centroids.grad)
                    centroids.grad /= self.accelerator.num_processes
                for group in self.codebook_optimizer.param_groups:
                    group["lr"] = self.args.codebook_learning_rate * ratio
                self.codebook_optimizer.step()
                self.codebooks.write_back()  # mining and the next refresh use the learned centroids
            self.codebook_optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def _control_drift(self, rows: torch.Tensor) -> None:
        """Drift control on the rows the bank optimizer just moved.

        ``bank_anchor_weight`` pulls each row back toward its initial embedding, decoupled from Adam (as AdamW
        decouples weight decay): ``row = initial + (1 - lr * weight) * (row - initial)``. ``bank_keep_norm`` then
        rescales each row to its initial norm.
        """
        weight = self.bank.weight
        current = weight[rows].float()
        if self._initial_rows is not None:
            initial = self._initial_rows.rows(rows).to(current.device, current.dtype)
            shrink = max(0.0, 1.0 - self.bank_optimizer.lr * self.args.bank_anchor_weight)
            current = initial + shrink * (current - initial)
        if self._initial_norms is not None:
            norms = self._initial_norms[rows.to(self._initial_norms.device)].to(current.device, current.dtype)
            current = current * (norms.unsqueeze(1) / current.norm(dim=1, keepdim=True).clamp_min(1e-12))
        weight[rows] = current.to(weight.dtype)

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
        """Runs the loss evaluation (when an ``eval_dataset`` is set) and the retrieval evaluator (when set).

        Retrieval metrics are logged as ``{prefix}_flat_ndcg@10``, ``{prefix}_quantized_ndcg@10``, ...
        """
        metrics: dict[str, float] = {}
        if eval_dataset is not None or self.eval_dataset is not None:
            metrics.update(super().evaluate(eval_dataset, ignore_keys, metric_key_prefix))
        if self.evaluator is not None:
            tokenizer = None if is_sentence_transformer(self.model) else self.processing_class
            scores = self.evaluator(self.model, self.bank, self.index, tokenizer=tokenizer)
            retrieval = {f"{metric_key_prefix}_{key}": value for key, value in scores.items()}
            self.log(dict(retrieval))
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, retrieval)
            metrics.update(retrieval)
        return metrics

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
        """What ``qret_config.json`` records about the training run."""
        base = getattr(self.model, "model_card_data", None)
        return {
            "base_model": getattr(base, "base_model", None) or getattr(getattr(self.model, "config", None), "_name_or_path", None),
            "scale": getattr(self.loss, "scale", None),
            "num_negatives": self.miner.num_negatives,
            "bank_learning_rate": self.args.bank_learning_rate,
            "learning_rate": self.args.learning_rate,
            "refresh_mode": self.args.refresh_mode,
            "opq_niter": self.index.opq_niter,
            "mining_shortlist": (
                {"nlist": self.index.mining_nlist, "nprobe": self.index.mining_nprobe}
                if self.index.mining_nlist
                else None
            ),
            "global_step": self.state.global_step,
            "adapter": adapter_info(self.accelerator.unwrap_model(self.model)),
        }

    def save_merged_model(self, output_dir: str | None = None) -> str:
        """Saves the artifact with the encoder's peft adapter merged into a copy of the base weights (a plain,
        self-contained model); see :func:`hf_qret.peft_utils.save_merged`. ``save_model`` keeps the adapter."""
        from .peft_utils import save_merged

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
        save_retrieval_files(output_dir, self.bank, self.index, self.artifact_config())

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Writes the checkpoint into a staging folder and renames it into place: never half-written."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = self._get_output_dir(trial=trial)
        staging = os.path.join(run_dir, f"_staging-{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._get_output_dir = lambda trial=None: staging  # type: ignore[method-assign]
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            if self.state.best_global_step:
                best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
                if os.path.isdir(best):
                    self.state.best_model_checkpoint = best
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            from safetensors.torch import save_file

            path = os.path.join(output_dir, BANK_OPTIMIZER_NAME)
            state = {k: v.detach().cpu().contiguous() for k, v in self.bank_optimizer.state_dict().items()}
            state[CHANGED_ROWS_KEY] = torch.from_numpy(self.bank.changed_rows())  # for incremental refreshes
            save_file(state, path + ".tmp")
            os.replace(path + ".tmp", path)
            if self.codebook_optimizer is not None:
                state = self.codebook_optimizer.state.get(self.codebooks.centroids)
                if state:
                    path = os.path.join(output_dir, CODEBOOK_OPTIMIZER_NAME)
                    tensors = {k: torch.as_tensor(v).detach().cpu().contiguous() for k, v in state.items()}
                    save_file(tensors, path + ".tmp")
                    os.replace(path + ".tmp", path)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, BANK_OPTIMIZER_NAME)
        if os.path.isfile(path):
            from safetensors.torch import load_file

            state = {k: v.to(self.bank.weight.device) for k, v in load_file(path).items()}
            changed = state.pop(CHANGED_ROWS_KEY, None)
            self.bank_optimizer.load_state_dict(state)
            if changed is not None:  # else every row counts as changed (set when the bank was loaded)
                self.bank.set_changed(changed.cpu())
        path = os.path.join(checkpoint, CODEBOOK_OPTIMIZER_NAME)
        if self.codebooks is not None and os.path.isfile(path):
            from safetensors.torch import load_file

            self.codebooks.maybe_sync()  # the checkpoint's index (and learned centroids) replaced ours
            self.codebook_optimizer = self._new_codebook_optimizer()
            device = self.codebooks.centroids.device
            self.codebook_optimizer.state[self.codebooks.centroids] = {
                k: (v if k == "step" else v.to(device)) for k, v in load_file(path).items()
            }

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        from .artifact import load_retrieval_files

        target = model if model is not None else self.model
        if is_sentence_transformer(target) and has_adapter(target):
            from .peft_utils import load_adapter_weights

            load_adapter_weights(self.accelerator.unwrap_model(target), resume_from_checkpoint)
        elif is_sentence_transformer(target):
            from sentence_transformers import SentenceTransformer

            loaded = SentenceTransformer(resume_from_checkpoint, device="cpu")
            self.accelerator.unwrap_model(target).load_state_dict(loaded.state_dict())
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        files = load_retrieval_files(resume_from_checkpoint)
        if self.bank.doc_ids != files.doc_ids or not files.config.get("bank_file"):
            raise ValueError(f"{resume_from_checkpoint}: its bank belongs to another corpus; resume with the same data.")
        # Streamed into the bank's own storage (dtype, device, memory map); every row counts as changed until the
        # bank optimizer state says which rows changed since the checkpoint's index was refreshed.
        self.bank.load_rows_from_file(os.path.join(resume_from_checkpoint, files.config["bank_file"]))
        self.index.replace(files.index.index)
        self.refresh_callback.bank_version_at_refresh = self.bank.version

    # ------------------------------------------------------------------ Hub
    def _bind_callbacks(self) -> None:
        """Attaches this trainer to callbacks that need it (``bind_trainer``, e.g. ``hf_qret.hub.PushToHubCallback``)."""
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
        from pathlib import Path

        from .model_card import EVAL_RESULTS_NAME, metrics_from_log_history, write_model_card

        folder = Path(self.args.output_dir)
        metrics = None if (folder / EVAL_RESULTS_NAME).is_file() else metrics_from_log_history(self.state.log_history)
        datasets = dataset_tags or dataset
        write_model_card(
            folder,
            metrics,
            repo_id=self.hub_model_id or self.args.hub_model_id,
            base_model=finetuned_from,
            datasets=[datasets] if isinstance(datasets, str) else datasets,
            tags=[tags] if isinstance(tags, str) else (tags or ()),
            license=license,
            language=language,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Mid-training push (``push_to_hub=True``): the base ``Trainer`` copies only transformers weight files
        from the checkpoint into ``output_dir`` before uploading it, so copy the rest of the artifact first (the
        sentence-transformers modules, ``index.faiss``, ``doc_ids.json``, ``bank.safetensors``,
        ``qret_config.json``) and render the model card; training state stays out."""
        import shutil
        from fnmatch import fnmatch

        from .hub import ARTIFACT_IGNORE_PATTERNS

        strategy = getattr(self.args.hub_strategy, "value", self.args.hub_strategy)
        pushing = self.args.hub_always_push or self.push_in_progress is None or self.push_in_progress.is_done()
        if self.is_world_process_zero() and strategy != "end" and pushing:
            output_dir = self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            for name in sorted(os.listdir(checkpoint_folder)):
                if any(fnmatch(name, pattern) for pattern in ARTIFACT_IGNORE_PATTERNS):
                    continue
                source, target = os.path.join(checkpoint_folder, name), os.path.join(output_dir, name)
                if os.path.isdir(source):
                    shutil.copytree(source, target, dirs_exist_ok=True)
                else:
                    shutil.copyfile(source, target + ".tmp")
                    os.replace(target + ".tmp", target)
            from .model_card import metrics_from_log_history, write_model_card

            write_model_card(output_dir, metrics_from_log_history(self.state.log_history), repo_id=self.hub_model_id)
        super()._push_from_checkpoint(checkpoint_folder)
