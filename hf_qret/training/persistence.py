"""``QRetTrainer``'s saving and resuming: :class:`CheckpointMixin`, the ``transformers.Trainer`` overrides that write
the artifact in every save, publish checkpoints atomically and give a resumed run (or the best / the untrained model)
back its encoder, bank, index and schedules. What a checkpoint holds is :mod:`hf_qret.training.checkpoint`'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from ..serving.artifact import save_document_encoder, save_retrieval_files, write_json
from ..serving.document_adapter import DOCUMENT_ADAPTER_NAME, load_document_adapters, save_document_adapters
from ..serving.encoder import is_sentence_transformer
from ..serving.peft_utils import has_adapter
from .checkpoint import (
    load_anchors,
    load_bank_rows,
    load_mining_index,
    load_optimizer_states,
    load_raw_bank_rows,
    load_refresh_state,
    publish_checkpoint,
    save_training_state,
    staging_folder,
)
from .dropin import write_corpus_texts
from .record import training_record
from .sharded import (
    check_shard_checkpoint,
    is_sharded,
    load_shard_optimizer,
    load_shard_state,
    require_every_process,
    save_shard_state,
    save_sharded_retrieval_files,
)

if TYPE_CHECKING:
    from torch import nn

__all__ = ["CheckpointMixin", "link_document_encoder"]

logger = logging.getLogger("hf_qret.training.trainer")


def link_document_encoder(run_dir: str, folder: str) -> None:
    """Gives ``folder`` (a checkpoint) the run's ``document_encoder/`` (saved once before training, never changed),
    as hard links where the file system allows (else copies), so that the checkpoint's ``qret_config.json`` records
    it and the checkpoint, or a mid-training push of it, is an artifact whose ``add_documents`` works.

    Example:
        >>> link_document_encoder("runs/scifact", "runs/scifact/_staging-checkpoint-100")  # doctest: +SKIP
    """
    import shutil

    from ..serving.artifact import DOCUMENT_ENCODER_DIR

    source = os.path.join(run_dir, DOCUMENT_ENCODER_DIR)
    target = os.path.join(folder, DOCUMENT_ENCODER_DIR)
    if os.path.abspath(source) == os.path.abspath(target) or not os.path.isfile(os.path.join(source, "modules.json")):
        return

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, copy_function=link)


class CheckpointMixin:
    """Saving and resuming for :class:`~hf_qret.training.trainer.QRetTrainer` (mixed in before
    ``transformers.Trainer``): the artifact in every save, checkpoints written into a staging folder and renamed
    into place, and the encoder, bank, index and schedules a resumed run (or the best / untrained model) gets back.

    Example:
        >>> from hf_qret import QRetTrainer
        >>> issubclass(QRetTrainer, CheckpointMixin)
        True
    """

    def artifact_config(self) -> dict[str, Any]:
        """What ``qret_config.json`` records about the training run (:func:`hf_qret.training.record.training_record`),
        and the document adapter's layers the artifact ships (``document_adapter``)."""
        config = training_record(self)
        layers = self.loss.adapter_layers()
        if layers:
            config["document_adapter"] = {"file": DOCUMENT_ADAPTER_NAME, "layers": len(layers)}
        return config

    def index_record(self) -> dict[str, Any]:
        """How the saved / evaluated index was built (``qret_config.json``'s ``"index_state"``): the configured modes
        and ``last_refresh_mode``, the mode the last refresh actually ran in (``None``: built, never refreshed)."""
        callback = self.refresh_callback
        return {
            "step": self.state.global_step,
            "last_refresh_step": None if callback.last_refresh_step < 0 else callback.last_refresh_step,
            "refresh_mode": callback.mode,
            "final_refresh_mode": callback.final_mode,
            "last_refresh_mode": callback.last_refresh_mode,
            "rows_reencoded_since_refresh": int(self.bank.num_changed),
            # the flat ranking distilled into the codebooks at train end (hf_qret.training.distillation)
            "codebook_distillation": self.distillation.record() if hasattr(self, "distillation") else None,
        }

    def _serving_bank(self) -> Any:
        """The bank an artifact saved now serves: the bank, or a copy holding a pending document adapter's rows."""
        adapted = self.loss.adapted_rows()
        if adapted is None:
            return self.bank
        from ..bank.core import TargetBank

        copy = TargetBank(adapted, self.bank.doc_ids, dtype=self.bank.local_weight.dtype)
        copy.encode_precision = self.bank.encode_precision
        return copy

    @contextlib.contextmanager
    def _serving_rows_in_bank(self) -> Iterator[None]:
        """A sharded bank holds a pending document adapter's rows while the artifact is assembled from the shards
        (every process swaps its own rows in, and back after)."""
        adapted = self.loss.adapted_rows()
        if adapted is None:
            yield
            return
        self.served_index()  # the served index is built from the rows before the swap (and cached)
        weight = self.bank.local_weight
        raw = weight.detach().clone()
        with torch.no_grad():
            weight.copy_(torch.from_numpy(adapted).to(weight.device, weight.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                weight.copy_(raw)

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

    def save_merged_model(self, output_dir: str | None = None) -> str:
        """Saves the artifact with the encoder's peft adapter merged into a copy of the base weights (a plain,
        self-contained model); see :func:`hf_qret.serving.peft_utils.save_merged`. ``save_model`` keeps the adapter."""
        from ..serving.peft_utils import save_merged

        return save_merged(self, output_dir)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Writes the artifact (encoder, corpus texts, index, doc ids, bank, config) into ``output_dir``."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        sharded = is_sharded(self.bank)  # every process writes its part: the artifact is assembled from the shards
        if not self.args.should_save and not sharded:
            return
        require_every_process(self, "save_model()")
        if self.args.should_save:
            self._save_model_state(output_dir, state_dict)
            link_document_encoder(self.args.output_dir, output_dir)  # a checkpoint is a whole artifact too
            if self.corpus_texts is not None:  # documents come back from QuantizedRetriever.search(return_text=True)
                write_corpus_texts(output_dir, self.corpus_texts)
        if self.args.should_save:
            save_document_adapters(output_dir, self.loss.adapter_layers())
        if sharded:
            with self._serving_rows_in_bank():
                save_sharded_retrieval_files(output_dir, self.bank, self.served_index(), self.artifact_config())
            if not self.args.should_save:
                return
        else:
            save_retrieval_files(output_dir, self._serving_bank(), self.served_index(), self.artifact_config())
        verdict = self.safety_net.verdict if self.safety_net is not None else None
        if verdict is not None and os.path.abspath(output_dir) == os.path.abspath(self.args.output_dir):
            from ..hub.model_card import EVAL_RESULTS_NAME

            write_json(verdict.as_results(), os.path.join(output_dir, EVAL_RESULTS_NAME))  # the card reads it

    def _save_model_state(self, output_dir: str, state_dict: dict | None = None) -> None:
        """The encoder (a sentence-transformers or transformers folder) and the bank's pending writes: what
        :meth:`restore_snapshot` reads back with the retrieval files."""
        os.makedirs(output_dir, exist_ok=True)
        self.bank.flush()
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if is_sentence_transformer(model):
            model.save_pretrained(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
        else:
            super()._save(output_dir, state_dict)

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
        """The Trainer's optimizer and scheduler, plus the bank's training state (:func:`save_training_state`)."""
        super()._save_optimizer_and_scheduler(output_dir)
        if is_sharded(self.bank):  # every process writes its shard's state
            save_shard_state(output_dir, self)
        elif self.args.should_save:
            save_training_state(
                output_dir,
                bank=self.bank,
                bank_optimizer=self.bank_optimizer,
                loss=self.loss,
                mining_index=self.index,
                served_index=self.served_index(),
                refresh_state=self.refresh_callback.state_dict(),
                # the artifact's bank.safetensors holds a pending adapter's rows: the rows to resume from
                raw_rows=self.bank.local_weight if self.loss.adapter_pending() else None,
            )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The Trainer's optimizer and scheduler, plus the bank's and the loss's optimizer states."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and is_sharded(self.bank):
            load_shard_optimizer(checkpoint, self)
        elif checkpoint is not None:
            load_optimizer_states(checkpoint, bank=self.bank, bank_optimizer=self.bank_optimizer, loss=self.loss)

    def _load_encoder(self, folder: str, model: nn.Module | None = None) -> None:
        """Loads a checkpoint's encoder weights into the model (sentence-transformers, peft adapter or transformers)."""
        target = model if model is not None else self.model
        if is_sentence_transformer(target) and has_adapter(target):
            from ..serving.peft_utils import load_adapter_weights

            load_adapter_weights(self.accelerator.unwrap_model(target), folder)
        elif is_sentence_transformer(target):
            from ..serving.sentence_encoder import load_encoder

            loaded = load_encoder(folder, "cpu", trainable=True)  # the folder as a SentenceTransformer
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
        if is_sharded(self.bank):
            check_shard_checkpoint(resume_from_checkpoint, self.bank.shard)  # before anything is loaded
            self._load_encoder(resume_from_checkpoint, model)
            load_shard_state(resume_from_checkpoint, self)
            return
        check_shard_checkpoint(resume_from_checkpoint, None)
        self._load_encoder(resume_from_checkpoint, model)
        files = self._load_bank(resume_from_checkpoint)
        load_raw_bank_rows(resume_from_checkpoint, self.bank)  # the rows before a pending document adapter
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
        net's untrained model: the encoder and the retrieval files, not the corpus texts an artifact ships. Written by
        the main process; the others wait."""
        if self.args.should_save:
            self._save_model_state(folder)
            if not is_sharded(self.bank):
                save_retrieval_files(folder, self.bank, self.served_index(), self.artifact_config())
        if is_sharded(self.bank):
            save_sharded_retrieval_files(folder, self.bank, self.served_index(), self.artifact_config())
        self.accelerator.wait_for_everyone()

    def restore_snapshot(self, folder: str) -> None:
        """Loads encoder, bank and index from a saved folder (a checkpoint or the safety net's snapshot) on every
        process; the index is that folder's, so nothing is stale. What ``qret_config.json`` records of the step and
        the index (``global_step``, ``index_state``) is then that folder's: the record of the model shipped."""
        self._load_encoder(folder)
        files = self._load_bank(folder)
        self.loss.set_adapter_layers(load_document_adapters(folder))  # the folder's rows went through its layers
        #: ``global_step`` / ``index_state`` of the restored folder (``None``: the model is the one training left).
        self.restored_record = {key: files.config.get(key) for key in ("global_step", "index_state")}
        if is_sharded(self.bank):  # this shard's rows, encoded with the folder's codebooks: its part of that index
            self.index.rebuild_from(files.index.index, self.bank.local_float32_rows())
        else:
            self.index.replace(files.index.index)
        self.bank.clear_changed()
