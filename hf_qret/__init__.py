"""hf-qret: train a dense retriever for the quantized FAISS index it is served from.

Implements Tan et al. (AAAI 2026), "Improving the Accuracy of Dense Retrieval on the Quantized Indexes via Gradient
Optimization of the Target Embeddings", as a Hugging Face ``Trainer`` extension.

The package is lazy: ``from hf_qret import QuantizedRetriever`` (serving) imports the retriever's modules only, not
the training stack (``transformers.Trainer``, peft, datasets, evaluate, accelerate, matplotlib); every public name
is imported from its module on first use.

Example:
    >>> import hf_qret
    >>> hf_qret.QuantizedRetriever.__name__
    'QuantizedRetriever'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    "TargetBank": "bank",
    "FollowScheduler": "optim",
    "RowAdam": "optim",
    "RowSGD": "optim",
    "IndexRefreshCallback": "callbacks",
    "RetrievalEvaluationCallback": "callbacks",
    "QRetDataCollator": "collator",
    "DataArguments": "config",
    "ModelArguments": "config",
    "QRetTrainingArguments": "config",
    "parse_config": "config",
    "BeirData": "data",
    "build_pairs_dataset": "data",
    "carve_dev_split": "data",
    "load_beir": "data",
    "load_qrels": "data",
    "ArtifactError": "errors",
    "ConfigError": "errors",
    "DataError": "errors",
    "QRetError": "errors",
    "RetrievalEvaluator": "evaluation",
    "PushToHubCallback": "hub",
    "push_artifact": "hub",
    "QuantizedIndex": "index",
    "CandidateCrossEntropyLoss": "loss",
    "MinedNegativesLoss": "loss",
    "QRetLoss": "loss",
    "build_loss": "loss",
    "compute_metrics": "metrics",
    "write_trec_run": "metrics",
    "render_model_card": "model_card",
    "write_model_card": "model_card",
    "IndexMiner": "mining",
    "MinedBatch": "mining",
    "QuantizedRetriever": "retriever",
    "SentenceEncoder": "sentence_encoder",
    "QRetTrainer": "trainer",
}

__all__ = ["__version__", *sorted(_EXPORTS, key=str.lower)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # static type checkers and IDEs see the eager imports
    from .bank import TargetBank
    from .callbacks import IndexRefreshCallback, RetrievalEvaluationCallback
    from .collator import QRetDataCollator
    from .config import DataArguments, ModelArguments, QRetTrainingArguments, parse_config
    from .data import BeirData, build_pairs_dataset, carve_dev_split, load_beir, load_qrels
    from .errors import ArtifactError, ConfigError, DataError, QRetError
    from .evaluation import RetrievalEvaluator
    from .hub import PushToHubCallback, push_artifact
    from .index import QuantizedIndex
    from .loss import (
        CandidateCrossEntropyLoss,
        MinedNegativesLoss,
        QRetLoss,
        build_loss,
    )
    from .metrics import compute_metrics, write_trec_run
    from .mining import IndexMiner, MinedBatch
    from .model_card import render_model_card, write_model_card
    from .optim import FollowScheduler, RowAdam, RowSGD
    from .retriever import QuantizedRetriever
    from .sentence_encoder import SentenceEncoder
    from .trainer import QRetTrainer
