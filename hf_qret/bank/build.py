"""One constructor for a bank, whatever its rows come from: :func:`build_bank` takes what the bank is
(:class:`BankSpec`: its ids, storage dtype, a memory-mapped working file, sharded or not) and where its rows come from
(a source: :class:`EncodeSource` encodes texts, :class:`FileSource` reads a file of rows, :class:`CacheSource` encodes
once and caches the rows keyed by what they depend on).

Under several processes (``torchrun``, ``accelerate launch``) every process calls it at the same point: the texts are
split across the processes (:func:`hf_qret.bank.processes.encode_corpus`), and every file (an init file, the cache, the
memory-mapped working file) is written by one process while the others wait, then open it. A sharded spec gives each
process its :class:`~hf_qret.bank.sharding.ShardedTargetBank`, whose rows are encoded (or read) by that process only.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from .core import TargetBank
from .precomputed import check_texts
from .processes import barrier, encode_corpus, process_rank, world_size

__all__ = ["BankSpec", "EncodeSource", "FileSource", "CacheSource", "BankSource", "build_bank", "CACHE_DIR"]

logger = logging.getLogger(__name__)

#: The bank cache folder under the output folder (``_*`` folders are never pushed to the Hub).
CACHE_DIR = "_qret_cache"

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class BankSpec:
    """What the bank is, whatever its rows come from.

    Args:
        ids: The document ids, in row order.
        dtype: Storage dtype (``"fp32"``, ``"bf16"``, ``"fp16"``).
        dim: The embedding dimension (needed to create ``mmap_path`` before encoding under several processes).
        mmap_path: Keep the bank in this memory-mapped ``.npy`` working file instead of RAM.
        shard: Under several processes (``bank_sharding='rows'``), give each process its own rows only
            (a :class:`~hf_qret.bank.sharding.ShardedTargetBank`); not with ``mmap_path`` or a
            :class:`CacheSource`, nor an :class:`EncodeSource` with an ``init_file`` to write (those need the whole
            bank once, which the trainer then splits).

    Example:
        >>> BankSpec(["d1", "d2"], dtype="bf16").dtype
        'bf16'
    """

    ids: Sequence[str]
    dtype: str = "fp32"
    dim: int | None = None
    mmap_path: PathLike | None = None
    shard: bool = False


@dataclass(frozen=True)
class EncodeSource:
    """Rows encoded now from ``texts`` (each process its share), and written (float32) to ``init_file`` first when
    one is given.

    Args:
        encode: Maps a list of texts to their ``(n, dim)`` embeddings; its ``precision`` attribute (``"fp32"`` /
            ``"bf16"``), when it has one, becomes the bank's ``encode_precision``.
        texts: The document texts, in row order (none may be ``None``: rows without a text cannot be encoded).
        init_file: Write the encoded rows to this file (float32), then keep the bank as read from it.

    Example:
        >>> import numpy as np
        >>> bank = build_bank(BankSpec(["d1"]), EncodeSource(lambda t: np.ones((len(t), 2)), ["a text"]))
        >>> len(bank), bank.dim
        (1, 2)
    """

    encode: Callable[[list[str]], Any]
    texts: Sequence[str | None]
    init_file: PathLike | None = None


@dataclass(frozen=True)
class FileSource:
    """Rows read from a saved file of rows (``.npy`` or safetensors: a bank file, a ``--bank_init_file``).

    Args:
        path: The file.
        precision: How its rows were encoded, when known (the bank's ``encode_precision``; ``None``: not known).

    Example:
        >>> bank = build_bank(BankSpec(ids), FileSource("bank_init.npy", precision="fp32"))  # doctest: +SKIP
    """

    path: PathLike
    precision: str | None = None


@dataclass(frozen=True)
class CacheSource:
    """Rows encoded once and cached in ``cache_dir/_qret_cache/bank_init.npy`` (with ``bank_init.json``, the key): a
    cache of the same ``key`` is read instead of encoding, any other replaced.

    Args:
        encode: As :class:`EncodeSource`'s.
        texts: As :class:`EncodeSource`'s.
        cache_dir: The folder of the cache (the output folder).
        key: What the cached rows depend on (e.g. the documents' digest, the encoder's fingerprint, the precision).

    Example:
        >>> source = CacheSource(encode, texts, "out", {"documents": digest})  # doctest: +SKIP
    """

    encode: Callable[[list[str]], Any]
    texts: Sequence[str | None]
    cache_dir: PathLike
    key: dict[str, Any]


#: Where a bank's rows come from.
BankSource = EncodeSource | FileSource | CacheSource


def build_bank(spec: BankSpec, source: BankSource) -> TargetBank:
    """The bank ``spec`` describes, its rows from ``source``; every process of a run calls it at the same point.

    Its :attr:`~hf_qret.bank.core.TargetBank.encode_precision` records what happened: the ``encode`` function's
    ``precision`` when the rows were encoded now or come from the cache (whose key includes the precision), the
    :class:`FileSource`'s ``precision`` when they were read from a file.

    Raises:
        DataError: An :class:`EncodeSource` has rows without a text.
        ArtifactError: A :class:`FileSource` is unreadable or its rows do not match ``spec.ids``.

    Example:
        >>> import numpy as np
        >>> def encode(texts):
        ...     return np.ones((len(texts), 4))
        >>> encode.precision = "fp32"
        >>> bank = build_bank(BankSpec(["d1", "d2"], dtype="fp16"), EncodeSource(encode, ["a", "b"]))
        >>> len(bank), bank.dtype, bank.encode_precision
        (2, torch.float16, 'fp32')
    """
    if isinstance(source, FileSource):
        bank = _from_file(spec, source.path)
        bank.encode_precision = source.precision
        return bank
    if not isinstance(source, (EncodeSource, CacheSource)):
        raise TypeError(f"build_bank takes an EncodeSource, FileSource or CacheSource, got {type(source).__name__}.")
    if isinstance(source, EncodeSource):  # rows of precomputed embeddings (text None) cannot be encoded
        check_texts(source.texts, spec.ids)
    bank = _from_cache(spec, source) if isinstance(source, CacheSource) else _encoded(spec, source)
    bank.encode_precision = getattr(source.encode, "precision", None)
    return bank


def _sharded(spec: BankSpec) -> bool:
    return spec.shard and world_size() > 1 and spec.mmap_path is None


def _cache_paths(cache_dir: PathLike) -> tuple[Path, Path]:
    folder = Path(cache_dir) / CACHE_DIR
    return folder / "bank_init.npy", folder / "bank_init.json"


def _cache_matches(rows_path: Path, meta_path: Path, key: dict[str, Any]) -> bool:
    if not (rows_path.is_file() and meta_path.is_file()):
        return False
    try:
        return json.loads(meta_path.read_text(encoding="utf-8")) == key
    except (OSError, json.JSONDecodeError):
        return False


def _from_cache(spec: BankSpec, source: CacheSource) -> TargetBank:
    """The cached rows when the key matches; else encoded into the cache, whose key is written last."""
    rows_path, meta_path = _cache_paths(source.cache_dir)
    if _cache_matches(rows_path, meta_path, source.key):
        logger.info("bank: loading the %d encoded documents cached in %s", len(spec.ids), rows_path)
        return _whole_from_file(spec, rows_path)
    bank = _encode_whole(spec, source.encode, source.texts, rows_path)
    if process_rank() == 0:
        meta_tmp = meta_path.with_name(meta_path.name + ".tmp")
        meta_tmp.write_text(json.dumps(source.key) + "\n", encoding="utf-8")
        os.replace(meta_tmp, meta_path)
    return bank


def _from_file(spec: BankSpec, path: PathLike) -> TargetBank:
    """The rows of a saved file: this process's rows of it (sharded), or the whole bank."""
    if not _sharded(spec):
        return _whole_from_file(spec, path)
    from .collectives import ShardLayout
    from .files import read_bank_chunks
    from .sharding import ShardedTargetBank

    shape, _, chunks = read_bank_chunks(Path(path))
    del chunks
    bank = ShardedTargetBank.zeros(ShardLayout.create(len(spec.ids)), shape[1], spec.ids, spec.dtype)
    bank.load_rows_from_file(path)  # chunk by chunk: this process's rows only
    return bank


def _encoded(spec: BankSpec, source: EncodeSource) -> TargetBank:
    """Encoded now: each process's own rows (sharded, nothing to write), else the whole bank."""
    if _sharded(spec) and not source.init_file:
        from .collectives import ShardLayout
        from .sharding import ShardedTargetBank

        rows = encode_corpus(source.encode, source.texts, local=True)  # the whole bank is never in one place
        return ShardedTargetBank(torch.from_numpy(rows), spec.ids, ShardLayout.create(len(spec.ids)), spec.dtype)
    return _encode_whole(spec, source.encode, source.texts, source.init_file)


def _from_main(make: Callable[[], TargetBank], spec: BankSpec) -> TargetBank:
    """``make()`` on the main process (which writes ``spec.mmap_path``); the others open the file it wrote."""
    main = process_rank() == 0
    bank = make() if main else None
    barrier()
    return bank if main else TargetBank.open_mmap(spec.mmap_path, spec.ids, spec.dtype)


def _whole_from_file(spec: BankSpec, path: PathLike) -> TargetBank:
    """The bank read from a file of rows; into one memory-mapped working file written by the main process."""
    ids, dtype, mmap_path = spec.ids, spec.dtype, spec.mmap_path
    if mmap_path is None:
        return TargetBank.from_file(path, ids, dtype=dtype)
    if world_size() == 1:
        return TargetBank.from_file(path, ids, dtype=dtype, mmap_path=mmap_path)
    return _from_main(lambda: TargetBank.from_file(path, ids, dtype=dtype, mmap_path=mmap_path), spec)


def _encode_whole(spec: BankSpec, encode: Any, texts: Sequence[Any], init_file: PathLike | None) -> TargetBank:
    """Encodes ``texts`` once into the whole bank (written to ``init_file`` first, in float32, when given)."""
    ids, dtype, mmap_path = spec.ids, spec.dtype, spec.mmap_path
    if world_size() == 1:  # one process: stream the encoding straight into the bank
        if not init_file:
            return TargetBank.from_encoder(encode, texts, ids, dtype, mmap_path)
        bank = TargetBank.from_encoder(encode, texts, ids)  # the init file keeps float32 rows
        Path(init_file).parent.mkdir(parents=True, exist_ok=True)
        bank.save(init_file)
        if dtype == "fp32" and mmap_path is None:
            return bank
        del bank
        return TargetBank.from_file(init_file, ids, dtype=dtype, mmap_path=mmap_path)
    if not init_file and mmap_path is not None:
        # the main process creates the (sparse, zero) file; each process writes the rows it encoded into it
        bank = _from_main(lambda: TargetBank.create_mmap(mmap_path, len(ids), spec.dim, ids, dtype), spec)
        encode_corpus(encode, texts, write=lambda start, rows: (bank.write_rows(start, rows), bank.flush()))
        bank.mark_all_changed()  # on every process, as with one process
        return bank
    rows = torch.from_numpy(encode_corpus(encode, texts))
    if not init_file:
        return TargetBank(rows, ids, dtype)
    if process_rank() == 0:
        Path(init_file).parent.mkdir(parents=True, exist_ok=True)
        TargetBank(rows, ids).save(init_file)
    barrier()
    if mmap_path is None:
        return TargetBank(rows, ids, dtype)
    del rows
    return _whole_from_file(spec, init_file)
