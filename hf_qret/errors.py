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


class TrainingDivergedError(QRetError, RuntimeError):
    """The loss became NaN or infinite; training stopped before the bad step changed anything."""
