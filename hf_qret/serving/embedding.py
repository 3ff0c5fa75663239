"""The one definition of an hf-qret embedding, shared by training and serving: how token states are pooled and
normalised (:func:`pool`), and which prompt a query or a document is prefixed with (:func:`prompt_for`).

Training (:func:`hf_qret.serving.encoder.embed`, the collator's tokenization, the bank's encoding, the evaluators) and the
light serving encoder (:class:`hf_qret.serving.sentence_encoder.SentenceEncoder`, :class:`~hf_qret.QuantizedRetriever`) both
call these functions, so a query is embedded the same way wherever it is embedded. This module imports torch only:
serving imports it without the training stack.

Prompts follow sentence-transformers v6: ``model.prompts`` maps prompt names to texts, queries use the ``"query"``
prompt (``SentenceTransformer.encode_query``), documents the first of ``"document"``, ``"passage"``, ``"corpus"``
(``encode_document``); when the model has none of those names, its ``default_prompt_name`` (if any) applies. A prompt
is prepended to the text before tokenization.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "DOCUMENT_PROMPT_NAMES",
    "POOLING_MODES",
    "ROLES",
    "model_prompts",
    "pool",
    "prompt_for",
    "prompt_name_for",
    "prompt_record",
    "recorded_prompt",
]

#: Poolings of token states: mean over the attention mask, the first (CLS) token, max over the attention mask.
POOLING_MODES = ("mean", "cls", "max")
#: What a text is: a query (encoded by the trained query encoder) or a document (a bank row).
ROLES = ("query", "document")
#: The prompt names ``SentenceTransformer.encode_document`` looks for, in order.
DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")


def pool(
    hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean", normalize: bool = True
) -> torch.Tensor:
    """Pools token states into one embedding per text and optionally L2-normalises it, as sentence-transformers'
    ``Pooling`` and ``Normalize`` modules do.

    Args:
        hidden: ``(batch, tokens, dim)`` token states.
        attention_mask: ``(batch, tokens)`` mask of real tokens.
        mode: ``"mean"`` (over the mask), ``"cls"`` (the first token) or ``"max"`` (over the mask).
        normalize: L2-normalise the pooled embedding.

    Returns:
        ``(batch, dim)`` embeddings (keeps the autograd graph).

    Raises:
        ValueError: An unknown ``mode``.

    Example:
        >>> hidden, mask = torch.ones(2, 3, 4), torch.tensor([[1, 1, 0], [1, 0, 0]])
        >>> pool(hidden, mask, "mean").norm(dim=-1)
        tensor([1., 1.])
    """
    if mode == "cls":
        pooled = hidden[:, 0]
    elif mode == "max":
        mask = attention_mask.unsqueeze(-1)
        pooled = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    elif mode == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    else:
        raise ValueError(f"pooling must be one of {', '.join(POOLING_MODES)}, got {mode!r}.")
    return nn.functional.normalize(pooled, p=2, dim=-1) if normalize else pooled


def prompt_name_for(prompts: Mapping[str, Any] | None, default_prompt_name: str | None, role: str) -> str | None:
    """The name of the prompt sentence-transformers v6 uses for a ``role`` (``"query"`` or ``"document"``).

    ``"query"``: the ``"query"`` prompt (``encode_query``); ``"document"``: the first of ``"document"``,
    ``"passage"``, ``"corpus"`` (``encode_document``); otherwise ``default_prompt_name`` (``None``: no prompt).

    Example:
        >>> prompt_name_for({"query": "query: ", "passage": "passage: "}, None, "document")
        'passage'
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}.")
    prompts = prompts or {}
    candidates = ("query",) if role == "query" else DOCUMENT_PROMPT_NAMES
    for name in candidates:
        if name in prompts:
            return name
    return default_prompt_name if default_prompt_name in prompts else None


def model_prompts(model: Any) -> tuple[dict[str, str], str | None]:
    """``(prompts, default_prompt_name)`` of a model: a ``SentenceTransformer`` or a
    :class:`~hf_qret.serving.sentence_encoder.SentenceEncoder` (possibly wrapped by DDP / accelerate); ``({}, None)`` for a
    plain transformers encoder.

    Example:
        >>> class E5:
        ...     prompts, default_prompt_name = {"query": "query: ", "passage": "passage: "}, "query"
        >>> model_prompts(E5()), model_prompts(object())
        (({'query': 'query: ', 'passage': 'passage: '}, 'query'), ({}, None))
    """
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    model = getattr(model, "_orig_mod", model)
    prompts = getattr(model, "prompts", None)
    if not isinstance(prompts, Mapping):
        return {}, None
    return {str(k): "" if v is None else str(v) for k, v in prompts.items()}, getattr(
        model, "default_prompt_name", None
    )


def prompt_for(model: Any, role: str) -> str:
    """The prompt text ``model`` prefixes a ``role`` text with (``""``: none); see :func:`prompt_name_for`.

    Example:
        >>> class E5:  # any model with sentence-transformers' ``prompts`` / ``default_prompt_name``
        ...     prompts, default_prompt_name = {"query": "query: ", "document": "passage: "}, None
        >>> prompt_for(E5(), "query"), prompt_for(E5(), "document")
        ('query: ', 'passage: ')
    """
    prompts, default = model_prompts(model)
    name = prompt_name_for(prompts, default, role)
    return prompts.get(name, "") if name is not None else ""


def prompt_record(model: Any) -> dict[str, dict[str, str | None]]:
    """What ``qret_config.json`` records as ``"prompts"``: ``{role: {"name": name, "text": text}}`` for queries and
    documents (``name`` ``None`` and ``text`` ``""`` when no prompt applies).

    Example:
        >>> class E5:
        ...     prompts, default_prompt_name = {"query": "query: ", "passage": "passage: "}, None
        >>> prompt_record(E5())["document"]
        {'name': 'passage', 'text': 'passage: '}
    """
    prompts, default = model_prompts(model)
    record: dict[str, dict[str, str | None]] = {}
    for role in ROLES:
        name = prompt_name_for(prompts, default, role)
        record[role] = {"name": name, "text": prompts.get(name, "") if name is not None else ""}
    return record


def recorded_prompt(config: Mapping[str, Any] | None, role: str) -> str | None:
    """The ``role`` prompt text an artifact's ``qret_config.json`` records, or ``None`` when it records none (an
    artifact written before prompts were recorded: the encoder's own prompts apply).

    Example:
        >>> config = {"prompts": {"query": {"name": "query", "text": "query: "}, "document": {"name": None, "text": ""}}}
        >>> recorded_prompt(config, "query"), recorded_prompt(config, "document"), recorded_prompt({}, "query")
        ('query: ', '', None)
    """
    prompts = (config or {}).get("prompts")
    if not isinstance(prompts, Mapping) or not isinstance(prompts.get(role), Mapping):
        return None
    text = prompts[role].get("text")
    return "" if text is None else str(text)
