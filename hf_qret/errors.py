"""Errors a user can cause, each carrying one message that says what is wrong and what to do."""

from __future__ import annotations


class QRetError(Exception):
    """Base class of every error hf-qret raises for bad input (paths, configs, data, artifacts).

    The command line prints the message of these errors as one line, without a traceback, and exits with status 2.
    """


class DataError(QRetError, ValueError):
    """A data folder is missing, malformed or inconsistent."""


class ConfigError(QRetError, ValueError):
    """A configuration value is invalid (for example a FAISS factory string)."""


class ArtifactError(QRetError, ValueError):
    """A saved artifact (bank, index, doc-id map) is missing, corrupt or inconsistent."""


class MissingExtraError(QRetError, ImportError):
    """A command needs an optional extra (``pip install 'hf-qret[train]'``) that is not installed."""


class TrainingDivergedError(QRetError, RuntimeError):
    """The loss became NaN or infinite; training stopped before the bad step changed anything."""

    @classmethod
    def at(cls, value: float, step: int, epoch: float, output_dir: str) -> TrainingDivergedError:
        """The error for a loss of ``value`` at ``step``, naming the last checkpoint in ``output_dir`` to resume."""
        import os

        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet (set --save_steps)"
        return cls(
            f"the loss became {value} at step {step} (epoch {epoch:.2f}); training stopped before that step changed "
            f"the encoder or the bank, and {kept}. Lower --learning_rate/--bank_learning_rate or --scale, then "
            "resume with --resume_from_checkpoint."
        )
