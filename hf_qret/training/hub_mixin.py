"""``QRetTrainer``'s Hub glue: binding callbacks that need the trainer, the model card and the pushes.

Every upload goes through :mod:`hf_qret.hub.push` (:func:`~hf_qret.hub.push.push_artifact` for the artifact, with the
manifest's ignore patterns; :func:`~hf_qret.hub.push.push_checkpoint` for a whole checkpoint folder), through the
``HfApi`` the base ``Trainer`` uses.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..hub.push import push_artifact, push_checkpoint

__all__ = ["HubMixin"]

logger = logging.getLogger(__name__)


class HubMixin:
    """The Hub half of :class:`~hf_qret.training.trainer.QRetTrainer` (mixed in before ``transformers.Trainer``).

    Example:
        >>> from hf_qret import QRetTrainer
        >>> issubclass(QRetTrainer, HubMixin)
        True
    """

    def _bind_callbacks(self) -> None:
        """Attaches this trainer to callbacks that need it (``bind_trainer``, e.g. ``hf_qret.hub.callback.PushToHubCallback``)."""
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, "bind_trainer") and getattr(callback, "trainer", None) is None:
                callback.bind_trainer(self)

    def add_callback(self, callback: Any) -> None:
        """``Trainer.add_callback``, then binds the trainer to callbacks that need it (``bind_trainer``).

        Args:
            callback: A ``TrainerCallback`` class or instance.
        """
        super().add_callback(callback)
        if hasattr(self, "callback_handler"):
            self._bind_callbacks()

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None, **kwargs) -> None:  # fmt: skip
        """Writes hf-qret's model card (``README.md`` + ``quality_vs_bytes.png``) into ``args.output_dir``.

        ``push_to_hub`` calls it after saving. Metrics come from ``output_dir/eval_results.json`` when the recipe
        wrote one, else from the latest retrieval evaluation in the log history.

        Args:
            language: The card's ``language``.
            license: The card's ``license``.
            tags: More tags.
            model_name: Unused (the base ``Trainer``'s signature).
            finetuned_from: The base model's Hub id.
            tasks: Unused (the base ``Trainer``'s signature).
            dataset_tags: The training datasets' Hub ids.
            dataset: Same as ``dataset_tags``.
            dataset_args: Unused (the base ``Trainer``'s signature).
            **kwargs: Ignored.
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
        """One commit of ``args.output_dir``'s artifact files (:func:`hf_qret.hub.push.push_artifact`, into the
        repository the ``Trainer`` created), through the ``HfApi`` the base ``Trainer`` uses."""
        from transformers import trainer as hf_trainer

        return push_artifact(
            self.args.output_dir,
            self.hub_model_id,
            revision=revision,
            token=token,
            commit_message=commit_message,
            run_as_future=run_as_future,
            api=hf_trainer.hf_api(),
            create_repo=False,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Mid-training push (``push_to_hub=True``, ``hub_strategy`` other than ``"end"``): copies the checkpoint's
        artifact files (the sentence-transformers modules, ``index.faiss``, ``doc_ids.json``, ``bank.safetensors``,
        ``qret_config.json``; :func:`hf_qret.serving.artifact.copy_artifact_files`) into ``args.output_dir``, renders the
        model card and uploads the artifact as :meth:`push_to_hub` does; never training state, pickles or working
        files. With ``args.hub_push_training_state`` (opt-in), ``hub_strategy="checkpoint"`` / ``"all_checkpoints"``
        also upload the whole checkpoint folder (training state and the ``Trainer``'s pickles included, to resume
        from) to ``last-checkpoint/`` / ``checkpoint-N/``, which :class:`~hf_qret.serving.retriever.QuantizedRetriever`
        never downloads; without it they push the artifact only, as ``"every_save"`` does."""
        if self._defer_push:  # inside _save_checkpoint: pushed once the checkpoint is in its final folder
            return
        strategy = getattr(self.args.hub_strategy, "value", self.args.hub_strategy)
        pushing = self.args.hub_always_push or self.push_in_progress is None or self.push_in_progress.is_done()
        if not self.is_world_process_zero() or strategy == "end" or not pushing:
            return
        from transformers import trainer as hf_trainer
        from transformers.utils import PushInProgress

        from ..hub.model_card import write_training_card
        from ..serving.artifact import copy_artifact_files

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
        if strategy in ("checkpoint", "all_checkpoints") and not self.args.hub_push_training_state:
            if not getattr(self, "_noted_state_push", False):  # once per trainer
                self._noted_state_push = True
                logger.warning(
                    "hub_strategy=%r: pushing the artifact only; the resume state (optimizer.pt, rng_state*.pth, "
                    "training_args.bin: pickles) stays local unless --hub_push_training_state true.", strategy
                )  # fmt: skip
        elif strategy in ("checkpoint", "all_checkpoints"):
            jobs.append(
                push_checkpoint(
                    checkpoint_folder,
                    self.hub_model_id,
                    "last-checkpoint" if strategy == "checkpoint" else Path(checkpoint_folder).name,
                    revision=self.args.hub_revision,
                    token=self.args.hub_token,
                    commit_message=commit_message + ", checkpoint",
                    run_as_future=True,
                    api=hf_trainer.hf_api(),
                )
            )
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)
