"""hf-qret: train a dense retriever for the quantized FAISS index it is served from.

Implements Tan et al. (AAAI 2026), "Improving the Accuracy of Dense Retrieval on the Quantized Indexes via Gradient
Optimization of the Target Embeddings", as a Hugging Face ``Trainer`` extension.
"""

__version__ = "0.1.0"

from .bank import InitialRows, TargetBank
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
    CodebookLearningLoss,
    MinedNegativesLoss,
    QRetLoss,
    QuantizationAwareLoss,
    build_loss,
)
from .metrics import compute_metrics, write_trec_run
from .model_card import render_model_card, write_model_card
from .mining import IndexMiner, MinedBatch
from .optim import FollowScheduler, RowAdam, RowSGD
from .retriever import QuantizedRetriever
from .trainer import QRetTrainer

__all__ = [
    "__version__",
    "ArtifactError",
    "BeirData",
    "CandidateCrossEntropyLoss",
    "InitialRows",
    "FollowScheduler",
    "build_loss",
    "QuantizationAwareLoss",
    "QRetLoss",
    "MinedNegativesLoss",
    "CodebookLearningLoss",
    "ConfigError",
    "DataArguments",
    "DataError",
    "IndexMiner",
    "IndexRefreshCallback",
    "MinedBatch",
    "PushToHubCallback",
    "ModelArguments",
    "QRetDataCollator",
    "QRetError",
    "QRetTrainer",
    "QRetTrainingArguments",
    "QuantizedIndex",
    "QuantizedRetriever",
    "RetrievalEvaluationCallback",
    "RetrievalEvaluator",
    "RowAdam",
    "RowSGD",
    "TargetBank",
    "build_pairs_dataset",
    "carve_dev_split",
    "compute_metrics",
    "load_beir",
    "load_qrels",
    "parse_config",
    "push_artifact",
    "render_model_card",
    "write_model_card",
    "write_trec_run",
]
