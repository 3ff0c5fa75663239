"""The target bank: the trainable document rows (``TargetBank``), how they are stored (fp32/bf16/fp16,
memory-mapped files, chunked I/O) and their pretrained values (``InitialRows``). :func:`build_bank` makes a bank
from a :class:`BankSpec` and a source (:class:`EncodeSource`, :class:`FileSource`, :class:`CacheSource`).

Bottom layer with :mod:`hf_qret.index.core`: imports neither training, hub nor evaluation.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Names importable from ``hf_qret.bank`` and their module, loaded on first use: importing the package (as
#: ``hf_qret.bank.uneven``'s users do) loads nothing else.
_EXPORTS = {
    name: "build" for name in ("BankSource", "BankSpec", "CacheSource", "EncodeSource", "FileSource", "build_bank")
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
