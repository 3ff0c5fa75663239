"""Re-exports :mod:`hf_qret.serving.card_data` (the model card is part of the artifact: the serving layer writes it, and
``QuantizedRetriever.save_pretrained`` re-renders it), where this module's names now live.
"""

from ..serving.card_data import (  # noqa: F401
    CARD_TAGS,
    KINDS,
    METRIC_COLUMNS,
    STAGE_LABELS,
    card_metadata,
    card_metrics,
    dataset_display_name,
    dataset_id_from_path,
    front_matter,
    hub_base_model,
    is_qret_model_card,
    metrics_from_log_history,
    ordered_stages,
)

__all__ = [
    "CARD_TAGS",
    "METRIC_COLUMNS",
    "KINDS",
    "STAGE_LABELS",
    "card_metrics",
    "metrics_from_log_history",
    "ordered_stages",
    "hub_base_model",
    "dataset_id_from_path",
    "dataset_display_name",
    "card_metadata",
    "front_matter",
    "is_qret_model_card",
]
