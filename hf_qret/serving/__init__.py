"""Serving: ``QuantizedRetriever``, the artifact on disk, encoding (pooling, similarity) and the
sentence-transformers-style encoder.

Never imports :mod:`hf_qret.training` (enforced by import-linter): ``from hf_qret import QuantizedRetriever``
must not load the training stack. Keep this ``__init__`` free of imports.
"""
