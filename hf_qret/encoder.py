"""One way to run a query/document encoder, whether it is a sentence-transformers model or a plain transformers
``AutoModel``: tokenize (:func:`tokenize`), embed a tokenized batch with gradients (:func:`embed`), or encode texts
in batches without gradients (:func:`encode_texts`).

A plain transformers encoder is mean-pooled over its attention mask and L2-normalised, the recipe of
all-MiniLM-L6-v2 and most sentence embedding models.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["is_sentence_transformer", "tokenize", "embed", "encode_texts", "embedding_dim", "make_tokenize_fn"]


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP / accelerate / torch.compile wrappers
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def is_sentence_transformer(model: nn.Module) -> bool:
    """Whether ``model`` (possibly wrapped) is a ``sentence_transformers.SentenceTransformer``.

    Never imports sentence-transformers (it imports the training stack): a model can only be one once it is imported.
    """
    module = sys.modules.get("sentence_transformers")
    cls = getattr(module, "SentenceTransformer", None) if module is not None else None
    return cls is not None and isinstance(_unwrap(model), cls)


def _has_own_pipeline(model: nn.Module) -> bool:
    # A SentenceTransformer or a SentenceEncoder: tokenizes with ``preprocess`` and returns ``sentence_embedding``.
    from .sentence_encoder import SentenceEncoder

    return is_sentence_transformer(model) or isinstance(_unwrap(model), SentenceEncoder)


def make_tokenize_fn(model: nn.Module, tokenizer: Any = None, max_length: int | None = None) -> Callable[[list[str]], dict]:
    """A function that turns a list of texts into model inputs (tensors on the CPU)."""
    base = _unwrap(model)
    if _has_own_pipeline(base) and tokenizer is None:
        return lambda texts: base.preprocess(list(texts))
    if tokenizer is None:
        raise ValueError("a transformers encoder needs its tokenizer: pass processing_class=AutoTokenizer(...).")
    limit = max_length or min(getattr(tokenizer, "model_max_length", 512) or 512, 512)
    return lambda texts: tokenizer(list(texts), padding=True, truncation=True, max_length=limit, return_tensors="pt")


def tokenize(model: nn.Module, texts: Sequence[str], tokenizer: Any = None, max_length: int | None = None) -> dict:
    """Tokenizes ``texts`` for ``model``."""
    return make_tokenize_fn(model, tokenizer, max_length)(list(texts))


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def embed(model: nn.Module, features: dict[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
    """Embeds a tokenized batch (keeps the autograd graph).

    A sentence-transformers model returns its own ``sentence_embedding`` (its modules decide pooling and
    normalisation); any other encoder is mean-pooled and, when ``normalize``, L2-normalised.
    """
    if _has_own_pipeline(model):
        return model(dict(features))["sentence_embedding"]
    accepted = {k: v for k, v in features.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    output = model(**accepted)
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    pooled = _mean_pool(hidden, features["attention_mask"])
    return nn.functional.normalize(pooled, dim=-1) if normalize else pooled


def embedding_dim(model: nn.Module) -> int:
    """The dimension of ``model``'s embeddings."""
    base = _unwrap(model)
    if _has_own_pipeline(base):
        getter = getattr(base, "get_embedding_dimension", None) or base.get_sentence_embedding_dimension
        return int(getter())
    return int(base.config.hidden_size)


@torch.no_grad()
def encode_texts(
    model: nn.Module,
    texts: Sequence[str],
    batch_size: int = 64,
    tokenizer: Any = None,
    max_length: int | None = None,
    show_progress_bar: bool = False,
    desc: str = "Encoding",
) -> np.ndarray:
    """Encodes ``texts`` in batches without gradients, longest first for little padding.

    Returns:
        ``(len(texts), dim)`` float32 embeddings in the order of ``texts``.

    Example:
        >>> emb = encode_texts(model, ["a claim", "another claim"])  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    texts = list(texts)
    base = _unwrap(model)
    if not texts:
        return np.zeros((0, embedding_dim(base)), dtype=np.float32)
    was_training = base.training
    base.eval()
    device = next(base.parameters()).device
    to_tokens = make_tokenize_fn(base, tokenizer, max_length)
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), embedding_dim(base)), dtype=np.float32)
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not show_progress_bar):
            rows = order[start : start + batch_size]
            features = to_tokens([texts[i] for i in rows])
            features = {k: v.to(device) if torch.is_tensor(v) else v for k, v in features.items()}
            out[rows] = embed(base, features).float().cpu().numpy()
    finally:
        base.train(was_training)
    return out
