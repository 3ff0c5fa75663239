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
memory-mapped bank), is the manifest of :mod:`hf_qret.serving.manifest` (:data:`ARTIFACT_IGNORE_PATTERNS`,
:func:`artifact_files`), re-exported here with the file names; a Hub download is :mod:`hf_qret.serving.download`.
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
    "RAW_BANK_NAME",
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

from .download import SERVING_IGNORE_PATTERNS, HubSource, fetch_artifact_part, hub_source_of, resolve_artifact
from .manifest import (  # noqa: F401  the file names and the manifest, re-exported: this module held them before
    ANCHORS_NAME,
    ARTIFACT_IGNORE_PATTERNS,
    BANK_INIT_SCRATCH_NAME,
    BANK_NAME,
    BANK_OPTIMIZER_NAME,
    CHECKPOINT_PATTERNS,
    CONFIG_NAME,
    CORPUS_NAMES,
    DOC_IDS_NAME,
    DOCUMENT_ENCODER_DIR,
    INDEX_NAME,
    INITIAL_MMAP_NAME,
    LOSS_OPTIMIZER_NAME,
    MINING_INDEX_NAME,
    MMAP_BANK_NAME,
    PICKLE_PATTERNS,
    PRECOMPUTED_INIT_NAME,
    RAW_BANK_NAME,
    REFRESH_STATE_NAME,
    SHORTLIST_NAME,
    TRAINER_STATE_PATTERNS,
    TRAINING_STATE_NAMES,
    WORKING_FILE_PATTERNS,
    artifact_files,
    copy_artifact_files,
    is_artifact_file,
)

_ENCODER_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
FORMAT_VERSION = 1


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
