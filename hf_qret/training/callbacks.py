"""Trainer callbacks: index refresh and retrieval evaluation scheduling."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback

from ..bank.core import TargetBank
from ..index.core import QuantizedIndex
from ..options import REFRESH_MODES

__all__ = ["BankStepCallback", "IndexRefreshCallback", "RetrievalEvaluationCallback"]

logger = logging.getLogger(__name__)

#: What :meth:`IndexRefreshCallback.state_dict` holds.
_REFRESH_STATE_KEYS = frozenset({"refreshes", "last_refresh_step", "last_refreshed_rows", "stale", "epoch_end_pending"})


class IndexRefreshCallback(TrainerCallback):
    """Rebuilds the quantized index from the bank every ``every_n_steps`` steps, at epoch end and at train end.

    ``mode="reencode"`` keeps the trained codebooks and re-encodes every bank row with them (cheap, the mined
    neighbourhoods stay comparable); ``mode="retrain"`` retrains the codebooks on the current bank;
    ``mode="incremental"`` keeps the codebooks and re-encodes, in place, only the rows the optimizer changed since
    the last refresh (the same codes as ``"reencode"``, at a cost proportional to the changed rows). At train end the
    index is refreshed only if the bank changed since the last refresh, so the saved artifact always indexes the
    final bank. ``final_mode`` is how that last refresh (at the run's last step when ``every_n_steps`` divides it, at
    the last epoch's end, or at train end) is made: with ``mode="incremental"`` and ``final_mode="retrain"`` the index
    follows the moved rows cheaply during training and the saved index gets codebooks trained on the final bank.
    :attr:`last_refresh_mode` records the mode the index's last refresh actually ran in (``None``: only built).

    Its state (:meth:`state_dict`) is saved with every checkpoint and restored on resume (:mod:`hf_qret.training.checkpoint`),
    so a resumed run refreshes exactly when the unbroken run did. That includes the end-of-epoch refresh of a
    checkpoint written at an epoch's last step: the ``Trainer`` saves at the step, before the epoch ends, and a run
    resumed there starts with the next epoch; the callback makes that refresh at train begin instead.

    Args:
        bank: The trained bank.
        index: The index the miner searches.
        every_n_steps: Refresh period in optimizer steps; 0 disables step refreshes.
        on_epoch_end: Also refresh at the end of every epoch.
        mode: ``"reencode"``, ``"retrain"`` or ``"incremental"``.
        final_mode: The mode of the last refresh of the run; ``None``: ``mode``.
        loss: The trainer's loss: a document adapter it trains (``QRetLoss.bake_adapter``) is baked into the bank
            before each refresh, and counts as a change of the bank.

    Example:
        >>> callback = IndexRefreshCallback(bank, index, every_n_steps=50, mode="reencode")  # doctest: +SKIP
        >>> trainer = QRetTrainer(..., callbacks=[callback])  # doctest: +SKIP
    """

    def __init__(
        self,
        bank: TargetBank,
        index: QuantizedIndex,
        every_n_steps: int = 0,
        on_epoch_end: bool = True,
        mode: str = "reencode",
        final_mode: str | None = None,
        loss: Any = None,
    ) -> None:
        for name, value in (("refresh mode", mode), ("final refresh mode", final_mode or mode)):
            if value not in REFRESH_MODES:
                raise ValueError(f"unknown {name} {value!r}; use one of {', '.join(REFRESH_MODES)}.")
        self.bank = bank
        self.index = index
        self.loss = loss
        self.every_n_steps = int(every_n_steps)
        self.refresh_at_epoch_end = on_epoch_end
        self.mode = mode
        self.final_mode = final_mode or mode
        self.refreshes = 0
        self.last_refresh_step = -1
        #: The mode the last refresh ran in (``None`` while the index has only been built).
        self.last_refresh_mode: str | None = None
        self.last_refresh_seconds = 0.0
        #: Seconds spent building and refreshing the index in this run (the trainer adds its first build).
        self.total_index_seconds = 0.0
        #: Rows encoded by the last refresh (all rows, or the changed ones in ``"incremental"`` mode).
        self.last_refreshed_rows = 0
        self.bank_version_at_refresh = 0
        #: Set from the last optimizer step of an epoch until that epoch's ``on_epoch_end``.
        self.epoch_end_pending = False

    def refresh(self, step: int, final: bool = False) -> None:
        """Rebuilds the index from the current bank now (``final``: the run's last refresh, in ``final_mode``)."""
        start = time.perf_counter()
        bank = self.bank
        mode = self.final_mode if final else self.mode
        if self.loss is not None and self.loss.bake_adapter():
            logger.info("baked the document adapter into the bank's %d rows at step %d", len(bank.local_weight), step)
        vectors = bank.local_float32_rows()  # a sharded bank: this shard's rows, what its index shard holds
        rows = bank.local_changed_rows() if mode == "incremental" and hasattr(bank, "local_changed_rows") else None
        encoded = self.index.refresh(vectors, mode=mode, rows=rows)
        if hasattr(bank, "clear_changed"):
            bank.clear_changed()
        self.last_refresh_seconds = time.perf_counter() - start
        self.total_index_seconds += self.last_refresh_seconds
        self.last_refreshed_rows = int(encoded) if encoded is not None else len(bank)
        self.refreshes += 1
        self.last_refresh_step = step
        self.last_refresh_mode = mode
        self.bank_version_at_refresh = getattr(bank, "version", 0)
        logger.info(
            "refreshed the %s index (%s, %d rows) at step %d in %.2fs",
            self.index.factory, mode, self.last_refreshed_rows, step, self.last_refresh_seconds,
        )  # fmt: skip

    def _stale(self) -> bool:
        if self.loss is not None and self.loss.adapter_pending():
            return True
        return getattr(self.bank, "version", 0) != self.bank_version_at_refresh

    def state_dict(self) -> dict[str, Any]:
        """The refresh schedule's state, JSON-serializable: what a checkpoint saves to resume it exactly.

        Example:
            >>> state = callback.state_dict()  # doctest: +SKIP
            >>> state["stale"], state["epoch_end_pending"]  # at an epoch's last step  # doctest: +SKIP
            (True, True)
        """
        return {
            "refreshes": self.refreshes,
            "last_refresh_step": self.last_refresh_step,
            "last_refreshed_rows": self.last_refreshed_rows,
            "stale": self._stale(),  # the bank moved since the index was last refreshed
            "epoch_end_pending": self.epoch_end_pending,
            "last_refresh_mode": self.last_refresh_mode,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` (after the checkpoint's bank is loaded into :attr:`bank`).

        Raises:
            ValueError: ``state`` lacks a key of :meth:`state_dict`.
        """
        missing = sorted(_REFRESH_STATE_KEYS - set(state))
        if missing:
            raise ValueError(f"the index refresh state lacks {', '.join(missing)}; resume from another checkpoint.")
        self.refreshes = int(state["refreshes"])
        self.last_refresh_step = int(state["last_refresh_step"])
        self.last_refreshed_rows = int(state["last_refreshed_rows"])
        self.epoch_end_pending = bool(state["epoch_end_pending"])
        self.last_refresh_mode = state.get("last_refresh_mode")
        version = getattr(self.bank, "version", 0)
        # Any other version than the bank's makes the index count as stale until the next refresh.
        self.bank_version_at_refresh = version - 1 if state["stale"] else version

    def on_train_begin(self, args, state, control, **kwargs):
        if self.epoch_end_pending:  # resumed from a checkpoint written at an epoch's last step, before its end
            logger.info("resuming at the end of an epoch (step %d): making its end-of-epoch refresh", state.global_step)
            self.on_epoch_end(args, state, control)

    def on_step_end(self, args, state, control, **kwargs):
        if self.every_n_steps > 0 and state.global_step % self.every_n_steps == 0:
            # the run's last step (refresh_steps divides the run): this is its last refresh, the epoch-end and
            # train-end refreshes will find nothing stale
            self.refresh(state.global_step, final=_is_last_step(state))
        # The Trainer sets state.epoch to exactly epoch + 1 at an epoch's last step; a checkpoint saved now comes
        # before on_epoch_end.
        self.epoch_end_pending = state.epoch is not None and float(state.epoch).is_integer()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.epoch_end_pending = False
        if self.refresh_at_epoch_end and self.last_refresh_step != state.global_step and self._stale():
            self.refresh(state.global_step, final=_is_last_step(state))

    def on_train_end(self, args, state, control, **kwargs):
        if self._stale():
            self.refresh(state.global_step, final=True)


def _is_last_step(state: Any) -> bool:
    """Whether ``state`` is at the run's last optimizer step (``TrainerState.max_steps`` is set at train begin)."""
    return bool(state.max_steps) and state.global_step >= state.max_steps


class RetrievalEvaluationCallback(TrainerCallback):
    """Asks the trainer to run its retrieval evaluation (flat and quantized) every N steps and/or at epoch end.

    The evaluation itself is :meth:`hf_qret.training.trainer.QRetTrainer.evaluate` with the trainer's ``evaluator``; this
    callback only schedules it, the transformers way (``control.should_evaluate``), so metrics are logged to every
    ``report_to`` integration and are usable as ``metric_for_best_model`` (e.g. ``"eval_quantized_ndcg@10"``).

    Args:
        every_n_steps: Evaluate every N optimizer steps (0: never by steps).
        on_epoch_end: Evaluate at the end of each epoch.

    Example:
        >>> from transformers import TrainerControl, TrainerState
        >>> callback = RetrievalEvaluationCallback(every_n_steps=100)
        >>> callback.on_step_end(None, TrainerState(global_step=200), TrainerControl()).should_evaluate
        True
        >>> callback.on_epoch_end(None, TrainerState(global_step=200), TrainerControl()).should_evaluate  # done already
        False
    """

    def __init__(self, every_n_steps: int = 0, on_epoch_end: bool = True) -> None:
        self.every_n_steps = int(every_n_steps)
        self.evaluate_at_epoch_end = on_epoch_end
        self._last_scheduled_step = -1

    def on_step_end(self, args, state, control, **kwargs):
        if self.every_n_steps > 0 and state.global_step % self.every_n_steps == 0:
            control.should_evaluate = True
            self._last_scheduled_step = state.global_step
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        # A step evaluation at the epoch's last step already covers it: never evaluate the same step twice.
        if self.evaluate_at_epoch_end and self._last_scheduled_step != state.global_step:
            control.should_evaluate = True
            self._last_scheduled_step = state.global_step
        return control


class BankStepCallback(TrainerCallback):
    """Steps the bank's row optimizer right after the encoder's optimizer step (``on_optimizer_step``).

    :class:`~hf_qret.training.trainer.QRetTrainer` adds it with its own ``_step_bank``; the bank's rows thus move once per
    optimizer step, after gradient accumulation, whatever the number of micro-batches.

    Example:
        >>> steps = []
        >>> callback = BankStepCallback(lambda: steps.append("bank rows stepped"))
        >>> callback.on_optimizer_step(None, None, None)
        >>> steps
        ['bank rows stepped']
    """

    def __init__(self, step: Callable[[], None]) -> None:
        self.step = step

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.step()
