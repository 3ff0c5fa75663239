"""Bank rows from precomputed embeddings: documents with an id and an embedding but no text (computed elsewhere,
texts that cannot be shipped, distractors). They join the bank after the encoded corpus, train and are served like
any other row (training moves only the rows it touches), and never need a text unless something must encode them
again, which raises one :class:`~hf_qret.errors.DataError` naming the rows.

Files: the rows as ``.npy`` (float32/float16, read memory-mapped) or ``.safetensors`` (key ``embeddings``), and the
ids as a JSON list or a text file of one id per line, in row order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

__all__ = ["PrecomputedRows", "load_precomputed_rows", "write_rows_file", "check_texts"]

#: Rows written per chunk when files are concatenated.
_CHUNK = 65_536


@dataclass
class PrecomputedRows:
    """Precomputed document embeddings and their ids, in row order.

    Attributes:
        rows: ``(n, dim)`` array (a read-only memory map for ``.npy`` files).
        ids: ``n`` unique document ids.

    Example:
        >>> extra = PrecomputedRows(np.zeros((2, 4), dtype=np.float32), ["x1", "x2"])
        >>> len(extra), extra.dim
        (2, 4)
    """

    rows: Any
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        """The embedding dimension."""
        return int(self.rows.shape[1])


def _read_ids(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            ids = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: malformed JSON ({exc.msg}); give a JSON list of document ids.") from None
        if not isinstance(ids, list):
            raise DataError(f"{path}: give a JSON list of document ids.")
        return [str(i) for i in ids]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_rows(path: Path) -> Any:
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False)
    if path.suffix == ".safetensors":
        from .files import read_bank_file

        return read_bank_file(path).float().numpy()
    raise DataError(f"{path}: precomputed rows must be a .npy or .safetensors file (key 'embeddings').")


def load_precomputed_rows(rows_file: str | os.PathLike, ids_file: str | os.PathLike) -> PrecomputedRows:
    """Reads precomputed rows and their ids, checked: one id per row, ids unique and non-empty, a 2-d float array.

    Raises:
        DataError: A file is missing or malformed, or the rows and ids disagree.

    Example:
        >>> extra = load_precomputed_rows("distractors.npy", "distractor_ids.json")  # doctest: +SKIP
        >>> len(extra), extra.dim  # doctest: +SKIP
        (1000000, 384)
    """
    rows_path, ids_path = Path(rows_file), Path(ids_file)
    for path in (rows_path, ids_path):
        if not path.is_file():
            raise DataError(f"{path}: no such file; pass the precomputed rows (.npy/.safetensors) and their ids.")
    rows, ids = _read_rows(rows_path), _read_ids(ids_path)
    if rows.ndim != 2 or not np.issubdtype(rows.dtype, np.floating):
        raise DataError(f"{rows_path}: expected a 2-d float array of embeddings, got {rows.dtype} {rows.shape}.")
    if rows.shape[0] != len(ids):
        raise DataError(
            f"{rows_path} has {rows.shape[0]} rows but {ids_path} lists {len(ids)} ids; give one id per row."
        )
    if any(not i for i in ids):
        raise DataError(f"{ids_path}: document ids must be non-empty.")
    if len(set(ids)) != len(ids):
        raise DataError(f"{ids_path}: the ids are not unique; every row needs its own document id.")
    return PrecomputedRows(rows, ids)


def write_rows_file(path: str | os.PathLike, parts: Sequence[Any]) -> Path:
    """Writes the rows of ``parts`` (arrays or tensors of one dimension), one after the other, as one float32
    safetensors bank file (key ``embeddings``), chunk by chunk: a million precomputed rows are never copied whole.
    Written to a temporary name, then renamed.

    Example:
        >>> write_rows_file("out/bank_init.tmp.all.safetensors", [corpus_rows, extra.rows])  # doctest: +SKIP
        PosixPath('out/bank_init.tmp.all.safetensors')
    """
    import torch

    from .files import write_safetensors_header

    path = Path(path)
    dims = {int(part.shape[1]) for part in parts}
    if len(dims) != 1:
        raise DataError(f"the bank's rows have different dimensions {sorted(dims)}; give rows of one model.")
    total = sum(int(part.shape[0]) for part in parts)
    dim = dims.pop()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        write_safetensors_header(handle, torch.float32, [total, dim], total * dim * 4)
        for part in parts:
            for start in range(0, int(part.shape[0]), _CHUNK):
                chunk = part[start : start + _CHUNK]
                chunk = chunk.numpy() if hasattr(chunk, "numpy") else np.asarray(chunk)
                handle.write(np.ascontiguousarray(chunk, dtype=np.float32).tobytes())
    os.replace(tmp, path)
    return path


def check_texts(texts: Sequence[str | None], ids: Sequence[str], what: str = "the bank") -> None:
    """Raises one :class:`DataError` when rows that must be encoded have no text (rows from precomputed
    embeddings, whose texts ``None``).

    Example:
        >>> check_texts(["a text"], ["d1"])  # every row has a text: nothing happens
    """
    missing = [doc_id for doc_id, text in zip(ids, texts) if text is None]
    if missing:
        raise DataError(
            f"{len(missing)} row(s) have no text (first: {missing[0]!r}), so {what} cannot encode them: they come "
            "from precomputed embeddings. Keep their rows (--extra_rows_file / --extra_ids_file, or a "
            "--bank_init_file that holds them) or give their texts in the corpus."
        )
