"""What an artifact folder holds and what never belongs to one: the retrieval files' names and the manifest
(:data:`ARTIFACT_IGNORE_PATTERNS`, :func:`is_artifact_file`, :func:`artifact_files`, :func:`copy_artifact_files`).
:mod:`hf_qret.serving.artifact` re-exports every name.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ArtifactError

__all__ = [
    "INDEX_NAME",
    "DOC_IDS_NAME",
    "BANK_NAME",
    "CONFIG_NAME",
    "DOCUMENT_ENCODER_DIR",
    "CORPUS_NAMES",
    "BANK_OPTIMIZER_NAME",
    "LOSS_OPTIMIZER_NAME",
    "ANCHORS_NAME",
    "MINING_INDEX_NAME",
    "SHORTLIST_NAME",
    "REFRESH_STATE_NAME",
    "RAW_BANK_NAME",
    "TRAINING_STATE_NAMES",
    "TRAINER_STATE_PATTERNS",
    "PICKLE_PATTERNS",
    "CHECKPOINT_PATTERNS",
    "MMAP_BANK_NAME",
    "INITIAL_MMAP_NAME",
    "BANK_INIT_SCRATCH_NAME",
    "PRECOMPUTED_INIT_NAME",
    "WORKING_FILE_PATTERNS",
    "ARTIFACT_IGNORE_PATTERNS",
    "is_artifact_file",
    "artifact_files",
    "copy_artifact_files",
]

INDEX_NAME = "index.faiss"
DOC_IDS_NAME = "doc_ids.json"
BANK_NAME = "bank.safetensors"
CONFIG_NAME = "qret_config.json"
#: Subfolder holding the (pretrained) encoder the bank's rows were computed with: new documents are encoded with it.
DOCUMENT_ENCODER_DIR = "document_encoder"
#: Where an artifact may ship its document texts (BEIR ``{"_id", "title", "text"}`` lines).
CORPUS_NAMES = ("corpus.jsonl", "corpus.jsonl.gz")

# ------------------------------------------------------------------------------------------- the artifact manifest
# An artifact folder is everything under it except what the patterns below match (``fnmatch`` on the relative POSIX
# path, ``*`` crossing ``/``, as ``huggingface_hub`` matches them): the encoder's own files (whatever its
# ``save_pretrained`` writes), the retrieval files above, ``document_encoder/``, the shipped corpus and the model card.
# Every path that writes, copies, pushes or downloads an artifact applies them: ``hf_qret.hub`` (``push_artifact``,
# ``PushToHubCallback``, ``hf-qret push``), ``QRetTrainer.push_to_hub`` and its mid-training pushes,
# ``copy_artifact_files`` and ``QuantizedRetriever.save_pretrained`` / ``push_to_hub`` / ``from_pretrained``.

#: hf-qret's own training state in a checkpoint (:mod:`hf_qret.training.checkpoint` writes them).
BANK_OPTIMIZER_NAME = "bank_optimizer.safetensors"
LOSS_OPTIMIZER_NAME = "loss_optimizer.safetensors"
ANCHORS_NAME = "bank_anchors.safetensors"
MINING_INDEX_NAME = "mining_index.faiss"
SHORTLIST_NAME = "mining_shortlist.faiss"
REFRESH_STATE_NAME = "index_refresh_state.json"
#: The bank's rows before a pending document adapter (the artifact's ``bank.safetensors`` holds the adapted rows).
RAW_BANK_NAME = "bank_before_adapter.safetensors"
TRAINING_STATE_NAMES: tuple[str, ...] = (
    BANK_OPTIMIZER_NAME,
    RAW_BANK_NAME,
    LOSS_OPTIMIZER_NAME,
    ANCHORS_NAME,
    "values." + ANCHORS_NAME,
    MINING_INDEX_NAME,
    SHORTLIST_NAME,
    REFRESH_STATE_NAME,
    # bank_sharding='rows': each process's part (bank-shard-0-of-2.safetensors, mining_index-shard-0-of-2.faiss...)
    "*-shard-*-of-*.safetensors",
    "*-shard-*-of-*.faiss",
)
#: The base ``Trainer``'s checkpoint state (``training_args.bin`` is matched by :data:`PICKLE_PATTERNS`).
TRAINER_STATE_PATTERNS: tuple[str, ...] = (
    "trainer_state.json",
    "optimizer.*",
    "scheduler.*",
    "scaler.*",
    "rng_state*",
    "global_step*",
)
#: Pickled files: never pushed, copied or downloaded (hf-qret never unpickles anything).
PICKLE_PATTERNS: tuple[str, ...] = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")
#: Checkpoint folders of a run (their artifact files are pushed from the output folder, not from there).
CHECKPOINT_PATTERNS: tuple[str, ...] = ("checkpoint-*", "last-checkpoint", "last-checkpoint/*")
#: The memory-mapped working copy of the bank (``--bank_mmap``) and of its initial rows, under ``--output_dir``.
MMAP_BANK_NAME = "bank_mmap.npy"
INITIAL_MMAP_NAME = "bank_initial_mmap.npy"
#: Where the recipe writes the encoded corpus before it becomes the bank.
BANK_INIT_SCRATCH_NAME = "bank_init.tmp.safetensors"
#: Where the recipe joins the corpus's rows and the precomputed ones (``--extra_rows_file``) for the run.
PRECOMPUTED_INIT_NAME = "bank_init.tmp.precomputed.safetensors"
#: Working files: memory-mapped banks (gigabytes, written while training), files being written (``*.tmp``),
#: staging folders (``_*``: ``_staging-checkpoint-N``, ``_document_encoder.tmp``), hidden folders and logs.
WORKING_FILE_PATTERNS: tuple[str, ...] = (
    "bank_mmap*.npy",
    INITIAL_MMAP_NAME,
    "bank_init.tmp*",
    "*.tmp",
    "_*",
    ".*",
    "runs/*",
)
#: Everything that is not part of an artifact: never pushed, copied, or read back from a download.
ARTIFACT_IGNORE_PATTERNS: tuple[str, ...] = (
    *CHECKPOINT_PATTERNS,
    *TRAINER_STATE_PATTERNS,
    *TRAINING_STATE_NAMES,
    *PICKLE_PATTERNS,
    *WORKING_FILE_PATTERNS,
)


def is_artifact_file(path: str) -> bool:
    """Whether the file at ``path`` (relative to the artifact folder, ``/``-separated) belongs to the artifact.

    Example:
        >>> is_artifact_file("index.faiss"), is_artifact_file("bank_mmap.npy"), is_artifact_file("training_args.bin")
        (True, False, False)
    """
    from fnmatch import fnmatch

    return not any(fnmatch(path, pattern) for pattern in ARTIFACT_IGNORE_PATTERNS)


def artifact_files(folder: str | os.PathLike) -> list[str]:
    """The files of the artifact in ``folder``: relative POSIX paths, sorted, without :data:`ARTIFACT_IGNORE_PATTERNS`.

    Example:
        >>> artifact_files("runs/scifact")  # doctest: +SKIP
        ['1_Pooling/config.json', 'README.md', 'bank.safetensors', 'config.json', 'doc_ids.json', 'index.faiss', ...]
    """
    root = Path(folder)
    paths = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return sorted(path for path in paths if is_artifact_file(path))


def copy_artifact_files(source: str | os.PathLike, target: str | os.PathLike) -> list[str]:
    """Copies the artifact in ``source`` (a checkpoint or an artifact folder) into ``target``: the files of
    :func:`artifact_files`, each to a temporary name renamed into place. Returns the copied paths.

    Example:
        >>> copy_artifact_files("runs/scifact/checkpoint-500", "runs/scifact")  # doctest: +SKIP
        ['1_Pooling/config.json', 'bank.safetensors', 'config.json', 'doc_ids.json', 'index.faiss', ...]
    """
    import shutil

    source, target = Path(source), Path(target)
    if not source.is_dir():
        raise ArtifactError(f"{source}: no such artifact folder; pass the --output_dir of a training run.")
    names = artifact_files(source)
    for name in names:
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        tmp = destination.with_name(destination.name + ".tmp")
        shutil.copyfile(source / name, tmp)
        os.replace(tmp, destination)
    return names
