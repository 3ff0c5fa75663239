"""A sentence-transformers model folder run with plain transformers, for serving without the training stack.

``import sentence_transformers`` imports its trainers and with them ``transformers.Trainer``, datasets, accelerate
and peft (17 s on 2 cores). A served artifact's encoder is almost always the three modules hf-qret trains
(``Transformer`` -> ``Pooling`` -> optional ``Normalize``): :class:`SentenceEncoder` reads that folder with
``AutoModel`` / ``AutoTokenizer`` and pools as sentence-transformers does (same tokenization, same embeddings, tested
against ``SentenceTransformer``). :func:`load_encoder` falls back to ``SentenceTransformer`` for anything else
(extra modules such as ``Dense``, a peft adapter, other pooling modes).

Pooling, normalisation and prompts are :mod:`hf_qret.serving.embedding`'s, the functions training uses too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ArtifactError
from .embedding import POOLING_MODES, pool

__all__ = ["SentenceEncoder", "load_encoder", "pooled_sentence_transformer", "write_sentence_transformer_modules"]

_POOLING_MODES = POOLING_MODES
_OLD_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}
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
    modality = settings.get(
        "modality_config", {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}
    )
    text = modality.get("text") if isinstance(modality, dict) else None
    if task != "feature-extraction" or set(modality) != {"text"} or not isinstance(text, dict):
        return None
    if text.get("method", "forward") != "forward" or text.get("method_output_name") != "last_hidden_state":
        return None
    if settings.get("module_output_name", "token_embeddings") != "token_embeddings":
        return None
    pooling_config = _read(folder / str(modules[1].get("path") or "") / "config.json")
    pooling = _pooling_mode(pooling_config)
    if pooling is None or pooling_config.get("include_prompt", True) is False:
        return None  # prompt tokens left out of the pooling: sentence-transformers' prompt_length handling
    st_config = _read(folder / "config_sentence_transformers.json")
    similarity = st_config.get("similarity_fn_name") or "cosine"
    if similarity not in ("cosine", "dot"):
        return None
    prompts = st_config.get("prompts")
    return {
        "path": transformer_dir,
        "pooling": pooling,
        # hf-qret's rule (hf_qret.serving.encoder.embed): a cosine model's embeddings are unit vectors, Normalize or not
        "normalize": kinds[-1] == "Normalize" or similarity == "cosine",
        "max_seq_length": settings.get("max_seq_length"),
        "do_lower_case": bool(settings.get("do_lower_case", False)),
        "prompts": {str(k): "" if v is None else str(v) for k, v in prompts.items()}
        if isinstance(prompts, dict)
        else {},
        "default_prompt_name": st_config.get("default_prompt_name"),
    }


class SentenceEncoder(nn.Module):
    """A transformers encoder with the pooling (mean, CLS or max), normalisation and prompts of a
    sentence-transformers folder: embeddings equal to ``SentenceTransformer(folder)``'s (``encode_query`` /
    ``encode_document``'s with prompts), without importing sentence-transformers.

    A folder whose ``similarity_fn_name`` is cosine is L2-normalised even without a ``Normalize`` module: hf-qret
    trains and indexes a cosine model's unit vectors (:func:`hf_qret.serving.encoder.embed`), whose inner products are the
    model's cosine scores.

    Args:
        model: The transformers ``AutoModel``.
        tokenizer: Its tokenizer.
        pooling: ``"mean"``, ``"cls"`` or ``"max"`` over the attention mask.
        normalize: L2-normalise the pooled embedding.
        max_seq_length: Truncation length (default: the tokenizer's ``model_max_length``).
        do_lower_case: Lower-case texts before tokenizing.
        prompts: Prompt name to text, as sentence-transformers' ``model.prompts``
            (:func:`hf_qret.serving.embedding.prompt_for` picks the query and document prompts).
        default_prompt_name: The prompt used when no query / document prompt name is defined.

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
        prompts: dict[str, str] | None = None,
        default_prompt_name: str | None = None,
    ) -> None:
        super().__init__()
        if pooling not in _POOLING_MODES:
            raise ValueError(f"pooling must be one of {_POOLING_MODES}, got {pooling!r}.")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.do_lower_case = do_lower_case
        self.prompts = dict(prompts or {})
        self.default_prompt_name = default_prompt_name
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
        encoder = cls(
            model,
            tokenizer,
            layout["pooling"],
            layout["normalize"],
            layout["max_seq_length"],
            layout["do_lower_case"],
            prompts=layout["prompts"],
            default_prompt_name=layout["default_prompt_name"],
        )
        encoder.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return encoder.eval()

    @property
    def device(self) -> torch.device:
        """The device of the encoder's weights."""
        return next(self.parameters()).device

    def get_sentence_embedding_dimension(self) -> int:
        """The dimension of the embeddings."""
        return int(self.model.config.hidden_size)

    def preprocess(self, texts: Sequence[str], prompt: str | None = None) -> dict[str, torch.Tensor]:
        """Tokenizes ``texts`` as sentence-transformers does (``prompt`` prepended, padded, truncated to
        ``max_seq_length``)."""
        cleaned = [(prompt or "") + str(text).strip() for text in texts]
        if self.do_lower_case:
            cleaned = [text.lower() for text in cleaned]
        return self.tokenizer(
            cleaned, padding=True, truncation="longest_first", max_length=self.max_seq_length, return_tensors="pt"
        )

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"sentence_embedding": (batch, dim), "token_embeddings": ...}`` of a tokenized batch."""
        inputs = {k: v for k, v in features.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        hidden = self.model(**inputs, return_dict=True).last_hidden_state
        pooled = pool(hidden, features["attention_mask"], self.pooling, self.normalize)
        return {"sentence_embedding": pooled, "token_embeddings": hidden}

    def encode(self, texts: Sequence[str], batch_size: int = 64, role: str | None = None) -> Any:
        """``(len(texts), dim)`` float32 numpy embeddings (see :func:`hf_qret.serving.encoder.encode_texts`); ``role``
        ``"query"`` / ``"document"`` prepends the prompt ``encode_query`` / ``encode_document`` would."""
        from .encoder import encode_texts

        return encode_texts(self, list(texts), batch_size=batch_size, role=role)


def load_encoder(
    folder: str | os.PathLike,
    device: str | None = None,
    what: str = "query encoder",
    pooling: str | None = None,
    *,
    trainable: bool = False,
) -> nn.Module:
    """The one place a folder (or model name) becomes an encoder, for serving, training and resuming.

    Serving (the default): a :class:`SentenceEncoder` when it implements the folder's modules, else a
    ``SentenceTransformer`` (safetensors only, no network). A plain transformers folder (no ``modules.json``) is
    pooled with ``pooling`` (``"cls"``; ``None`` or ``"mean"``: mean pooling, as sentence-transformers loads such a
    folder) and L2-normalised, exactly as :func:`hf_qret.serving.encoder.embed` encoded its bank
    (``qret_config.json`` records the pooling).

    Training (``trainable=True``): always a ``SentenceTransformer`` (what the trainer trains), from a folder or a
    Hub model name. ``pooling`` (``--pooling mean|cls``) applies to a plain transformers folder only, which becomes
    Transformer + Pooling(``pooling``) + Normalize (:func:`pooled_sentence_transformer`); a sentence-transformers
    folder pools with its own modules. Loading errors (``OSError``, ``ValueError``) are raised as they come.

    Args:
        folder: The model folder (or, with ``trainable``, a Hub model name).
        device: Torch device (default: CUDA when available).
        what: What the folder holds, for error messages (``"query encoder"``, ``"document encoder"``).
        pooling: Pooling of a plain transformers folder (``"mean"`` or ``"cls"``).
        trainable: Load a ``SentenceTransformer`` to train (see above).

    Raises:
        ArtifactError: Serving: the folder's encoder cannot be loaded.
        ConfigError: Training: ``pooling`` given for a sentence-transformers folder (or not a local folder).

    Example:
        >>> model = load_encoder("runs/scifact")  # doctest: +SKIP
        >>> model = load_encoder("path/to/bert", "cpu", pooling="cls", trainable=True)  # doctest: +SKIP
    """
    if trainable:
        return _load_trainable(str(folder), device, pooling)
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
        return SentenceTransformer(
            str(folder), device=device, local_files_only=True, model_kwargs={"use_safetensors": True}
        )
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise cannot_load(exc) from None


def _load_trainable(model_path: str, device: str | None, pooling: str | None) -> nn.Module:
    from sentence_transformers import SentenceTransformer

    from ..errors import ConfigError

    if pooling is None:
        return SentenceTransformer(model_path, device=device)
    if not os.path.isdir(model_path) or os.path.isfile(os.path.join(model_path, "modules.json")):
        raise ConfigError(
            f"--pooling {pooling} applies to a plain transformers model folder; {model_path!r} is a "
            "sentence-transformers model (or not a local folder), whose own Pooling module decides: drop --pooling."
        )
    return pooled_sentence_transformer(model_path, pooling, device)


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


def write_sentence_transformer_modules(
    folder: str | os.PathLike, pooling: str = "mean", normalize: bool = True, max_seq_length: int | None = None
) -> None:
    """Makes a saved plain transformers model folder a sentence-transformers folder (Transformer → Pooling →
    Normalize): writes ``modules.json``, ``sentence_bert_config.json``, ``1_Pooling/`` and, when ``normalize``,
    ``2_Normalize/``, next to the model's own files, without importing sentence-transformers.

    Then ``SentenceTransformer(folder)`` (and :class:`SentenceEncoder`) embed as hf-qret trained the plain encoder
    (``pooling``, unit vectors), instead of sentence-transformers' default for a plain folder (mean pooling, no
    normalisation). A folder that already has ``modules.json`` is left alone.

    Example:
        >>> write_sentence_transformer_modules("runs/plain-bert", "cls")  # doctest: +SKIP
    """
    folder = Path(folder)
    if (folder / "modules.json").is_file():
        return
    if pooling not in _POOLING_MODES:
        raise ValueError(f"pooling must be one of {_POOLING_MODES}, got {pooling!r}.")
    config = _read(folder / "config.json")
    dim = config.get("hidden_size") or config.get("dim") or config.get("d_model")

    def write(path: Path, content: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    settings: dict[str, Any] = {
        "transformer_task": "feature-extraction",
        "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        "module_output_name": "token_embeddings",
    }
    if max_seq_length:
        settings["max_seq_length"] = int(max_seq_length)
    write(folder / "sentence_bert_config.json", settings)
    write(
        folder / "1_Pooling" / "config.json",
        {"embedding_dimension": dim, "pooling_mode": pooling, "include_prompt": True},
    )
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
        },
    ]
    if normalize:
        write(
            folder / "2_Normalize" / "config.json",
            {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"},
        )
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.base.modules.normalize.Normalize",
            }
        )
    if not (folder / "config_sentence_transformers.json").is_file():
        write(
            folder / "config_sentence_transformers.json",
            {"model_type": "SentenceTransformer", "prompts": {}, "default_prompt_name": None,
             "similarity_fn_name": "cosine" if normalize else "dot"},
        )  # fmt: skip
    write(folder / "modules.json", modules)  # last: a folder with modules.json is complete
