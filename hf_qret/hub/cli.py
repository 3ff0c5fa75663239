"""The ``hf-qret push`` and ``hf-qret card`` commands (see :mod:`hf_qret.cli`)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .push import artifact_upload_files, check_artifact_folder, prepare_repo, push_artifact

__all__ = [
    "write_corpus",
    "push_main",
    "card_main",
]


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

    Example:
        >>> write_corpus("runs/scifact", "recipes/data/scifact")  # doctest: +SKIP
        PosixPath('runs/scifact/corpus.jsonl')
    """
    from ..data import _find, _load_corpus
    from ..errors import DataError

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

    Checks the artifact first (index size vs doc ids, dimension), then the Hub (creates the repository and branch:
    offline mode, no network, a missing, wrong or read-only token and a name taken fail here, with one
    :class:`~hf_qret.errors.HubError` and exit status 1, before anything is written locally), renders ``README.md``
    (the model card) when the folder has none of hf-qret's (or with ``--refresh-card``), optionally ships the corpus
    texts, then pushes in one commit. ``--dry-run`` prints the files that would be uploaded and contacts nothing.

    Example:
        >>> push_main(["runs/scifact", "--repo-id", "me/minilm-scifact-rq16", "--dry-run"])  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(
        prog="hf-qret push", description="Push an hf-qret artifact to the Hugging Face Hub."
    )
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

    from ..serving.artifact import load_retrieval_files
    from .model_card import MODEL_CARD_NAME, is_qret_model_card, write_model_card

    folder = Path(args.artifact).expanduser()
    check_artifact_folder(folder)
    load_retrieval_files(folder)  # index size vs doc ids, dimension: refuse to publish a broken artifact
    repo_id = args.repo_id
    if not args.dry_run:  # the Hub first: a failure there leaves the folder as it was
        repo_id = prepare_repo(args.repo_id, args.private or None, args.revision, args.token)
    if args.corpus:
        write_corpus(folder, args.corpus)
    if args.refresh_card or not is_qret_model_card(folder / MODEL_CARD_NAME):
        write_model_card(folder, repo_id=args.repo_id, **_card_kwargs(args))
    files = artifact_upload_files(folder)
    if args.dry_run:
        print(json.dumps({"repo_id": args.repo_id, "files": files}))
        return files
    commit = push_artifact(
        folder, repo_id, revision=args.revision, token=args.token, commit_message=args.commit_message,
        create_repo=False,
    )  # fmt: skip
    url = getattr(commit, "commit_url", None) or str(commit)
    print(json.dumps({"repo_id": args.repo_id, "commit_url": url, "files": len(files)}))
    return commit


def card_main(argv: list[str] | None = None) -> Path:
    """``hf-qret card OUT [--repo-id NAME] [--base-model M] [--dataset D] [--metrics FILE]``: (re)writes README.md.

    Example:
        >>> card_main(["runs/scifact", "--repo-id", "me/minilm-scifact-rq16"])  # doctest: +SKIP
        PosixPath('runs/scifact/README.md')
    """
    parser = argparse.ArgumentParser(prog="hf-qret card", description="Render the model card of an hf-qret artifact.")
    parser.add_argument("artifact", help="the --output_dir of a training run")
    parser.add_argument("--repo-id", help="the Hub repository the code examples load")
    _card_arguments(parser)
    args = parser.parse_args(argv)

    from .model_card import write_model_card

    path = write_model_card(args.artifact, repo_id=args.repo_id, **_card_kwargs(args))
    print(str(path))
    return path
