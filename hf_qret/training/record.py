"""What ``qret_config.json`` records about a training run (:func:`training_record`), next to the artifact format
:mod:`hf_qret.serving.artifact` writes: training logic, so it lives with training, and serving stays free of it."""

from __future__ import annotations

from typing import Any

from ..serving.embedding import prompt_record
from ..serving.encoder import (
    _unwrap,
    get_pooling,
    is_sentence_transformer,
    normalizes_embeddings,
    plain_max_length,
    similarity_function,
)
from ..serving.peft_utils import adapter_info

__all__ = ["training_record"]


def training_record(trainer: Any) -> dict[str, Any]:
    """What ``qret_config.json`` records about a :class:`~hf_qret.training.trainer.QRetTrainer`'s run: the base
    model, loss, scale, similarity, how texts are embedded (pooling, normalisation, the query and document prompts), mining and
    learning-rate settings, the step and how the index was built (those of the restored folder when the safety net
    kept the untrained model or ``load_best_model_at_end`` loaded a checkpoint: one record of what is shipped).

    ``prompts`` is ``{"query": {"name", "text"}, "document": {"name", "text"}}`` (:func:`hf_qret.serving.embedding.prompt_record`):
    the prompts training, the bank and the evaluators used, which :class:`~hf_qret.QuantizedRetriever` applies to
    queries and added documents. ``normalize``: whether the embeddings are unit vectors.

    Example:
        >>> training_record(trainer)["prompts"]["query"]  # doctest: +SKIP
        {'name': 'query', 'text': 'query: '}
    """
    base = getattr(trainer.model, "model_card_data", None)
    verdict = getattr(getattr(trainer, "safety_net", None), "verdict", None)
    # the safety net's untrained model (or load_best_model_at_end's checkpoint) was restored: its step and index record
    restored = getattr(trainer, "restored_record", None)
    return {
        "base_model": getattr(base, "base_model", None)
        or getattr(getattr(trainer.model, "config", None), "_name_or_path", None),
        "loss": type(trainer.loss).__name__,
        "scale": getattr(trainer.loss, "scale", None),
        "similarity": similarity_function(trainer.model),
        "pooling": get_pooling(trainer.model),  # a plain encoder's pooling (None: the sentence-transformers modules)
        "normalize": normalizes_embeddings(trainer.model),
        "prompts": prompt_record(trainer.model),
        # how the bank's rows were actually encoded (None: not known, e.g. read from a --bank_init_file)
        "document_precision": getattr(trainer.bank, "encode_precision", None),
        "max_seq_length": _max_seq_length(trainer),
        "num_negatives": trainer.miner.num_negatives,
        "bank_learning_rate": trainer.args.bank_learning_rate,
        "learning_rate": trainer.args.learning_rate,
        "refresh_mode": trainer.args.refresh_mode,
        "opq_niter": trainer.index.opq_niter,
        # candidates scored by the cosine of their decoded vectors (QuantizedIndex.normalize_decoded)
        "normalize_decoded": bool(getattr(trainer.index, "normalize_decoded", False)),
        "mining_shortlist": (
            {"nlist": trainer.index.mining_nlist, "nprobe": trainer.index.mining_nprobe}
            if trainer.index.mining_nlist
            else None
        ),
        "index_choice": _index_choice(trainer.args, trainer.index),
        # rows from precomputed embeddings (ids without texts): doc_ids[start : start + count]
        "precomputed_rows": getattr(trainer.args, "precomputed_rows", None),
        "global_step": restored["global_step"] if restored else trainer.state.global_step,
        "safety_net": None if verdict is None else verdict.summary(),
        "index_state": restored["index_state"] if restored else trainer.index_record(),
        "adapter": adapter_info(trainer.accelerator.unwrap_model(trainer.model)),
    }


def _max_seq_length(trainer: Any) -> int | None:
    """The truncation length queries were trained with."""
    model = _unwrap(trainer.model)
    if is_sentence_transformer(model) or hasattr(model, "max_seq_length"):
        value = getattr(model, "max_seq_length", None)
        return int(value) if value else None
    tokenizer = getattr(trainer, "processing_class", None)
    return plain_max_length(tokenizer) if tokenizer is not None else None


def _index_choice(args: Any, index: Any) -> dict[str, Any] | None:
    """What ``index_factory="auto"`` resolved to (:class:`hf_qret.index.auto.IndexChoice`, on the arguments or the
    index); ``None`` when the factory was given explicitly."""
    choice = getattr(args, "index_choice", None) or getattr(index, "choice", None)
    return choice.record() if choice is not None else None
