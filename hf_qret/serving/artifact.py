"""The on-disk artifact: a sentence-transformers model folder plus the quantized index, the doc-id map, the bank and a
JSON config of how they were built.

Layout of ``OUT/``::

    OUT/
      config.json, model.safetensors, modules.json, ...   # the query encoder (SentenceTransformer(OUT) loads it)
      index.faiss                                         # the quantized index over the trained bank
      doc_ids.json                                        # row -> document id
      bank.safetensors                                    # the trained bank (key "embeddings")
      qret_config.json                                    # how the index and bank were built
      document_encoder/                                   # the encoder the bank was built with (add_documents)

The files written here (index, doc-id map, bank, config) go to a temporary name and are renamed into place; the
encoder's own files are written in place by its ``save_pretrained``. Loading never unpickles anything.

What belongs to an artifact, and what never does (checkpoints, training state, pickles, working files such as the
memory-mapped bank), is this module's manifest: :data:`ARTIFACT_IGNORE_PATTERNS`, :func:`artifact_files`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bank.core import TargetBank
from ..errors import ArtifactError
from ..index.core import QuantizedIndex

__all__ = [
    "ARTIFACT_IGNORE_PATTERNS",
    "TRAINING_STATE_NAMES",
    "is_artifact_file",
    "artifact_files",
    "copy_artifact_files",
    "INDEX_NAME",
    "DOC_IDS_NAME",
    "BANK_NAME",
    "CONFIG_NAME",
    "DOCUMENT_ENCODER_DIR",
    "write_json",
    "save_document_encoder",
    "save_retrieval_files",
    "load_retrieval_files",
    "resolve_artifact",
    "HubSource",
    "SERVING_IGNORE_PATTERNS",
    "fetch_artifact_part",
    "hub_source_of",
    "check_encoder_files",
    "load_shipped_corpus",
    "CORPUS_NAMES",
    "PICKLE_PATTERNS",
    "RetrievalFiles",
]

INDEX_NAME = "index.faiss"
DOC_IDS_NAME = "doc_ids.json"
BANK_NAME = "bank.safetensors"
CONFIG_NAME = "qret_config.json"
#: Subfolder holding the (pretrained) encoder the bank's rows were computed with: new documents are encoded with it.
DOCUMENT_ENCODER_DIR = "document_encoder"
#: Where an artifact may ship its document texts (BEIR ``{"_id", "title", "text"}`` lines).
CORPUS_NAMES = ("corpus.jsonl", "corpus.jsonl.gz")
_ENCODER_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
FORMAT_VERSION = 1

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
TRAINING_STATE_NAMES: tuple[str, ...] = (
    BANK_OPTIMIZER_NAME,
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


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Writes JSON atomically (temp file, then rename).

    Example:
        >>> write_json({"index_factory": "OPQ16,PQ16"}, "out/qret_config.json")  # doctest: +SKIP
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ArtifactError(f"{path}: missing {what}; the folder is not a complete hf-qret artifact.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: corrupt {what} ({exc}); re-create the artifact.") from None


def save_retrieval_files(
    output_dir: str | os.PathLike,
    bank: TargetBank,
    index: QuantizedIndex,
    extra_config: dict[str, Any] | None = None,
    save_bank: bool = True,
) -> None:
    """Writes the index, doc-id map, bank and ``qret_config.json`` next to a saved encoder.

    The index goes last, so a folder with an ``index.faiss`` has everything else too.

    Example:
        >>> save_retrieval_files("out", trainer.bank, trainer.served_index())  # doctest: +SKIP
    """
    from .._version import __version__

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if index.ntotal != len(bank):
        raise ArtifactError(
            f"the index holds {index.ntotal} vectors but the bank has {len(bank)} rows; refresh the index first."
        )
    config = {
        "format_version": FORMAT_VERSION,
        "hf_qret_version": __version__,
        "index_factory": index.factory,
        "index_search_params": index.search_params,
        "metric": "inner_product",
        "dim": bank.dim,
        "num_vectors": len(bank),
        "bytes_per_vector": index.bytes_per_vector,
        "index_file": INDEX_NAME,
        "doc_ids_file": DOC_IDS_NAME,
        "bank_file": BANK_NAME if save_bank else None,
    }
    if (output_dir / DOCUMENT_ENCODER_DIR / "modules.json").is_file():
        config["document_encoder"] = DOCUMENT_ENCODER_DIR
    config.update(extra_config or {})
    if config.get("pooling") and (output_dir / "config.json").is_file():
        # a plain transformers encoder: saved with the modules of its pooling and normalisation, so that
        # SentenceTransformer(OUT) embeds as it was trained and served
        from .sentence_encoder import write_sentence_transformer_modules

        write_sentence_transformer_modules(
            output_dir, config["pooling"], config.get("normalize", True) is not False, config.get("max_seq_length")
        )
    write_json(bank.doc_ids if isinstance(bank.doc_ids, list) else list(bank.doc_ids), output_dir / DOC_IDS_NAME)
    if save_bank:
        bank.save(output_dir / BANK_NAME)
    write_json(config, output_dir / CONFIG_NAME)
    index.save(output_dir / INDEX_NAME)


def save_document_encoder(output_dir: str | os.PathLike, model: Any) -> Path:
    """Saves the encoder the bank was built with into ``output_dir/document_encoder/``, so the artifact can encode
    new documents offline (:meth:`hf_qret.serving.retriever.QuantizedRetriever.add_documents`).

    Call it before training changes the model (the recipe does): the bank's rows that training did not move (every
    document that is not a training positive, under ``bank_update: positives``) are exactly this encoder's
    embeddings. ``qret_config.json`` records the folder when
    the artifact is saved. The folder is written under a temporary name and renamed into place. A cosine
    sentence-transformers model without a ``Normalize`` module gets one first (:func:`hf_qret.serving.encoder.configure_encoder`,
    what the trainer does too), so the saved encoder returns the unit vectors the bank holds.

    Args:
        output_dir: The artifact folder (the training run's ``output_dir``).
        model: A ``SentenceTransformer`` (or any model with ``save_pretrained``).

    Returns:
        The ``document_encoder`` folder.

    Example:
        >>> save_document_encoder("runs/api", model)  # before trainer.train()  # doctest: +SKIP
        PosixPath('runs/api/document_encoder')
    """
    import shutil

    from .encoder import configure_encoder

    configure_encoder(model)  # a cosine model gets its Normalize module first, as training gives it one
    target = Path(output_dir) / DOCUMENT_ENCODER_DIR
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"_{DOCUMENT_ENCODER_DIR}.tmp")  # "_*" is never pushed
    shutil.rmtree(tmp, ignore_errors=True)
    save = getattr(model, "save_pretrained", None)
    if save is None:
        raise TypeError(f"cannot save a {type(model).__name__} as the document encoder; pass a SentenceTransformer.")
    save(str(tmp))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


@dataclass
class RetrievalFiles:
    """What :func:`load_retrieval_files` returns.

    Example:
        >>> files = load_retrieval_files("out")  # doctest: +SKIP
        >>> files.index.ntotal == len(files.doc_ids), files.bank is None  # doctest: +SKIP
        (True, True)
    """

    config: dict[str, Any]
    doc_ids: list[str]
    index: QuantizedIndex
    bank: TargetBank | None


def load_retrieval_files(folder: str | os.PathLike, load_bank: bool = False) -> RetrievalFiles:
    """Reads and cross-checks an artifact's index, doc-id map (and bank).

    Raises:
        ArtifactError: A file is missing or corrupt, or the index size, doc-id map and bank disagree.

    Example:
        >>> load_retrieval_files("out", load_bank=True).config["index_factory"]  # doctest: +SKIP
        'OPQ16,PQ16'
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such artifact folder; pass the --output_dir of a training run.")
    config = _read_json(folder / CONFIG_NAME, "qret_config.json")
    doc_ids = _read_json(folder / config.get("doc_ids_file", DOC_IDS_NAME), "doc-id map")
    if not isinstance(doc_ids, list) or not all(isinstance(d, str) for d in doc_ids):
        raise ArtifactError(f"{folder / DOC_IDS_NAME}: the doc-id map must be a JSON list of strings.")
    if len(set(doc_ids)) != len(doc_ids):
        raise ArtifactError(f"{folder / DOC_IDS_NAME}: the doc-id map has duplicate ids; re-create the artifact.")
    index = QuantizedIndex.load(
        folder / config.get("index_file", INDEX_NAME), config.get("index_factory"), config.get("index_search_params")
    )
    index.normalize_decoded = bool(config.get("normalize_decoded", False))
    if index.ntotal != len(doc_ids):
        raise ArtifactError(
            f"{folder}: the index holds {index.ntotal} vectors but the doc-id map lists {len(doc_ids)} documents; "
            "the artifact is inconsistent, re-create it."
        )
    if config.get("dim") is not None and index.dim != int(config["dim"]):
        raise ArtifactError(f"{folder}: the index has dimension {index.dim}, the config says {config['dim']}.")
    bank = None
    if load_bank and config.get("bank_file"):
        if not (folder / config["bank_file"]).is_file():
            raise ArtifactError(
                f"{folder}: {CONFIG_NAME} records the bank {config['bank_file']} but the folder lacks it; copy or "
                "download the whole artifact, or load it with load_bank=False to serve without the bank."
            )
        bank = TargetBank.from_file(folder / config["bank_file"], doc_ids)
    return RetrievalFiles(config=config, doc_ids=doc_ids, index=index, bank=bank)


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


def check_encoder_files(folder: Path) -> None:
    """Refuses an artifact whose encoder is missing or has only pickled weights (never loaded).

    Example:
        >>> check_encoder_files(Path("out"))  # doctest: +SKIP
    """
    if not any((folder / name).is_file() for name in ("modules.json", "config.json", "adapter_config.json")):
        raise ArtifactError(f"{folder}: no encoder (modules.json / config.json); the artifact is incomplete.")
    has_safetensors = any((folder / name).is_file() for name in _ENCODER_WEIGHTS) or any(
        folder.glob("*/model.safetensors")
    )
    if not has_safetensors:
        raise ArtifactError(
            f"{folder}: the encoder has no safetensors weights; hf-qret never loads pickled weights "
            "(pytorch_model.bin). Re-save the model with safe_serialization=True."
        )


def load_shipped_corpus(folder: Path, doc_ids: Sequence[str]) -> dict[str, str] | None:
    """The document texts an artifact ships (``corpus.jsonl[.gz]``), checked against its doc ids; ``None`` if none.

    Example:
        >>> load_shipped_corpus(Path("out"), files.doc_ids)["d1"]  # doctest: +SKIP
        'Cats purr. They do it when content.'
    """
    from ..data import _read_jsonl, doc_text

    path = next((folder / name for name in CORPUS_NAMES if (folder / name).is_file()), None)
    if path is None:
        return None
    known = set(doc_ids)
    corpus: dict[str, str] = {}
    try:
        for line_no, record in _read_jsonl(path):
            doc_id = str(record["_id"])
            if doc_id not in known:
                raise ArtifactError(
                    f"{path}:{line_no}: document {doc_id!r} is not in doc_ids.json; the shipped corpus belongs to "
                    "another index, re-create the artifact."
                )
            corpus[doc_id] = doc_text(record)
    except ArtifactError:
        raise
    except Exception as exc:  # DataError from a malformed line
        raise ArtifactError(f"{path}: unreadable corpus ({exc}); delete it or re-create the artifact.") from None
    return corpus
