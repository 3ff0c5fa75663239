"""PEFT (LoRA and other ``peft`` adapters) on the query encoder, trained together with the TargetBank.

A LoRA query encoder trains like a full one: :class:`~hf_qret.training.trainer.QRetTrainer` optimises the adapter weights
(the only encoder parameters with ``requires_grad``) and the bank; the base weights stay frozen.

Saving follows peft's conventions: ``trainer.save_model(OUT)`` writes ``adapter_config.json`` and
``adapter_model.safetensors`` (plus the sentence-transformers module files, the index, the doc-id map and the bank);
the adapter's ``base_model_name_or_path`` names the base model, which must be loadable where the artifact is used.
``trainer.save_merged_model(OUT)`` (:func:`save_merged`) merges the adapter into a copy of the encoder
(``merge_and_unload``) and writes a plain, self-contained artifact instead. ``SentenceTransformer(OUT)`` and
:meth:`hf_qret.QuantizedRetriever.from_pretrained` load both kinds (the first with the adapter attached).

Example:
    >>> from peft import LoraConfig
    >>> from hf_qret.serving.peft_utils import add_adapter
    >>> model = add_adapter(SentenceTransformer("all-MiniLM-L6-v2"), LoraConfig(r=8, lora_alpha=16))  # doctest: +SKIP
    >>> trainer = QRetTrainer(model, args, train_dataset=pairs, bank=bank)  # doctest: +SKIP
    >>> trainer.train(); trainer.save_model("out/lora"); trainer.save_merged_model("out/merged")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from .encoder import _unwrap, is_sentence_transformer

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "add_adapter",
    "transformer_module",
    "backbone",
    "has_adapter",
    "adapter_info",
    "merge_adapter",
    "load_adapter_weights",
    "adapter_base_model",
    "save_merged",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def transformer_module(model: nn.Module) -> nn.Module | None:
    """The sentence-transformers ``Transformer`` module of ``model`` (the first module holding a transformers
    model), or ``None`` for a plain transformers / peft model.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))
        >>> transformer_module(model) is None  # a plain transformers model
        True
        >>> type(transformer_module(SentenceTransformer("all-MiniLM-L6-v2"))).__name__  # doctest: +SKIP
        'Transformer'
    """
    base = _unwrap(model)
    if not is_sentence_transformer(base):
        return None
    for module in base.children():
        if hasattr(module, "auto_model") or "model" in module._modules:
            return module
    return None


def _backbone_attr(module: nn.Module) -> str:
    # sentence-transformers >= 6 keeps the transformers model in ``.model`` (``auto_model`` is a read-only alias);
    # older versions store it in ``.auto_model``.
    return "model" if "model" in module._modules else "auto_model"


def backbone(model: nn.Module) -> nn.Module:
    """The transformers (or ``peft.PeftModel``) backbone of an encoder: ``model[0].model`` for a
    SentenceTransformer, the (unwrapped) model itself otherwise.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))
        >>> backbone(model) is model
        True
    """
    module = transformer_module(model)
    if module is None:
        return _unwrap(model)
    return getattr(module, _backbone_attr(module))


def _default_config(**kwargs: Any):
    from peft import LoraConfig

    options = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1}
    options.update(kwargs)
    return LoraConfig(**options)


def add_adapter(model: nn.Module, peft_config: Any = None, **lora_kwargs: Any) -> nn.Module:
    """Attaches a fresh trainable ``peft`` adapter to a query encoder; only the adapter's weights stay trainable.

    Args:
        model: A ``SentenceTransformer`` (the adapter wraps its transformers backbone in place) or a transformers
            ``PreTrainedModel``.
        peft_config: Any ``peft.PeftConfig`` (``LoraConfig``, ``IA3Config``...). Default: ``LoraConfig(r=8,
            lora_alpha=16, lora_dropout=0.1, **lora_kwargs)`` on peft's default target modules of the architecture.
        **lora_kwargs: Options of the default ``LoraConfig`` (e.g. ``r=4, target_modules=["query", "value"]``).

    Returns:
        The SentenceTransformer itself, or the ``peft.PeftModel`` wrapping a transformers model (use the returned
        object: pass it to :class:`~hf_qret.training.trainer.QRetTrainer`).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))
        >>> lora = add_adapter(model, r=2, target_modules=["query", "value"])
        >>> type(lora).__name__, sum(p.numel() for p in lora.parameters() if p.requires_grad)
        ('PeftModel', 64)
    """
    from peft import get_peft_model

    if peft_config is None:
        peft_config = _default_config(**lora_kwargs)
    elif lora_kwargs:
        raise TypeError("pass either a peft config or LoRA keyword options, not both.")
    module = transformer_module(model)
    if module is None:
        return get_peft_model(_unwrap(model), peft_config)
    attr = _backbone_attr(module)
    setattr(module, attr, get_peft_model(getattr(module, attr), peft_config))
    return model


def _peft_model(model: nn.Module):
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    found = backbone(model)
    return found if isinstance(found, PeftModel) else None


def _tuner_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        return []
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, BaseTunerLayer):
                found.append((parent, name, child))
    return found


def has_adapter(model: nn.Module) -> bool:
    """Whether the encoder carries a peft adapter (a ``PeftModel`` backbone, or adapter layers injected by
    transformers' own peft integration, as when ``SentenceTransformer(OUT)`` loads an adapter artifact).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))
        >>> has_adapter(model), has_adapter(add_adapter(model, r=2, target_modules=["query"]))
        (False, True)
    """
    if _peft_model(model) is not None:
        return True
    return bool(getattr(backbone(model), "_hf_peft_config_loaded", False)) or bool(_tuner_layers(backbone(model)))


def adapter_info(model: nn.Module) -> dict[str, Any] | None:
    """What ``qret_config.json`` records about the encoder's adapter (``None`` without one).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))
        >>> adapter_info(model) is None
        True
        >>> adapter_info(add_adapter(model, r=2, target_modules=["query"]))["peft_type"]
        'LORA'
    """
    if not has_adapter(model):
        return None
    configs = getattr(backbone(model), "peft_config", None) or {}
    info: dict[str, Any] = {"merged": False}
    if configs:
        name, config = next(iter(configs.items()))
        info.update(
            name=name,
            peft_type=str(getattr(config.peft_type, "value", config.peft_type)),
            base_model_name_or_path=getattr(config, "base_model_name_or_path", None),
        )
        if hasattr(config, "r"):
            info["r"] = config.r
    return info


def merge_adapter(model: nn.Module) -> nn.Module:
    """Merges the adapter into the base weights and removes the adapter layers (peft's ``merge_and_unload``).

    Modifies ``model`` in place (see :func:`save_merged` to keep the trained adapter). Returns the
    SentenceTransformer itself, or the merged transformers model for a ``peft.PeftModel``. A model without an
    adapter is returned unchanged.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))
        >>> merged = merge_adapter(add_adapter(model, r=2, target_modules=["query"]))
        >>> type(merged).__name__, has_adapter(merged)
        ('BertModel', False)
    """
    module = transformer_module(model)
    found = _peft_model(model)
    if found is not None:
        merged = found.merge_and_unload()
        if module is None:
            return merged
        setattr(module, _backbone_attr(module), merged)
        return model
    target = backbone(model)
    for parent, name, layer in _tuner_layers(target):  # adapters injected by transformers' peft integration
        layer.merge()
        setattr(parent, name, layer.get_base_layer())
    if getattr(target, "_hf_peft_config_loaded", False):
        target._hf_peft_config_loaded = False
    if hasattr(target, "peft_config"):
        del target.peft_config
    return model


def load_adapter_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Loads ``adapter_model.safetensors`` from ``folder`` into the encoder's ``PeftModel`` (resuming a LoRA run).

    Example:
        >>> load_adapter_weights(trainer.model, "out/checkpoint-10")  # doctest: +SKIP
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    found = _peft_model(model)
    if found is None:
        raise ValueError("the encoder has no peft adapter to load weights into.")
    path = Path(folder) / ADAPTER_WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter weights; the checkpoint was not saved from a peft encoder.")
    device = next(found.parameters()).device
    result = set_peft_model_state_dict(found, load_file(str(path), device=str(device)))
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"{path}: adapter weights that this encoder does not have: {unexpected[:3]}...")


def adapter_base_model(folder: str | os.PathLike) -> str | None:
    """The ``base_model_name_or_path`` of the adapter saved in ``folder`` (``None`` when there is no adapter).

    Example:
        >>> adapter_base_model("out/lora")  # doctest: +SKIP
        'sentence-transformers/all-MiniLM-L6-v2'
        >>> adapter_base_model("no-such-folder") is None
        True
    """
    path = Path(folder) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def save_merged(trainer: Any, output_dir: str | os.PathLike | None = None) -> str:
    """Writes a self-contained artifact with the adapter merged into (a copy of) the encoder.

    The trainer's own encoder keeps its adapter (training can go on). ``SentenceTransformer(OUT)`` loads the result
    as a plain model; ``qret_config.json`` records ``"adapter": {..., "merged": true}``.

    Args:
        trainer: A :class:`~hf_qret.training.trainer.QRetTrainer`.
        output_dir: Where to write (default ``trainer.args.output_dir``).

    Returns:
        The output folder.

    Example:
        >>> save_merged(trainer, "out/merged")  # doctest: +SKIP
        'out/merged'
    """
    from .artifact import save_retrieval_files

    output_dir = str(output_dir if output_dir is not None else trainer.args.output_dir)
    if not trainer.args.should_save:
        return output_dir
    os.makedirs(output_dir, exist_ok=True)
    model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    info = adapter_info(model)
    merged = merge_adapter(copy.deepcopy(model))
    for parameter in merged.parameters():
        parameter.requires_grad_(True)
    if is_sentence_transformer(merged):
        merged.save_pretrained(output_dir)
    else:
        merged.save_pretrained(output_dir, safe_serialization=True)
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(output_dir)
    config = trainer.artifact_config()
    config["adapter"] = {**(info or {}), "merged": True} if info else None
    save_retrieval_files(output_dir, trainer.bank, trainer.index, config)
    return output_dir
