"""The safety net: a run whose training made the evaluator's metric worse keeps the untrained model.

:class:`SafetyNetCallback` evaluates the model before the first step (the run's step-0 evaluation, logged like any
other) and snapshots the untrained encoder, bank and index into ``OUTPUT_DIR/_untrained``. When training ends it
evaluates again; if the metric fell, it restores encoder, bank and index from the snapshot, warns loudly and records
the verdict, which ``save_model`` writes into ``eval_results.json`` and the model card. ``QRetTrainer`` adds it
whenever it has an evaluator and ``args.keep_untrained_if_better`` is on (the default); ``hf-qret train`` uses the
same code.

A resumed run takes the step-0 metrics from the checkpoint's log history and the untrained model from the snapshot
folder the first run wrote, so a resumed run keeps its safety net.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

__all__ = ["SafetyNetCallback", "SafetyNetVerdict", "training_verdict", "UNTRAINED_DIR", "eval_key", "stage_metrics"]

logger = logging.getLogger("hf_qret")

#: The untrained model's snapshot under ``output_dir`` (a working folder: never pushed, removed after training).
UNTRAINED_DIR = "_untrained"
#: The metric the net compares when ``metric_for_best_model`` names none of the evaluator's: the served index's.
DEFAULT_METRIC = "quantized_ndcg@10"


def training_verdict(results: dict[str, Any], metric: str = DEFAULT_METRIC) -> tuple[str, str | None]:
    """Which model ships, from a before/after evaluation: ``("trained" | "untrained", warning)``.

    Training that ends *below* the untrained model on ``metric`` is not shipped: the untrained model is, with a
    warning saying so. No evaluation: the trained model, no warning.

    Args:
        results: ``{"untrained": {"untrained_<metric>": value, ...}, "trained": {"trained_<metric>": value, ...}}``.
        metric: The metric compared, without its stage prefix.

    Example:
        >>> training_verdict({"untrained": {"untrained_quantized_ndcg@10": 0.30},
        ...                   "trained": {"trained_quantized_ndcg@10": 0.20}})[0]
        'untrained'
    """
    before = (results.get("untrained") or {}).get(f"untrained_{metric}")
    after = (results.get("trained") or {}).get(f"trained_{metric}")
    if before is None or after is None or after >= before:
        return "trained", None
    return "untrained", (
        f"TRAINING MADE THE MODEL WORSE: {metric} on the evaluation data fell from {before:.4f} (untrained) to "
        f"{after:.4f} (trained). The model kept is the UNTRAINED one (pretrained encoder, pretrained bank, the index "
        "evaluated before training); change the training settings and train again."
    )


def eval_key(name: str) -> str:
    """A metric name as the trainer logs it (``quantized_ndcg@10`` -> ``eval_quantized_ndcg@10``), as
    ``metric_for_best_model`` is read.

    Example:
        >>> eval_key("quantized_ndcg@10"), eval_key("eval_dev_quantized_ndcg@10")
        ('eval_quantized_ndcg@10', 'eval_dev_quantized_ndcg@10')
    """
    return name if name.startswith("eval_") else f"eval_{name}"


def stage_metrics(metrics: dict[str, float], stage: str, prefix: str = "eval") -> dict[str, float]:
    """Renames a trainer evaluation's keys to a stage's (``eval_quantized_ndcg@10`` -> ``trained_quantized_ndcg@10``).

    Example:
        >>> stage_metrics({"eval_quantized_ndcg@10": 0.5, "epoch": 1.0}, "untrained")
        {'untrained_quantized_ndcg@10': 0.5}
    """
    head = f"{prefix}_"
    return {f"{stage}_{key[len(head) :]}": value for key, value in metrics.items() if key.startswith(head)}


@dataclass
class SafetyNetVerdict:
    """What the safety net measured and kept.

    Attributes:
        metric: The compared metric, as logged (``eval_quantized_ndcg@10``).
        untrained: Every metric of the step-0 evaluation, keys ``untrained_*``.
        trained: Every metric of the evaluation after training, keys ``trained_*``.
        shipped: ``"trained"`` or ``"untrained"``.
        warning: The loud message when the untrained model was kept.

    Example:
        >>> verdict = SafetyNetVerdict(
        ...     "eval_quantized_ndcg@10",
        ...     untrained={"untrained_quantized_ndcg@10": 0.61},
        ...     trained={"trained_quantized_ndcg@10": 0.67},
        ... )
        >>> verdict.as_results()["shipped"], verdict.summary()["untrained"]
        ('trained', 0.61)
    """

    metric: str
    untrained: dict[str, float] = field(default_factory=dict)
    trained: dict[str, float] = field(default_factory=dict)
    shipped: str = "trained"
    warning: str | None = None

    def summary(self) -> dict[str, Any]:
        """The compared metric before and after training and what was kept (``qret_config.json``'s record)."""
        metric = self.metric[len("eval_") :]
        return {
            "metric": self.metric,
            "untrained": self.untrained.get(f"untrained_{metric}"),
            "trained": self.trained.get(f"trained_{metric}"),
            "shipped": self.shipped,
        }

    def as_results(self) -> dict[str, Any]:
        """The ``eval_results.json`` layout the model card reads (``untrained`` / ``trained`` / ``shipped``)."""
        results: dict[str, Any] = {"untrained": self.untrained, "trained": self.trained, "shipped": self.shipped}
        if self.warning:
            results["notes"] = [f"**Warning:** {self.warning}"]
        return results


class SafetyNetCallback(TrainerCallback):
    """Evaluates before the first step and keeps the untrained encoder, bank and index if training made them worse.

    The compared metric is ``args.metric_for_best_model`` when the evaluator reports it, else the served (quantized)
    index's nDCG@10 of the first evaluator. With ``load_best_model_at_end`` the step-0 evaluation is also the best
    metric to beat: a checkpoint is "best" only if it beats the untrained model.

    Args:
        metric: The metric to compare (a key of the trainer's evaluation, with or without ``eval_``); default as above.

    Example:
        >>> from hf_qret.training.safety_net import SafetyNetCallback
        >>> trainer = QRetTrainer(model, args, train_dataset=pairs, corpus=corpus, evaluator=ir_evaluator)  # doctest: +SKIP
        >>> any(isinstance(cb, SafetyNetCallback) for cb in trainer.callback_handler.callbacks)  # doctest: +SKIP
        True
    """

    def __init__(self, metric: str | None = None) -> None:
        self.metric = metric
        self.trainer: Any = None
        self.untrained_metrics: dict[str, float] | None = None
        #: The verdict of the last training run (``None`` until one ended).
        self.verdict: SafetyNetVerdict | None = None

    def bind_trainer(self, trainer: Any) -> None:
        """Attaches the trainer whose model, bank and index the net evaluates, snapshots and restores."""
        self.trainer = trainer

    def snapshot_dir(self, args: Any) -> Path:
        """Where the untrained model is kept during training."""
        return Path(args.output_dir) / UNTRAINED_DIR

    def _metric_key(self, metrics: dict[str, float]) -> str:
        wanted = self.metric or self.trainer.args.metric_for_best_model
        if wanted:
            key = eval_key(wanted)
            if key in metrics:
                return key
            if self.metric:
                from ..errors import ConfigError

                raise ConfigError(
                    f"the safety net compares {key!r}, which the evaluator does not report (it reports "
                    f"{', '.join(sorted(metrics)) or 'nothing'}); pass one of those."
                )
        found = [k for k in metrics if k.endswith(f"_{DEFAULT_METRIC}")]
        if not found:
            from ..errors import ConfigError

            raise ConfigError(
                f"the safety net needs a {DEFAULT_METRIC} from the evaluator; it reports "
                f"{', '.join(sorted(metrics)) or 'nothing'}. Pass a retrieval evaluator or keep_untrained_if_better=False."
            )
        return found[0]

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        self.verdict = None
        folder = self.snapshot_dir(args)
        if state.global_step == 0:
            metrics = trainer.evaluate()  # the run's step-0 evaluation, logged at step 0
            key = self._metric_key(metrics)
            self.untrained_metrics = dict(metrics)
            if args.load_best_model_at_end and args.metric_for_best_model and state.best_metric is None:
                best_key = eval_key(args.metric_for_best_model)
                if best_key in metrics:
                    state.best_metric = metrics[best_key]  # a checkpoint must beat the untrained model
            trainer.save_untrained_snapshot(str(folder))
            logger.info("safety net: untrained %s = %.4f; snapshot in %s", key, metrics[key], folder)
            return
        # resumed: the step-0 evaluation is in the checkpoint's log history, the snapshot on disk
        logged = [
            entry for entry in state.log_history if entry.get("step") == 0 and any(k.startswith("eval_") for k in entry)
        ]
        if not logged or not (folder / "qret_config.json").is_file():
            logger.warning(
                "safety net: the resumed run has no %s; it cannot keep the untrained model if training made it "
                "worse (resume in the output folder of the run that started it).",
                "step-0 evaluation in its log history" if not logged else f"untrained snapshot in {folder}",
            )
            self.untrained_metrics = None
            return
        self.untrained_metrics = {k: v for entry in logged for k, v in entry.items() if k.startswith("eval_")}

    def on_train_end(self, args, state, control, **kwargs):
        if self.untrained_metrics is None:
            return
        trainer = self.trainer
        # the model as it ends (after the train-end refresh), measured without a second log entry for the last step
        trained = trainer.retrieval_metrics("eval")
        key = self._metric_key(trained)
        metric = key[len("eval_") :]
        untrained = stage_metrics(self.untrained_metrics, "untrained")
        after = stage_metrics(trained, "trained")
        shipped, warning = training_verdict({"untrained": untrained, "trained": after}, metric)
        folder = self.snapshot_dir(args)
        if shipped == "untrained":
            trainer.restore_snapshot(str(folder))
            for line in ("!" * 100, warning, "!" * 100):
                logger.warning("%s", line)
        else:
            logger.info(
                "safety net: %s %.4f after training vs %.4f untrained: the trained model is kept",
                key, trained[key], self.untrained_metrics[key],
            )  # fmt: skip
        self.verdict = SafetyNetVerdict(key, untrained, after, shipped, warning)
        trainer.log({"safety_net_kept_untrained": float(shipped == "untrained")})
        trainer.accelerator.wait_for_everyone()  # every process has restored before the snapshot goes
        if args.should_save:
            shutil.rmtree(folder, ignore_errors=True)
        self.untrained_metrics = None
