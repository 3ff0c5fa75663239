"""Errors a user can cause, each carrying one message that says what is wrong and what to do."""

from __future__ import annotations


class QRetError(Exception):
    """Base class of every error hf-qret raises for bad input (paths, configs, data, artifacts).

    The command line prints the message of these errors as one line, without a traceback, and exits with
    :attr:`exit_status` (2: bad input; 1: :class:`HubError`, the Hub refused or could not be reached).

    Example:
        >>> from hf_qret.errors import ConfigError, QRetError
        >>> try:
        ...     raise ConfigError("opq_niter must be at least 1, got 0.")
        ... except QRetError as exc:  # every hf-qret input error, whatever its kind
        ...     print(exc)
        opq_niter must be at least 1, got 0.
    """

    #: The command line's exit status for this error.
    exit_status = 2


class DataError(QRetError, ValueError):
    """A data folder is missing, malformed or inconsistent.

    Example:
        >>> from hf_qret.data import load_beir
        >>> load_beir("no/such/folder/here")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        hf_qret.errors.DataError: ...
        >>> issubclass(DataError, ValueError)  # callers catching ValueError still catch it
        True
    """


class ConfigError(QRetError, ValueError):
    """A configuration value is invalid (for example a FAISS factory string).

    Example:
        >>> from hf_qret.index.core import QuantizedIndex
        >>> QuantizedIndex(32, "PQ7")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        hf_qret.errors.ConfigError: invalid --index_factory 'PQ7' for dimension 32 ...
    """


class ArtifactError(QRetError, ValueError):
    """A saved artifact (bank, index, doc-id map) is missing, corrupt or inconsistent.

    Example:
        >>> from hf_qret.index.core import QuantizedIndex
        >>> QuantizedIndex.load("no-such-index.faiss")
        Traceback (most recent call last):
        ...
        hf_qret.errors.ArtifactError: no-such-index.faiss: no such index file; train or download the artifact first.
    """


class MissingExtraError(QRetError, ImportError):
    """A command needs an optional extra (``pip install 'hf-qret[train]'``) that is not installed.

    Example:
        >>> issubclass(MissingExtraError, ImportError)  # callers catching ImportError still catch it
        True
    """


class TrainingDivergedError(QRetError, RuntimeError):
    """The loss became NaN or infinite; training stopped before the bad step changed anything.

    Example:
        >>> str(TrainingDivergedError.at(float("nan"), step=120, epoch=0.5, output_dir="no-such-run"))  # doctest: +ELLIPSIS
        'the loss became nan at step 120 (epoch 0.50); ... no checkpoint was saved yet (set --save_strategy steps --save_steps N)...'
    """

    @classmethod
    def at(cls, value: float, step: int, epoch: float, output_dir: str) -> TrainingDivergedError:
        """The error for a loss of ``value`` at ``step``, naming the last checkpoint in ``output_dir`` to resume."""
        import os

        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        kept = (
            f"the last good checkpoint is {last}"
            if last
            else "no checkpoint was saved yet (set --save_strategy steps --save_steps N)"
        )
        return cls(
            f"the loss became {value} at step {step} (epoch {epoch:.2f}); training stopped before that step changed "
            f"the encoder or the bank, and {kept}. Lower --learning_rate/--bank_learning_rate or --scale, then "
            "resume with --resume_from_checkpoint."
        )


class HubError(QRetError, RuntimeError):
    """The Hugging Face Hub could not be reached or refused the request (offline mode, no network, no or wrong
    token, no write access, a repository name taken); the command line exits with status 1.

    Example:
        >>> HubError.exit_status
        1
    """

    exit_status = 1


class CollectiveCallError(QRetError, RuntimeError):
    """A call every process of a multi-process run makes together (``evaluate()``, ``save_model()`` with
    ``bank_sharding='rows'``, where each process holds part of the bank and the index) was made by only some of them.

    Example:
        >>> issubclass(CollectiveCallError, RuntimeError)
        True
    """
