"""Pushing artifacts to the Hugging Face Hub: :func:`push_artifact`, :class:`PushToHubCallback` and the
``hf-qret push`` / ``hf-qret card`` commands.

A push is one ``HfApi.create_repo(exist_ok=True)`` and one ``HfApi.upload_folder`` commit of the artifact folder
(encoder, ``index.faiss``, ``doc_ids.json``, ``bank.safetensors``, ``qret_config.json``, the model card), leaving out
what :mod:`hf_qret.artifact`'s manifest says is not part of an artifact (``checkpoint-*/``, optimizer, scheduler, RNG
and trainer state, pickles such as ``training_args.bin``, the memory-mapped ``bank_mmap.npy`` and temporary files).
``upload_folder`` sends binary and large files (the index, the weights, the bank) through the Hub's large-file
storage (LFS / Xet) on its own.

``QRetTrainer`` itself honours ``TrainingArguments.push_to_hub`` / ``hub_model_id`` / ``hub_strategy`` (its
mid-training pushes include the index); the callback is for pushing to a repository of its own, with any trainer
setup.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .artifact import (
    ARTIFACT_IGNORE_PATTERNS,
    CONFIG_NAME,
    INDEX_NAME,
    artifact_files,
    copy_artifact_files,
)
from .errors import ArtifactError, ConfigError

__all__ = [
    "ARTIFACT_IGNORE_PATTERNS",
    "copy_artifact_files",
    "artifact_upload_files",
    "push_artifact",
    "write_corpus",
    "PushToHubCallback",
    "push_main",
    "card_main",
]

logger = logging.getLogger(__name__)



def _api(api: Any = None) -> Any:
    if api is not None:
        return api
    from huggingface_hub import HfApi

    from . import __version__

    return HfApi(library_name="hf-qret", library_version=__version__)


def _check_artifact(folder: Path) -> None:
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

    :func:`hf_qret.artifact.artifact_files` less ``extra_ignore`` and huggingface_hub's own defaults, exactly as
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
) -> Any:
    """Creates (if needed) the model repository and uploads the artifact folder in one commit.

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

    Returns:
        The ``CommitInfo`` of the upload (or a ``Future`` of it).

    Raises:
        ArtifactError: ``folder`` is not a saved artifact.

    Example:
        >>> push_artifact("runs/scifact", "me/minilm-scifact-opq16", private=True)  # doctest: +SKIP
        CommitInfo(commit_url='https://huggingface.co/me/minilm-scifact-opq16/commit/...', ...)
    """
    folder = Path(folder).expanduser()
    _check_artifact(folder)
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
    api = _api(api)
    repo_url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    repo_id = getattr(repo_url, "repo_id", None) or repo_id
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
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


# ----------------------------------------------------------------------------------------------------- callback
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
        card_kwargs: Passed to :func:`hf_qret.model_card.write_model_card` (``base_model``, ``datasets``, ...).

    Example:
        >>> callback = PushToHubCallback("me/minilm-scifact-opq16", private=True)  # doctest: +SKIP
        >>> trainer = QRetTrainer(model, args, train_dataset=pairs, bank=bank, callbacks=[callback])  # doctest: +SKIP
        >>> trainer.train()  # pushes each checkpoint and, at the end, the final artifact  # doctest: +SKIP
    """

    def __init__(
        self,
        repo_id: str | None = None,
        *,
        private: bool | None = None,
        revision: str | None = None,
        token: str | None = None,
        every_save: bool | None = None,
        trainer: Any = None,
        card_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.repo_id = repo_id
        self.private = private
        self.revision = revision
        self.token = token
        self.every_save = every_save
        self.trainer = trainer
        self.card_kwargs = dict(card_kwargs or {})
        self.pushes: list[Any] = []

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


# ---------------------------------------------------------------------------------------------------------- CLI
def _card_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-model", help="Hub id of the model training started from (card metadata)")
    parser.add_argument("--dataset", action="append", help="Hub dataset id(s) for the card metadata, e.g. BeIR/scifact")
    parser.add_argument("--eval-split", help="the split the card's metrics were measured on")
    parser.add_argument("--license", help="SPDX license id for the card metadata")
    parser.add_argument("--metrics", help="a JSON file of metrics (eval_results.json or hf-qret evaluate output)")


def _card_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    metrics = None
    if args.metrics:
        try:
            metrics = json.loads(Path(args.metrics).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{args.metrics}: cannot read the metrics JSON ({exc}).") from None
    return {
        "metrics": metrics,
        "base_model": args.base_model,
        "datasets": args.dataset,
        "eval_split": args.eval_split,
        "license": args.license,
    }


def write_corpus(folder: str | os.PathLike, data_dir: str | os.PathLike) -> Path:
    """Ships the document texts: writes ``folder/corpus.jsonl`` from a BEIR folder, in the artifact's row order.

    Raises:
        DataError: The BEIR corpus lacks some of the artifact's documents.
    """
    from .data import _find, _load_corpus
    from .errors import DataError

    folder = Path(folder)
    doc_ids = json.loads((folder / "doc_ids.json").read_text(encoding="utf-8"))
    source = Path(data_dir)
    path = _find(source, "corpus.jsonl") if source.is_dir() else (source if source.is_file() else None)
    if path is None:
        raise DataError(f"{data_dir}: no corpus.jsonl (or .gz); pass the BEIR folder the artifact was built from.")
    corpus = _load_corpus(path)
    missing = [d for d in doc_ids if d not in corpus]
    if missing:
        raise DataError(
            f"{path}: {len(missing)} of the artifact's documents are not in it (first: {missing[0]!r}); pass the "
            "corpus the artifact was built from."
        )
    target = folder / "corpus.jsonl"
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for doc_id in doc_ids:
            handle.write(json.dumps({"_id": doc_id, **corpus[doc_id]}, ensure_ascii=False) + "\n")
    os.replace(tmp, target)
    return target


def push_main(argv: list[str] | None = None) -> Any:
    """``hf-qret push OUT --repo-id NAME [--private] [--revision R]``: one commit of the artifact to the Hub.

    Checks the artifact first (index size vs doc ids, dimension), renders ``README.md`` (the model card) when the
    folder has none of hf-qret's (or with ``--refresh-card``), optionally ships the corpus texts, then pushes.
    ``--dry-run`` prints the files that would be uploaded and pushes nothing.
    """
    parser = argparse.ArgumentParser(prog="hf-qret push", description="Push an hf-qret artifact to the Hugging Face Hub.")
    parser.add_argument("artifact", help="the --output_dir of a training run (or a checkpoint-N folder)")
    parser.add_argument("--repo-id", required=True, help="the Hub repository, USER/NAME")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", help="branch to push to (created if missing)")
    parser.add_argument("--token", help="Hub token with write access (default: the logged-in one)")
    parser.add_argument("--commit-message", help="commit message")
    parser.add_argument("--corpus", help="a BEIR folder: also ship its corpus.jsonl (retriever.corpus)")
    parser.add_argument("--refresh-card", action="store_true", help="re-render README.md even if it is hf-qret's")
    parser.add_argument("--dry-run", action="store_true", help="list the files to upload, push nothing")
    _card_arguments(parser)
    args = parser.parse_args(argv)

    from .artifact import load_retrieval_files
    from .model_card import MODEL_CARD_NAME, is_qret_model_card, write_model_card

    folder = Path(args.artifact).expanduser()
    _check_artifact(folder)
    load_retrieval_files(folder)  # index size vs doc ids, dimension: refuse to publish a broken artifact
    if args.corpus:
        write_corpus(folder, args.corpus)
    if args.refresh_card or not is_qret_model_card(folder / MODEL_CARD_NAME):
        write_model_card(folder, repo_id=args.repo_id, **_card_kwargs(args))
    files = artifact_upload_files(folder)
    if args.dry_run:
        print(json.dumps({"repo_id": args.repo_id, "files": files}))
        return files
    commit = push_artifact(
        folder, args.repo_id, private=args.private or None, revision=args.revision, token=args.token,
        commit_message=args.commit_message,
    )  # fmt: skip
    url = getattr(commit, "commit_url", None) or str(commit)
    print(json.dumps({"repo_id": args.repo_id, "commit_url": url, "files": len(files)}))
    return commit


def card_main(argv: list[str] | None = None) -> Path:
    """``hf-qret card OUT [--repo-id NAME] [--base-model M] [--dataset D] [--metrics FILE]``: (re)writes README.md."""
    parser = argparse.ArgumentParser(prog="hf-qret card", description="Render the model card of an hf-qret artifact.")
    parser.add_argument("artifact", help="the --output_dir of a training run")
    parser.add_argument("--repo-id", help="the Hub repository the code examples load")
    _card_arguments(parser)
    args = parser.parse_args(argv)

    from .model_card import write_model_card

    path = write_model_card(args.artifact, repo_id=args.repo_id, **_card_kwargs(args))
    print(str(path))
    return path
