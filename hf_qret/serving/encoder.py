"""One way to run a query/document encoder, whether it is a sentence-transformers model or a plain transformers
``AutoModel``: tokenize (:func:`tokenize`), embed a tokenized batch with gradients (:func:`embed`), or encode texts
in batches without gradients (:func:`encode_texts`).

A plain transformers encoder is pooled (``mean`` over its attention mask, the recipe of all-MiniLM-L6-v2 and most
sentence embedding models, or ``cls``: the first token; see :func:`set_pooling`) and L2-normalised.

Pooling and normalisation are :func:`hf_qret.serving.embedding.pool`, the function the serving encoder
(:class:`~hf_qret.serving.sentence_encoder.SentenceEncoder`) calls too. Texts are given a ``role`` (``"query"`` or
``"document"``): the model's prompt for that role (sentence-transformers v6's ``model.prompts``, as ``encode_query`` /
``encode_document`` choose it, :func:`hf_qret.serving.embedding.prompt_for`) is prepended before tokenization, in the
collator (queries), the bank's encoding (documents), the evaluators (queries) and the retriever.

How the embeddings are compared (:func:`similarity_function`) decides the loss's default scale
(:func:`resolve_scale`): unit-norm embeddings (cosine) get 20, dot-product models (TAS-B, Contriever,
``msmarco-*-dot``: ``similarity_fn_name="dot"`` and no ``Normalize`` module) get 1, the sentence-transformers
``MultipleNegativesRankingLoss`` conventions.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..options import ENCODE_PRECISIONS, POOLINGS
from .embedding import pool, prompt_for

__all__ = [
    "is_sentence_transformer",
    "tokenize",
    "embed",
    "encode_texts",
    "ENCODE_PRECISIONS",
    "encode_autocast_dtype",
    "resolved_precision",
    "embedding_dim",
    "make_tokenize_fn",
    "normalizes_embeddings",
    "plain_max_length",
    "POOLINGS",
    "set_pooling",
    "get_pooling",
    "configure_encoder",
    "similarity_function",
    "resolve_scale",
    "DEFAULT_SCALES",
]

#: The loss's default scale (inverse temperature) per similarity function (MultipleNegativesRankingLoss: 20 for
#: cosine scores, 1 for dot products).
DEFAULT_SCALES = {"cosine": 20.0, "dot": 1.0}
_POOLING_ATTR = "_hf_qret_pooling"


def encode_autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype :func:`encode_texts` uses for ``precision`` on ``device`` (``None``: plain float32).

    ``"auto"`` is bfloat16 where the hardware computes it natively (a CUDA GPU with bf16, or a CPU with AMX tiles such
    as Intel Sapphire Rapids, where all-MiniLM-L6-v2 encodes SciFact about 2.7x faster with embeddings at cosine
    0.9999 of float32's), else float32.

    Example:
        >>> encode_autocast_dtype("fp32", "cpu") is None
        True
        >>> encode_autocast_dtype("bf16", "cpu")
        torch.bfloat16
    """
    if precision not in ENCODE_PRECISIONS:
        raise ConfigError(f"unknown encoding precision {precision!r}; use one of {', '.join(ENCODE_PRECISIONS)}.")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    device_type = torch.device(device).type
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    if device_type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return torch.bfloat16 if amx is not None and amx() else None
    return None


def resolved_precision(precision: str, model: nn.Module) -> str:
    """``"bf16"`` or ``"fp32"``: what ``precision`` means for ``model`` on its device (qret_config's
    ``document_precision``, the precision :meth:`~hf_qret.QuantizedRetriever.add_documents` encodes in).

    Example:
        >>> resolved_precision("fp32", torch.nn.Linear(2, 2))
        'fp32'
    """
    device = next(model.parameters()).device
    return "bf16" if encode_autocast_dtype(precision, device) is torch.bfloat16 else "fp32"


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP / accelerate / torch.compile wrappers
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def is_sentence_transformer(model: nn.Module) -> bool:
    """Whether ``model`` (possibly wrapped) is a ``sentence_transformers.SentenceTransformer``.

    Never imports sentence-transformers (it imports the training stack): a model can only be one once it is imported.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))
        >>> is_sentence_transformer(model)
        False
    """
    module = sys.modules.get("sentence_transformers")
    cls = getattr(module, "SentenceTransformer", None) if module is not None else None
    return cls is not None and isinstance(_unwrap(model), cls)


def _has_own_pipeline(model: nn.Module) -> bool:
    # A SentenceTransformer or a SentenceEncoder: tokenizes with ``preprocess`` and returns ``sentence_embedding``.
    from .sentence_encoder import SentenceEncoder

    return is_sentence_transformer(model) or isinstance(_unwrap(model), SentenceEncoder)


def plain_max_length(tokenizer: Any, max_length: int | None = None) -> int:
    """The truncation length of a plain transformers encoder: ``max_length``, else the tokenizer's
    ``model_max_length`` capped at 512.

    Example:
        >>> from types import SimpleNamespace
        >>> tokenizer = SimpleNamespace(model_max_length=int(1e30))  # what transformers sets when it knows no limit
        >>> plain_max_length(tokenizer), plain_max_length(tokenizer, max_length=256)
        (512, 256)
    """
    return int(max_length or min(getattr(tokenizer, "model_max_length", 512) or 512, 512))


def _prompt_text(model: nn.Module, role: str | None, prompt: str | None) -> str:
    if prompt is not None:
        return str(prompt)
    return prompt_for(model, role) if role is not None else ""


def make_tokenize_fn(
    model: nn.Module,
    tokenizer: Any = None,
    max_length: int | None = None,
    *,
    role: str | None = None,
    prompt: str | None = None,
) -> Callable[[list[str]], dict]:
    """A function that turns a list of texts into model inputs (tensors on the CPU).

    Args:
        model: A ``SentenceTransformer``, a :class:`~hf_qret.serving.sentence_encoder.SentenceEncoder` or a transformers
            encoder.
        tokenizer: A transformers encoder's tokenizer.
        max_length: A transformers encoder's truncation length (default: :func:`plain_max_length`).
        role: ``"query"`` or ``"document"``: prepend the model's prompt for that role
            (:func:`hf_qret.serving.embedding.prompt_for`); ``None``: no prompt.
        prompt: An explicit prompt text, instead of the model's (``""``: none).

    Example:
        >>> to_tokens = make_tokenize_fn(model, role="query")  # doctest: +SKIP
        >>> batch = to_tokens(["does aspirin prevent stroke?"])  # doctest: +SKIP
    """
    base = _unwrap(model)
    text_prompt = _prompt_text(base, role, prompt)
    if _has_own_pipeline(base) and tokenizer is None:
        if text_prompt:
            return lambda texts: base.preprocess(list(texts), prompt=text_prompt)
        return lambda texts: base.preprocess(list(texts))
    if tokenizer is None:
        raise ValueError("a transformers encoder needs its tokenizer: pass processing_class=AutoTokenizer(...).")
    limit = plain_max_length(tokenizer, max_length)
    return lambda texts: tokenizer(
        [text_prompt + str(t) for t in texts], padding=True, truncation=True, max_length=limit, return_tensors="pt"
    )


def tokenize(
    model: nn.Module,
    texts: Sequence[str],
    tokenizer: Any = None,
    max_length: int | None = None,
    *,
    role: str | None = None,
    prompt: str | None = None,
) -> dict:
    """Tokenizes ``texts`` for ``model`` (with the ``role``'s prompt; see :func:`make_tokenize_fn`).

    Example:
        >>> batch = tokenize(model, ["does aspirin prevent stroke?"], tokenizer, role="query")  # doctest: +SKIP
        >>> sorted(batch)  # doctest: +SKIP
        ['attention_mask', 'input_ids', 'token_type_ids']
    """
    return make_tokenize_fn(model, tokenizer, max_length, role=role, prompt=prompt)(list(texts))


def set_pooling(model: nn.Module, pooling: str) -> None:
    """Chooses how a plain transformers encoder pools its token states: ``"mean"`` (default) or ``"cls"``.

    Set it before encoding the bank: :func:`embed` and :func:`encode_texts` (the bank, the evaluator, the
    retriever) read it from the model. A sentence-transformers model's own ``Pooling`` module decides instead.

    Raises:
        ConfigError: an unknown pooling, or a sentence-transformers model.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))
        >>> set_pooling(model, "cls")
        >>> get_pooling(model)
        'cls'
    """
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}.")
    if is_sentence_transformer(model):
        raise ConfigError(
            "pooling applies to plain transformers encoders; a SentenceTransformer pools with its own Pooling "
            "module (build it with Pooling(dim, pooling_mode='cls') instead)."
        )
    setattr(_unwrap(model), _POOLING_ATTR, pooling)


def get_pooling(model: nn.Module) -> str | None:
    """The pooling of a plain transformers encoder (``"mean"`` unless :func:`set_pooling` chose another);
    ``None`` for a sentence-transformers model.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))
        >>> get_pooling(model)
        'mean'
    """
    base = _unwrap(model)
    if is_sentence_transformer(base):
        return None
    return getattr(base, _POOLING_ATTR, "mean")


def configure_encoder(model: nn.Module, pooling: str | None = None) -> None:
    """Prepares ``model`` for training and serving, before anything is encoded: checks that its similarity is one
    hf-qret trains for, applies ``pooling`` (``None``: keep the model's) to a plain transformers encoder, and gives a
    cosine sentence-transformers model without a ``Normalize`` module one, so the model itself returns the unit
    vectors hf-qret trains and indexes (a saved artifact then carries the ``Normalize`` module and
    ``SentenceTransformer(OUT).encode`` returns the vectors the retriever serves). What
    :class:`~hf_qret.training.trainer.QRetTrainer` does with ``args.pooling``; calling it again changes nothing.

    Raises:
        ConfigError: a euclidean/manhattan model, ``pooling`` given for a sentence-transformers model, or a
            ``pooling`` other than the one :func:`set_pooling` already chose (the bank was encoded with that one).

    Example:
        >>> configure_encoder(model, "cls")  # doctest: +SKIP
    """
    similarity = similarity_function(model)
    base = _unwrap(model)
    if is_sentence_transformer(base) and similarity == "cosine" and not _has_normalize(base):
        from sentence_transformers.sentence_transformer.modules import Normalize

        base.append(Normalize())
    if pooling is None:
        return
    chosen = getattr(base, _POOLING_ATTR, None)
    if chosen is not None and chosen != pooling and not is_sentence_transformer(model):
        raise ConfigError(
            f"pooling {pooling!r} differs from the {chosen!r} pooling set on the model with set_pooling (the bank "
            "was presumably encoded with it); pass the same pooling to both."
        )
    set_pooling(model, pooling)


def _has_normalize(model: nn.Module) -> bool:
    return any(type(module).__name__ == "Normalize" for module in model.children())


def _normalizes_output(model: nn.Module) -> bool:
    """Whether :func:`embed` must L2-normalise a sentence-transformers model's output: its similarity is cosine
    but no ``Normalize`` module does it (dot products of unit vectors are then its cosine scores)."""
    return not _has_normalize(model) and similarity_function(model) == "cosine"


def normalizes_embeddings(model: nn.Module) -> bool:
    """Whether :func:`embed` returns unit vectors for ``model``: a cosine model (``Normalize`` module, cosine
    ``similarity_fn_name``, a plain transformers encoder) does, a dot-product model does not.

    Example:
        >>> normalizes_embeddings(model)  # doctest: +SKIP
        True
    """
    base = _unwrap(model)
    from .sentence_encoder import SentenceEncoder

    if isinstance(base, SentenceEncoder):
        return bool(base.normalize)
    return similarity_function(base) == "cosine"


def similarity_function(model: nn.Module) -> str:
    """How ``model``'s embeddings (as :func:`embed` returns them) are compared: ``"cosine"`` or ``"dot"``.

    ``"cosine"``: the embeddings are unit-norm (a ``Normalize`` module, a plain transformers encoder, or a
    sentence-transformers model whose ``similarity_fn_name`` is cosine, which :func:`embed` normalises).
    ``"dot"``: a sentence-transformers model with ``similarity_fn_name="dot"`` and no ``Normalize`` module (TAS-B,
    Contriever, ``msmarco-*-dot``): raw dot products, the norms carry signal.

    Raises:
        ConfigError: the model's similarity is euclidean or manhattan (the quantized index scores inner products).

    Example:
        >>> similarity_function(model)  # doctest: +SKIP
        'cosine'
    """
    base = _unwrap(model)
    if not is_sentence_transformer(base):
        return "cosine"
    if _has_normalize(base):
        return "cosine"  # unit vectors: dot product == cosine, whatever similarity_fn_name says
    name = getattr(base, "_similarity_fn_name", None) or "cosine"  # sentence-transformers' own default
    name = getattr(name, "value", name)
    if name in ("cosine", "dot"):
        return name
    raise ConfigError(
        f"the model's similarity_fn_name is {name!r}; hf-qret trains for an inner-product index, so it supports "
        "'cosine' and 'dot' models only (set model.similarity_fn_name to one of them)."
    )


def resolve_scale(model: nn.Module, scale: float | None) -> float:
    """The loss's scale (inverse temperature): ``scale`` when given, else 20 for cosine models and 1 for
    dot-product models (see :data:`DEFAULT_SCALES`).

    Example:
        >>> resolve_scale(model, None)  # doctest: +SKIP
        20.0
    """
    if scale is not None:
        if float(scale) <= 0:
            raise ConfigError(f"scale must be > 0, got {scale}.")
        return float(scale)
    return DEFAULT_SCALES[similarity_function(model)]


def embed(model: nn.Module, features: dict[str, torch.Tensor], normalize: bool | None = None) -> torch.Tensor:
    """Embeds a tokenized batch (keeps the autograd graph): the one embedding function of training and serving.

    A sentence-transformers model (or a :class:`~hf_qret.serving.sentence_encoder.SentenceEncoder`) returns its own
    ``sentence_embedding``; any other encoder is pooled as :func:`set_pooling` chose (``mean`` by default, or
    ``cls``) with :func:`hf_qret.serving.embedding.pool`, the pooling the serving encoder runs.

    Args:
        model: The encoder.
        features: A batch from :func:`tokenize` / :func:`make_tokenize_fn` (prompts are applied there).
        normalize: ``None``: the model's rule (:func:`normalizes_embeddings`: a cosine sentence-transformers model
            without a ``Normalize`` module and a plain encoder are L2-normalised, a dot-product model is not);
            ``True`` / ``False``: unit vectors / the model's raw output.

    Example:
        >>> vectors = embed(model, tokenize(model, ["a query"], role="query"))  # doctest: +SKIP
    """
    if _has_own_pipeline(model):
        embeddings = model(dict(features))["sentence_embedding"]
        base = _unwrap(model)
        if normalize is None:
            normalize = is_sentence_transformer(base) and _normalizes_output(base)
        elif normalize:  # unless the model already did
            from .sentence_encoder import SentenceEncoder

            normalize = not (_has_normalize(base) or (isinstance(base, SentenceEncoder) and base.normalize))
        return nn.functional.normalize(embeddings, p=2, dim=-1) if normalize else embeddings
    accepted = {k: v for k, v in features.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    output = model(**accepted)
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    return pool(hidden, features["attention_mask"], get_pooling(model) or "mean", normalize is not False)


def embedding_dim(model: nn.Module) -> int:
    """The dimension of ``model``'s embeddings.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))
        >>> embedding_dim(model)
        8
    """
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
    *,
    role: str | None = None,
    prompt: str | None = None,
    normalize: bool | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """Encodes ``texts`` in batches without gradients, longest first for little padding: :func:`tokenize` and
    :func:`embed`, the functions training uses.

    Args:
        model: The encoder.
        texts: The texts.
        batch_size: Texts per batch.
        tokenizer: A transformers encoder's tokenizer.
        max_length: A transformers encoder's truncation length.
        show_progress_bar: Show a progress bar.
        desc: Its label.
        role: ``"query"`` or ``"document"``: prepend the model's prompt for that role; ``None``: no prompt.
        prompt: An explicit prompt text instead of the model's.
        normalize: See :func:`embed`.
        precision: ``"fp32"``, ``"bf16"`` (the model runs under bfloat16 autocast) or ``"auto"``
            (:func:`encode_autocast_dtype`). The embeddings are float32 in every case.

    Returns:
        ``(len(texts), dim)`` float32 embeddings in the order of ``texts``.

    Example:
        >>> emb = encode_texts(model, ["a claim", "another claim"], role="document")  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    texts = list(texts)
    base = _unwrap(model)
    if not texts:
        return np.zeros((0, embedding_dim(base)), dtype=np.float32)
    was_training = base.training
    base.eval()
    device = next(base.parameters()).device
    to_tokens = make_tokenize_fn(base, tokenizer, max_length, role=role, prompt=prompt)
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), embedding_dim(base)), dtype=np.float32)
    autocast_dtype = encode_autocast_dtype(precision, device)
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not show_progress_bar):
            rows = order[start : start + batch_size]
            features = to_tokens([texts[i] for i in rows])
            features = {k: v.to(device) if torch.is_tensor(v) else v for k, v in features.items()}
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                embeddings = embed(base, features, normalize)
            out[rows] = embeddings.float().cpu().numpy()
    finally:
        base.train(was_training)
    return out
