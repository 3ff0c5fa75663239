"""The quantized FAISS index: ``QuantizedIndex``, its factory strings, FAISS helpers, the mining shortlist,
trainable codebooks, quantizer distillation and the index miner.

Bottom layer with :mod:`hf_qret.bank.core`: imports neither training, hub nor evaluation.
"""
