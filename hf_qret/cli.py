"""The ``hf-qret`` command line: ``train`` (the recipe) and ``evaluate`` (an artifact on a BEIR split)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from typing import Any

from .errors import MissingExtraError, QRetError

__all__ = ["main", "train_main", "evaluate_main", "require_train_extra"]

logger = logging.getLogger("hf_qret")


def _flatten(metrics: dict[str, float], kind: str) -> dict[str, float]:
    prefix = f"{kind}_"
    return {k[len(prefix) :]: round(v, 6) for k, v in metrics.items() if k.startswith(prefix)}


def _report(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    return {kind: _flatten(metrics, kind) for kind in ("flat", "quantized")}


# ---------------------------------------------------------------------------------------------------------- train
#: What ``hf-qret train`` needs of the ``train`` extra: (module, the package that installs it).
TRAIN_REQUIREMENTS = (
    ("sentence_transformers", "sentence-transformers"),
    ("datasets", "datasets"),
    ("accelerate", "accelerate"),
    ("yaml", "pyyaml"),
    ("pytrec_eval", "pytrec_eval-terrier"),
    ("matplotlib", "matplotlib"),
)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install, or a module set to None in sys.modules
        return False


def require_train_extra(command: str = "hf-qret train") -> None:
    """Checks, before anything is loaded, that the ``train`` extra is installed (a serving-only install lacks it).

    Raises:
        MissingExtraError: Some of its packages are missing; the message names them and the install command.

    Example:
        >>> require_train_extra()  # with `pip install 'hf-qret[train]'` done, returns None
    """
    missing = [package for module, package in TRAIN_REQUIREMENTS if not _installed(module)]
    if missing:
        raise MissingExtraError(
            f"{command} needs the train extra, and {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
            "installed (serving needs none of it); install it with: pip install 'hf-qret[train]'"
        )


def train_main(argv: list[str] | None = None) -> dict[str, Any]:
    """``hf-qret train CONFIG.yaml|RECIPE [--option value ...]``: the training recipe (:func:`hf_qret.recipe.train_main`),
    once :func:`require_train_extra` has checked that it can run. Returns the recipe's evaluation.

    Example:
        >>> train_main(["recipes/scifact.yaml", "--output_dir", "runs/scifact"])  # doctest: +SKIP
    """
    require_train_extra()
    from .recipe import train_main as run_recipe  # imports the training stack only when it runs

    return run_recipe(argv)


def _push_main(argv: list[str]) -> Any:
    from .hub.cli import push_main

    return push_main(argv)


def _card_main(argv: list[str]) -> Any:
    from .hub.cli import card_main

    return card_main(argv)


# ------------------------------------------------------------------------------------------------------- evaluate
def evaluate_main(argv: list[str] | None = None) -> dict[str, Any]:
    """``hf-qret evaluate OUT --data DIR --split SPLIT [--run-file FILE]``; prints one JSON line.

    Example:
        >>> result = evaluate_main(["runs/scifact", "--data", "recipes/data/scifact"])  # doctest: +SKIP
        {"split": "test", "queries": 300, "bytes_per_vector": 16, "flat": {"ndcg@10": ...}, "quantized": {...}, ...}
    """
    parser = argparse.ArgumentParser(
        prog="hf-qret evaluate",
        description="Evaluate an hf-qret artifact with its flat bank and its quantized index on a BEIR split.",
    )
    parser.add_argument("artifact", help="the --output_dir of a training run (or a Hub model id)")
    parser.add_argument("--data", required=True, help="a BEIR folder with the same corpus as the artifact")
    parser.add_argument("--split", default="test", help="qrels split to evaluate (default: test)")
    parser.add_argument("--run-file", help="write the quantized run here in TREC format")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--seen-qrels", help="training qrels (TSV): adds metrics on queries whose relevant docs were / were not seen"
    )
    args = parser.parse_args(argv)

    from .data import load_beir, load_qrels
    from .errors import DataError
    from .evaluation.evaluator import RetrievalEvaluator
    from .evaluation.metrics import write_trec_run
    from .serving.retriever import QuantizedRetriever

    data = load_beir(args.data, split=args.split)
    retriever = QuantizedRetriever.from_pretrained(args.artifact, load_bank=True)
    artifact_ids = set(retriever.doc_ids)
    # rows from precomputed embeddings (no text; e.g. distractors) are not in the folder's corpus: ranked like any
    # other row, they count as non-relevant (no qrels name them)
    span = retriever.config.get("precomputed_rows") or {}
    start = int(span.get("start", 0))
    precomputed = set(retriever.doc_ids[start : start + int(span.get("count", 0))])
    corpus_ids = set(data.doc_ids)
    missing = [d for d in data.doc_ids if d not in artifact_ids]
    unknown = [d for d in retriever.doc_ids if d not in corpus_ids and d not in precomputed]
    if missing or unknown:
        raise DataError(
            f"{args.data}: its corpus ({len(data.doc_ids)} documents) does not match the artifact's "
            f"({len(artifact_ids)} documents, {len(precomputed)} of them precomputed rows without text; "
            f"{len(missing)} of the folder's ids are not in it, first: {missing[0] if missing else 'n/a'!r}; "
            f"{len(unknown)} of its other ids are not in the folder, first: {unknown[0] if unknown else 'n/a'!r}); "
            "evaluate on the corpus the artifact was built from."
        )
    bank = retriever.files.bank
    if bank is None:
        raise DataError(f"{args.artifact}: the artifact ships no bank, so there is no flat index to evaluate.")
    seen = None
    if args.seen_qrels:
        seen = {d for docs in load_qrels(args.seen_qrels).values() for d, s in docs.items() if s > 0}
    evaluator = RetrievalEvaluator(data.queries, data.qrels, batch_size=args.batch_size, seen_doc_ids=seen)
    runs = evaluator.runs(retriever.model, bank, retriever.index)
    metrics = evaluator.score(runs)
    if args.run_file:
        write_trec_run(runs["quantized"], args.run_file, tag="hf-qret-quantized")
    result: dict[str, Any] = {
        "split": args.split,
        "queries": len(evaluator.query_ids),
        "bytes_per_vector": retriever.bytes_per_vector,
        **_report(metrics),
        "index_factory": retriever.config.get("index_factory"),
        "precomputed_rows": len(precomputed),
    }
    if seen is not None:
        for slice_name in ("seen", "unseen"):
            result[slice_name] = {
                "queries": len(evaluator.slices[slice_name]),
                **{
                    kind: {
                        k[len(kind) + 1 : -len(slice_name) - 1]: round(v, 6)
                        for k, v in metrics.items()
                        if k.startswith(f"{kind}_") and k.endswith(f"_{slice_name}")
                    }
                    for kind in ("flat", "quantized")
                },
            }
        for kind in ("flat", "quantized"):
            result[kind] = {k: v for k, v in result[kind].items() if not k.endswith(("_seen", "_unseen"))}
    print(json.dumps(result))
    return result


# ----------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hf-qret`` console script.

    Example:
        >>> main(["--help"])  # doctest: +ELLIPSIS
        usage: hf-qret {train,evaluate,push,card} ...
        ...
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # Each command imports what it needs when it runs (``train`` checks the train extra first).
    commands = {"train": train_main, "evaluate": evaluate_main, "push": _push_main, "card": _card_main}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(
            "usage: hf-qret {train,evaluate,push,card} ...\n\n"
            "  train     CONFIG.yaml | RECIPE [--option value ...]   train an encoder + bank for a quantized index\n"
            "            (RECIPE: a shipped recipe by name, e.g. scifact; from a wheel pass --data_dir)\n"
            "  evaluate  OUT --data DIR --split SPLIT [--run-file FILE]   flat vs quantized metrics (JSON)\n"
            "  push      OUT --repo-id USER/NAME [--private] [--revision R]   upload the artifact to the Hub\n"
            "  card      OUT [--repo-id USER/NAME]   (re)write the model card README.md",
            file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return run_command(commands[argv[0]], argv[1:])


#: Modules of the ``train`` extra (``pip install 'hf-qret[train]'``); the serving core works without them.
TRAIN_EXTRA_MODULES = ("sentence_transformers", "accelerate", "datasets", "peft", "evaluate", "pytrec_eval", "yaml",
                       "matplotlib")  # fmt: skip


def run_command(command, argv: list[str]) -> int:
    """Runs ``command(argv)``; user errors end with one ``error: ...`` line on stderr and exit status 2 (1 for a
    Hub failure, :class:`~hf_qret.errors.HubError`).

    Example:
        >>> from hf_qret.errors import ConfigError
        >>> def bad_option(argv):
        ...     raise ConfigError("opq_niter must be at least 1, got 0.")
        >>> run_command(bad_option, [])  # prints "error: opq_niter must be at least 1, got 0." on stderr
        2
    """
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        command(argv)
    except QRetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_status
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in TRAIN_EXTRA_MODULES:
            raise
        print(f"error: {exc.name} is not installed; training, evaluation and model cards need the train extra: "
              "pip install 'hf-qret[train]'", file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        _shutdown_process_group()
    return 0


def _shutdown_process_group() -> None:
    """Tears down the ``torch.distributed`` group of a ``torchrun`` / ``accelerate launch`` run, if one is up.

    A gloo group left to the interpreter's exit can abort the process (SIGABRT) while its threads are torn down; a
    clean ``destroy_process_group`` makes every launcher run end with exit status 0.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
