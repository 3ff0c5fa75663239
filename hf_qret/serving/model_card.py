"""The model card (``README.md``) of an artifact: Hub metadata, the index's size and compression, the flat-vs-quantized
metrics, a plot of quality against bytes per vector, how to load it, and the paper's citation.

The card is rendered from ``model_cards/template.md`` with :class:`string.Template`; its Hub metadata (tags,
``base_model``, ``datasets``, the ``model-index`` results) is ``huggingface_hub``'s ``ModelCardData`` with
``EvalResult`` entries, and cards are parsed back with ``huggingface_hub``'s ``RepoCard``. The numbers come from a plain
dict of metrics (:func:`card_metrics` reads the ``eval_results.json`` the recipe writes, the JSON of
``hf-qret evaluate`` or a ``Trainer`` log history), so rendering is a pure function (:func:`render_model_card`);
:func:`write_model_card` reads an artifact folder and writes ``README.md`` and ``quality_vs_bytes.png`` into it
atomically.

Example:
    >>> from hf_qret.hub.model_card import write_model_card
    >>> write_model_card("runs/scifact", base_model="sentence-transformers/all-MiniLM-L6-v2",
    ...                  datasets=["BeIR/scifact"], eval_split="dev")  # doctest: +SKIP
    PosixPath('runs/scifact/README.md')
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ArtifactError
from . import card_data
from .card_data import *  # noqa: F403  (every card_data name, importable from here too: see __all__)
from .card_data import (
    KINDS,
    METRIC_COLUMNS,
    STAGE_LABELS,
    card_metadata,
    card_metrics,
    dataset_display_name,
    hub_base_model,
    metrics_from_log_history,
    ordered_stages,
)

#: This module's names, then every name of :mod:`hf_qret.serving.card_data` (re-exported).
__all__ = [
    "MODEL_CARD_NAME",
    "PLOT_NAME",
    "EVAL_RESULTS_NAME",
    "TEMPLATE_PATH",
    "default_template_path",
    "render_model_card",
    "plot_quality_vs_bytes",
    "write_model_card",
    "write_training_card",
    *card_data.__all__,
]

MODEL_CARD_NAME = "README.md"
PLOT_NAME = "quality_vs_bytes.png"
EVAL_RESULTS_NAME = "eval_results.json"
#: The card template in a source checkout: ``model_cards/template.md`` at the root of the tree. An installed wheel
#: ships the same folder as the package data ``hf_qret.model_cards`` (see :func:`default_template_path`).
TEMPLATE_PATH = Path(__file__).resolve().parents[2] / "model_cards" / "template.md"


def default_template_path() -> Path:
    """The model card template this hf-qret runs with.

    The source tree's ``model_cards/template.md`` when hf-qret runs from a checkout (``PYTHONPATH``, editable
    install), else the copy installed with the package (``hf_qret.model_cards``, read with ``importlib.resources``).

    Example:
        >>> default_template_path().name
        'template.md'
    """
    if TEMPLATE_PATH.is_file():
        return TEMPLATE_PATH
    from importlib.resources import as_file, files

    try:
        resource = files("hf_qret.model_cards") / "template.md"
    except ModuleNotFoundError:
        return TEMPLATE_PATH
    with as_file(resource) as path:  # a wheel is installed unzipped: this is the file itself
        return Path(path)


# ---------------------------------------------------------------------------------------------------------- render
def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _human_bytes(size: int | None) -> str:
    if size is None:
        return "–"
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:,} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"  # pragma: no cover


def _compression(dim: int, bytes_per_vector: int) -> str:
    ratio = 4 * dim / max(bytes_per_vector, 1)
    return f"{ratio:.0f}" if abs(ratio - round(ratio)) < 0.05 else f"{ratio:.1f}"


def _metrics_section(
    metrics: Mapping[str, Any],
    config: Mapping[str, Any],
    dataset_label: str | None,
    eval_split: str | None,
    plot: bool,
    notes: Sequence[str] = (),
) -> str:
    if not metrics:
        return (
            "No evaluation results were recorded with this artifact. Measure them with\n"
            "`hf-qret evaluate OUT --data BEIR_FOLDER --split test`."
        )
    dim = int(config.get("dim") or 0)
    factory = config.get("index_factory") or "quantized"
    bpv = config.get("bytes_per_vector")
    where = f" on {dataset_label}" if dataset_label else ""
    where += f" ({eval_split} split)" if eval_split else ""
    lines = [
        f"Retrieval quality{where}, searching the full-precision bank (flat, fp32, {4 * dim} bytes per vector) and "
        f"the quantized index (`{factory}`, {bpv} bytes per vector) with the same query encoder:",
        "",
        "| model | index | bytes / vector | " + " | ".join(header for _, header in METRIC_COLUMNS) + " |",
        "| --- | --- | ---: | " + " | ".join("---:" for _ in METRIC_COLUMNS) + " |",
    ]
    for stage in ordered_stages(metrics):
        label = STAGE_LABELS.get(stage, stage)
        for kind in KINDS:
            values = metrics[stage].get(kind)
            if not values:
                continue
            index_label, size = ("flat (fp32)", 4 * dim) if kind == "flat" else (f"`{factory}`", bpv)
            cells = " | ".join(_fmt(values.get(key)) for key, _ in METRIC_COLUMNS)
            lines.append(f"| {label} | {index_label} | {size} | {cells} |")
    if "untrained" in metrics and "trained" in metrics:
        before = metrics["untrained"].get("quantized", {}).get("ndcg@10")
        after = metrics["trained"].get("quantized", {}).get("ndcg@10")
        if before is not None and after is not None:
            lines += ["", f"Training changed the quantized index's nDCG@10 from {_fmt(before)} to {_fmt(after)} "
                      f"({after - before:+.4f})."]  # fmt: skip
    for note in notes:
        lines += ["", str(note)]
    if plot:
        lines += ["", f"![Retrieval quality against bytes per vector]({PLOT_NAME})"]
    return "\n".join(lines)


def _training_rows(
    config: Mapping[str, Any],
    base_model: str | None,
    datasets: Sequence[str],
    eval_split: str | None,
    trained_on: Sequence[str] | None = None,
) -> str:
    rows = []
    shown_base = base_model or config.get("base_model")
    if shown_base:
        rows.append(
            ("Base model", f"[{shown_base}](https://huggingface.co/{shown_base})" if base_model else f"`{shown_base}`")
        )
    if datasets:
        rows.append(("Data", ", ".join(f"[{d}](https://huggingface.co/datasets/{d})" for d in datasets)))
    if trained_on is not None:
        rows.append(
            ("Trained on", " + ".join(trained_on) if trained_on else "nothing (the untrained model is shipped)")
        )
    if eval_split:
        rows.append(("Evaluation split", eval_split))
    choice = config.get("index_choice")
    if isinstance(choice, dict) and choice.get("reason"):  # index_factory "auto" (hf_qret.index.auto)
        rows.append(("Index choice", f"`index_factory auto`: {choice['reason']}"))
    precomputed = config.get("precomputed_rows")
    if isinstance(precomputed, dict) and precomputed.get("count"):
        rows.append(("Rows from precomputed embeddings", f"{int(precomputed['count']):,} (ids without text)"))
    for key, label in (
        ("learning_rate", "Encoder learning rate"),
        ("bank_learning_rate", "Bank learning rate"),
        ("num_negatives", "Mined candidates per query (top-k)"),
        ("scale", "Softmax scale"),
        ("refresh_mode", "Index refresh"),
        ("global_step", "Optimizer steps"),
        ("hf_qret_version", "hf-qret version"),
    ):
        if config.get(key) is not None:
            rows.append((label, f"`{config[key]}`" if isinstance(config[key], str) else str(config[key])))
    return "\n".join(f"| {label} | {value} |" for label, value in rows) or "| – | – |"


def _load_template(template: str | os.PathLike | None) -> string.Template:
    path = Path(template) if template is not None else default_template_path()
    if not path.is_file():
        raise ArtifactError(
            f"{path}: no model card template; pass template=PATH (a string.Template markdown file) or reinstall "
            "hf-qret (its wheel ships model_cards/template.md as hf_qret/model_cards/template.md)."
        )
    return string.Template(path.read_text(encoding="utf-8"))


def render_model_card(
    config: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    datasets: Sequence[str] | None = None,
    dataset_name: str | None = None,
    eval_split: str | None = None,
    example_query: str | None = None,
    tags: Sequence[str] = (),
    license: str | None = None,
    language: str | Sequence[str] | None = None,
    index_size: int | None = None,
    extra_files: Sequence[tuple[str, str]] = (),
    plot: bool = True,
    template: str | os.PathLike | None = None,
    notes: Sequence[str] = (),
    trained_on: Sequence[str] | None = None,
) -> str:
    """Renders the model card text (YAML front matter + markdown) from plain dicts; writes nothing.

    Args:
        config: The artifact's ``qret_config.json`` (``index_factory``, ``dim``, ``num_vectors``,
            ``bytes_per_vector``, training options).
        metrics: Evaluation results in any form :func:`card_metrics` accepts; ``None`` renders a card without them.
        repo_id: The Hub id used in the code examples (default: a placeholder).
        base_model: Hub id of the model training started from (``None``: ``config["base_model"]`` if it is a
            Hub id).
        datasets: Hub dataset ids for the metadata (e.g. ``["BeIR/scifact"]``).
        dataset_name: Human-readable name of the evaluation data (default: derived from ``datasets``).
        eval_split: The split the metrics were measured on.
        example_query: A query for the code examples.
        tags: Extra Hub tags.
        license: SPDX id for the metadata.
        language: Language code(s) for the metadata.
        index_size: Size of ``index.faiss`` in bytes.
        extra_files: ``(file, description)`` rows added to the file table.
        plot: Whether the card embeds ``quality_vs_bytes.png``.
        template: A ``string.Template`` file to use instead of ``model_cards/template.md``.
        notes: Paragraphs shown under the evaluation table (the recipe's warnings, what the model was trained on).
        trained_on: The qrels splits the shipped model was trained on (``[]``: none, the untrained model).

    Returns:
        The card's text.

    Example:
        >>> config = {"index_factory": "PQ16", "dim": 384, "num_vectors": 5183, "bytes_per_vector": 16}
        >>> card = render_model_card(config, {"trained": {"flat": {"ndcg@10": 0.65}, "quantized": {"ndcg@10": 0.6}}})
        >>> "96×" in card and "0.6000" in card
        True
    """
    config = dict(config)
    metrics = card_metrics(metrics)
    missing = [key for key in ("index_factory", "dim", "bytes_per_vector") if config.get(key) is None]
    if missing:
        raise ArtifactError(f"qret_config.json lacks {', '.join(missing)}; re-create the artifact to render its card.")
    dim, bpv = int(config["dim"]), int(config["bytes_per_vector"])
    base_model = base_model or hub_base_model(config.get("base_model"))
    datasets = [d for d in (datasets or []) if d]
    title = (repo_id.split("/")[-1] if repo_id else None) or (
        f"{(base_model or 'encoder').split('/')[-1]} for a quantized {config['index_factory']} index"
    )
    dataset_label = dataset_display_name(datasets, dataset_name)
    files = [*extra_files]
    search_params = config.get("index_search_params")
    plain_params = f'\nfaiss.ParameterSpace().set_index_parameters(index, "{search_params}")' if search_params else ""
    values = {
        "front_matter": card_metadata(
            title=title, config=config, metrics=metrics, base_model=base_model, datasets=datasets,
            dataset_name=dataset_name, eval_split=eval_split, tags=tags, license=license, language=language,
        ),
        "title": title,
        "factory": config["index_factory"],
        "num_vectors": f"{int(config.get('num_vectors') or 0):,}",
        "dim": str(dim),
        "bytes_per_vector": str(bpv),
        "fp32_bytes": f"{4 * dim:,}",
        "compression": _compression(dim, bpv),
        "index_size": _human_bytes(index_size),
        "search_params": f"`{search_params}`" if search_params else "FAISS defaults",
        "extra_files": "".join(f"| `{name}` | {what} |\n" for name, what in files),
        "metrics_section": _metrics_section(
            metrics, config, dataset_label, eval_split, plot and bool(metrics), notes
        ),
        "training_rows": _training_rows(config, base_model, datasets, eval_split, trained_on),
        "repo_id": repo_id or "your-name/your-hf-qret-model",
        "example_query": (example_query or "What does vitamin D do to cancer risk?").replace('"', "'"),
        "plain_search_params": plain_params,
        "hf_qret_version": str(config.get("hf_qret_version") or _version()),
    }  # fmt: skip
    try:
        return _load_template(template).substitute(values)
    except (KeyError, ValueError) as exc:
        raise ArtifactError(f"the model card template has an unknown or malformed placeholder ({exc}).") from None


def _version() -> str:
    from .._version import __version__

    return __version__


# ------------------------------------------------------------------------------------------------------------ plot
def plot_quality_vs_bytes(
    metrics: Mapping[str, Any], dim: int, bytes_per_vector: int, factory: str, path: str | os.PathLike
) -> bool:
    """Draws nDCG@10 against bytes per vector (log x) for the flat and the quantized index, per stage, as a PNG.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch). The file is written atomically.

    Returns:
        ``False`` (and writes nothing) when no stage has an nDCG@10 to plot.

    Example:
        >>> plot_quality_vs_bytes(metrics, 384, 16, "RQ16x8", "runs/scifact/quality_vs_bytes.png")  # doctest: +SKIP
        True
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = card_metrics(metrics)
    flat_bytes = 4 * int(dim)
    styles = {"untrained": ("tab:gray", "--", "o"), "trained": ("tab:blue", "-", "s")}
    figure = Figure(figsize=(6.0, 4.0), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    plotted = False
    for position, stage in enumerate(ordered_stages(metrics)):
        color, line, marker = styles.get(stage, (f"C{position + 2}", ":", "^"))
        points = [
            (size, metrics[stage].get(kind, {}).get("ndcg@10"))
            for kind, size in (("quantized", bytes_per_vector), ("flat", flat_bytes))
        ]
        points = [(x, y) for x, y in points if y is not None]
        if not points:
            continue
        xs, ys = zip(*points)
        axes.plot(xs, ys, linestyle=line, marker=marker, color=color, label=STAGE_LABELS.get(stage, stage))
        for x, y in points:
            axes.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
        plotted = True
    if not plotted:
        return False
    axes.set_xscale("log")
    axes.set_xticks([bytes_per_vector, flat_bytes])
    axes.set_xticklabels([f"{bytes_per_vector}\n{factory}", f"{flat_bytes}\nflat fp32"])
    axes.set_xlim(bytes_per_vector / 2, flat_bytes * 2)
    axes.margins(y=0.15)
    axes.set_xlabel("bytes per vector (log scale)")
    axes.set_ylabel("nDCG@10")
    axes.set_title(f"Quality vs memory: {4 * dim / max(bytes_per_vector, 1):.0f}x compression")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    figure.savefig(tmp, format="png")
    os.replace(tmp, path)
    return True


# ----------------------------------------------------------------------------------------------------------- write
def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_json_if_present(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc}); fix or delete it.") from None
    return loaded if isinstance(loaded, dict) else {}


def write_model_card(
    folder: str | os.PathLike,
    metrics: Mapping[str, Any] | None = None,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    datasets: Sequence[str] | None = None,
    dataset_name: str | None = None,
    eval_split: str | None = None,
    tags: Sequence[str] = (),
    license: str | None = None,
    language: str | Sequence[str] | None = None,
    template: str | os.PathLike | None = None,
) -> Path:
    """Writes ``README.md`` (the model card) and ``quality_vs_bytes.png`` into an artifact folder.

    Missing arguments are filled from the folder: metrics, ``base_model``, ``dataset`` and ``eval_split`` from
    ``eval_results.json`` (written by the recipe), the index description from ``qret_config.json``, an example
    query from ``corpus.jsonl`` when it is shipped.

    Args:
        folder: An artifact folder (``qret_config.json`` at least).
        metrics: Evaluation results (see :func:`card_metrics`); default: ``folder/eval_results.json``.
        repo_id, base_model, datasets, dataset_name, eval_split, tags, license, language, template: See
            :func:`render_model_card`.

    Returns:
        The path of the written ``README.md``.

    Raises:
        ArtifactError: ``qret_config.json`` is missing or corrupt.

    Example:
        >>> write_model_card("runs/scifact", repo_id="me/minilm-scifact-rq16", license="apache-2.0")  # doctest: +SKIP
        PosixPath('runs/scifact/README.md')
    """
    folder = Path(folder)
    config_path = folder / "qret_config.json"
    if not config_path.is_file():
        raise ArtifactError(f"{folder}: no qret_config.json; render the card of a saved hf-qret artifact folder.")
    config = _read_json_if_present(config_path)
    saved = _read_json_if_present(folder / EVAL_RESULTS_NAME)
    if metrics is None:
        metrics = saved
    base_model = base_model or saved.get("base_model")
    if datasets is None and saved.get("dataset"):
        datasets = [saved["dataset"]] if isinstance(saved["dataset"], str) else list(saved["dataset"])
    eval_split = eval_split or saved.get("eval_split")
    normalised = card_metrics(metrics)
    plotted = False
    if normalised:
        plotted = plot_quality_vs_bytes(
            normalised, int(config["dim"]), int(config["bytes_per_vector"]), str(config["index_factory"]),
            folder / PLOT_NAME,
        )  # fmt: skip
    extra = [("README.md", "this model card")]
    if plotted:
        extra.append((PLOT_NAME, "retrieval quality against bytes per vector"))
    if (folder / EVAL_RESULTS_NAME).is_file():
        extra.append((EVAL_RESULTS_NAME, "the evaluation behind the table below"))
    corpus = next((folder / n for n in ("corpus.jsonl", "corpus.jsonl.gz") if (folder / n).is_file()), None)
    if corpus is not None:
        extra.append((corpus.name, "the document texts (`retriever.corpus[doc_id]`)"))
    index_path = folder / str(config.get("index_file") or "index.faiss")
    text = render_model_card(
        config,
        normalised,
        repo_id=repo_id,
        base_model=base_model,
        datasets=datasets,
        dataset_name=dataset_name,
        eval_split=eval_split,
        tags=tags,
        license=license,
        language=language,
        index_size=index_path.stat().st_size if index_path.is_file() else None,
        extra_files=extra,
        plot=plotted,
        template=template,
        notes=[str(n) for n in saved.get("notes") or ()],
        trained_on=list(saved["trained_on"]) if isinstance(saved.get("trained_on"), list) else None,
    )
    path = folder / MODEL_CARD_NAME
    _atomic_write_text(path, text)
    return path


def write_training_card(
    folder: str | os.PathLike, log_history: Sequence[Mapping[str, Any]] = (), **card_kwargs: Any
) -> Path:
    """:func:`write_model_card` for a training run's folder: its metrics are the folder's ``eval_results.json`` (the
    recipe's) when there is one, else the latest retrieval evaluation in the Trainer's ``log_history``.

    Example:
        >>> write_training_card("runs/scifact/checkpoint-100", trainer.state.log_history)  # doctest: +SKIP
    """
    folder = Path(folder)
    metrics = None if (folder / EVAL_RESULTS_NAME).is_file() else metrics_from_log_history(log_history)
    return write_model_card(folder, metrics, **card_kwargs)
