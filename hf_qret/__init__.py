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

from ._version import __version__

#: Public name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    "TargetBank": "bank.core",
    "FollowScheduler": "training.optim",
    "RowAdam": "training.optim",
    "RowSGD": "training.optim",
    "IndexRefreshCallback": "training.callbacks",
    "RetrievalEvaluationCallback": "training.callbacks",
    "QRetDataCollator": "training.collator",
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
    "CollectiveCallError": "errors",
    "ConfigError": "errors",
    "DataError": "errors",
    "HubError": "errors",
    "MissingExtraError": "errors",
    "QRetError": "errors",
    "TrainingDivergedError": "errors",
    "RetrievalEvaluator": "evaluation.evaluator",
    "PushToHubCallback": "hub.callback",
    "push_artifact": "hub.push",
    "QuantizedIndex": "index.core",
    "CandidateCrossEntropyLoss": "training.loss",
    "MinedNegativesLoss": "training.loss",
    "QRetLoss": "training.loss",
    "build_loss": "training.loss",
    "compute_metrics": "evaluation.metrics",
    "write_trec_run": "evaluation.metrics",
    "render_model_card": "hub.model_card",
    "write_model_card": "hub.model_card",
    "IndexMiner": "index.mining",
    "MinedBatch": "index.mining",
    "QuantizedRetriever": "serving.retriever",
    "SentenceEncoder": "serving.sentence_encoder",
    "QRetTrainer": "training.trainer",
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
    from .bank.core import TargetBank
    from .config import DataArguments, ModelArguments, QRetTrainingArguments, parse_config
    from .data import BeirData, build_pairs_dataset, carve_dev_split, load_beir, load_qrels
    from .errors import (
        ArtifactError,
        CollectiveCallError,
        ConfigError,
        DataError,
        HubError,
        MissingExtraError,
        QRetError,
        TrainingDivergedError,
    )
    from .evaluation.evaluator import RetrievalEvaluator
    from .evaluation.metrics import compute_metrics, write_trec_run
    from .hub.callback import PushToHubCallback
    from .hub.model_card import render_model_card, write_model_card
    from .hub.push import push_artifact
    from .index.core import QuantizedIndex
    from .index.mining import IndexMiner, MinedBatch
    from .serving.retriever import QuantizedRetriever
    from .serving.sentence_encoder import SentenceEncoder
    from .training.callbacks import IndexRefreshCallback, RetrievalEvaluationCallback
    from .training.collator import QRetDataCollator
    from .training.loss import (
        CandidateCrossEntropyLoss,
        MinedNegativesLoss,
        QRetLoss,
        build_loss,
    )
    from .training.optim import FollowScheduler, RowAdam, RowSGD
    from .training.trainer import QRetTrainer
