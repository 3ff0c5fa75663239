"""Pushing to the Hugging Face Hub: :func:`push_artifact` (the upload of an artifact, which lives with the download in
the serving layer, :mod:`hf_qret.serving.upload`, re-exported here) and :func:`push_checkpoint` for a whole checkpoint
folder (``hub_strategy="checkpoint"`` / ``"all_checkpoints"``).
"""

from __future__ import annotations

import os
from typing import Any

from ..serving.manifest import ARTIFACT_IGNORE_PATTERNS, WORKING_FILE_PATTERNS, copy_artifact_files
from ..serving.upload import (  # noqa: F401  re-exported: this module held them before
    artifact_upload_files,
    check_artifact_folder,
    hub_api,
    hub_errors,
    prepare_repo,
    push_artifact,
)

__all__ = [
    "ARTIFACT_IGNORE_PATTERNS",
    "copy_artifact_files",
    "artifact_upload_files",
    "push_artifact",
    "push_checkpoint",
    "prepare_repo",
    "hub_errors",
    "check_artifact_folder",
]


def push_checkpoint(
    folder: str | os.PathLike,
    repo_id: str,
    path_in_repo: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    run_as_future: bool = False,
    api: Any = None,
) -> Any:
    """Uploads a whole checkpoint folder (training state included, to resume from) under ``path_in_repo``
    (``last-checkpoint``, ``checkpoint-N``): ``hub_strategy="checkpoint"`` / ``"all_checkpoints"``. Working files
    (:data:`hf_qret.serving.artifact.WORKING_FILE_PATTERNS`) stay local;
    :class:`~hf_qret.serving.retriever.QuantizedRetriever` never downloads these folders.

    Args:
        folder: The checkpoint folder.
        repo_id: The (existing) model repository.
        path_in_repo: Where the folder goes in the repository.
        revision: Branch to commit to.
        token: A Hub token with write access.
        commit_message: The commit's message.
        run_as_future: Return a ``concurrent.futures.Future`` instead of waiting for the upload.
        api: An ``HfApi`` to use (default: a new one).

    Returns:
        The ``CommitInfo`` of the upload (or a ``Future`` of it).

    Example:
        >>> push_checkpoint("runs/scifact/checkpoint-500", "me/minilm-scifact-opq16", "last-checkpoint")  # doctest: +SKIP
    """
    return hub_api(api).upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        path_in_repo=path_in_repo,
        commit_message=commit_message,
        token=token,
        run_as_future=run_as_future,
        ignore_patterns=list(WORKING_FILE_PATTERNS),
        revision=revision,
    )
