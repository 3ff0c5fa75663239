"""Configuration dataclasses, parsed with ``transformers.HfArgumentParser`` from a YAML file plus CLI overrides:
the training arguments (:mod:`hf_qret.config.training`) and the recipe script's model and data arguments with the
parser (:mod:`hf_qret.config.script`). Every name is importable from ``hf_qret.config``.
"""

from ..shipped_recipes import recipe_path
from .script import DEFAULT_MODEL, DataArguments, ModelArguments, parse_config, resolve_model_path
from .training import (
    BANK_DEVICES,
    BANK_LEARNING_RATES,
    BANK_OPTIMIZERS,
    BANK_QUERIES,
    BANK_SHARDINGS,
    BANK_UPDATES,
    UNSHARDABLE_INDEXES,
    QRetTrainingArguments,
)

__all__ = [
    "BANK_DEVICES",
    "BANK_LEARNING_RATES",
    "BANK_OPTIMIZERS",
    "BANK_QUERIES",
    "BANK_SHARDINGS",
    "BANK_UPDATES",
    "DEFAULT_MODEL",
    "DataArguments",
    "ModelArguments",
    "QRetTrainingArguments",
    "UNSHARDABLE_INDEXES",
    "parse_config",
    "recipe_path",
    "resolve_model_path",
]
