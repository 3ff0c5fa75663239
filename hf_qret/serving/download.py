"""Where an artifact comes from when it is not a local folder: the Hub, downloaded with ``snapshot_download``
without what never belongs to an artifact (:func:`resolve_artifact`), and the parts serving skipped fetched later from
the same commit (:class:`HubSource`, :func:`fetch_artifact_part`). :mod:`hf_qret.serving.artifact` re-exports every
name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ArtifactError
from .manifest import ARTIFACT_IGNORE_PATTERNS, BANK_NAME, DOCUMENT_ENCODER_DIR

__all__ = ["resolve_artifact", "HubSource", "SERVING_IGNORE_PATTERNS", "fetch_artifact_part", "hub_source_of"]

#: What serving does not need, so a Hub download leaves it out until it is needed: the full-precision bank
#: (``add_documents`` with a saved bank, ``retrain_index``, ``load_bank=True``) and the document encoder
#: (``add_documents``). :func:`fetch_artifact_part` downloads them on first use.
SERVING_IGNORE_PATTERNS: tuple[str, ...] = (BANK_NAME, f"{DOCUMENT_ENCODER_DIR}/*")


@dataclass
class HubSource:
    """Where a downloaded artifact came from, so the parts serving skipped can be fetched later from the same commit.

    Attributes:
        repo_id: The Hub model id.
        revision: The commit the first download resolved (its snapshot folder's name), else the requested revision.
        token: Hub token.
        cache_dir: Hub cache folder.

    Example:
        >>> HubSource("me/scifact-qret", "0" * 40, None, None).repo_id
        'me/scifact-qret'
    """

    repo_id: str
    revision: str | None
    token: str | bool | None
    cache_dir: Any


def _download(source: HubSource, **patterns: Any) -> Path:
    """``snapshot_download`` of ``source`` with ``patterns``, its errors turned into one :class:`ArtifactError`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    text = source.repo_id
    try:
        return Path(
            snapshot_download(
                text, revision=source.revision, token=source.token, cache_dir=source.cache_dir, **patterns
            )
        )
    except HFValidationError:
        raise ArtifactError(
            f"{text}: no such artifact folder, and not a Hub model id (USER/NAME); pass the --output_dir of a "
            "training run or a Hub repository id."
        ) from None
    except LocalEntryNotFoundError:
        raise ArtifactError(
            f"{text}: not a local folder and not in the Hub cache, and the Hub cannot be reached (or HF_HUB_OFFLINE "
            "is set); download it once online or pass a local artifact folder."
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise ArtifactError(
            f"{text}: cannot download it from the Hub ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}); "
            "check the repository id, revision and token, or pass a local artifact folder."
        ) from None


def resolve_artifact(
    repo_id_or_path: str | os.PathLike,
    revision: str | None,
    token: str | bool | None,
    cache_dir: Any,
    *,
    skip: Sequence[str] = (),
) -> Path:
    """A local artifact folder as is, else the Hub repository downloaded with ``snapshot_download`` (without what
    is not part of an artifact, :data:`ARTIFACT_IGNORE_PATTERNS`: pickles, checkpoints, working files, nor the
    patterns in ``skip``, e.g. :data:`SERVING_IGNORE_PATTERNS`); one :class:`ArtifactError` saying what to do when
    it is neither.

    Example:
        >>> folder = resolve_artifact("user/scifact-qret", revision=None, token=None, cache_dir=None)  # doctest: +SKIP
    """
    folder = Path(repo_id_or_path).expanduser()
    if folder.is_dir():
        return folder
    source = HubSource(str(repo_id_or_path), revision, token, cache_dir)
    return _download(source, ignore_patterns=[*ARTIFACT_IGNORE_PATTERNS, *skip])


def hub_source_of(folder: Path, repo_id: str, revision: str | None, token: Any, cache_dir: Any) -> HubSource:
    """The :class:`HubSource` of a downloaded snapshot folder: pinned to its commit (the folder's name).

    Example:
        >>> hub_source_of(Path("cache/snapshots/" + "a" * 40), "me/repo", "main", None, None).revision == "a" * 40
        True
    """
    import re

    pinned = folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else revision
    return HubSource(repo_id, pinned, token, cache_dir)


def fetch_artifact_part(source: HubSource | None, folder: Path, patterns: Sequence[str]) -> Path:
    """Downloads the files of ``patterns`` (e.g. ``bank.safetensors``, ``document_encoder/*``) that a serving
    download skipped, into the same snapshot folder; a local artifact (``source`` ``None``) is returned as is.

    Raises:
        ArtifactError: The download fails (offline, no access).

    Example:
        >>> fetch_artifact_part(retriever._hub, retriever.folder, ["bank.safetensors"])  # doctest: +SKIP
        PosixPath('.../snapshots/0123.../')
    """
    if source is None:
        return folder
    import logging

    logging.getLogger(__name__).info("downloading %s of %s (not needed to serve)", ", ".join(patterns), source.repo_id)
    fetched = _download(source, allow_patterns=list(patterns), ignore_patterns=list(ARTIFACT_IGNORE_PATTERNS))
    if fetched.resolve() != folder.resolve():  # the same commit lands in the same snapshot folder; else copy
        import shutil
        from fnmatch import fnmatch

        for path in fetched.rglob("*"):
            rel = path.relative_to(fetched).as_posix()
            if path.is_file() and any(fnmatch(rel, pattern) for pattern in patterns):
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, folder / rel)
    return folder
