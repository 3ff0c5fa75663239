"""The on-disk artifact: a sentence-transformers model folder plus the quantized index, the doc-id map, the bank and a
JSON config of how they were built.

Layout of ``OUT/``::

    OUT/
      config.json, model.safetensors, modules.json, ...   # the query encoder (SentenceTransformer(OUT) loads it)
      index.faiss                                         # the quantized index over the trained bank
      doc_ids.json                                        # row -> document id
      bank.safetensors                                    # the trained bank (key "embeddings")
      qret_config.json                                    # how the index and bank were built

The files written here (index, doc-id map, bank, config) go to a temporary name and are renamed into place; the
encoder's own files are written in place by its ``save_pretrained``. Loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bank import TargetBank
from .errors import ArtifactError
from .index import QuantizedIndex

__all__ = [
    "INDEX_NAME",
    "DOC_IDS_NAME",
    "BANK_NAME",
    "CONFIG_NAME",
    "write_json",
    "save_retrieval_files",
    "load_retrieval_files",
    "RetrievalFiles",
]

INDEX_NAME = "index.faiss"
DOC_IDS_NAME = "doc_ids.json"
BANK_NAME = "bank.safetensors"
CONFIG_NAME = "qret_config.json"
FORMAT_VERSION = 1


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Writes JSON atomically (temp file, then rename)."""
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
    """
    from . import __version__

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
    config.update(extra_config or {})
    write_json(bank.doc_ids if isinstance(bank.doc_ids, list) else list(bank.doc_ids), output_dir / DOC_IDS_NAME)
    if save_bank:
        bank.save(output_dir / BANK_NAME)
    write_json(config, output_dir / CONFIG_NAME)
    index.save(output_dir / INDEX_NAME)


@dataclass
class RetrievalFiles:
    """What :func:`load_retrieval_files` returns."""

    config: dict[str, Any]
    doc_ids: list[str]
    index: QuantizedIndex
    bank: TargetBank | None


def load_retrieval_files(folder: str | os.PathLike, load_bank: bool = False) -> RetrievalFiles:
    """Reads and cross-checks an artifact's index, doc-id map (and bank).

    Raises:
        ArtifactError: A file is missing or corrupt, or the index size, doc-id map and bank disagree.
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
    if index.ntotal != len(doc_ids):
        raise ArtifactError(
            f"{folder}: the index holds {index.ntotal} vectors but the doc-id map lists {len(doc_ids)} documents; "
            "the artifact is inconsistent, re-create it."
        )
    if config.get("dim") is not None and index.dim != int(config["dim"]):
        raise ArtifactError(f"{folder}: the index has dimension {index.dim}, the config says {config['dim']}.")
    bank = None
    if load_bank and config.get("bank_file"):
        bank = TargetBank.from_file(folder / config["bank_file"], doc_ids)
    return RetrievalFiles(config=config, doc_ids=doc_ids, index=index, bank=bank)
