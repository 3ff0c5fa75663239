"""Re-exports :mod:`hf_qret.serving.model_card` (the model card is part of the artifact: the serving layer writes it, and
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
from ..serving.model_card import (  # noqa: F401
    EVAL_RESULTS_NAME,
    MODEL_CARD_NAME,
    PLOT_NAME,
    TEMPLATE_PATH,
    default_template_path,
    plot_quality_vs_bytes,
    render_model_card,
    write_model_card,
    write_training_card,
)

__all__ = [
    "MODEL_CARD_NAME",
    "PLOT_NAME",
    "EVAL_RESULTS_NAME",
    "CARD_TAGS",
    "TEMPLATE_PATH",
    "default_template_path",
    "card_metrics",
    "metrics_from_log_history",
    "render_model_card",
    "plot_quality_vs_bytes",
    "write_model_card",
    "write_training_card",
    "is_qret_model_card",
    "front_matter",
    "hub_base_model",
    "dataset_id_from_path",
]
