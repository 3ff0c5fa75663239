"""Uploading an artifact to the Hugging Face Hub: :func:`push_artifact`, the one upload of an artifact (used by
``QuantizedRetriever.push_to_hub``, by ``QRetTrainer.push_to_hub`` and its mid-training pushes, by the training
callback in :mod:`hf_qret.hub.callback` and by the commands in :mod:`hf_qret.hub.cli`); the serving layer's, as the
download is (:mod:`hf_qret.serving.download`). :mod:`hf_qret.hub.push` re-exports it, with
:func:`~hf_qret.hub.push.push_checkpoint` for a whole checkpoint folder.

A push is one ``HfApi.create_repo(exist_ok=True)`` and one ``HfApi.upload_folder`` commit of the artifact folder
(encoder, ``index.faiss``, ``doc_ids.json``, ``bank.safetensors``, ``qret_config.json``, the model card), leaving out
what :mod:`hf_qret.serving.artifact`'s manifest says is not part of an artifact (``checkpoint-*/``, optimizer, scheduler, RNG
and trainer state, pickles such as ``training_args.bin``, the memory-mapped ``bank_mmap.npy`` and temporary files).
``upload_folder`` sends binary and large files (the index, the weights, the bank) through the Hub's large-file
storage (LFS / Xet) on its own.

``QRetTrainer`` itself honours ``TrainingArguments.push_to_hub`` / ``hub_model_id`` / ``hub_strategy`` (its
mid-training pushes include the index); the callback is for pushing to a repository of its own, with any trainer
setup.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import ArtifactError, ConfigError, HubError
from .manifest import (
    ARTIFACT_IGNORE_PATTERNS,
    CONFIG_NAME,
    INDEX_NAME,
    artifact_files,
    copy_artifact_files,
)

__all__ = [
    "ARTIFACT_IGNORE_PATTERNS",
    "copy_artifact_files",
    "artifact_upload_files",
    "push_artifact",
    "prepare_repo",
    "hub_errors",
    "hub_api",
    "check_artifact_folder",
]

#: What a refused request means, by HTTP status, for :func:`hub_errors`.
_REFUSALS = {
    401: "the Hub does not accept the token (expired or mistyped); log in again (`hf auth login`) or pass another "
    "--token / HF_TOKEN",
    403: "the token has no write access to {repo_id} (a read-only token, or another user's or organization's "
    "namespace); use a write token of that namespace, or push to a repository of your own",
    404: "{repo_id} (or the branch) was not found, or the token cannot see it; check --repo-id and --revision",
    409: "the name {repo_id} is taken (by a repository of another type, or one being created); pick another --repo-id",
}


@contextlib.contextmanager
def hub_errors(repo_id: str, action: str = "push to") -> Iterator[None]:
    """Turns every Hub failure a user can cause into one :class:`~hf_qret.errors.HubError` that says what to do:
    offline mode, no network, no or a wrong token, no write access, a repository name taken.

    Example:
        >>> with hub_errors("me/minilm-scifact"):  # doctest: +SKIP
        ...     HfApi().create_repo("me/minilm-scifact", exist_ok=True)
    """
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalTokenNotFoundError,
        OfflineModeIsEnabled,
    )
    from huggingface_hub.errors import HTTPError as TransportError  # httpx's base error, whichever httpx it uses

    where = f"cannot {action} {repo_id} on the Hugging Face Hub"
    try:
        yield
    except OfflineModeIsEnabled:
        raise HubError(f"{where}: HF_HUB_OFFLINE is set (offline mode); unset it to push.") from None
    except LocalTokenNotFoundError:
        raise HubError(f"{where}: no Hub token; log in (`hf auth login`) or pass --token / set HF_TOKEN.") from None
    except HFValidationError as exc:
        raise HubError(f"{where}: {repo_id!r} is not a valid repository id ({exc}); pass USER/NAME.") from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        reason = _REFUSALS.get(status, "the Hub refused the request").format(repo_id=repo_id)
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise HubError(f"{where}: {reason} (HTTP {status}: {detail}).") from None
    except (TransportError, ConnectionError, TimeoutError) as exc:
        raise HubError(
            f"{where}: the Hub cannot be reached ({type(exc).__name__}: {str(exc)[:200]}); check the network "
            "(and a proxy, HF_ENDPOINT), then push again."
        ) from None


def prepare_repo(
    repo_id: str,
    private: bool | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    api: Any = None,
) -> str:
    """Creates the model repository (``exist_ok``) and the branch ``revision`` if missing; returns the repository
    id the Hub resolved (``"name"`` becomes ``"user/name"``). Hub failures are one :class:`~hf_qret.errors.HubError`.

    Example:
        >>> prepare_repo("me/minilm-scifact", private=True)  # doctest: +SKIP
        'me/minilm-scifact'
    """
    api = hub_api(api)
    with hub_errors(repo_id, "create"):
        repo_url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        repo_id = getattr(repo_url, "repo_id", None) or repo_id
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
    return repo_id


def hub_api(api: Any = None) -> Any:
    """``api``, or a new ``HfApi`` that names hf-qret (and its version) in its requests' user agent.

    Example:
        >>> hub_api().library_name  # doctest: +SKIP
        'hf-qret'
    """
    if api is not None:
        return api
    from huggingface_hub import HfApi

    from .._version import __version__

    return HfApi(library_name="hf-qret", library_version=__version__)


def check_artifact_folder(folder: str | os.PathLike) -> None:
    """Checks that ``folder`` is a saved hf-qret artifact (a folder holding ``qret_config.json`` and
    ``index.faiss``) before anything is uploaded from it: what ``hf-qret push`` and :func:`push_artifact` check first.

    Raises:
        ArtifactError: ``folder`` does not exist or lacks those files; the message says which.

    Example:
        >>> check_artifact_folder("no/such/run")
        Traceback (most recent call last):
        ...
        hf_qret.errors.ArtifactError: no/such/run: no such folder; pass the --output_dir of a training run.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such folder; pass the --output_dir of a training run.")
    missing = [name for name in (CONFIG_NAME, INDEX_NAME) if not (folder / name).is_file()]
    if missing:
        raise ArtifactError(
            f"{folder}: missing {', '.join(missing)}; this is not a saved hf-qret artifact (run training with "
            "save_model, or pick a checkpoint-N folder)."
        )


def artifact_upload_files(folder: str | os.PathLike, extra_ignore: Sequence[str] = ()) -> list[str]:
    """The files (relative POSIX paths, sorted) that :func:`push_artifact` uploads from ``folder``.

    :func:`hf_qret.serving.artifact.artifact_files` less ``extra_ignore`` and huggingface_hub's own defaults, exactly as
    ``upload_folder`` filters them.

    Example:
        >>> artifact_upload_files("runs/scifact")  # doctest: +SKIP
        ['1_Pooling/config.json', 'README.md', 'bank.safetensors', 'config.json', 'doc_ids.json', 'index.faiss', ...]
    """
    from huggingface_hub.utils import filter_repo_objects
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

    paths = artifact_files(Path(folder).expanduser().resolve())
    return list(filter_repo_objects(paths, ignore_patterns=[*extra_ignore, *DEFAULT_IGNORE_PATTERNS]))


def push_artifact(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    *,
    extra_ignore: Sequence[str] = (),
    run_as_future: bool = False,
    api: Any = None,
    create_repo: bool = True,
) -> Any:
    """Creates (if needed) the model repository and uploads the artifact folder in one commit: the one place an
    artifact is uploaded (``hf-qret push``, :class:`~hf_qret.hub.callback.PushToHubCallback`,
    ``QRetTrainer.push_to_hub`` and its mid-training pushes, ``QuantizedRetriever.push_to_hub``).

    Args:
        folder: A saved artifact (``save_model`` output or a ``checkpoint-N`` folder).
        repo_id: ``"user/name"`` (or ``"name"`` for the token's own namespace).
        private: Visibility of a newly created repository (``None``: the Hub's default); no effect if it exists.
        revision: Branch to commit to; created from the default branch when it does not exist.
        token: A Hub token with write access (default: the logged-in one).
        commit_message: Defaults to ``"Upload hf-qret artifact (<factory>, <bytes> bytes/vector)"``.
        extra_ignore: More ``fnmatch`` patterns to leave out.
        run_as_future: Return a ``concurrent.futures.Future`` instead of waiting for the upload.
        api: An ``HfApi`` to use (default: a new one).
        create_repo: Create the repository first (``exist_ok``); ``False`` when the caller already did (the
            ``Trainer`` creates it when it starts).

    Returns:
        The ``CommitInfo`` of the upload (or a ``Future`` of it).

    Raises:
        ArtifactError: ``folder`` is not a saved artifact.
        HubError: The Hub cannot be reached (offline mode, no network) or refused the push (no or a wrong token,
            no write access, the name taken). The upload is one commit: a failed one leaves no commit behind.

    Example:
        >>> push_artifact("runs/scifact", "me/minilm-scifact-opq16", private=True)  # doctest: +SKIP
        CommitInfo(commit_url='https://huggingface.co/me/minilm-scifact-opq16/commit/...', ...)
    """
    folder = Path(folder).expanduser()
    check_artifact_folder(folder)
    if not repo_id or not str(repo_id).strip():
        raise ConfigError("no repository id; pass --repo-id USER/NAME (or set hub_model_id).")
    if commit_message is None:
        try:
            config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
            commit_message = (
                f"Upload hf-qret artifact ({config.get('index_factory')}, {config.get('bytes_per_vector')} "
                "bytes/vector)"
            )
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ArtifactError(f"{folder / CONFIG_NAME}: corrupt JSON; re-create the artifact.") from None
    api = hub_api(api)
    if create_repo:
        repo_id = prepare_repo(repo_id, private, revision, token, api)
    elif revision is not None and revision != "main":
        with hub_errors(repo_id, "create a branch of"):
            api.create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
    with hub_errors(repo_id):
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            token=token,
            commit_message=commit_message,
            ignore_patterns=[*ARTIFACT_IGNORE_PATTERNS, *extra_ignore],
            run_as_future=run_as_future,
        )
