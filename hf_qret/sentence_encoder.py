"""A sentence-transformers model folder run with plain transformers, for serving without the training stack.

``import sentence_transformers`` imports its trainers and with them ``transformers.Trainer``, datasets, accelerate
and peft (17 s on 2 cores). A served artifact's encoder is almost always the three modules hf-qret trains
(``Transformer`` -> ``Pooling`` -> optional ``Normalize``): :class:`SentenceEncoder` reads that folder with
``AutoModel`` / ``AutoTokenizer`` and pools as sentence-transformers does (same tokenization, same embeddings, tested
against ``SentenceTransformer``). :func:`load_encoder` falls back to ``SentenceTransformer`` for anything else
(extra modules such as ``Dense``, a peft adapter, other pooling modes).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ArtifactError

__all__ = ["SentenceEncoder", "load_encoder", "pooled_sentence_transformer"]

_POOLING_MODES = ("mean", "cls", "max")
_OLD_POOLING_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}
_OTHER_OLD_POOLING_KEYS = (
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
)


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _pooling_mode(config: dict[str, Any]) -> str | None:
    """``"mean"`` / ``"cls"`` / ``"max"`` from a ``Pooling`` config (sentence-transformers 2-6 formats), else None."""
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        return mode if isinstance(mode, str) and mode in _POOLING_MODES else None
    chosen = [mode for key, mode in _OLD_POOLING_KEYS.items() if config.get(key)]
    if len(chosen) != 1 or any(config.get(key) for key in _OTHER_OLD_POOLING_KEYS):
        return None
    return chosen[0]


def _folder_layout(folder: Path) -> dict[str, Any] | None:
    """What :class:`SentenceEncoder` needs from a sentence-transformers folder, or ``None`` when the folder has a
    module it does not implement."""
    if (folder / "adapter_config.json").is_file():
        return None
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return None
    try:
        modules = json.loads(modules_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(modules, list) or not modules:
        return None
    kinds = [str(module.get("type", "")).rsplit(".", 1)[-1] for module in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        return None
    transformer_dir = folder / str(modules[0].get("path") or "")
    settings = _read(transformer_dir / "sentence_bert_config.json")
    task = settings.get("transformer_task", "feature-extraction")
    modality = settings.get("modality_config", {"text": {"method": "forward", "method_output_name": "last_hidden_state"}})
    text = modality.get("text") if isinstance(modality, dict) else None
    if task != "feature-extraction" or set(modality) != {"text"} or not isinstance(text, dict):
        return None
    if text.get("method", "forward") != "forward" or text.get("method_output_name") != "last_hidden_state":
        return None
    if settings.get("module_output_name", "token_embeddings") != "token_embeddings":
        return None
    pooling = _pooling_mode(_read(folder / str(modules[1].get("path") or "") / "config.json"))
    if pooling is None:
        return None
    return {
        "path": transformer_dir,
        "pooling": pooling,
        "normalize": kinds[-1] == "Normalize",
        "max_seq_length": settings.get("max_seq_length"),
        "do_lower_case": bool(settings.get("do_lower_case", False)),
    }


class SentenceEncoder(nn.Module):
    """A transformers encoder with the pooling (mean, CLS or max) and normalisation of a sentence-transformers
    folder: embeddings equal to ``SentenceTransformer(folder)``'s, without importing sentence-transformers.

    Args:
        model: The transformers ``AutoModel``.
        tokenizer: Its tokenizer.
        pooling: ``"mean"``, ``"cls"`` or ``"max"`` over the attention mask.
        normalize: L2-normalise the pooled embedding.
        max_seq_length: Truncation length (default: the tokenizer's ``model_max_length``).
        do_lower_case: Lower-case texts before tokenizing.

    Example:
        >>> encoder = SentenceEncoder.from_folder("runs/scifact")  # doctest: +SKIP
        >>> encoder.encode(["a claim"]).shape  # doctest: +SKIP
        (1, 384)
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        pooling: str = "mean",
        normalize: bool = True,
        max_seq_length: int | None = None,
        do_lower_case: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in _POOLING_MODES:
            raise ValueError(f"pooling must be one of {_POOLING_MODES}, got {pooling!r}.")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.do_lower_case = do_lower_case
        limit = max_seq_length or getattr(tokenizer, "model_max_length", None)
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if not limit or limit > 1_000_000:  # tokenizers without a limit report a huge sentinel
            limit = positions or 512
        self.max_seq_length = int(limit)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, device: str | torch.device | None = None) -> SentenceEncoder | None:
        """Loads a sentence-transformers folder (safetensors weights only, no network), or returns ``None`` when
        the folder has modules this class does not implement (use ``SentenceTransformer`` then)."""
        layout = _folder_layout(Path(folder))
        if layout is None:
            return None
        from transformers import AutoModel, AutoTokenizer

        path = str(layout["path"])
        model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        encoder = cls(model, tokenizer, layout["pooling"], layout["normalize"], layout["max_seq_length"], layout["do_lower_case"])
        encoder.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return encoder.eval()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def get_sentence_embedding_dimension(self) -> int:
        """The dimension of the embeddings."""
        return int(self.model.config.hidden_size)

    def preprocess(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenizes ``texts`` as sentence-transformers does (stripped, padded, truncated to ``max_seq_length``)."""
        cleaned = [str(text).strip() for text in texts]
        if self.do_lower_case:
            cleaned = [text.lower() for text in cleaned]
        return self.tokenizer(
            cleaned, padding=True, truncation="longest_first", max_length=self.max_seq_length, return_tensors="pt"
        )

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"sentence_embedding": (batch, dim), "token_embeddings": ...}`` of a tokenized batch."""
        inputs = {k: v for k, v in features.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        hidden = self.model(**inputs, return_dict=True).last_hidden_state
        mask = features["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "max":
            pooled = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
        else:
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2, dim=-1)
        return {"sentence_embedding": pooled, "token_embeddings": hidden}

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> Any:
        """``(len(texts), dim)`` float32 numpy embeddings (see :func:`hf_qret.encoder.encode_texts`)."""
        from .encoder import encode_texts

        return encode_texts(self, list(texts), batch_size=batch_size)


def load_encoder(
    folder: str | os.PathLike, device: str | None = None, what: str = "query encoder", pooling: str | None = None
) -> nn.Module:
    """The encoder of a sentence-transformers folder: a :class:`SentenceEncoder` when it implements the folder's
    modules, else a ``SentenceTransformer`` (safetensors only, no network).

    A plain transformers folder (no ``modules.json``) is pooled with ``pooling`` (``"cls"``; ``None`` or ``"mean"``:
    mean pooling, as sentence-transformers loads such a folder) and L2-normalised, exactly as
    :func:`hf_qret.encoder.embed` encoded its bank (``qret_config.json`` records the pooling).

    Raises:
        ArtifactError: The folder's encoder cannot be loaded.

    Example:
        >>> model = load_encoder("runs/scifact")  # doctest: +SKIP
    """
    folder = Path(folder)

    def cannot_load(exc: BaseException) -> ArtifactError:
        from .peft_utils import adapter_base_model

        base = adapter_base_model(folder)
        hint = f" (its adapter needs the base model {base!r})" if base else ""
        return ArtifactError(
            f"{folder}: the {what} cannot be loaded{hint} ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); re-create the artifact."
        )

    plain_pooling = pooling not in (None, "mean") and not (folder / "modules.json").is_file()
    try:
        encoder = None if plain_pooling else SentenceEncoder.from_folder(folder, device)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise cannot_load(exc) from None
    if encoder is not None:
        return encoder
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ArtifactError(
            f"{folder}: the {what} has sentence-transformers modules beyond Transformer/Pooling/Normalize (or a "
            f"peft adapter, or a plain transformers model pooled with {pooling!r}); install them with "
            "`pip install 'hf-qret[train]'`."
        ) from None
    safe = {"use_safetensors": True, "local_files_only": True}
    try:
        if plain_pooling:
            return pooled_sentence_transformer(str(folder), str(pooling), device, model_kwargs=safe)
        return SentenceTransformer(str(folder), device=device, local_files_only=True, model_kwargs={"use_safetensors": True})
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise cannot_load(exc) from None


def pooled_sentence_transformer(
    model_path: str, pooling: str, device: str | None = None, model_kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """A plain transformers model folder as a ``SentenceTransformer`` of Transformer → Pooling(``pooling``) →
    Normalize: what hf-qret trains and serves for a plain model (``--pooling mean|cls``).

    Example:
        >>> model = pooled_sentence_transformer("path/to/bert", "cls")  # doctest: +SKIP
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    transformer = Transformer(model_path, model_kwargs=model_kwargs)
    pool = Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)
    return SentenceTransformer(modules=[transformer, pool, Normalize()], device=device)
