"""The document adapter's layers in an artifact: what a new document's embedding goes through to be served like the
bank's rows.

Training moves every bank row through a shared residual MLP (:mod:`hf_qret.training.adapter`), baked into the bank at
each index refresh; the bank's rows are therefore the document encoder's embeddings passed through every baked layer
in turn. An artifact keeps those layers in ``document_adapter.safetensors`` (``{i}.down.weight``, ``{i}.down.bias``,
``{i}.up.weight``, ``{i}.up.bias`` for layer ``i``), recorded in ``qret_config.json`` as ``document_adapter``, and
:meth:`~hf_qret.serving.retriever.QuantizedRetriever.add_documents` applies them (:func:`adapt_rows`) to the
documents it encodes. :func:`adapter_step` is the one definition of a layer, used by training too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ArtifactError

__all__ = [
    "DOCUMENT_ADAPTER_NAME",
    "adapt_rows",
    "adapter_step",
    "load_document_adapters",
    "save_document_adapters",
]

DOCUMENT_ADAPTER_NAME = "document_adapter.safetensors"
_PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")


def adapter_step(rows: torch.Tensor, layer: dict[str, torch.Tensor]) -> torch.Tensor:
    """One adapter layer: ``(x + W_up gelu(W_down x + b_down) + b_up) * |x| / |...|`` (each row keeps its norm).

    Example:
        >>> layer = {"down.weight": torch.zeros(2, 4), "down.bias": torch.zeros(2),
        ...          "up.weight": torch.zeros(4, 2), "up.bias": torch.ones(4)}
        >>> adapter_step(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), layer).norm().item()
        1.0
    """
    hidden = nn.functional.gelu(nn.functional.linear(rows, layer["down.weight"], layer["down.bias"]))
    moved = rows + nn.functional.linear(hidden, layer["up.weight"], layer["up.bias"])
    return moved * (rows.norm(dim=-1, keepdim=True) / moved.norm(dim=-1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def adapt_rows(rows: np.ndarray, layers: Sequence[dict[str, torch.Tensor]]) -> np.ndarray:
    """``rows`` (float32 embeddings from the document encoder) through every layer in order.

    Example:
        >>> rows = np.eye(2, dtype="float32")
        >>> np.array_equal(adapt_rows(rows, []), rows)
        True
    """
    if not layers:
        return rows
    out = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
    for layer in layers:
        out = adapter_step(out, layer)
    return out.numpy()


def save_document_adapters(folder: str | os.PathLike, layers: Sequence[dict[str, torch.Tensor]]) -> Path | None:
    """Writes ``layers`` into ``folder/document_adapter.safetensors`` (temp file, then renamed); nothing, and any
    older file removed, when there is no layer. Returns the path written (or ``None``).

    Example:
        >>> save_document_adapters("out", trainer.loss.adapter_layers())  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    path = Path(folder) / DOCUMENT_ADAPTER_NAME
    if not layers:
        path.unlink(missing_ok=True)
        return None
    tensors = {
        f"{i}.{part}": layer[part].detach().cpu().contiguous() for i, layer in enumerate(layers) for part in _PARTS
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"layers": str(len(layers))})
    os.replace(tmp, path)
    return path


def load_document_adapters(folder: str | os.PathLike) -> list[dict[str, torch.Tensor]]:
    """The layers saved in ``folder`` (``[]`` without a ``document_adapter.safetensors``).

    Raises:
        ArtifactError: The file is not a set of adapter layers.

    Example:
        >>> load_document_adapters("runs/scifact")  # doctest: +SKIP
        [{'down.weight': tensor(...), ...}]
    """
    from safetensors.torch import load_file

    path = Path(folder) / DOCUMENT_ADAPTER_NAME
    if not path.is_file():
        return []
    tensors = load_file(str(path))
    count = len({key.split(".", 1)[0] for key in tensors})
    try:
        return [{part: tensors[f"{i}.{part}"] for part in _PARTS} for i in range(count)]
    except KeyError as exc:
        raise ArtifactError(
            f"{path} lacks {exc.args[0]}: it is not a document adapter written by hf-qret; re-save the artifact."
        ) from None
