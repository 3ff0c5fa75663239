"""``PushToHubCallback``: pushes the artifact to a Hub repository during and at the end of training.

The training-side half of :mod:`hf_qret.hub` (a ``transformers.TrainerCallback``); the upload itself is
:func:`hf_qret.hub.push.push_artifact`, which serving uses too.
"""

from __future__ import annotations

import logging
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..serving.artifact import INDEX_NAME
from .push import push_artifact

__all__ = [
    "PushToHubCallback",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------- callback
@dataclass(eq=False)
class PushToHubCallback(TrainerCallback):
    """Pushes the artifact to a Hub repository: every saved checkpoint (optionally) and the final artifact.

    At each save (when ``every_save``), the ``checkpoint-N`` folder's artifact files are pushed: the encoder,
    ``index.faiss``, ``doc_ids.json``, ``bank.safetensors``, ``qret_config.json`` and a model card with the latest
    evaluation in the log history (optimizer and trainer state stay local). At train end the trainer's final
    artifact (index refreshed from the final bank) is saved to ``args.output_dir``, its card rendered, and pushed.

    ``QRetTrainer`` attaches itself to this callback; with another trainer call :meth:`bind_trainer`. Pushes are
    blocking and only run on the main process. Use this callback *or* ``TrainingArguments(push_to_hub=True)``
    (which ``QRetTrainer`` also honours), not both.

    Args:
        repo_id: Target repository (default: ``args.hub_model_id``, else the output folder's name).
        private: Visibility of a new repository (default: ``args.hub_private_repo``).
        revision: Branch to push to (default: ``args.hub_revision``).
        token: Hub token (default: ``args.hub_token``).
        every_save: Push every saved checkpoint (default: unless ``args.hub_strategy == "end"``).
        trainer: The trainer whose final artifact is pushed at train end.
        card_kwargs: Passed to :func:`hf_qret.hub.model_card.write_model_card` (``base_model``, ``datasets``, ...).

    Example:
        >>> callback = PushToHubCallback("me/minilm-scifact-opq16", private=True)  # doctest: +SKIP
        >>> trainer = QRetTrainer(model, args, train_dataset=pairs, bank=bank, callbacks=[callback])  # doctest: +SKIP
        >>> trainer.train()  # pushes each checkpoint and, at the end, the final artifact  # doctest: +SKIP
    """

    repo_id: str | None = None
    _: KW_ONLY
    private: bool | None = None
    revision: str | None = None
    token: str | None = None
    every_save: bool | None = None
    trainer: Any = None
    card_kwargs: dict[str, Any] | None = None
    #: What each push returned (``CommitInfo``), in order.
    pushes: list[Any] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.card_kwargs = dict(self.card_kwargs or {})

    def bind_trainer(self, trainer: Any) -> None:
        """Attaches the trainer whose final artifact :meth:`on_train_end` saves and pushes."""
        self.trainer = trainer

    # ------------------------------------------------------------------ settings
    def _repo_id(self, args: Any) -> str:
        return self.repo_id or getattr(args, "hub_model_id", None) or Path(args.output_dir).absolute().name

    def _push(self, args: Any, folder: Path, commit_message: str) -> Any:
        result = push_artifact(
            folder,
            self._repo_id(args),
            private=self.private if self.private is not None else getattr(args, "hub_private_repo", None),
            revision=self.revision or getattr(args, "hub_revision", None),
            token=self.token or getattr(args, "hub_token", None),
            commit_message=commit_message,
        )
        self.pushes.append(result)
        logger.info("pushed %s to %s", folder, self._repo_id(args))
        return result

    def _pushes_checkpoints(self, args: Any) -> bool:
        if self.every_save is not None:
            return self.every_save
        strategy = getattr(args, "hub_strategy", "every_save")
        return str(getattr(strategy, "value", strategy)) != "end"

    # ------------------------------------------------------------------ events
    def on_save(self, args, state, control, **kwargs):
        """Pushes the checkpoint just saved (``every_save``), with a model card of the latest evaluation; not the run's last save, which :meth:`on_train_end` pushes."""
        if not state.is_world_process_zero or not self._pushes_checkpoints(args):
            return
        if self.trainer is not None and state.max_steps and state.global_step >= state.max_steps:
            return  # the last save of the run: on_train_end pushes the final artifact right after
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not (folder / INDEX_NAME).is_file():
            logger.warning("%s has no %s; not pushing it (save with QRetTrainer).", folder, INDEX_NAME)
            return
        from .model_card import write_training_card

        write_training_card(folder, state.log_history, repo_id=self._repo_id(args), **self.card_kwargs)
        self._push(args, folder, f"Training in progress, step {state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        """Refreshes the index from the final bank, saves the trainer's artifact to ``args.output_dir``, renders its card and pushes it."""
        trainer = self.trainer
        if trainer is None:
            logger.warning(
                "PushToHubCallback has no trainer attached, so the final artifact is not pushed; use QRetTrainer, "
                "call callback.bind_trainer(trainer), or run push_artifact(output_dir, repo_id) after save_model()."
            )
            return
        refresh = getattr(trainer, "refresh_callback", None)
        if refresh is not None:  # the index must hold the final bank before it is saved
            refresh.on_train_end(args, state, control)
        trainer.save_model(args.output_dir, _internal_call=True)
        if not state.is_world_process_zero:
            return
        from .model_card import write_training_card

        write_training_card(args.output_dir, state.log_history, repo_id=self._repo_id(args), **self.card_kwargs)
        self._push(args, Path(args.output_dir), "End of training")
