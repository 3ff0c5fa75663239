"""``QRetTrainer`` with the bank and the index split across processes by rows (``bank_sharding='rows'``).

Each process holds a :class:`~hf_qret.bank.sharding.ShardedTargetBank` (its rows and their optimizer state) and a
:class:`~hf_qret.index.sharding.ShardedIndex` (the index over them). The trainer runs as in the replicated mode;
what differs lives here: turning the bank and index into shards, and saving and resuming them.

- The artifact (``save_model``, every checkpoint's artifact files) is one ``index.faiss`` and one
  ``bank.safetensors`` over the whole corpus, assembled on the main process: serving never needs the training
  topology.
- A checkpoint also holds each shard's training state: ``bank-shard-R-of-N.safetensors`` (its rows),
  ``bank_optimizer-shard-R-of-N.safetensors`` (their optimizer state and changed rows),
  ``bank_anchors-shard-R-of-N.safetensors`` (their norms, with ``bank_keep_norm``) and
  ``mining_index-shard-R-of-N.faiss`` (the index the shard mines from). It resumes on ``N`` processes only
  (:func:`check_shard_checkpoint` says so otherwise).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..bank.collectives import ShardLayout, check_every_process
from ..bank.sharding import ShardedTargetBank
from ..errors import ConfigError
from ..index.core import QuantizedIndex
from ..index.sharding import ShardedIndex
from ..serving.artifact import BANK_NAME, LOSS_OPTIMIZER_NAME, REFRESH_STATE_NAME, save_retrieval_files, write_json
from .checkpoint import CHANGED_ROWS_KEY, _load_tensors, _save_tensors, _write_faiss, load_refresh_state

if TYPE_CHECKING:
    from ..bank.core import TargetBank

__all__ = [
    "shard_for_training",
    "is_sharded",
    "require_every_process",
    "shard_file",
    "check_shard_checkpoint",
    "save_sharded_retrieval_files",
    "save_shard_state",
    "load_shard_state",
    "load_shard_optimizer",
]

logger = logging.getLogger(__name__)

_SHARD_FILE = re.compile(r"^bank-shard-(\d+)-of-(\d+)\.safetensors$")


def shard_file(name: str, layout: ShardLayout, suffix: str = ".safetensors") -> str:
    """The file name of shard ``layout.rank``'s part of ``name`` in a checkpoint.

    Example:
        >>> shard_file("bank", ShardLayout(count=10, world=2, rank=1))
        'bank-shard-1-of-2.safetensors'
    """
    return f"{name}-shard-{layout.rank}-of-{layout.world}{suffix}"


def is_sharded(bank: Any) -> bool:
    """Whether ``bank`` is one process's shard (``bank_sharding='rows'`` under several processes).

    Example:
        >>> import torch
        >>> from hf_qret.bank.core import TargetBank
        >>> is_sharded(TargetBank(torch.zeros(2, 4), ["a", "b"]))
        False
    """
    return isinstance(bank, ShardedTargetBank)


def require_every_process(trainer: Any, call: str) -> None:
    """In a sharded run, waits until every process has reached ``call`` (``evaluate()``, ``save_model()``: their
    collectives need all of them) and raises a clear error after ``args.ddp_timeout`` seconds instead of hanging.

    Raises:
        CollectiveCallError: Some process did not call ``call`` (:func:`~hf_qret.bank.collectives.check_every_process`).

    Example:
        >>> require_every_process(trainer, "evaluate()")  # doctest: +SKIP
    """
    if is_sharded(trainer.bank):
        check_every_process(trainer.bank.shard, call, trainer.args.ddp_timeout)


def shard_for_training(bank: TargetBank, index: QuantizedIndex, args: Any) -> tuple[TargetBank, QuantizedIndex]:
    """The bank and the index a trainer with ``args`` trains: unchanged unless ``args.bank_sharding == 'rows'``
    under several processes, where each process keeps its shard of the bank and an empty sharded index with the same
    settings (a collective: every process calls it at the same point).

    Raises:
        ConfigError: The bank is memory mapped, has fewer rows than processes, or the index is already built.

    Example:
        >>> bank, index = shard_for_training(bank, index, args)  # under torchrun  # doctest: +SKIP
    """
    if args.bank_sharding != "rows":
        return bank, index
    world = args.world_size
    if world == 1:
        logger.info("bank_sharding='rows' with one process: nothing to split, the bank and the index stay whole")
        return bank, index
    if bank.is_mmap:
        raise ConfigError(
            "bank_sharding='rows' keeps each process's rows in its own memory; it does not take a memory-mapped bank "
            "(--bank_mmap): turn one of them off."
        )
    if len(bank) < world:
        raise ConfigError(
            f"bank_sharding='rows' needs at least one row per process: {len(bank)} rows, {world} processes."
        )
    if is_sharded(bank):
        layout = bank.shard
    else:
        layout = ShardLayout.create(len(bank))
        bank = ShardedTargetBank.from_bank(bank, layout)
    logger.info(
        "bank_sharding='rows': process %d of %d holds rows %d-%d of %d", layout.rank, world, layout.start, layout.end,
        layout.count,
    )  # fmt: skip
    if isinstance(index, ShardedIndex):
        return bank, index
    if index.local_ntotal:
        raise ConfigError(
            "bank_sharding='rows' builds its own index over each process's rows; pass an empty index= (or none)."
        )
    sharded = ShardedIndex(
        bank.dim,
        index.requested_factory,
        layout,
        search_params=index.search_params,
        opq_niter=index.opq_niter,
        rq_beam_size=index.rq_beam_size,
        normalize_decoded=index.normalize_decoded,
    )
    return bank, sharded


def check_shard_checkpoint(folder: str | os.PathLike, layout: ShardLayout | None) -> None:
    """Refuses to resume ``folder`` with another sharding than the one that wrote it (``layout``: this run's;
    ``None``: a run whose bank is not sharded), saying what to do.

    Raises:
        ConfigError: The checkpoint's number of processes (or its sharding) differs from this run's.

    Example:
        >>> check_shard_checkpoint("out/checkpoint-10", ShardLayout(count=10, world=2, rank=0))  # doctest: +SKIP
    """
    folder = Path(folder)
    worlds = sorted({int(m.group(2)) for p in folder.glob("bank-shard-*") if (m := _SHARD_FILE.match(p.name))})
    written = worlds[0] if worlds else None
    if layout is None:
        if written is not None:
            raise ConfigError(
                f"{folder} was written by {written} processes with bank_sharding='rows'; resume it with "
                f"--bank_sharding rows on {written} processes (torchrun --nproc_per_node {written})."
            )
        return
    if written is None:
        raise ConfigError(
            f"{folder} was written without bank_sharding='rows' (it has no bank-shard-* files); resume it with "
            "--bank_sharding none, or start a new sharded run."
        )
    if written != layout.world:
        raise ConfigError(
            f"{folder} was written by {written} processes with bank_sharding='rows' but this run has "
            f"{layout.world}: each process resumes its own shard, so resume with {written} processes "
            f"(torchrun --nproc_per_node {written}), or start a new run."
        )


def save_sharded_retrieval_files(
    output_dir: str | os.PathLike, bank: ShardedTargetBank, index: ShardedIndex, config: dict[str, Any]
) -> None:
    """Writes the artifact's retrieval files over the whole corpus from the shards: ``bank.safetensors`` streamed
    in row order and one ``index.faiss`` assembled (:meth:`ShardedIndex.assemble`) by process 0, plus the doc ids
    and ``qret_config.json`` (a collective).

    Example:
        >>> save_sharded_retrieval_files("out", trainer.bank, trainer.served_index(), trainer.artifact_config())  # doctest: +SKIP
    """
    output_dir = Path(output_dir)
    if bank.shard.rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
    assembled_bank = bank.assemble_file(output_dir / BANK_NAME)
    assembled_index = index.assemble()
    if assembled_bank is not None:
        config = {**config, "bank_sharding": {"processes": bank.shard.world}}
        save_retrieval_files(output_dir, assembled_bank, assembled_index, config)


def save_shard_state(folder: str | os.PathLike, trainer: Any) -> None:
    """Writes this process's shard of a checkpoint's training state into ``folder`` (every process; see the module
    docstring), and the state every process shares (the refresh schedule, the loss's own state) from process 0.

    Example:
        >>> save_shard_state("out/checkpoint-10", trainer)  # doctest: +SKIP
    """
    folder = Path(folder)
    bank, layout = trainer.bank, trainer.bank.shard
    folder.mkdir(parents=True, exist_ok=True)
    bank.save_shard(folder / shard_file("bank", layout))
    state = dict(trainer.bank_optimizer.state_dict())
    state[CHANGED_ROWS_KEY] = torch.from_numpy(bank.local_changed_rows())
    _save_tensors(folder / shard_file("bank_optimizer", layout), state)
    if trainer.bank_optimizer.keep_norms is not None:
        _save_tensors(folder / shard_file("bank_anchors", layout), {"norms": trainer.bank_optimizer.keep_norms})
    _write_faiss(trainer.index.faiss, trainer.index.index, folder / shard_file("mining_index", layout, ".faiss"))
    if layout.rank == 0:
        write_json(trainer.refresh_callback.state_dict(), folder / REFRESH_STATE_NAME)
        loss_state = trainer.loss.optimizer_state()
        if loss_state:
            _save_tensors(folder / LOSS_OPTIMIZER_NAME, loss_state)


def load_shard_state(folder: str | os.PathLike, trainer: Any) -> None:
    """Resumes this process's shard from a checkpoint of :func:`save_shard_state`: its rows, the index it mined
    from, the refresh schedule and the drift-control anchors (the optimizer state: :func:`load_shard_optimizer`).

    Raises:
        ConfigError: The checkpoint was written by another number of processes (:func:`check_shard_checkpoint`).

    Example:
        >>> load_shard_state("out/checkpoint-10", trainer)  # every process  # doctest: +SKIP
    """
    folder = Path(folder)
    bank, layout = trainer.bank, trainer.bank.shard
    check_shard_checkpoint(folder, layout)
    bank.load_shard(folder / shard_file("bank", layout))
    trainer.refresh_callback.bank_version_at_refresh = bank.version
    trainer._served = None
    load_refresh_state(folder, trainer.refresh_callback)
    index = trainer.index
    index.replace(index.faiss.read_index(str(folder / shard_file("mining_index", layout, ".faiss"))))
    anchors = folder / shard_file("bank_anchors", layout)
    if anchors.is_file() and trainer.bank_optimizer.keep_norms is not None:
        trainer.bank_optimizer.keep_norms = _load_tensors(anchors)["norms"].to(trainer.bank_optimizer.keep_norms.device)


def load_shard_optimizer(folder: str | os.PathLike, trainer: Any) -> None:
    """Restores this shard's row optimizer state and changed rows, and the loss's own state, from a checkpoint.

    Example:
        >>> load_shard_optimizer("out/checkpoint-10", trainer)  # doctest: +SKIP
    """
    folder = Path(folder)
    bank, layout = trainer.bank, trainer.bank.shard
    check_shard_checkpoint(folder, layout)
    state = _load_tensors(folder / shard_file("bank_optimizer", layout), bank.local_weight.device)
    changed = state.pop(CHANGED_ROWS_KEY, None)
    trainer.bank_optimizer.load_state_dict(state)
    if changed is not None:
        bank.set_changed(changed.cpu())
    if (folder / LOSS_OPTIMIZER_NAME).is_file():
        trainer.loss.load_optimizer_state(_load_tensors(folder / LOSS_OPTIMIZER_NAME))
