"""The target bank: the trainable document rows (``TargetBank``), how they are stored (fp32/bf16/fp16,
memory-mapped files, chunked I/O) and their pretrained values (``InitialRows``). :func:`build_bank` makes a bank
from a :class:`BankSpec` and a source (:class:`EncodeSource`, :class:`FileSource`, :class:`CacheSource`).

Bottom layer with :mod:`hf_qret.index.core`: imports neither training, hub nor evaluation.
"""

from .build import BankSource, BankSpec, CacheSource, EncodeSource, FileSource, build_bank

__all__ = ["BankSource", "BankSpec", "CacheSource", "EncodeSource", "FileSource", "build_bank"]
