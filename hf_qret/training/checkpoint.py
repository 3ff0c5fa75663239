"""What a checkpoint holds beyond the artifact, so that a resumed run continues exactly as an unbroken one.

A checkpoint folder is an artifact (encoder, ``index.faiss`` = the bank of that step as it would be served,
``bank.safetensors``, ``doc_ids.json``, ``qret_config.json``) plus the Trainer's own state plus:

- ``bank_optimizer.safetensors``: :class:`~hf_qret.training.optim.RowAdam`'s per-row state and the rows changed since the last
  index refresh;
- ``loss_optimizer.safetensors``: the loss's own optimizer state, when it has one (a custom loss's);
- ``bank_anchors.safetensors``: the drift-control anchors (the initial row norms ``bank_keep_norm`` keeps), which
  belong to the run, not to whatever bank a resuming script passes in;
- ``mining_index.faiss``: the index the run mines from, when it differs from the served ``index.faiss`` (rows moved
  since the last refresh are not re-encoded in it: the method mines from a stale index between refreshes);
- ``mining_shortlist.faiss``: the mining shortlist's inverted lists, when there is one;
- ``index_refresh_state.json``: :class:`~hf_qret.training.callbacks.IndexRefreshCallback`'s schedule (refreshes so far, the
  last refresh step, whether the index is stale, whether the epoch's end-of-epoch refresh is still to come), so the
  resumed run refreshes exactly when the unbroken run did. It is a file of its own, not ``trainer_state.json``'s
  ``stateful_callbacks``: transformers restores those by constructing the callback again from JSON arguments, and
  this callback holds the bank and the index.

Every file is written to a temporary name and renamed. Nothing is unpickled on load.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ArtifactError

# The file names are the artifact manifest's (hf_qret.serving.artifact): what is training state is never pushed or copied.
from ..serving.artifact import (
    ANCHORS_NAME,
    BANK_OPTIMIZER_NAME,
    LOSS_OPTIMIZER_NAME,
    MINING_INDEX_NAME,
    RAW_BANK_NAME,
    REFRESH_STATE_NAME,
    SHORTLIST_NAME,
    TRAINING_STATE_NAMES,
    write_json,
)

if TYPE_CHECKING:
    from ..bank.core import TargetBank
    from ..index.core import QuantizedIndex
    from .callbacks import IndexRefreshCallback
    from .loss import QRetLoss
    from .optim import RowAdam

__all__ = [
    "ANCHORS_NAME",
    "BANK_OPTIMIZER_NAME",
    "LOSS_OPTIMIZER_NAME",
    "MINING_INDEX_NAME",
    "REFRESH_STATE_NAME",
    "SHORTLIST_NAME",
    "TRAINING_STATE_NAMES",
    "load_anchors",
    "load_bank_rows",
    "load_mining_index",
    "load_optimizer_states",
    "load_raw_bank_rows",
    "load_refresh_state",
    "publish_checkpoint",
    "save_training_state",
    "staging_folder",
]

#: Key of the rows changed since the last index refresh, saved with the bank optimizer state.
CHANGED_ROWS_KEY = "changed_rows"

logger = logging.getLogger(__name__)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _load_tensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return {k: v.to(device) for k, v in load_file(str(path)).items()}
    except Exception as exc:  # noqa: BLE001 - a corrupt file is the user's to re-create
        raise ArtifactError(f"{path}: cannot be read ({exc}); resume from another checkpoint.") from None


def _write_faiss(faiss: Any, index: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def save_training_state(
    folder: str | os.PathLike,
    *,
    bank: TargetBank,
    bank_optimizer: RowAdam,
    loss: QRetLoss,
    mining_index: QuantizedIndex,
    served_index: QuantizedIndex,
    refresh_state: dict[str, Any] | None = None,
    raw_rows: torch.Tensor | None = None,
) -> None:
    """Writes the training-state files of a checkpoint into ``folder`` (see the module docstring).

    ``raw_rows``: the bank's rows before a pending document adapter, when the artifact's ``bank.safetensors`` holds
    the adapted ones (:func:`load_raw_bank_rows` puts them back on resume).

    ``refresh_state`` is :meth:`IndexRefreshCallback.state_dict() <hf_qret.training.callbacks.IndexRefreshCallback.state_dict>`.

    Example:
        >>> save_training_state("out/checkpoint-10", bank=bank, bank_optimizer=opt, loss=loss,
        ...                     mining_index=index, served_index=index,
        ...                     refresh_state=trainer.refresh_callback.state_dict())  # doctest: +SKIP
    """
    folder = Path(folder)
    if refresh_state is not None:
        write_json(refresh_state, folder / REFRESH_STATE_NAME)
    state = dict(bank_optimizer.state_dict())
    state[CHANGED_ROWS_KEY] = torch.from_numpy(bank.local_changed_rows())  # for incremental refreshes
    _save_tensors(folder / BANK_OPTIMIZER_NAME, state)
    loss_state = loss.optimizer_state()
    if loss_state:
        _save_tensors(folder / LOSS_OPTIMIZER_NAME, loss_state)
    if bank_optimizer.keep_norms is not None:
        _save_tensors(folder / ANCHORS_NAME, {"norms": bank_optimizer.keep_norms})
    if raw_rows is not None:
        _save_tensors(folder / RAW_BANK_NAME, {"rows": raw_rows})
    if mining_index is not served_index:
        _write_faiss(mining_index.faiss, mining_index.index, folder / MINING_INDEX_NAME)
    if mining_index.shortlist is not None:
        _write_faiss(mining_index.faiss, mining_index.shortlist.ivf, folder / SHORTLIST_NAME)


def load_optimizer_states(
    folder: str | os.PathLike, *, bank: TargetBank, bank_optimizer: RowAdam, loss: QRetLoss
) -> None:
    """Restores the bank optimizer (and the changed-row record) and the loss's optimizer state, when saved.

    Example:
        >>> load_optimizer_states("out/checkpoint-10", bank=bank, bank_optimizer=opt, loss=loss)  # doctest: +SKIP
    """
    folder = Path(folder)
    path = folder / BANK_OPTIMIZER_NAME
    if path.is_file():
        state = _load_tensors(path, bank.local_weight.device)
        changed = state.pop(CHANGED_ROWS_KEY, None)
        bank_optimizer.load_state_dict(state)
        if changed is not None:  # else every row counts as changed (set when the bank was loaded)
            bank.set_changed(changed.cpu())
    path = folder / LOSS_OPTIMIZER_NAME
    if path.is_file():
        loss.load_optimizer_state(_load_tensors(path))


def load_refresh_state(folder: str | os.PathLike, callback: IndexRefreshCallback) -> None:
    """Restores the index refresh schedule of a checkpoint into ``callback``; call it after the checkpoint's bank is
    loaded. A checkpoint without one (written by an older hf-qret) leaves the schedule as it is, with a warning.

    Raises:
        ArtifactError: The checkpoint's refresh state is unreadable.

    Example:
        >>> load_refresh_state("out/checkpoint-10", trainer.refresh_callback)  # doctest: +SKIP
    """
    path = Path(folder) / REFRESH_STATE_NAME
    if not path.is_file():
        logger.warning(
            "%s has no %s (an older hf-qret wrote it): the index refresh schedule restarts from the checkpoint's "
            "index, and an end-of-epoch refresh due at the checkpoint's step is not made.",
            folder, REFRESH_STATE_NAME,
        )  # fmt: skip
        return
    try:
        callback.load_state_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"{path}: cannot be read ({exc}); resume from another checkpoint.") from None


def load_anchors(folder: str | os.PathLike, *, bank_optimizer: RowAdam) -> None:
    """Restores the drift-control anchors of the run (the initial row norms) from a checkpoint.

    Raises:
        ArtifactError: The checkpoint's anchors do not fit this run (another corpus or training set).

    Example:
        >>> load_anchors("out/checkpoint-10", bank_optimizer=trainer.bank_optimizer)  # doctest: +SKIP
    """
    folder = Path(folder)
    path = folder / ANCHORS_NAME
    if not path.is_file():
        return
    anchors = _load_tensors(path)

    def mismatch(what: str) -> ArtifactError:
        return ArtifactError(
            f"{path}: the checkpoint's {what} do not fit this run; resume with the same corpus, training data and "
            "bank_keep_norm option."
        )

    norms = anchors.get("norms")
    if (norms is None) != (bank_optimizer.keep_norms is None):
        raise mismatch("norms")
    if norms is not None:
        if norms.shape != bank_optimizer.keep_norms.shape:
            raise mismatch("norms")
        bank_optimizer.keep_norms = norms.to(bank_optimizer.keep_norms.device)


def load_mining_index(folder: str | os.PathLike, index: QuantizedIndex, served: Any) -> None:
    """Makes ``index`` mine exactly what the checkpointed run mined: its mining index (or ``served``, the faiss index
    of ``index.faiss``, when they were the same) and its mining shortlist's inverted lists.

    Example:
        >>> load_mining_index("out/checkpoint-10", trainer.index, served_index.index)  # doctest: +SKIP
    """
    folder = Path(folder)
    faiss = index.faiss
    path = folder / MINING_INDEX_NAME
    mining = faiss.read_index(str(path)) if path.is_file() else served
    path = folder / SHORTLIST_NAME
    shortlist = faiss.read_index(str(path)) if path.is_file() and index.mining_nlist else None
    index.replace(mining, shortlist_ivf=shortlist)


def staging_folder(run_dir: str, step: int) -> str:
    """The folder a checkpoint of ``step`` is written into before :func:`publish_checkpoint` renames it.

    Example:
        >>> staging_folder("out", 10)
        'out/_staging-checkpoint-10'
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return os.path.join(run_dir, f"_staging-{PREFIX_CHECKPOINT_DIR}-{step}")


def publish_checkpoint(staging: str, run_dir: str, state: Any, save_total_limit: int | None) -> str:
    """Renames a complete staged checkpoint into ``run_dir/checkpoint-<step>``, points ``state`` at the best one
    (the base ``Trainer`` recorded it inside the staging folder) and rotates old checkpoints. Returns the folder.

    Example:
        >>> publish_checkpoint(staging_folder("out", 10), "out", trainer.state, save_total_limit=2)  # doctest: +SKIP
        'out/checkpoint-10'
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

    name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    final = os.path.join(run_dir, name)
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(os.path.join(staging, name), final)
    shutil.rmtree(staging, ignore_errors=True)
    if state.best_global_step:
        best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}")
        if os.path.isdir(best):
            state.best_model_checkpoint = best
    rotate_checkpoints(
        output_dir=run_dir,
        save_total_limit=save_total_limit,
        best_model_checkpoint=state.best_model_checkpoint,
        use_mtime=True,
    )
    return final


def load_bank_rows(folder: str | os.PathLike, bank: TargetBank) -> Any:
    """Streams a checkpoint's (or artifact's) ``bank.safetensors`` into ``bank``'s own storage (dtype, device, memory
    map) and returns the folder's :class:`~hf_qret.serving.artifact.RetrievalFiles` (its index, doc ids, config).

    Raises:
        ValueError: The folder's bank belongs to another corpus (other doc ids) or it has none.

    Example:
        >>> files = load_bank_rows("out/checkpoint-10", trainer.bank)  # doctest: +SKIP
        >>> files.index.ntotal == len(trainer.bank)  # doctest: +SKIP
        True
    """
    from ..serving.artifact import load_retrieval_files

    files = load_retrieval_files(folder)
    if bank.doc_ids != files.doc_ids or not files.config.get("bank_file"):
        raise ValueError(f"{folder}: its bank belongs to another corpus; resume with the same data.")
    bank.load_rows_from_file(os.path.join(folder, files.config["bank_file"]))
    return files


def load_raw_bank_rows(folder: str | os.PathLike, bank: TargetBank) -> bool:
    """Puts back the bank's rows from before a pending document adapter, when the checkpoint has them (its
    ``bank.safetensors`` then holds the adapted rows it serves); returns whether it did.

    Example:
        >>> load_raw_bank_rows("out/checkpoint-10", bank)  # doctest: +SKIP
        True
    """
    path = Path(folder) / RAW_BANK_NAME
    if not path.is_file():
        return False
    rows = _load_tensors(path)["rows"]
    if tuple(rows.shape) != tuple(bank.local_weight.shape):
        raise ArtifactError(f"{path} holds {tuple(rows.shape)} rows, the bank {tuple(bank.local_weight.shape)}.")
    with torch.no_grad():
        bank.local_weight.copy_(rows.to(bank.local_weight.device, bank.local_weight.dtype))
    return True
